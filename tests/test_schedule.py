"""Scheduling: Algorithm 1 (vs a brute-force reference and the paper's Appendix A), the async
variant's causality, STS calibration, the SPS fit, packed verification."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import schedule as S
from dspark_jax.validate import DataError
from dspark_jax import target as target_model
from dspark_jax.sampling import Sampling
from dspark_jax.speculative import (ScheduleState, accept_drafts, packed_buckets, packed_read, packed_verify,
                                    packed_write, schedule_lengths)


# --------------------------------------------------------------------------- Algorithm 1


def algorithm1_reference(a, live, sps, early_stop=True):
    """Algorithm 1 as printed in the paper, in plain Python."""
    R, K = a.shape
    reqs = [r for r in range(R) if live[r]]
    cands = [(a[r, j], j, r) for r in reqs for j in range(K) if a[r, j] > 0]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    lengths = np.zeros(R, int)
    best_lengths = lengths.copy()
    B = len(reqs)
    tau = float(len(reqs))
    best = tau * sps[B]
    for value, j, r in cands:
        lengths[r] = j + 1
        B += 1
        tau += value
        theta = tau * sps[min(B, len(sps) - 1)]
        if theta > best:
            best = theta
            best_lengths = lengths.copy()
        elif early_stop:
            break
    return best_lengths


def random_survival(rng, R, K):
    c = rng.uniform(0.05, 1.0, (R, K))
    c[rng.uniform(size=(R, K)) < 0.1] = 0.0  # some hard zeros
    return np.cumprod(c, axis=1).astype(np.float32)


@pytest.mark.parametrize("early_stop", [True, False])
def test_algorithm1_matches_a_brute_force_reference_on_random_inputs(early_stop):
    rng = np.random.default_rng(0)
    fn = jax.jit(functools.partial(S.algorithm1, early_stop=early_stop))
    for trial in range(60):
        R, K = rng.integers(1, 9), rng.integers(1, 8)
        a = random_survival(rng, R, K)
        live = rng.uniform(size=R) < 0.85
        # a jagged but decreasing-on-average cost curve, sometimes with plateaus
        steps = np.maximum.accumulate(rng.uniform(0.0, 0.2, R * (K + 1) + 2))
        sps = (1.0 / (1.0 + np.cumsum(steps) * rng.uniform(0.1, 2.0))).astype(np.float32)
        got = np.asarray(fn(jnp.asarray(a), jnp.asarray(live), jnp.asarray(sps)))
        want = algorithm1_reference(a, live, sps, early_stop)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def test_algorithm1_verifies_everything_when_verification_is_free_and_nothing_when_it_is_dear():
    a = jnp.asarray(np.cumprod(np.full((3, 4), 0.9), 1), jnp.float32)
    live = jnp.ones(3, bool)
    free = jnp.ones(20, jnp.float32)
    dear = jnp.asarray(np.r_[1.0, 1.0, 1.0, 1.0, np.full(16, 0.01)], jnp.float32)
    np.testing.assert_array_equal(S.algorithm1(a, live, free), [4, 4, 4])
    np.testing.assert_array_equal(S.algorithm1(a, live, dear), [0, 0, 0])


APPENDIX_A_SPS = jnp.asarray([1.0, 1.0, 0.5, 0.45], jnp.float32)  # SPS(1) = 1, SPS(2) = .5, SPS(3) = .45


def appendix_a_output(early_stop: bool, n: int = 40000, seed: int = 0) -> np.ndarray:
    """The paper's Appendix A: one request, gamma = 2, target (0.7, 0.3), draft (0.5, 0.5),
    c_1 = 0.8 and c_2 = 0.9 if x_1 = A else 0. Returns the first output token of n trials."""
    p = jnp.asarray([[0.7, 0.3]] * 3, jnp.float32)  # the target at both positions (and the bonus)
    q = jnp.asarray([[0.5, 0.5]] * 2, jnp.float32)
    k_draft, k_accept = jax.random.split(jax.random.key(seed))

    def trial(kd, ka):
        k1, k2 = jax.random.split(kd)
        x1 = jax.random.categorical(k1, jnp.log(q[0]))
        x2 = jax.random.categorical(k2, jnp.log(q[1]))
        c = jnp.stack([0.8, jnp.where(x1 == 0, 0.9, 0.0)])
        a = jnp.cumprod(c)[None]
        length = S.algorithm1(a, jnp.ones(1, bool), APPENDIX_A_SPS, early_stop=early_stop)
        drafts = jnp.stack([x1, x2]).astype(jnp.int32)[None]
        n, bonus = accept_drafts(ka, drafts, q[None], p[None], jnp.log(p)[None], length, Sampling(1.0))
        return jnp.where(n[0] >= 1, x1, bonus[0])

    out = jax.jit(jax.vmap(trial))(jax.random.split(k_draft, n), jax.random.split(k_accept, n))
    return np.asarray(out)


def test_appendix_a_global_search_without_early_stop_biases_the_output():
    first = appendix_a_output(early_stop=False)
    share_a = (first == 0).mean()
    # (0.85, 0.15) instead of (0.7, 0.3); 5 sigma of 40000 Bernoulli trials is 0.009
    assert abs(share_a - 0.85) < 0.009
    assert abs(share_a - 0.70) > 0.1


def test_appendix_a_algorithm1_with_early_stop_keeps_the_target_distribution():
    first = appendix_a_output(early_stop=True)
    share_a = (first == 0).mean()
    assert abs(share_a - 0.70) < 0.0115  # 5 sigma: sqrt(.7 * .3 / 40000) = 0.0023


# --------------------------------------------------------------------------- async variant


def test_async_budget_comes_from_two_rounds_ago_and_admits_fresh_top_k():
    rng = np.random.default_rng(1)
    B, K = 4, 5
    sps = S.linear_cost_profile(B * (K + 1), per_token=0.02).table
    stale = jnp.asarray(np.stack([random_survival(rng, B, K), random_survival(rng, B, K)]))
    live = jnp.ones(B, bool)
    sched = ScheduleState(threshold=jnp.float32(0), sps_table=jnp.asarray(sps), temperatures=jnp.ones((2, K)),
                          mean_survival=jnp.ones((B, K)),
                          stale_survival=stale)
    budget = int(S.budget_from_stale(stale[0], live, jnp.asarray(sps)))
    totals = set()
    for trial in range(10):
        fresh = jnp.asarray(np.cumprod(rng.uniform(0.05, 1.0, (B, K)), 1).astype(np.float32))
        lengths, new = schedule_lengths("async", jnp.zeros((B, K)), fresh, live, sched)
        lengths = np.asarray(lengths)
        totals.add(int(lengths.sum()))
        # the admitted drafts are exactly the `budget` largest fresh survival probabilities
        admitted = np.concatenate([np.asarray(fresh)[r, : lengths[r]] for r in range(B)])
        rest = np.concatenate([np.asarray(fresh)[r, lengths[r] :] for r in range(B)])
        assert len(admitted) == budget
        if len(rest) and len(admitted):
            assert admitted.min() >= rest.max()
        # history shifts: the fresh survival becomes the stale value of two rounds later
        np.testing.assert_array_equal(new.stale_survival[0], stale[1])
        np.testing.assert_array_equal(new.stale_survival[1], fresh)
    assert totals == {budget}  # the current round's values never change the budget


# --------------------------------------------------------------------------- STS


def test_sts_lowers_ece_of_overconfident_scores_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    N, K = 6000, 4
    true_logit = rng.normal(0.5, 1.5, (N, K))
    survive = rng.uniform(size=(N, K)) < 1 / (1 + np.exp(-true_logit))
    accepted = np.sum(np.cumprod(survive, 1), 1)
    overconfident = 3.0 * true_logit  # a head that is right about the ranking, 3x too sure
    cal = S.fit_sts(overconfident, accepted)
    rep = cal.report
    for k in range(K):
        assert rep["ece_after"][k] < 0.5 * rep["ece_before"][k], k
        assert rep["ece_after"][k] < 0.03, k
        # per-position ranking is exactly preserved; the cumulative product's nearly so
        assert rep["auroc_after"][k] == pytest.approx(rep["auroc_before"][k], abs=1e-12), k
        assert rep["auroc_prefix_after"][k] == pytest.approx(rep["auroc_prefix_before"][k], abs=0.01), k
        assert rep["auroc_before"][k] > 0.7, k  # the scores carry real information
    assert cal.temperatures[0] == pytest.approx(3.0, rel=0.2)


def test_ece_and_auroc_reference_values():
    assert S.expected_calibration_error(np.array([0.9, 0.9, 0.1, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.1)
    assert S.auroc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0])) == 1.0
    assert S.auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5


def test_calibration_round_trips_through_the_draft_directory(tmp_path):
    cal = S.Calibration(np.array([1.5, 2.0, 0.5], np.float32), {"ece_before": [0.1]})
    cal.save(tmp_path)
    again = S.Calibration.load(tmp_path)
    np.testing.assert_array_equal(again.temperatures, cal.temperatures)
    assert S.Calibration.load(tmp_path / "missing") is None


def test_greedy_and_sampled_sets_are_fitted_apart_and_read_by_each_rows_regime(tmp_path):
    """A greedy fit is stored beside the sampled one (either order keeps the other), survives
    the file, and decoding reads per row the set of that row's regime: a temperature-0 row
    the greedy set, a sampled row the sampled set; a drafter with one set reads it for both."""
    from dspark_jax.sampling import RowSampling, Sampling
    from dspark_jax.speculative import confidence_temperatures, regime_temperatures

    sampled = S.Calibration(np.array([1.5, 2.0, 0.5], np.float32), {"temperature": 1.0})
    greedy = S.Calibration(np.array([0.8, 0.7, 0.6], np.float32), {"temperature": 0.0})
    assert S.Calibration.fitted(greedy, True).for_sampling(1.0).tolist() == greedy.temperatures.tolist()  # alone
    both = S.Calibration.fitted(greedy, True, S.Calibration.fitted(sampled, False))
    assert both.report == sampled.report and both.greedy_report == greedy.report
    again = S.Calibration.fitted(sampled, False, both)  # a new sampled fit keeps the greedy set
    np.testing.assert_array_equal(again.greedy_temperatures, greedy.temperatures)
    again.save(tmp_path)
    loaded = S.Calibration.load(tmp_path, 3)
    np.testing.assert_array_equal(loaded.temperatures, sampled.temperatures)
    np.testing.assert_array_equal(loaded.for_greedy(), greedy.temperatures)
    np.testing.assert_array_equal(loaded.for_sampling(0.0), greedy.temperatures)
    sampled.save(tmp_path)
    np.testing.assert_array_equal(S.Calibration.load(tmp_path).for_greedy(), sampled.temperatures)
    bad = json.loads((tmp_path / "sts_calibration.json").read_text()) | {"greedy_temperatures": [1.0, 1.0]}
    (tmp_path / "sts_calibration.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="2 greedy_temperatures for a drafter of block_size 3"):
        S.Calibration.load(tmp_path, 3)

    temps = jnp.asarray(regime_temperatures(loaded, 3))
    rows = confidence_temperatures(temps, RowSampling.of([Sampling(), Sampling(temperature=0.7), Sampling()]))
    np.testing.assert_array_equal(np.asarray(rows), [greedy.temperatures, sampled.temperatures, greedy.temperatures])
    np.testing.assert_array_equal(np.asarray(confidence_temperatures(temps, Sampling())), greedy.temperatures)
    np.testing.assert_array_equal(np.asarray(confidence_temperatures(temps, Sampling(1.0))), sampled.temperatures)
    np.testing.assert_array_equal(regime_temperatures(None, 2), np.ones((2, 2)))
    with pytest.raises(ValueError, match="3 STS temperatures for 2 drafts"):
        regime_temperatures(sampled.temperatures, 2)


# --------------------------------------------------------------------------- SPS profile


def test_sps_fit_is_non_increasing_and_close_to_the_measurements():
    raw = [10.0, 9.0, 9.5, 8.0, 8.2, 8.1, 5.0, 5.5, 4.0]
    fit = S.monotone_decreasing_fit(raw)
    assert np.all(np.diff(fit) <= 1e-12)
    assert np.sum((fit - raw) ** 2) <= np.sum((np.maximum.accumulate(np.array(raw)[::-1])[::-1] - raw) ** 2)
    prof = S.profile_from_bucket_times({4: 0.010, 8: 0.012, 16: 0.011, 32: 0.030}, 32)
    assert prof(1) == prof(4) == pytest.approx(100.0)
    assert np.all(np.diff(prof.table[1:]) <= 1e-6)
    assert prof(32) == pytest.approx(1 / 0.030)


# --------------------------------------------------------------------------- packed verification


def test_packed_verification_equals_the_unpacked_forward_on_the_verified_tokens():
    from dspark_jax.config import Qwen3Config

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    params = target_model.init_params(jax.random.key(0), cfg, std=0.3)
    B, K = 4, 5
    cache = target_model.init_cache(cfg, B, 32)
    _, cache = target_model.forward(params, cfg, jax.random.randint(jax.random.key(1), (B, 9), 0, 64), cache)
    cache = cache.advance(jnp.array([9, 3, 6, 1]))
    tokens = jax.random.randint(jax.random.key(2), (B, K + 1), 0, 64)
    ref, ref_cache = target_model.forward(params, cfg, tokens, cache, feature_layers=(0,))
    lengths = jnp.array([5, 0, 2, 3])
    live = jnp.array([True, True, False, True])
    logits, feats, new_cache, size = jax.jit(
        lambda c: packed_verify(params, cfg, c, tokens, lengths, live, (0,))
    )(cache)
    assert int(size) == 12  # 6 + 1 + 0 + 4 = 11 tokens -> bucket 12 of (6, 12, 24)
    assert packed_buckets(B, K) == (6, 12, 24)  # from one block (K + 1) up
    for b in range(B):
        if not live[b]:
            continue
        n = int(lengths[b]) + 1
        np.testing.assert_allclose(logits[b, :n], ref.logits[b, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(feats[b, :n], ref.features[b, :n], rtol=1e-5, atol=1e-5)
        L = int(cache.lengths[b])
        np.testing.assert_allclose(new_cache.k[:, b, : L + n], ref_cache.k[:, b, : L + n], rtol=1e-5, atol=1e-5)
    # the finished sequence's cache is untouched
    np.testing.assert_array_equal(new_cache.k[:, 2], cache.k[:, 2])


@pytest.mark.parametrize("verified", [0, 2, 5])
def test_packed_verification_of_one_sequence_equals_the_unpacked_forward(verified):
    """One sequence runs its packed axis as its own chunk (no grid, padding after its tokens):
    the same logits, features and cache entries as the unpacked forward, at every bucket."""
    from dspark_jax.config import Qwen3Config

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    params = target_model.init_params(jax.random.key(0), cfg, std=0.3)
    K = 5
    cache = target_model.init_cache(cfg, 1, 32)
    _, cache = target_model.forward(params, cfg, jax.random.randint(jax.random.key(1), (1, 9), 0, 64), cache)
    cache = cache.advance(jnp.array([7]))
    tokens = jax.random.randint(jax.random.key(2), (1, K + 1), 0, 64)
    ref, ref_cache = target_model.forward(params, cfg, tokens, cache, feature_layers=(0,))
    lengths = jnp.array([verified])
    live = jnp.array([True])

    def verify(c):  # every bucket size a row's tokens may take, padding after them
        logits, feats, new_kv, size = packed_read(params, cfg, c, tokens, lengths, live, (0,), buckets=(1, 2, 4, 6))
        return logits, feats, packed_write(c, new_kv, lengths, live, K + 1), size

    logits, feats, new_cache, size = jax.jit(verify)(cache)
    assert packed_buckets(1, K) == (6,)  # the engine's own buckets start at one block
    assert int(size) == {0: 1, 2: 4, 5: 6}[verified]  # 3 tokens: 1 padding token after them
    n = verified + 1
    np.testing.assert_allclose(logits[0, :n], ref.logits[0, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats[0, :n], ref.features[0, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_cache.k[:, 0, : 7 + n], ref_cache.k[:, 0, : 7 + n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_cache.v[:, 0, : 7 + n], ref_cache.v[:, 0, : 7 + n], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new_cache.k[:, 0, 7 + n:], cache.k[:, 0, 7 + n:])  # padding is not written
    # a finished sequence computes nothing that is written
    _, _, idle, _ = packed_verify(params, cfg, cache, tokens, lengths, jnp.array([False]), (0,))
    np.testing.assert_array_equal(idle.k, cache.k)
