"""Evaluation bookkeeping: per-position conditional acceptance and reliability from round traces."""

import numpy as np
import pytest

from dspark_jax.evaluate import DomainResult, format_table, summarize_trace


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
