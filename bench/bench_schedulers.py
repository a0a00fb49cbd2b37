"""Load simulation: R concurrent requests decoded together, for each verification scheduler.

For R in 1..64 (a CPU-sized target and a drafter whose drafts are partly accepted: the
near-bigram oracle of tests/spec_models.py), decode R prompts in one batch with
  ar          plain autoregressive decoding ("verify none")
  fixed       every draft verified ("verify all")
  threshold   the prefix whose confidences pass --threshold
  algorithm1  the paper's Algorithm 1 (SPS profile measured at start-up for this batch)
  async       budget from two rounds ago, fresh top-K
and print aggregate tokens/s, per-request tokens/s, tau and the verification budget per
request (tokens verified per request per round). Timings are of a second, compiled call.

    python bench/bench_schedulers.py                   # R = 1 2 4 8 16 32 64
    python bench/bench_schedulers.py --loads 1 8 32 --plot docs/scheduler_load.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dspark_jax.decoding import bucket, generate_ar  # noqa: E402
from dspark_jax.sampling import Sampling  # noqa: E402
from dspark_jax.speculative import BATCH_BUCKETS, profile_verification, speculative_generate  # noqa: E402
from spec_models import make_pair, random_prompts  # noqa: E402

SCHEDULERS = ("fixed", "threshold", "algorithm1", "async")


def timed(fn, repeats=3):
    """(result, median seconds of `repeats` calls after a compiling call)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=1.0, help="oracle drafter sharpness (acceptance)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--plot", help="write a PNG of tokens/s and budget vs load")
    args = ap.parse_args()

    pr = make_pair("vanilla", vocab=args.vocab, block_size=args.block_size, alpha=args.alpha, hidden=args.hidden,
                   layers=args.layers, heads=4, kv_heads=2, head_dim=args.hidden // 4, intermediate=3 * args.hidden)
    sampling = Sampling(temperature=args.temperature)
    K = args.block_size
    print(f"backend={jax.default_backend()} target {args.layers}L d{args.hidden} V{args.vocab}, block {K}, "
          f"T={args.temperature}, {args.max_new_tokens} new tokens per request")
    header = f"{'R':>3} {'scheduler':>10} {'agg tok/s':>10} {'req tok/s':>10} {'tau':>6} {'budget/req':>10}"
    print(header)
    rows = []
    for R in args.loads:
        prompts = random_prompts(R, args.vocab, 8, 16, seed=R)
        samples, sec = timed(lambda: generate_ar(pr.target, pr.tcfg, prompts, max_new_tokens=args.max_new_tokens,
                                                 sampling=sampling, seed=0))
        n = sum(map(len, samples))
        rows.append((R, "ar", n / sec, n / sec / R, 1.0, 1.0))
        print(f"{R:3d} {'ar':>10} {n / sec:10.1f} {n / sec / R:10.1f} {1.0:6.2f} {1.0:10.2f}")
        profile = profile_verification(pr.target, pr.tcfg, bucket(R, BATCH_BUCKETS), K, draft=pr.draft, dcfg=pr.dcfg)
        for sch in SCHEDULERS:
            res, sec = timed(lambda: speculative_generate(
                pr.target, pr.tcfg, pr.draft, pr.dcfg, prompts, max_new_tokens=args.max_new_tokens,
                sampling=sampling, seed=0, scheduler=sch, confidence_threshold=args.threshold,
                sps_profile=profile))
            n = sum(map(len, res.samples))
            st = res.stats
            rows.append((R, sch, n / sec, n / sec / R, st["tau"], st["verification_budget_per_request"]))
            print(f"{R:3d} {sch:>10} {n / sec:10.1f} {n / sec / R:10.1f} {st['tau']:6.2f} "
                  f"{st['verification_budget_per_request']:10.2f}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for name in ("ar",) + SCHEDULERS:
            pts = [r for r in rows if r[1] == name]
            loads = [r[0] for r in pts]
            axes[0].plot(loads, [r[2] for r in pts], marker="o", label=name)
            axes[1].plot(loads, [r[3] for r in pts], marker="o", label=name)
            axes[2].plot(loads, [r[5] for r in pts], marker="o", label=name)
        for ax, title in zip(axes, ("aggregate tokens/s", "per-request tokens/s", "verified tokens per request per round")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests R")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=80)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
