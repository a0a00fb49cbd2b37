"""What a speculative round that skips drafting costs, in AR steps: ms per round of the
engine's decoding loop with ``--live`` requests (the engine runs the smallest width holding
them), for plain AR steps (``ar``), algorithm1 rounds
forced to skip drafting (``skip``) and forced to draft (``drafted``), on the embedded pair.

The three run alternately (``--reps`` times each, ``--rounds`` rounds per call), and the
ratios to ``ar`` are medians of per-repetition ratios, so a noisy machine shifts all three
together; absolute times are only indicative.

    python bench/bench_skip_round.py [--slots 8] [--live 8] [--rounds 32] [--reps 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import numpy as np  # noqa: E402

MODES = {"ar": "ar", "skip": "algorithm1", "drafted": "algorithm1"}


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


def forced(engine, mode):
    """The engine's state and the width's costs with the skip decision forced: always skip, or
    never."""
    import jax.numpy as jnp

    sps_table, draft_seconds = engine._costs[engine.width]
    sched = engine.state.schedule
    if mode == "skip":  # nothing survives, and the run of skips never ends
        sched = dataclasses.replace(sched, skipped=jnp.int32(-10**6), stale_survival=jnp.zeros_like(sched.stale_survival))
    else:  # every verified token costs the same: any survival pays for drafting
        sps_table, draft_seconds = jnp.ones_like(sps_table), jnp.float32(0)
    return dataclasses.replace(engine.state, schedule=sched), (sps_table, draft_seconds)


def seconds_per_round(engine, mode, prompts, args) -> float:
    import jax

    from dspark_jax.engine import generate

    engine.running.clear()  # a fresh set of requests in the lowest slots
    for p in prompts[: args.live]:
        engine.submit(p, max_new_tokens=engine.max_new_tokens)
    engine.admit()
    costs = (None, None)
    if mode != "ar":
        engine.state, costs = forced(engine, mode)
    jax.block_until_ready(engine.state)
    start = time.perf_counter()
    engine.state, out = generate(engine.target, engine.draft, engine.state, *costs, scfg=engine.scfg, tcfg=engine.tcfg,
                                 max_steps=args.rounds, width=engine.width)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / args.rounds
    if mode != "ar":
        assert int(engine.state.stats.skipped[0]) == (args.rounds if mode == "skip" else 0), f"{mode}: forced wrong"
    return seconds


def main(argv=None):
    import bench_serving

    from dspark_jax.engine import Engine

    args = parse_args(argv)
    target, tcfg, draft, dcfg, prompts, calibration = bench_serving.load_pair(bench_serving.parse_args([]))
    new_tokens = args.rounds * (dcfg.block_size + 1)  # no request ends inside a timed call
    max_len = max(len(p) for p in prompts) + new_tokens + dcfg.block_size + 1
    engines = {mode: Engine(target, tcfg, draft, dcfg, slots=args.slots, max_len=max_len, max_new_tokens=new_tokens,
                            scheduler=scheduler, calibration=calibration) for mode, scheduler in MODES.items()}
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
