"""What a speculative round that skips drafting costs, in AR steps: ms per round of the
engine's decoding loop with ``--live`` requests (the engine runs the smallest width holding
them), for plain AR steps (``ar``), algorithm1 rounds forced to skip drafting (``skip``: each
round decides and skips; ``anchor``: the skips known ahead, run as AR steps of the decode core
as the engine runs them) and forced to draft (``drafted``), on the embedded pair.

The three run alternately (``--reps`` times each, ``--rounds`` rounds per call), and the
ratios to ``ar`` are medians of per-repetition ratios, so a noisy machine shifts all three
together; absolute times are only indicative.

    python bench/bench_skip_round.py [--slots 8] [--live 8] [--rounds 32] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import numpy as np  # noqa: E402

MODES = {"ar": "ar", "skip": "algorithm1", "anchor": "algorithm1", "drafted": "algorithm1"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--live", type=int, default=None, help="live slots (default: all)")
    ap.add_argument("--rounds", type=int, default=32, help="rounds per timed call")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    args.live = args.slots if args.live is None else args.live
    if not 1 <= args.live <= args.slots or args.rounds < 1 or args.reps < 1:
        ap.error("need 1 <= --live <= --slots, --rounds >= 1 and --reps >= 1")
    return args


def seconds_per_round(engine, mode, prompts, args) -> float:
    from dspark_jax.engine import loop_round_seconds, width_for

    forced = "skip" if mode == "anchor" else mode
    return loop_round_seconds(engine, width_for(args.live, args.slots), forced, prompts[: args.live], args.rounds)


def main(argv=None):
    import bench_serving

    from dspark_jax.engine import Engine

    args = parse_args(argv)
    target, tcfg, draft, dcfg, prompts, calibration = bench_serving.load_pair(bench_serving.parse_args([]))
    new_tokens = args.rounds * (dcfg.block_size + 1)  # no request ends inside a timed call
    max_len = max(len(p) for p in prompts) + new_tokens + dcfg.block_size + 1
    engines = {mode: Engine(target, tcfg, draft, dcfg, slots=args.slots, max_len=max_len, max_new_tokens=new_tokens,
                            scheduler=scheduler, calibration=calibration, anchor_steps=mode == "anchor")
               for mode, scheduler in MODES.items()}
    for mode, engine in engines.items():  # compile
        seconds_per_round(engine, mode, prompts, args)
    ms = {mode: [] for mode in MODES}
    for _ in range(args.reps):
        for mode, engine in engines.items():
            ms[mode].append(1e3 * seconds_per_round(engine, mode, prompts, args))
    ratios = {mode: float(np.median(np.array(v) / np.array(ms["ar"]))) for mode, v in ms.items()}
    print(f"slots {args.slots}, live {args.live}, {args.rounds} rounds per call, {args.reps} alternating repetitions")
    print("ms per round (median): " + "  ".join(f"{m} {np.median(v):.2f}" for m, v in ms.items()))
    print("AR steps per round (median ratio): " + "  ".join(f"{m} {r:.2f}" for m, r in ratios.items()))
    return ratios


if __name__ == "__main__":
    main()
