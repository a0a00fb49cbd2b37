"""Serving under load: the continuous-batching engine (``dspark_jax.engine``) fed Poisson
arrivals, for ``ar`` and every verification scheduler (a Figure 7/8 analogue).

For each offered load r (requests/s) and each scheduler, requests arrive at the times of a
Poisson process for ``--duration`` seconds (the same arrival times and held-out prompts for
every scheduler; with ``--repeats N`` each scheduler serves them N times, the schedulers in
turn, and the figures pool the runs, so a machine's drift does not land on one scheduler), wait (first come, first served) for one of ``--slots`` batch slots, and
decode greedily up to ``--max-new`` tokens or EOS; the run ends when the last one finished.
The queue is bounded: an arrival that finds ``--max-queue`` requests already waiting is turned
away (counted as ``rejected``), as a saturated server sheds load; without the bound, the wait
above capacity grows with the run's length and no TTFT percentile is bounded. Reported per
(load, scheduler), over the admitted requests:
  * throughput: generated tokens / seconds from the first arrival to the last finish;
  * per-user tokens/s (p50, p90): a request's tokens / (finish - its insertion into a slot),
    i.e. its own prefill and decoding, not its wait in the queue;
  * time to first token (p50, p99): first token - arrival (queueing + prefill);
  * budget: mean target tokens verified per round per request (1 for ``ar``).
The engine of each scheduler compiles during a warm-up before the first load; ``algorithm1``
and ``async`` read an SPS profile measured on this machine at every width the engine runs
(``engine.profile_widths``; ``--profile synthetic``: the linear stand-in). ``docs/serving.png``
plots per-user speed against throughput.

    python bench/bench_serving.py --loads 1 4 16 --duration 20 --slots 8 [--json] [--plot docs/serving.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import numpy as np  # noqa: E402

SCHEDULERS = ("ar", "fixed", "threshold", "algorithm1", "async")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=float, nargs="+", default=[1.0, 4.0, 16.0], help="offered loads (requests/s)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per (load, scheduler, repeat)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of the same arrivals per (load, scheduler), the schedulers in turn (figures pooled)")
    ap.add_argument("--slots", type=int, default=8, help="batch slots of the engine")
    ap.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS))
    ap.add_argument("--max-new", type=int, default=64, help="max new tokens per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=64, help="held-out prompts cycled through")
    ap.add_argument("--prompts", default="held-out-code", help="held-out-code|held-out-prose|FILE.jsonl")
    ap.add_argument("--threshold", type=float, default=0.5, help="the threshold scheduler's confidence threshold")
    ap.add_argument("--max-queue", type=int, default=None,
                    help="waiting requests beyond which arrivals are turned away (default: 2 x --slots)")
    ap.add_argument("--steps-per-call", type=int, default=4, help="rounds between two host visits")
    ap.add_argument("--profile", choices=("measured", "synthetic"), default="measured",
                    help="SPS profile of algorithm1/async")
    ap.add_argument("--target", help="target directory (default: the embedded checkpoints/target)")
    ap.add_argument("--draft", help="drafter directory (default: the embedded checkpoints/dspark)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write the plot here (e.g. docs/serving.png)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.slots < 1 or args.max_new < 1 or args.repeats < 1 or min(args.loads) <= 0:
        ap.error("--duration, --slots, --max-new, --repeats and every --loads value must be > 0")
    if args.max_queue is None:
        args.max_queue = 2 * args.slots
    if args.max_queue < 1:
        ap.error("--max-queue must be >= 1")
    return args


def load_pair(args):
    from dspark_jax.checkpoint import embedded_path, load_drafter, load_target
    from dspark_jax.evaluate import load_prompt_set
    from dspark_jax.schedule import Calibration
    from dspark_jax.tokenizer import Tokenizer

    target_dir = args.target or embedded_path("target")
    draft_dir = args.draft or embedded_path("dspark")
    target, tcfg = load_target(target_dir, per_layer="auto")
    draft, dcfg = load_drafter(draft_dir, target, tcfg, per_layer="auto")
    _, prompts = load_prompt_set(args.prompts, Tokenizer(target_dir).encode, args.prompt_len, args.num_prompts)
    return target, tcfg, draft, dcfg, prompts, Calibration.load(draft_dir, dcfg.block_size)


def percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def serve(engine, prompts, arrivals, max_new: int, max_queue: int) -> dict:
    """Feed ``arrivals`` (seconds from now) into the engine in real time, turning away those
    that find ``max_queue`` requests waiting: the run's admitted requests, its span and how
    many were turned away."""
    start = time.perf_counter()
    pending = list(arrivals)
    ids, rejected = [], 0
    while pending or engine.waiting or engine.running:
        now = time.perf_counter() - start
        while pending and pending[0] <= now:
            at = pending.pop(0)
            if len(engine.waiting) >= max_queue:
                rejected += 1
                continue
            rid = engine.submit(prompts[(len(ids) + rejected) % len(prompts)], max_new_tokens=max_new)
            engine.requests[rid].submitted = start + at  # latency counts from the scheduled arrival
            ids.append(rid)
        if engine.waiting or engine.running:
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0] - (time.perf_counter() - start)))
    reqs = [engine.requests[i] for i in ids]
    return {"requests": reqs, "seconds": max(r.finished_at for r in reqs) - start, "rejected": rejected}


def summarize(runs) -> dict:
    """The figures of one scheduler's runs at one load (``serve`` results, pooled: requests of
    every repetition, throughput = all their tokens / all the runs' seconds)."""
    reqs = [r for run in runs for r in run["requests"]]
    tokens = sum(len(r.tokens) for r in reqs)
    per_user = [len(r.tokens) / (r.finished_at - r.started_at) for r in reqs]
    ttft = [r.first_token_at - r.submitted for r in reqs]
    return {
        "requests": len(reqs),
        "rejected": sum(run["rejected"] for run in runs),
        "tokens": tokens,
        "throughput": tokens / sum(run["seconds"] for run in runs),
        "per_user_p50": percentile(per_user, 50),
        "per_user_p90": percentile(per_user, 90),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "budget": float(np.mean([r.budget for r in reqs])),
    }


def warm_up(engine, prompts, max_new: int):
    """Compile before timing: generate at every width (a wave of that many requests), the row
    move (a request that finishes first below one that runs on) and insert per prompt bucket."""
    for width in engine.widths:
        for p in prompts[:width]:
            engine.submit(p, max_new_tokens=max_new)
        engine.run_until_done()
    engine.submit(prompts[0], max_new_tokens=1)
    engine.submit(prompts[1 % len(prompts)], max_new_tokens=max_new)
    engine.run_until_done()


def make_engines(args, target, tcfg, draft, dcfg, calibration, prompts):
    from dspark_jax.engine import Engine, profile_widths

    profile = None
    if args.profile == "measured" and {"algorithm1", "async"} & set(args.schedulers):
        # one profile per width the engine runs: fewer rows draft and verify cheaper
        profile = profile_widths(target, tcfg, draft, dcfg, args.slots, context=args.prompt_len + args.max_new,
                                 rounds=args.steps_per_call)
    max_len = args.prompt_len + args.max_new + dcfg.block_size + 1
    engines = {}
    for name in args.schedulers:
        kw = dict(confidence_threshold=args.threshold) if name == "threshold" else {}
        engine = Engine(target, tcfg, draft, dcfg, slots=args.slots, max_len=max_len, max_new_tokens=args.max_new,
                        scheduler=name, sps_profile=profile, calibration=calibration,
                        steps_per_call=args.steps_per_call, **kw)
        warm_up(engine, prompts, args.max_new)
        engines[name] = engine
    return engines


def plot(loads, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in loads[0]["results"]:
        xs = [row["results"][name]["throughput"] for row in loads]
        ys = [row["results"][name]["per_user_p50"] for row in loads]
        ax.plot(xs, ys, "o-", label=name)
        for row, x, y in zip(loads, xs, ys):
            ax.annotate(f"{row['offered']:g}/s", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("throughput (tokens/s)")
    ax.set_ylabel("per-user speed p50 (tokens/s)")
    ax.set_title("Serving the embedded pair, Poisson arrivals\n(point labels: offered requests/s)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    target, tcfg, draft, dcfg, prompts, calibration = load_pair(args)
    engines = make_engines(args, target, tcfg, draft, dcfg, calibration, prompts)
    rng = np.random.default_rng(args.seed)
    loads = []
    for rate in args.loads:
        gaps = rng.exponential(1.0 / rate, size=max(1, int(rate * args.duration * 3) + 8))
        arrivals = [float(t) for t in np.cumsum(gaps) - gaps[0] if t < args.duration]
        runs = {name: [] for name in engines}
        for rep in range(args.repeats):  # in turn, the order rotated: the machine's drift lands on every scheduler
            names = list(engines)[rep % len(engines):] + list(engines)[: rep % len(engines)]
            for name in names:
                runs[name].append(serve(engines[name], prompts, arrivals, args.max_new, args.max_queue))
        results = {name: summarize(runs[name]) for name in engines}
        loads.append({"offered": rate, "results": results})
    if args.plot:
        plot(loads, args.plot)
    if args.json:
        print(json.dumps({"loads": loads}, indent=1))
        return loads
    print(f"slots {args.slots}, {args.max_new} new tokens (or EOS), prompts {args.prompts} of {args.prompt_len} tokens, "
          f"{args.duration:g} s of arrivals per load x {args.repeats} runs in turn, at most {args.max_queue} waiting (later arrivals turned away), "
          f"SPS profile {args.profile}")
    print(f"{'offered/s':>9} {'scheduler':>10} {'reqs':>5} {'turned':>6} {'tok/s':>8} {'user p50':>8} {'user p90':>8} "
          f"{'ttft p50':>8} {'ttft p99':>8} {'budget':>6}")
    for row in loads:
        for name, r in row["results"].items():
            print(f"{row['offered']:>9g} {name:>10} {r['requests']:>5} {r['rejected']:>6} {r['throughput']:>8.1f} {r['per_user_p50']:>8.1f} "
                  f"{r['per_user_p90']:>8.1f} {r['ttft_p50']:>8.3f} {r['ttft_p99']:>8.3f} {r['budget']:>6.2f}")
    return loads


if __name__ == "__main__":
    main()
