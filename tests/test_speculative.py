"""Speculative decoding is lossless: greedy output equals autoregressive output token for
token, sampled output follows the target's distribution, and the accept/reject rule is the
one of Section 1 of the spec.

Models are the tiny "near-bigram oracle" pairs of ``spec_models``: their drafts are often
accepted and often rejected, so both paths of every round run (each test asserts it).

Both verification paths are covered: dense fixed-length verification (scheduler 'fixed')
and the packed one of the static threshold ('threshold'); Algorithm 1 and its asynchronous
variant get a greedy-equality check.

Compilation dominates the runtime on CPU, so the greedy tests share one set of shapes
(batch of 8 prompts of <= 16 tokens, max_new_tokens <= 16, cache_len 48, trace on); each
(scheduler, head type, block size, EOS, cache length) still compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import draft as draft_model
from dspark_jax import speculative as spec
from dspark_jax.decoding import bucket, generate_ar, prepare_prompts
from dspark_jax.sampling import Sampling, distribution
from dspark_jax.speculative import accept_drafts, speculative_generate, verify_lengths
from dspark_jax.target import forward, init_cache
from spec_models import HEAD_TYPES, make_draft, make_pair, random_prompts

VOCAB = 32
K = 4  # the drafters' block size
BATCH = 8  # every greedy batch has 8 prompts: one batch bucket, one AR compile
MAX_NEW = 16
CACHE = 48  # >= 16 (prompt) + 16 (new) + K + 1
GREEDY_CONTEXT = 0.1  # target context strength for greedy tests (acceptance ~0.5-0.8)
SAMPLING_CONTEXT = 0.05  # for temperature 1 (acceptance ~0.3-0.65 with the drafts below)
CHI2_ALPHA = 1e-3  # significance level of every chi-square test here


@functools.lru_cache(maxsize=None)
def pair(head="vanilla", eos=None, context=GREEDY_CONTEXT, zero_mass_tokens=()):
    return make_pair(head, vocab=VOCAB, block_size=K, eos=eos, context=context, zero_mass_tokens=zero_mass_tokens)


def prompt_batch(seed):
    return random_prompts(BATCH, VOCAB, 1, 16, seed)


def run_spec(pr, prompts, *, block_size=None, threshold=0.0, max_new=MAX_NEW, cache_len=CACHE, seed=0, trace=True, **kw):
    return speculative_generate(
        pr.target, pr.tcfg, pr.draft, pr.dcfg, prompts,
        max_new_tokens=max_new, block_size=block_size, confidence_threshold=threshold,
        cache_len=cache_len, seed=seed, trace=trace, **kw,
    )


def run_ar(pr, prompts, *, max_new=MAX_NEW, cache_len=CACHE, **kw):
    return generate_ar(pr.target, pr.tcfg, prompts, max_new_tokens=max_new, cache_len=cache_len, **kw)


def check_stats_and_trace(res, max_new, eos_ids=()):
    """Statistics are consistent and each sample is re-derivable from its trace:
    [first token] + concat(proposed[:accepted] + [bonus]), cut at max_new_tokens / first EOS."""
    st = res.stats
    rounds = st["rounds"]
    assert rounds == sum(st["rounds_per_sample"]) == sum(len(t) for t in res.trace)
    assert st["tau"] == (st["accepted_tokens"] + rounds) / max(rounds, 1)
    for k, rate in enumerate(st["accept_rate_by_position"]):
        assert rate is None or 0.0 <= rate <= 1.0
        # position k is reached when offered with every earlier draft accepted
        reached = [r["accepted"] > k for t in res.trace for r in t if len(r["proposed"]) > k and r["accepted"] >= k]
        assert rate == (sum(reached) / len(reached) if reached else None)
    assert st["accepted_tokens"] == sum(r["accepted"] for t in res.trace for r in t)
    assert st["proposed_tokens"] == sum(len(r["proposed"]) for t in res.trace for r in t)
    for sample, rounds_b, n_rounds in zip(res.samples, res.trace, st["rounds_per_sample"]):
        assert len(rounds_b) == n_rounds
        derived = sample[:1]
        for r in rounds_b:
            assert 0 <= r["accepted"] <= len(r["proposed"]) <= res_block(res)
            derived += r["proposed"][: r["accepted"]] + [r["bonus"]]
        derived = derived[:max_new]
        for i, t in enumerate(derived):
            if t in eos_ids:
                derived = derived[: i + 1]
                break
        assert derived == sample


def res_block(res):
    return len(res.stats["accept_rate_by_position"])


# ---------------------------------------------------------------------------- greedy


def check_verified_lengths(res, block_size, scheduler, threshold):
    """Fixed-length verification offers block_size drafts every round; the threshold scheduler
    offers the longest prefix whose (STS temperature 1) confidences pass the threshold, read
    from the trace's confidence logits (the cache never caps a round in these tests)."""
    st = res.stats
    if scheduler == "fixed":
        assert st["proposed_tokens"] == block_size * st["rounds"]
        assert st["verified_tokens"] == (block_size + 1) * st["rounds"]
        return
    assert st["verified_tokens"] == st["proposed_tokens"] + st["rounds"]  # packed: l_b + 1 per round
    for rounds in res.trace:
        for r in rounds:
            confidence = np.asarray(jax.nn.sigmoid(jnp.asarray(r["confidence_logits"], jnp.float32)))
            assert len(r["proposed"]) == np.cumprod(confidence >= np.float32(threshold)).sum()
    if 0 < threshold < 1:
        assert 0 < st["proposed_tokens"] < block_size * st["rounds"]  # the threshold cuts, not always


# (scheduler, confidence threshold): the static threshold (packed verification) with a
# threshold that passes everything and one that cuts, and dense fixed-length verification
# (at the smallest and the full block only: each (scheduler, block size) is one compile)
def schedules(block_size):
    fixed = [("fixed", 0.0)] if block_size in (1, K) else []
    return [("threshold", 0.0), ("threshold", 0.5)] + fixed


@pytest.mark.parametrize("block_size", [1, 2, 3, 4])
def test_greedy_speculative_equals_autoregressive_for_every_block_size(block_size):
    pr = pair("vanilla")
    for seed in (0, 1):
        prompts = prompt_batch(seed)
        ar = run_ar(pr, prompts)
        for scheduler, threshold in schedules(block_size):
            res = run_spec(pr, prompts, block_size=block_size, threshold=threshold, scheduler=scheduler)
            assert res.samples == ar
            assert all(len(s) == MAX_NEW for s in res.samples)  # no EOS, roomy cache
            check_stats_and_trace(res, MAX_NEW)
            check_verified_lengths(res, block_size, scheduler, threshold)
            st = res.stats
            assert st["accepted_tokens"] > 0  # the oracle drafter's drafts do get accepted ...
            assert st["accepted_tokens"] < st["proposed_tokens"]  # ... and rejected


@pytest.mark.parametrize("head", [h for h in HEAD_TYPES if h != "vanilla"])
def test_greedy_speculative_equals_autoregressive_for_every_head_type(head):
    pr = pair(head)
    prompts = prompt_batch(2)
    ar = run_ar(pr, prompts)
    for threshold in (0.0, 0.5):
        res = run_spec(pr, prompts, threshold=threshold, scheduler="threshold")
        assert res.samples == ar
        check_stats_and_trace(res, MAX_NEW)
        check_verified_lengths(res, K, "threshold", threshold)
        assert res.stats["accepted_tokens"] > 0
        assert res.stats["accepted_tokens"] < res.stats["proposed_tokens"]


@pytest.mark.parametrize("scheduler", ["algorithm1", "async"])
def test_greedy_speculative_equals_autoregressive_for_budget_schedulers(scheduler):
    """Algorithm 1 and its asynchronous variant (default synthetic SPS profile) choose ragged
    lengths per request; greedy output still equals AR."""
    pr = pair("vanilla")
    prompts = prompt_batch(0)
    res = run_spec(pr, prompts, scheduler=scheduler)
    assert res.samples == run_ar(pr, prompts)
    check_stats_and_trace(res, MAX_NEW)
    st = res.stats
    assert st["verified_tokens"] == st["proposed_tokens"] + st["rounds"]
    assert 0 < st["accepted_tokens"] < st["proposed_tokens"] < K * st["rounds"]


@pytest.mark.parametrize("min_expected", [2.0, math.inf])
def test_runs_of_skips_as_ar_steps_equal_rounds_that_each_decide(min_expected):
    """``speculative_decode`` runs the budget schedulers branch-free (``decode_rounds``: each
    run of rounds known to skip drafting as AR steps, the drafted rounds without a cond):
    greedy, the same samples, statistics and trace as ``speculative_round`` deciding every
    round in a ``lax.cond``, with both drafted and skipped rounds."""
    pr = pair("vanilla")
    prompts = prompt_batch(0)
    run = spec.speculative_start(pr.target, pr.tcfg, pr.draft, pr.dcfg, prompts, max_new_tokens=MAX_NEW,
                                 cache_len=CACHE, trace=True, scheduler="algorithm1",
                                 min_expected_accept=min_expected)
    each = jax.jit(lambda s: spec.loop_until_done(
        functools.partial(spec.speculative_round, run.target, run.draft, scfg=run.scfg), s))(run.state)
    slow = run.result(each, trace=True)
    fast = run.result(spec.speculative_decode(run.target, run.draft, run.state, scfg=run.scfg), trace=True)
    assert fast.samples == slow.samples == run_ar(pr, prompts)
    assert fast.stats == slow.stats
    assert 0 < fast.stats["skipped_rounds"] < fast.stats["rounds"]  # drafted and skipped rounds
    confidences = lambda res: [[r.pop("confidence_logits") for r in rounds] for rounds in res.trace]
    fast_conf, slow_conf = confidences(fast), confidences(slow)
    assert fast.trace == slow.trace
    for a, b in zip(fast_conf, slow_conf):  # the drafter context: appended per run or per round
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)
    check_stats_and_trace(fast, MAX_NEW)


def first_eos_in_accepted_drafts(trace, samples, token):
    """Samples whose first occurrence of ``token`` (within MAX_NEW tokens) is committed as an
    accepted draft, not as a bonus."""
    hits = []
    for b, (rounds, sample) in enumerate(zip(trace, samples)):
        committed = 1
        if sample[0] == token:
            continue
        for r in rounds:
            segment = r["proposed"][: r["accepted"]] + [r["bonus"]]
            if token in segment:
                i = segment.index(token)
                if i < r["accepted"] and committed + i < MAX_NEW:
                    hits.append(b)
                break
            committed += len(segment)
    return hits


def test_greedy_stops_at_eos_inside_accepted_drafts():
    base = pair("vanilla")
    prompts = prompt_batch(0)
    # Pick as EOS the token that most often first appears as an accepted draft (greedy runs
    # are deterministic, so with it as EOS those samples stop inside an accepted block).
    res0 = run_spec(base, prompts)
    counts = {t: len(first_eos_in_accepted_drafts(res0.trace, res0.samples, t)) for t in range(VOCAB)}
    eos = max(counts, key=counts.get)
    assert counts[eos] >= 2

    pr = pair("vanilla", eos=eos)
    ar = run_ar(pr, prompts)
    res = run_spec(pr, prompts)
    assert res.samples == ar
    check_stats_and_trace(res, MAX_NEW, (eos,))
    ended = 0
    for sample, long_sample in zip(res.samples, res0.samples):
        if eos in long_sample:
            # the sample ends exactly at the first EOS: nothing after it is committed
            assert sample == long_sample[: long_sample.index(eos) + 1]
            ended += 1
        else:
            assert sample == long_sample
    assert ended >= 2
    hits = first_eos_in_accepted_drafts(res.trace, res.samples, eos)
    assert len(hits) >= 2
    for b in hits:
        last = res.trace[b][-1]
        # the EOS was an accepted draft of the last round, and the round had more to commit
        assert eos in last["proposed"][: last["accepted"]]
        assert res.samples[b][-1] == eos and eos not in res.samples[b][:-1]


@pytest.mark.parametrize("scheduler,threshold", [("fixed", 0.0), ("threshold", 0.5)])
def test_greedy_equal_to_autoregressive_when_the_cache_fills(scheduler, threshold):
    pr = pair("vanilla")
    prompts = prompt_batch(3)
    cache_len = 20  # a prompt of P > 5 tokens fills it after 21 - P < 16 new tokens
    ar = run_ar(pr, prompts, cache_len=cache_len)
    res = run_spec(pr, prompts, cache_len=cache_len, scheduler=scheduler, threshold=threshold)
    assert res.samples == ar
    limited = 0
    for prompt, sample in zip(prompts, res.samples):
        expected = min(MAX_NEW, cache_len - len(prompt) + 1)
        assert len(sample) == expected
        limited += expected < MAX_NEW
    assert limited >= 4
    check_stats_and_trace(res, MAX_NEW)
    assert res.stats["accepted_tokens"] > 0


@pytest.mark.parametrize("scheduler,threshold", [("fixed", 0.0), ("threshold", 0.5)])
def test_greedy_output_independent_of_batch_neighbours(scheduler, threshold):
    """Alone, in a ragged batch, and among other neighbours at another row: the same output
    (with the threshold scheduler all rows share one packed verification axis)."""
    pr = pair("vanilla")
    x = [5, 9, 2, 14, 7, 7, 3]
    others_a = random_prompts(BATCH - 1, VOCAB, 1, 16, 10)
    others_b = random_prompts(BATCH - 1, VOCAB, 1, 16, 11)
    run = functools.partial(run_spec, pr, scheduler=scheduler, threshold=threshold)
    alone = run([x]).samples[0]
    in_a = run(others_a[:3] + [x] + others_a[3:]).samples[3]
    in_b = run([x] + others_b).samples[0]
    assert alone == in_a == in_b
    assert len(alone) == MAX_NEW


# ---------------------------------------------------------------------------- sampling


def chi2_critical(df: int, alpha: float = CHI2_ALPHA) -> float:
    """Upper alpha quantile of chi-square(df): scipy when installed, else the Wilson-Hilferty
    approximation (relative error well under 1% for df >= 10 at alpha = 1e-3)."""
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1.0 - alpha, df))
    except ImportError:
        z = {1e-3: 3.090232306167813}[alpha]
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(counts, probs):
    """Pearson statistic and degrees of freedom, pooling cells with expected count < 5.
    Also fails outright if a zero-probability cell is observed."""
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    assert not np.any(counts[probs == 0] > 0), "a token of target probability 0 was generated"
    expected = counts.sum() * probs
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    return stat, int(keep.sum()) - 1


def assert_matches(counts, probs):
    stat, df = chi2_statistic(counts, probs)
    assert df >= 10
    assert stat < chi2_critical(df), f"chi2 = {stat:.1f} >= critical value {chi2_critical(df):.1f} (df {df})"


SAMPLING_PROMPT = [3, 17, 8, 25, 4, 11]
SAMPLING_ROWS = 4096


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _continuations(params, tokens, *, cfg, sampling):
    out, _ = forward(params, cfg, tokens, init_cache(cfg, tokens.shape[0], tokens.shape[1], params.embed.dtype))
    return distribution(out.logits, sampling)


def exact_joint_2_3(pr, sampling):
    """P(token #2 = b, token #3 = c) for SAMPLING_PROMPT under the target alone:
    sum_a p(a | prompt) p(b | prompt, a) p(c | prompt, a, b), by enumeration."""
    V, P = VOCAB, len(SAMPLING_PROMPT)
    seqs = np.array([SAMPLING_PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)
    d = np.asarray(_continuations(pr.target, jnp.asarray(seqs), cfg=pr.tcfg, sampling=sampling), np.float64)
    p1 = d[0, P - 1]
    p2 = d[::V, P]  # [a, b]
    p3 = d[:, P + 1].reshape(V, V, V)  # [a, b, c]
    return np.einsum("a,ab,abc->bc", p1, p2, p3)


def budget_profile(rows):
    """A cost curve under which Algorithm 1 admits drafts with survival above roughly 1/3 (a
    verification step costs 1 + B / (2 rows)), so admission really depends on the confidences."""
    from dspark_jax.schedule import linear_cost_profile

    return linear_cost_profile(rows * (K + 1), fixed=1.0, per_token=0.5 / rows)


@pytest.mark.parametrize(
    "top_k,zero_mass,threshold,scheduler",
    [(0, False, 0.0, None), (0, True, 0.0, None), (0, True, 0.5, None), (8, True, 0.0, None),
     (0, True, 0.0, "algorithm1"), (0, True, 0.0, "async")],
    ids=["plain", "draft-zero-mass", "draft-zero-mass-threshold", "top_k-draft-zero-mass",
         "algorithm1-draft-zero-mass", "async-draft-zero-mass"],
)
def test_speculative_sampling_matches_target_distribution(top_k, zero_mass, threshold, scheduler):
    sampling = Sampling(temperature=1.0, top_k=top_k)
    joint = exact_joint_2_3(pair("vanilla", context=SAMPLING_CONTEXT), sampling)
    zero = ()
    if zero_mass:  # q(x) = 0 exactly for the 3 tokens the target likes most at #2
        zero = tuple(int(t) for t in np.argsort(-joint.sum(1))[:3])
        assert joint.sum(1)[list(zero)].sum() > 0.15
    pr = pair("vanilla", context=SAMPLING_CONTEXT, zero_mass_tokens=zero)
    prompts = [SAMPLING_PROMPT] * SAMPLING_ROWS
    samples, accepted, proposed, rounds = [], 0, 0, 0
    for seed in (1, 2):
        res = run_spec(pr, prompts, max_new=4, cache_len=32, sampling=sampling, seed=seed, threshold=threshold,
                       trace=False, scheduler=scheduler, sps_profile=budget_profile(len(prompts)))
        samples += res.samples
        accepted += res.stats["accepted_tokens"]
        proposed += res.stats["proposed_tokens"]
        rounds += res.stats["rounds"]
    assert 0.2 < accepted / proposed < 0.9  # both the accept and the residual paths run often
    if scheduler is not None:  # the budget schedulers verified some drafts, not all
        assert 0 < proposed < rounds * K
    S = np.array(samples)
    assert S.shape == (2 * SAMPLING_ROWS, 4)
    if zero:  # the residual gives back the tokens the draft never proposes
        assert np.isin(S[:, 1], zero).mean() > 0.1
    assert_matches(np.bincount(S[:, 1], minlength=VOCAB), joint.sum(1))
    assert_matches(np.bincount(S[:, 2], minlength=VOCAB), joint.sum(0))
    assert_matches(np.bincount(S[:, 1] * VOCAB + S[:, 2], minlength=VOCAB * VOCAB), joint)


# ---------------------------------------------------------------------------- accept_drafts


_accept = jax.jit(accept_drafts, static_argnames=("sampling",))
T1 = Sampling(temperature=1.0)


def tile(a, n):
    a = jnp.asarray(a)
    return jnp.broadcast_to(a[None], (n,) + a.shape)


def run_accept(key, drafts, q, p, lengths, n, sampling=T1, logits=None):
    logits = jnp.log(jnp.asarray(p, jnp.float32)) if logits is None else jnp.asarray(logits, jnp.float32)
    out_n, bonus = _accept(
        key, tile(jnp.asarray(drafts, jnp.int32), n), tile(jnp.asarray(q, jnp.float32), n),
        tile(jnp.asarray(p, jnp.float32), n), tile(logits, n), jnp.full((n,), lengths, jnp.int32), sampling=sampling,
    )
    return np.asarray(out_n), np.asarray(bonus)


def closed_form(drafts, q, p, lengths):
    """Exact P(n = j, bonus = x): d_k accepted w.p. min(1, p_{k-1}(d_k) / q_k(d_k)) in order;
    the bonus after a rejection at k ~ norm(max(0, p_{k-1} - q_k)), after L accepts ~ p_L."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    V = p.shape[1]
    out = np.zeros((lengths + 1, V))
    reach = 1.0
    for j in range(lengths):
        a = min(1.0, p[j, drafts[j]] / q[j, drafts[j]])
        residual = np.maximum(p[j] - q[j], 0.0)
        out[j] = reach * (1 - a) * residual / residual.sum()
        reach *= a
    out[lengths] = reach * p[lengths]
    return out


def _random_block(seed, V=6):
    rs = np.random.RandomState(seed)
    p = rs.dirichlet(np.ones(V), size=K + 1)
    q = rs.dirichlet(np.ones(V), size=K)
    q[:, 0] = 0.0  # the draft never proposes token 0 ...
    q /= q.sum(1, keepdims=True)
    p[:, 0] += 0.3  # ... which the target likes: only the residual can produce it
    p /= p.sum(1, keepdims=True)
    return p, q


@pytest.mark.parametrize("lengths", [K, 2])
def test_accept_drafts_joint_of_accepted_count_and_bonus_matches_closed_form(lengths):
    p, q = _random_block(1)
    drafts = np.array([5, 1, 2, 3])  # fixed drafts: every per-position acceptance is in (0, 1)
    accept_probs = [min(1, p[k, drafts[k]] / q[k, drafts[k]]) for k in range(K)]
    assert all(0.1 < a < 1 for a in accept_probs[:lengths])
    expected = closed_form(drafts, q, p, lengths)
    n, bonus = run_accept(jax.random.key(0), drafts, q, p, lengths, 200_000)
    assert n.max() <= lengths
    counts = np.zeros_like(expected)
    np.add.at(counts, (n, bonus), 1)
    assert_matches(counts, expected)
    assert counts[: lengths, 0].sum() > 0  # token 0 (q = 0) comes back through the residual


def test_accept_drafts_with_drafts_sampled_from_q_commits_target_distribution():
    """Drafts d_k ~ q_k; the first two committed tokens must be p_0 x p_1 (p_1 does not depend
    on d_1 here). A second token that the round does not commit is drawn as the next round
    would: from p_1."""
    p, q = _random_block(2)
    N, V = 200_000, p.shape[1]
    rs = np.random.RandomState(2)
    drafts = np.stack([rs.choice(V, size=N, p=q[k]) for k in range(K)], 1)
    n, bonus = _accept(
        jax.random.key(3), jnp.asarray(drafts, jnp.int32), tile(q.astype(np.float32), N), tile(p.astype(np.float32), N),
        tile(np.log(p).astype(np.float32), N), jnp.full((N,), K, jnp.int32), sampling=T1,
    )
    n, bonus = np.asarray(n), np.asarray(bonus)
    first = np.where(n >= 1, drafts[:, 0], bonus)
    second = np.where(n >= 2, drafts[:, 1], np.where(n == 1, bonus, rs.choice(V, size=N, p=p[1])))
    assert 0.2 < (n >= 1).mean() < 0.9
    counts = np.zeros((V, V))
    np.add.at(counts, (first, second), 1)
    assert_matches(counts, np.outer(p[0], p[1]))


def one_hot(ids, V=6):
    return np.eye(V)[ids]


def test_accept_drafts_deterministic_cases():
    key = jax.random.key(4)
    d = np.array([1, 2, 3, 4])
    q = one_hot(d)
    # target agrees everywhere: all accepted, bonus from p_K
    n, b = run_accept(key, d, q, one_hot([1, 2, 3, 4, 5]), K, 4000)
    assert (n == 4).all() and (b == 5).all()
    # p_{k-1} judges d_k: with p shifted by one position (p_k = d_k) d_1 is rejected at once
    n, b = run_accept(key, d, q, one_hot([5, 1, 2, 3, 4]), K, 4000)
    assert (n == 0).all() and (b == 5).all()
    # rejection at d_2 ends the round even though p_2 would accept d_3; bonus from the residual
    n, b = run_accept(key, d, q, one_hot([1, 0, 3, 4, 5]), K, 4000)
    assert (n == 1).all() and (b == 0).all()
    # only `lengths` drafts are offered: bonus from p_lengths, not a residual
    n, b = run_accept(key, d, q, one_hot([1, 2, 3, 4, 5]), 2, 4000)
    assert (n == 2).all() and (b == 3).all()
    # nothing offered: bonus ~ p_0 (here half on d_1, which the residual p_0 - q_1 would exclude)
    p = one_hot([1, 2, 3, 4, 5])
    p[0] = 0.5 * (one_hot(1) + one_hot(5))
    n, b = run_accept(key, d, q, p, 0, 4000)
    assert (n == 0).all() and set(np.unique(b)) == {1, 5}
    assert abs((b == 1).mean() - 0.5) < 0.05  # 6+ standard deviations
    # greedy: acceptance is draft == target argmax; the bonus is the argmax of the logits at n
    logits = 3.0 * one_hot([1, 2, 0, 4, 5]) + 0.1 * np.arange(6)
    n, b = run_accept(key, d, q, distribution(jnp.asarray(logits, jnp.float32), Sampling()), K, 4000, Sampling(), logits)
    assert (n == 2).all() and (b == 0).all()


def test_verify_lengths_is_longest_passing_prefix():
    logits = jnp.asarray([[2.0, 2.0, -2.0, 2.0], [-2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    assert verify_lengths(logits, jnp.float32(0.5)).tolist() == [2, 0, 4]
    assert verify_lengths(logits, jnp.float32(0.0)).tolist() == [4, 4, 4]
    assert verify_lengths(logits, jnp.float32(1.0)).tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------- thresholds and stats


@functools.partial(jax.jit, static_argnames=("dcfg", "block_size"))
def _first_block(draft, dcfg, target, state, block_size):
    block, _ = draft_model.draft_block(
        jax.random.key(0), draft, dcfg, target, state.draft_cache, state.anchor, Sampling(), block_size
    )
    return block


def prefilled_first_blocks(pr, prompts, max_new=MAX_NEW):
    """The greedy draft block (tokens, confidence logits) of round 1 for each prompt,
    computed outside the decoding loop from a fresh prefill (same compiled prefill as
    ``speculative_generate`` when the shapes match)."""
    prepared = prepare_prompts(prompts, VOCAB, max_new, CACHE, extra_cache=K + 1)
    tokens, lengths, active = spec.pad_batch(prepared.tokens, prepared.lengths)
    scfg = spec.SpecConfig(
        pr.tcfg, pr.dcfg, Sampling(), 0, pr.tcfg.eos_token_ids, trace_rounds=bucket(max_new), scheduler="fixed"
    )
    state = spec.speculative_prefill(
        pr.target, pr.draft, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(active), jax.random.key(0),
        jnp.int32(max_new), spec.init_schedule_state(tokens.shape[0], K), scfg=scfg, buffer_len=bucket(max_new),
        cache_len=CACHE,
    )
    block = _first_block(pr.draft, pr.dcfg, pr.target, state, K)
    return np.asarray(state.anchor), np.asarray(block.tokens), np.asarray(block.confidence_logits)


def test_threshold_limits_the_verified_prefix():
    """Round 1 of each sample offers exactly the longest prefix of the (greedy) draft block whose
    confidences pass the threshold, recomputed here from the prefilled state."""
    pr = pair("vanilla")
    prompts = prompt_batch(4)
    _, drafts, conf_logits = prefilled_first_blocks(pr, prompts)
    confidence = np.asarray(jax.nn.sigmoid(jnp.asarray(conf_logits)))
    ar = run_ar(pr, prompts)
    offered = set()
    for threshold in (0.0, 0.3, 0.5, 0.7, 1.0):
        res = run_spec(pr, prompts, threshold=threshold, scheduler="threshold")
        assert res.samples == ar
        check_verified_lengths(res, K, "threshold", threshold)
        expected = np.cumprod(confidence >= np.float32(threshold), axis=1).sum(1)
        for b in range(BATCH):
            first_round = res.trace[b][0]["proposed"]
            assert len(first_round) == expected[b]
            assert first_round == drafts[b, : expected[b]].tolist()
            offered.add(len(first_round))
        if threshold == 1.0:  # sigmoid reaches 1.0 only for logits > ~17: no draft is offered
            assert res.stats["proposed_tokens"] == 0 and res.stats["tau"] == 1.0
    assert len(offered) >= 3  # the thresholds cut blocks at several places


def test_drafts_see_exactly_the_committed_context():
    """The drafter's context cache after some rounds equals a fresh prefill of prompt + the
    committed tokens before the anchor: the greedy block of a later round, recomputed from
    that prefill, is the block the loop proposed (this catches a context cache that appends
    too few / too many positions, which the lossless tests cannot see). The DFlash drafter
    with full-strength draft layers: its drafts depend on the context, not on a Markov bias."""
    base = pair("none")
    pr = dataclasses.replace(base, draft=make_draft(base.target, base.tcfg, base.dcfg, 3, context=1.0))
    prompts = prompt_batch(5)
    res = run_spec(pr, prompts, scheduler="threshold")  # threshold 0: every round offers K drafts
    continued, proposed = [], []
    for b, (prompt, sample, rounds) in enumerate(zip(prompts, res.samples, res.trace)):
        assert len(rounds) >= 2
        r = min(1 + b % 3, len(rounds) - 1)  # a later round
        committed = 1 + sum(x["accepted"] + 1 for x in rounds[:r])
        continued.append(prompt + sample[: committed - 1])  # the prefill then samples the anchor
        proposed.append(rounds[r]["proposed"])
    anchors, drafts, _ = prefilled_first_blocks(pr, continued)
    for b in range(BATCH):
        assert anchors[b] == res.samples[b][len(continued[b]) - len(prompts[b])]
        assert drafts[b].tolist() == proposed[b]


def test_statistics_are_consistent():
    pr = pair("gated")
    # 0.4 sits inside this random drafter's confidence range (sigmoids ~0.33-0.41), so it cuts some rounds
    res = run_spec(pr, prompt_batch(5), threshold=0.4, scheduler="threshold")
    check_stats_and_trace(res, MAX_NEW)
    check_verified_lengths(res, K, "threshold", 0.4)
    st = res.stats
    rates = st["accept_rate_by_position"]
    assert len(rates) == K and rates[0] is not None
    assert st["target_compute_tokens"] >= st["verified_tokens"]  # packed buckets hold the verified tokens
    # expected accepted = sum over rounds of the survival probabilities of the offered drafts
    expected = sum(
        float(np.cumprod(1 / (1 + np.exp(-np.asarray(r["confidence_logits"], np.float64))))[: len(r["proposed"])].sum())
        for t in res.trace for r in t
    )
    assert st["expected_accepted_tokens"] == pytest.approx(expected, rel=1e-5)  # float32 sums in the loop
    # every round commits accepted + 1 tokens, except where max_new_tokens cuts the last one
    committed = sum(len(s) - 1 for s in res.samples)
    assert st["accepted_tokens"] + st["rounds"] - K * BATCH <= committed <= st["accepted_tokens"] + st["rounds"]


# ---------------------------------------------------------------------------- compilation and errors


def test_second_call_with_same_shapes_does_not_recompile():
    pr = pair("vanilla")
    run_spec(pr, prompt_batch(6), scheduler="threshold", threshold=0.3)
    sizes = (spec.speculative_prefill._cache_size(), spec.speculative_decode._cache_size())
    # other prompts of the same buckets, other max_new_tokens / threshold / seed
    res = run_spec(
        pr, random_prompts(BATCH - 2, VOCAB, 3, 12, 7), max_new=11, threshold=0.6, seed=5, scheduler="threshold"
    )
    assert all(len(s) == 11 for s in res.samples)
    assert (spec.speculative_prefill._cache_size(), spec.speculative_decode._cache_size()) == sizes


def _must_not_compile(*args, **kwargs):
    raise AssertionError("validation must happen before anything is compiled")


def test_invalid_arguments_raise_clear_errors_before_compiling(monkeypatch):
    monkeypatch.setattr(spec, "speculative_prefill", _must_not_compile)
    monkeypatch.setattr(spec, "speculative_decode", _must_not_compile)
    pr = pair("vanilla")
    no_conf = make_pair("vanilla", vocab=VOCAB, block_size=K, confidence=False)
    prompts = prompt_batch(0)
    with pytest.raises(ValueError, match="block_size"):
        run_spec(pr, prompts, block_size=K + 1)
    with pytest.raises(ValueError, match="confidence"):
        run_spec(no_conf, prompts, threshold=0.5)
    with pytest.raises(ValueError, match="confidence_threshold"):
        run_spec(pr, prompts, threshold=1.5)
    with pytest.raises(ValueError, match="cache"):
        run_spec(pr, [list(range(20))], cache_len=16)
    with pytest.raises(ValueError, match="scheduler"):
        run_spec(pr, prompts, scheduler="bogus")
    with pytest.raises(ValueError, match="confidence head"):
        run_spec(no_conf, prompts, scheduler="algorithm1")
    # a drafter without a confidence head still runs at threshold 0 (validation only)
    with pytest.raises(AssertionError, match="before anything is compiled"):
        run_spec(no_conf, prompts, threshold=0.0)
