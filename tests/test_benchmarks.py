"""Smoke runs of the long-context and accelerator benchmarks on tiny shapes: they run end to
end and report every figure they promise (nothing timed is asserted)."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_accelerator  # noqa: E402
import bench_long_context  # noqa: E402


def test_long_context_benchmark_reports_used_length_and_prefill_figures(capsys):
    bench_long_context.main(["--shape", "tiny", "--parts", "used", "prefill", "--used", "64", "--new-tokens", "2",
                             "--repeats", "1", "--prefill-len", "300", "--prefill-chunk", "128", "--json"])
    out = json.loads(capsys.readouterr().out)
    row = out["used"]["rows"][0]
    for key in ("ar_ms_per_token", "roofline_ratio", "spec_round_ms", "spec_breakeven_tau",
                "transformers_ms_per_token", "ours_vs_transformers"):
        assert row[key] > 0, key
    prefill = out["prefill"]
    assert prefill["prefill_len"] == 300 and prefill["peak_rss_bytes"] > prefill["kv_cache_bytes"] > 0
    assert prefill["within_budget"] is True


def test_accelerator_benchmark_reports_ar_verify_and_round(capsys):
    bench_accelerator.main(["--shape", "tiny", "--contexts", "40", "--batches", "2", "--verify-tokens", "1", "3",
                            "--repeats", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    (ctx,) = out["contexts"]
    assert ctx["context"] == 40 and ctx["ar"][0]["roofline_ratio"] > 0
    assert set(ctx["verify"][0]["ms_by_tokens"]) == {"1", "3"}
    assert ctx["round"][0]["round_ms"] > 0


@pytest.mark.slow  # compiles five engines of the embedded pair (minutes on a loaded CPU); test_engine covers the engine
def test_serving_benchmark_reports_every_figure_per_load_and_scheduler(capsys, tmp_path):
    import bench_serving

    bench_serving.main(["--loads", "20", "--duration", "0.2", "--slots", "2", "--max-new", "4", "--num-prompts", "3",
                        "--schedulers", "ar", "async", "--profile", "synthetic", "--plot", str(tmp_path / "s.png"),
                        "--max-queue", "1", "--repeats", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    (load,) = out["loads"]
    assert load["offered"] == 20 and set(load["results"]) == {"ar", "async"}
    for r in load["results"].values():
        assert r["requests"] >= 1 and r["throughput"] > 0 and r["ttft_p99"] >= r["ttft_p50"] > 0
        assert r["per_user_p50"] > 0 and r["budget"] >= 1
    assert load["results"]["ar"]["budget"] == 1
    # the same arrivals for every scheduler, served twice (the runs pooled), each admitted (at most one
    # waiting) or turned away
    assert len({r["requests"] + r["rejected"] for r in load["results"].values()}) == 1
    assert all((r["requests"] + r["rejected"]) % 2 == 0 for r in load["results"].values())
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.slow  # compiles three engines of the embedded pair
def test_skip_round_benchmark_forces_each_kind_of_round():
    import bench_skip_round

    ratios = bench_skip_round.main(["--slots", "2", "--rounds", "3", "--reps", "1"])  # asserts what each mode ran
    assert set(ratios) == {"ar", "skip", "anchor", "drafted"} and ratios["ar"] == 1.0
    assert all(r > 0 for r in ratios.values())
