"""The serving engine and the per-request decode core: a request's output does not depend on
its slot, its neighbours or when it arrived; per-request sampling, stop ids and token limits
are each row's own; rounds that skip drafting keep the target's distribution.

Models are the tiny near-bigram pairs of ``spec_models`` (as in test_speculative).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.engine import Engine
from dspark_jax.sampling import Sampling
from spec_models import random_prompts
from test_speculative import (CACHE, K, MAX_NEW, SAMPLING_CONTEXT, SAMPLING_PROMPT, SAMPLING_ROWS, assert_matches,
                              budget_profile, exact_joint_2_3, pair, run_ar, run_spec)

VOCAB = 32
ENGINE_SAMPLES = 800  # sampled requests through the engine (chi-square of tokens #2 and #3)


def staggered_run(engine, prompts, limits, **submit_kw):
    """Four waves: one request, two more while it runs, two more that wait for slots (the
    engine drains), then a short and a long one together (the short one's slot frees first and
    the long one moves down). The width grows and shrinks; returns each request's ids in
    submission order."""
    ids = []

    def submit(wave):
        ids.extend(engine.submit(p, max_new_tokens=limits[len(ids)], **submit_kw) for p in wave)

    for wave in (prompts[:1], prompts[1:3]):
        submit(wave)
        engine.step()
        engine.step()
    for wave in (prompts[3:5], prompts[5:]):
        submit(wave)
        engine.run_until_done()
    return [engine.result(i) for i in ids]


@pytest.mark.parametrize("scheduler", ["ar", "algorithm1"])
def test_engine_greedy_output_is_each_requests_own_ar_output(scheduler):
    """7 requests through 2 slots, arriving in waves with different token limits: each equals
    its own ``generate_ar`` output, whatever slot, neighbours, width and row moves it got;
    generate compiles one program per width at most."""
    from dspark_jax.engine import generate

    pr = pair("vanilla")
    prompts = random_prompts(8, VOCAB, 1, 16, 21)[:7]
    limits = [16, 5, 12, 16, 9, 3, 16]
    ar = run_ar(pr, prompts + prompts[:1])[:7]  # one batch of 8: the AR compile test_speculative shares
    engine = Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, max_len=CACHE, max_new_tokens=MAX_NEW,
                    scheduler=scheduler, steps_per_call=3)
    compiled = generate._cache_size()
    out = staggered_run(engine, prompts, limits)
    assert out == [a[:m] for a, m in zip(ar, limits)]
    assert engine.widths == (1, 2)
    widths = engine.widths_run
    assert widths[0] == 1 and 2 in widths and widths[-1] == 1  # up with the load, down as it drains
    assert engine.row_moves >= 1 and engine.requests[6].slot == 0  # the last one moved down
    assert generate._cache_size() - compiled <= len(engine.widths)
    starts = [engine.requests[i].started_at for i in range(7)]
    assert starts == sorted(starts)  # first come, first served: no request is overtaken (none starves)
    if scheduler != "ar":
        assert all(r.budget >= 1 for r in engine.requests.values())


def test_engine_sampling_follows_the_target_distribution_with_neighbours():
    """Sampled requests that arrive while others decode (the queue refills slots as they free):
    each starts its confidence history from a block drafted for it alone at insertion (never
    verified, drawn with a key of its own), which changes its budgets and skipped drafts but not
    what is drawn: every request's tokens #2 (its first round) and #3 follow the target's
    distribution."""
    sampling = Sampling(temperature=1.0)
    pr = pair("vanilla", context=SAMPLING_CONTEXT)
    # the shapes of the greedy test above: its compiles serve here
    engine = Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, max_len=CACHE, max_new_tokens=MAX_NEW,
                    scheduler="algorithm1", steps_per_call=3, sps_profile=budget_profile(2))
    ids = [engine.submit(SAMPLING_PROMPT, sampling=sampling, max_new_tokens=3 + i % 3, seed=i)
           for i in range(ENGINE_SAMPLES)]
    results = engine.run_until_done()
    S = np.array([results[i][:3] for i in ids])
    proposed = sum(engine.requests[i].verified - engine.requests[i].rounds for i in ids)
    assert 0 < proposed  # drafts were verified
    joint = exact_joint_2_3(pr, sampling)
    assert_matches(np.bincount(S[:, 1], minlength=VOCAB), joint.sum(1))
    assert_matches(np.bincount(S[:, 2], minlength=VOCAB), joint.sum(0))


def test_engine_stops_each_request_at_its_own_stop_ids_eos_and_limit():
    """Per request: its own stop ids, the model's EOS, its max_new_tokens (speculative
    rounds commit several tokens at once, so a stop inside accepted drafts is cut there)."""
    pr = pair("vanilla")
    prompts = random_prompts(8, VOCAB, 1, 16, 0)
    ar = run_ar(pr, prompts)
    engine = Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, max_len=CACHE, max_new_tokens=MAX_NEW,
                    scheduler="fixed")
    requests = []
    for i, (prompt, full) in enumerate(zip(prompts, ar)):
        stop = (full[6], full[3]) if i % 2 else ()  # odd requests stop at a token of their output
        limit = MAX_NEW - i
        requests.append((engine.submit(prompt, max_new_tokens=limit, stop=stop), full, stop, limit))
    results = engine.run_until_done()
    cut = 0
    for rid, full, stop, limit in requests:
        expected = full[:limit]
        hits = [j for j, t in enumerate(expected) if t in stop]
        if hits:
            expected = expected[: hits[0] + 1]
            cut += 1
        assert results[rid] == expected
    assert cut >= 3
    eos_pair = pair("vanilla", eos=int(ar[0][4]))
    ar_eos = run_ar(eos_pair, prompts)
    engine = Engine(eos_pair.target, eos_pair.tcfg, eos_pair.draft, eos_pair.dcfg, slots=2, max_len=CACHE,
                    max_new_tokens=MAX_NEW, scheduler="fixed")
    ids = [engine.submit(p, max_new_tokens=MAX_NEW) for p in prompts]
    results = engine.run_until_done()
    assert [results[i] for i in ids] == ar_eos
    assert sum(len(a) < MAX_NEW for a in ar_eos) >= 1


def test_per_request_sampling_follows_each_requests_target_distribution():
    """One batch, two sampling settings as traced rows (each row its own PRNG stream): each
    half's tokens #2 and #3 follow the target's distribution under its own setting."""
    settings = [Sampling(temperature=1.0), Sampling(temperature=1.0, top_k=8)]
    pr = pair("vanilla", context=SAMPLING_CONTEXT)
    half = SAMPLING_ROWS // 2
    res = run_spec(pr, [SAMPLING_PROMPT] * SAMPLING_ROWS, max_new=4, cache_len=32, trace=False,
                   sampling=[settings[0]] * half + [settings[1]] * half, seed=3)
    S = np.array(res.samples)
    assert 0 < res.stats["accepted_tokens"] < res.stats["proposed_tokens"]
    joints = [exact_joint_2_3(pr, setting) for setting in settings]
    # top-k zeroes most (token #2, token #3) pairs: a row sampled with the other setting fails
    assert (joints[1] == 0).sum() > (joints[0] == 0).sum() + 100
    for rows, joint in zip((S[:half], S[half:]), joints):
        assert_matches(np.bincount(rows[:, 1], minlength=VOCAB), joint.sum(1))
        assert_matches(np.bincount(rows[:, 1] * VOCAB + rows[:, 2], minlength=VOCAB * VOCAB), joint)


def test_row_sampling_is_each_rows_own_static_setting():
    """Traced per-row settings warp every row exactly as its static ``Sampling`` would."""
    import jax

    from dspark_jax.sampling import RowSampling, distribution

    logits = 3 * jax.random.normal(jax.random.key(0), (4, 3, 50))
    settings = [Sampling(), Sampling(0.7, 5), Sampling(1.0, 0, 0.8), Sampling(1.3, 7, 0.6)]
    rows = np.asarray(distribution(logits, RowSampling.of(settings)))
    for row, setting, x in zip(rows, settings, logits):
        np.testing.assert_array_equal(row, np.asarray(distribution(x, setting)))


def test_all_greedy_rows_take_the_argmax_path_and_mixed_rows_do_not():
    """A batch of greedy rows computes only the argmax (``lax.cond``), equal to what the mixed
    path gives a greedy row; one sampled row switches the whole batch to the mixed path."""
    import jax

    from dspark_jax.sampling import RowSampling, distribution, sample_logits

    logits = 3 * jax.random.normal(jax.random.key(1), (3, 50))
    keys = jax.random.split(jax.random.key(2), 3)
    greedy = RowSampling.of([Sampling()] * 3)
    np.testing.assert_array_equal(np.asarray(distribution(logits, greedy)),
                                  np.asarray(jax.nn.one_hot(argmax_ids(logits), 50)))
    np.testing.assert_array_equal(np.asarray(sample_logits(keys, logits, greedy)), argmax_ids(logits))
    mixed = RowSampling.of([Sampling(), Sampling(1.0), Sampling()])
    probs = np.asarray(distribution(logits, mixed))
    np.testing.assert_array_equal(probs[[0, 2]], np.asarray(jax.nn.one_hot(argmax_ids(logits)[[0, 2]], 50)))
    assert 0 < probs[1].max() < 1  # the sampled row is a softmax, not one-hot
    draws = np.stack([np.asarray(sample_logits(jax.random.split(jax.random.key(s), 3), logits, mixed))
                      for s in range(40)])
    assert (draws[:, [0, 2]] == argmax_ids(logits)[[0, 2]]).all() and len(set(draws[:, 1])) > 1


def argmax_ids(logits):
    return np.asarray(logits).argmax(-1)


def test_sample_draws_each_distribution_and_never_a_zero_probability_id():
    """``sample`` (one uniform per distribution, inverting the CDF) follows ``probs`` for
    per-row keys and for one key, and never returns an id of probability 0 (leading, inner
    and trailing zeros)."""
    import jax
    import jax.numpy as jnp

    from dspark_jax.sampling import sample

    probs = np.zeros((2, 40), np.float32)
    probs[0, 3:30] = np.arange(1, 28)
    probs[0, 10:14] = 0
    probs[1, [0, 7, 39]] = (0.5, 0.3, 0.2)
    probs /= probs.sum(-1, keepdims=True)
    n = 20000
    per_row = jax.vmap(lambda k: sample(jax.random.split(k, 2), jnp.asarray(probs)))(
        jax.random.split(jax.random.key(3), n))  # [n, 2]
    one_key = sample(jax.random.key(4), jnp.broadcast_to(jnp.asarray(probs), (n, 2, 40)))  # [n, 2]
    for draws in (np.asarray(per_row), np.asarray(one_key)):
        assert_matches(np.bincount(draws[:, 0], minlength=40), probs[0])  # 23 ids: a chi-square
        for row in range(2):
            counts = np.bincount(draws[:, row], minlength=40)
            assert not counts[probs[row] == 0].any()
            np.testing.assert_allclose(counts / n, probs[row], atol=0.015)


def test_skipping_drafts_keeps_the_target_distribution():
    """Rows whose last expected acceptance is too low verify nothing; when every row is, the
    round is one AR step. Both decisions read only past rounds, so the output is still the
    target's distribution."""
    sampling = Sampling(temperature=1.0)
    pr = pair("vanilla", context=SAMPLING_CONTEXT)
    joint = exact_joint_2_3(pr, sampling)
    samples, skipped, cut = [], 0, 0
    for seed, min_expected in ((1, 1.5), (2, float("inf"))):
        res = run_spec(pr, [SAMPLING_PROMPT] * SAMPLING_ROWS, max_new=4, cache_len=32, sampling=sampling, seed=seed,
                       trace=False, scheduler="algorithm1", sps_profile=budget_profile(SAMPLING_ROWS),
                       min_expected_accept=min_expected)
        samples += res.samples
        skipped += res.stats["skipped_rounds"]
        cut += res.stats["rounds"] - res.stats["skipped_rounds"]
    assert skipped > 0 and cut > 0
    S = np.array(samples)
    assert_matches(np.bincount(S[:, 1], minlength=VOCAB), joint.sum(1))
    assert_matches(np.bincount(S[:, 2], minlength=VOCAB), joint.sum(0))
    assert_matches(np.bincount(S[:, 1] * VOCAB + S[:, 2], minlength=VOCAB * VOCAB), joint)


def test_refreshes_back_off_while_nothing_pays():
    """While no row pays for its drafts, a drafted round refreshes the confidences after
    FIRST_REFRESH skipped ones; each refresh that still finds nothing to pay doubles the next
    run of skips (up to LAST_REFRESH), so a hopeless request pays for drafting ever more rarely."""
    from dspark_jax.speculative import FIRST_REFRESH, LAST_REFRESH

    pr = pair("vanilla")
    res = run_spec(pr, [[1, 2, 3]], max_new=120, cache_len=160, scheduler="algorithm1", sps_profile=budget_profile(1),
                   min_expected_accept=float("inf"))
    rounds = res.trace[0]
    drafted = [i for i, r in enumerate(rounds) if np.isfinite(r["confidence_logits"]).all()]
    skips_before = np.diff([-1] + drafted) - 1
    assert len(rounds) == 119 and res.stats["skipped_rounds"] == len(rounds) - len(drafted)
    assert len(drafted) >= 3 and skips_before[0] == FIRST_REFRESH
    assert all(b == min(2 * a + 1, LAST_REFRESH) for a, b in zip(skips_before, skips_before[1:]))
    assert all(r["proposed"] == [] for r in rounds)  # too low to pay: no draft is verified


def test_a_new_requests_run_of_skips_ignores_the_requests_before_it():
    """The run of skips and the refresh interval are the batch's: a request inserted after a
    hopeless one that doubled the interval skips and refreshes round for round as it does in
    a fresh engine (its neighbours' history never delays its first verified round)."""
    from dspark_jax.speculative import FIRST_REFRESH

    pr = pair("vanilla")
    make = lambda: Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, max_len=CACHE, max_new_tokens=MAX_NEW,
                          scheduler="algorithm1", steps_per_call=3, min_expected=float("inf"))

    def skipped_per_call(engine, prompt, max_new_tokens=MAX_NEW):
        engine.submit(prompt, max_new_tokens=max_new_tokens)
        counts = []
        while engine.waiting or engine.running:
            engine.step()
            counts.append((int(engine.state.stats.rounds[0]), int(engine.state.stats.skipped[0])))
        return counts

    used = make()
    skipped_per_call(used, [1, 2, 3] * 4, max_new_tokens=FIRST_REFRESH + 3)  # ends one skip after its refresh
    assert int(used.state.schedule.refresh_after) > FIRST_REFRESH  # the refresh found nothing: the interval grew
    after = skipped_per_call(used, [4, 5, 6])
    fresh = skipped_per_call(make(), [4, 5, 6])
    assert after == fresh and fresh[-1][0] > fresh[-1][1]  # the same rounds skipped, and one drafted


def test_a_rows_record_scales_what_the_skip_decision_expects():
    """The skip decision expects of a row's next drafted rounds its mean survival scaled by how
    its verified drafts fared against their survival so far: a row that beat its
    confidences drafts where the confidences alone would skip, and one that fell short skips
    where they alone would draft. (A drafted round here costs 3 AR steps: it pays from 2
    expected accepted drafts.)"""
    from types import SimpleNamespace

    from dspark_jax.speculative import RECORD_PRIOR, SpecConfig, init_schedule_state, init_stats, nothing_pays_now

    assert RECORD_PRIOR == 2.0  # the figures below
    pr = pair()
    scfg = SpecConfig(target=pr.tcfg, draft=pr.dcfg, scheduler="algorithm1")

    def skips(mean_survival, accepted, expected):
        sched = init_schedule_state(1, 3, sps_table=np.full(5, 1 / 3), draft_seconds=2.0)
        sched.mean_survival = jnp.asarray([mean_survival], jnp.float32)
        stats = init_stats(1, 3)
        stats.accepted, stats.expected_accepted = jnp.asarray([accepted]), jnp.asarray([expected], jnp.float32)
        return bool(nothing_pays_now(SimpleNamespace(schedule=sched, stats=stats, done=jnp.zeros(1, bool)), scfg))

    low, high = [0.6, 0.4, 0.2], [0.9, 0.8, 0.7]  # expected accepted drafts 1.2 and 2.4
    assert skips(low, 0, 0.0) and not skips(high, 0, 0.0)  # no record yet: the confidences decide
    assert not skips(low, 12, 6.0)  # 1.75x its expectation so far: 1 + 0.7 + 0.35 = 2.05 drafts
    assert skips(high, 0, 6.0)  # none of its 6 expected: 0.25x, 0.6 drafts
    assert skips(low, 1, 0.0)  # one draft beyond none expected: (1 + 2) / 2 = 1.5x, 1.8 drafts, still short


def test_a_drafted_round_moves_each_rows_mean_survival_halfway_to_its_own():
    """Every drafted round (whatever it verifies) moves each row's mean survival halfway to that
    round's survival; a skipped round leaves it (``anchor_round`` schedules nothing)."""
    from dspark_jax.speculative import SURVIVAL_DECAY, init_schedule_state, schedule_lengths

    assert SURVIVAL_DECAY == 0.5
    sched = init_schedule_state(2, 3)  # a new row's mean starts at "every draft survives"
    fresh = jnp.asarray([[0.5, 0.25, 0.1], [0.9, 0.8, 0.1]])
    for scheduler in ("algorithm1", "async", "threshold"):
        _, new = schedule_lengths(scheduler, jnp.zeros((2, 3)), fresh, jnp.ones(2, bool), sched)
        np.testing.assert_allclose(np.asarray(new.mean_survival), 0.5 + 0.5 * np.asarray(fresh), rtol=1e-6)
        _, again = schedule_lengths(scheduler, jnp.zeros((2, 3)), fresh, jnp.ones(2, bool), new)
        np.testing.assert_allclose(np.asarray(again.mean_survival), 0.25 + 0.75 * np.asarray(fresh), rtol=1e-6)


def test_engine_rejects_bad_requests_before_running():
    pr = pair("vanilla")
    engine = Engine(pr.target, pr.tcfg, slots=2, max_len=32, max_new_tokens=16)
    for kw, message in [(dict(prompt=[]), "empty prompt"), (dict(prompt=[VOCAB]), "outside the vocabulary"),
                        (dict(prompt=[1] * 20, max_new_tokens=16), "max_len=32"),
                        (dict(prompt=[1], max_new_tokens=17), "max_new_tokens must be in 1..16"),
                        (dict(prompt=[1], stop=list(range(9))), "at most 8 stop ids")]:
        with pytest.raises(ValueError, match=message):
            engine.submit(**kw)
    assert not engine.requests


def test_profile_widths_times_the_engines_own_loop():
    """One profile per width, levelled by rounds timed inside ``generate`` (the forced skip /
    drafted decisions hold, else ``loop_round_seconds`` raises): a valid, non-increasing table
    whose saved drafting is below every round's time, that survives its JSON and drives an
    engine whose greedy output is still each request's own AR output."""
    from dspark_jax.engine import profile_widths
    from dspark_jax.schedule import SPSProfile

    pr = pair()
    with pytest.raises(ValueError, match="repeats and rounds >= 1, got 12, 0, 2"):  # a median of nothing: NaN
        profile_widths(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, context=12, repeats=0, rounds=2)
    profiles = profile_widths(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, context=12, repeats=1, rounds=2)
    assert sorted(profiles) == [1, 2]
    for w, profile in profiles.items():
        table = profile.table[1:]
        assert len(profile.table) == w * (K + 1) + 1 and np.isfinite(table).all() and (table > 0).all()
        assert (np.diff(table) <= 0).all()
        assert 0 <= profile.draft_seconds < 1 / table.max()
        again = SPSProfile.from_json(profile.to_json())
        np.testing.assert_array_equal(again.table, profile.table)
    prompts = random_prompts(8, VOCAB, 1, 16, 21)[:7]
    ar = run_ar(pr, prompts + prompts[:1])[:3]  # the batch of 8 the first test compiles
    engine = Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, max_len=CACHE, max_new_tokens=MAX_NEW,
                    scheduler="algorithm1", sps_profile=profiles)
    ids = [engine.submit(p) for p in prompts[:3]]
    engine.run_until_done()
    assert [engine.result(i) for i in ids] == ar


def test_level_profile_reads_the_loop_and_cancels_drift():
    """Every kind of round is priced against the full block's round taken in the same turn:
    the full round costs its median, the others that times their median per-turn ratio (a
    machine that slowed 2x halfway through leaves the ratios alone), and what skipping saves
    is the anchors-only round less the skipped one."""
    from dspark_jax.engine import level_profile

    slow = np.asarray([1, 1, 2, 2, 2], float)  # the machine's speed over the five turns
    drafted = {1: 3e-3 * slow, 2: 3.5e-3 * slow, 4: 3.5e-3 * slow, 8: 4e-3 * slow}
    profile = level_profile(drafted, 1e-3 * slow, max_tokens=8)
    np.testing.assert_allclose(1 / profile.measured[[1, 2, 3, 4, 5, 8]], [6e-3, 7e-3, 7e-3, 7e-3, 8e-3, 8e-3], rtol=1e-6)
    np.testing.assert_allclose(profile.draft_seconds, 6e-3 - 2e-3, rtol=1e-6)
    assert (np.diff(profile.table[1:]) <= 0).all()


def test_a_new_request_starts_from_its_own_first_block():
    """At insertion a budget scheduler drafts one block for the request alone and starts its
    confidence history there. Greedy, that block is the one its first round drafts (the history
    after that round holds the same survival twice); sampled, its key is a stream of its own, so
    the first round drafts other tokens (a key the round also drew with would repeat the block,
    and the skip decision would read the drafts it decides on)."""
    pr = pair("vanilla", context=SAMPLING_CONTEXT)
    prompts = random_prompts(8, VOCAB, 1, 16, 21)[:4]
    histories = {}
    for name, sampling in (("greedy", Sampling()), ("sampled", Sampling(temperature=1.0))):
        engine = Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=4, max_len=CACHE, max_new_tokens=MAX_NEW,
                        scheduler="algorithm1", steps_per_call=1)
        for seed, p in enumerate(prompts):
            engine.submit(p, sampling=sampling, seed=seed)
        engine.admit()
        start = np.asarray(engine.state.schedule.stale_survival)
        assert (start[0] == start[1]).all() and ((0 < start) & (start < 1)).all()
        assert len({tuple(row) for row in start[1]}) == len(prompts)  # each its own evidence
        engine.step()
        assert not np.asarray(engine.state.stats.skipped).any()  # the first round drafted
        histories[name] = np.asarray(engine.state.schedule.stale_survival)
        np.testing.assert_array_equal(histories[name][0], start[1])
    np.testing.assert_allclose(histories["greedy"][1], histories["greedy"][0], rtol=1e-6)
    assert np.abs(histories["sampled"][1] - histories["sampled"][0]).max(-1).min() > 0


def test_rounds_known_to_skip_drafting_run_as_ar_steps_with_the_same_result():
    """The rounds a call knows will skip drafting (every row too low to pay; the run of skips
    until the next refresh) run first as plain AR steps (``speculative.anchor_steps``, the count
    read on the device), the rest of the call as rounds: the same ids, statistics,
    run of skips and drafter context (its features appended in one chunk after the steps) as
    running them as skipped rounds."""
    pr = pair("vanilla")
    prompts = random_prompts(8, VOCAB, 1, 16, 21)[:4]
    ar = run_ar(pr, prompts + prompts[:4])[:4]
    engines = {}
    for anchor_steps in (True, False):
        engine = Engine(pr.target, pr.tcfg, pr.draft, pr.dcfg, slots=2, max_len=CACHE, max_new_tokens=MAX_NEW,
                        scheduler="algorithm1", steps_per_call=3, min_expected=float("inf"),
                        anchor_steps=anchor_steps)
        ids = [engine.submit(p) for p in prompts]
        engine.run_until_done()
        assert [engine.result(i) for i in ids] == ar
        engines[anchor_steps] = engine
    fast, slow = engines[True], engines[False]
    assert fast.anchor_steps_run >= 4 * engine.steps_per_call and slow.anchor_steps_run == 0
    assert fast.anchor_calls >= 2 and slow.anchor_calls == 0  # runs of skips the host knew from a report
    for name in ("rounds", "verified", "skipped", "accepted", "proposed"):
        np.testing.assert_array_equal(getattr(fast.state.stats, name), getattr(slow.state.stats, name), err_msg=name)
    assert int(fast.state.schedule.skipped) == int(slow.state.schedule.skipped)
    lengths = np.asarray(fast.state.draft_cache.lengths)
    np.testing.assert_array_equal(lengths, np.asarray(slow.state.draft_cache.lengths))
    for slot, n in enumerate(lengths):  # entries past a row's length are never read
        for a, b in ((fast.state.draft_cache.k, slow.state.draft_cache.k),
                     (fast.state.draft_cache.v, slow.state.draft_cache.v)):
            np.testing.assert_allclose(np.asarray(a)[:, slot, :n], np.asarray(b)[:, slot, :n], rtol=1e-5, atol=1e-6)
