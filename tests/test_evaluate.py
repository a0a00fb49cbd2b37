"""Evaluation bookkeeping: per-position conditional acceptance and reliability from round traces."""

import numpy as np
import pytest

from dspark_jax.evaluate import DomainResult, format_table, ratio_interval, summarize_trace, tau_interval, tau_ratios


def test_trace_counts_give_conditional_acceptance_and_reliability_inputs():
    trace = [
        [  # sample 0: accepted 2 of 3, then 0 of 3
            {"proposed": [5, 6, 7], "accepted": 2, "bonus": 1, "confidence_logits": [2.0, 0.0, -2.0]},
            {"proposed": [5, 6, 7], "accepted": 0, "bonus": 1, "confidence_logits": [0.0, 0.0, 0.0]},
        ],
        [  # sample 1: all 3 accepted; then a round capped to one draft, accepted
            {"proposed": [1, 2, 3], "accepted": 3, "bonus": 4, "confidence_logits": [1.0, 1.0, 1.0]},
            {"proposed": [9], "accepted": 1, "bonus": 4, "confidence_logits": [1.0, 1.0, 1.0]},
        ],
    ]
    rounds, accepted, reached, accepted_at, conf, out = summarize_trace(trace, 3)
    assert rounds == 4 and accepted == 6
    np.testing.assert_array_equal(reached, [4, 2, 2])  # position 3 reached by the 2/3 and 3/3 rounds
    np.testing.assert_array_equal(accepted_at, [3, 2, 1])
    assert out[2] == [False, True]
    assert conf[0][0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    # temperatures divide the logits
    _, _, _, _, conf_t, _ = summarize_trace(trace, 3, temperatures=[2.0, 1.0, 1.0])
    assert conf_t[0][0] == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_table_lists_tau_per_domain_and_the_ratio_between_drafters():
    def result(drafter, domain, tau):
        return DomainResult(drafter, domain, 10, tau, [0.5, 0.4], [10, 5], [[0.6] * 10, [0.5] * 5],
                            [[True] * 5 + [False] * 5, [True] * 2 + [False] * 3])

    table = format_table([result("dspark", "code", 3.0), result("dspark", "prose", 2.0),
                          result("dflash", "code", 2.5), result("dflash", "prose", 1.6)])
    assert "dspark/dflash" in table
    assert "1.200x" in table and "1.250x" in table
    assert "ECE" in table


def per_prompt_result(drafter, domain, rounds, accepted):
    tau = (sum(accepted) + sum(rounds)) / sum(rounds)
    return DomainResult(drafter, domain, sum(rounds), tau, [], [], [], [], rounds_per_prompt=list(rounds),
                        accepted_per_prompt=list(accepted))


def test_tau_intervals_resample_prompts_and_ratios_pair_them():
    rng = np.random.default_rng(1)
    rounds = rng.integers(20, 60, 40)
    accepted = (rounds * rng.uniform(0.5, 2.5, 40)).astype(int)  # prompts differ a lot in acceptance
    a = per_prompt_result("dspark", "code", rounds, accepted)
    lo, hi = tau_interval(a)
    assert lo < a.tau < hi
    # four times the prompts (same spread): the interval is about half as wide
    a4 = per_prompt_result("dspark", "code", np.tile(rounds, 4), np.tile(accepted, 4))
    lo4, hi4 = tau_interval(a4)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.65
    # the same per-prompt counts for both drafters: the paired ratio is exactly 1 in every resample
    same = per_prompt_result("dflash", "code", rounds, accepted)
    assert ratio_interval(a, same) == [1.0, 1.0]
    # a drafter that accepts one more draft per round on every prompt: the interval excludes 1
    better = per_prompt_result("dspark", "code", rounds, accepted + rounds)
    lo_r, hi_r = ratio_interval(better, same)
    assert 1.0 < lo_r < better.tau / same.tau < hi_r
    rows = tau_ratios([better, same])
    assert rows == [{"drafter": "dspark", "baseline": "dflash", "domain": "code", "ratio": better.tau / same.tau,
                     "ci95": [lo_r, hi_r]}]
    assert tau_interval(per_prompt_result("x", "code", [5], [3])) is None  # one prompt: no interval
    table = format_table([better, same])
    assert "95% intervals" in table and f"{lo_r:.3f}-{hi_r:.3f}" in table


def test_held_out_prose_gives_the_asked_number_of_distinct_prompts_from_held_out_topics_only():
    from dspark_jax.checkpoint import embedded_path
    from dspark_jax.data import pydoc_prose
    from dspark_jax.evaluate import load_prompt_set
    from dspark_jax.tokenizer import Tokenizer

    encode = Tokenizer(embedded_path("target")).encode
    name, prompts = load_prompt_set("held-out-prose", encode, 64, 64)
    assert name == "held-out-prose" and len(prompts) == 64 and len({tuple(p) for p in prompts}) == 64
    held_out = [encode(d.text) for d in pydoc_prose("held-out")]
    assert len(held_out) < 10  # a handful of topics: the prompts overlap

    def inside(p, doc):
        return any(doc[i : i + len(p)] == p for i in range(len(doc) - len(p) + 1))

    assert all(len(p) == 64 and any(inside(p, doc) for doc in held_out) for p in prompts)
