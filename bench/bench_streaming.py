"""Streaming vs non-streaming tokens/s on the embedded pair (speculative or ar), runs alternating.

``stream_generate`` returns to the host every ``--chunk`` rounds (steps for ``ar``) and yields
the new ids; the non-streaming call runs the same loop to the end in one dispatch. Each prompt
is decoded once by each (compiled first), alternating, ``--repeats`` times; the ratio is the
median over prompts and repeats of streaming/non-streaming tokens/s of back-to-back runs. Both
must commit the same ids (greedy), which is checked.

    python bench/bench_streaming.py [--mode speculative|ar] [--chunk 8] [--prompts 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dspark_jax.checkpoint import embedded_path, load_drafter, load_target  # noqa: E402
from dspark_jax.data import prompts_from_documents, stdlib_code  # noqa: E402
from dspark_jax.decoding import generate_ar  # noqa: E402
from dspark_jax.speculative import speculative_generate  # noqa: E402
from dspark_jax.streaming import stream_generate  # noqa: E402
from dspark_jax.tokenizer import Tokenizer  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("speculative", "ar"), default="speculative")
    ap.add_argument("--chunk", type=int, help="rounds (ar: steps) per dispatch (default: stream_generate's, 8 / 32)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    target, tcfg = load_target(embedded_path("target"), per_layer="auto")
    draft, dcfg = load_drafter(embedded_path("dspark"), target, tcfg, per_layer="auto")
    tok = Tokenizer(embedded_path("target"))
    prompts = prompts_from_documents(stdlib_code("held-out"), args.prompt_tokens, tok.encode)[: args.prompts]
    spec = args.mode == "speculative"
    kw = dict(max_new_tokens=args.new_tokens) | (dict(block_size=args.block_size) if spec else {})

    def whole(p):
        if spec:
            return speculative_generate(target, tcfg, draft, dcfg, [p], **kw).samples[0]
        return generate_ar(target, tcfg, [p], **kw)[0]

    def streamed(p):
        ids, first = [], None
        extra = dict(draft=draft, dcfg=dcfg) if spec else {}
        for chunk in stream_generate(target, tcfg, [p], chunk=args.chunk, **extra, **kw):
            first = first or time.perf_counter()
            ids += chunk[0]
        return ids, first

    ratios, rates = [], {"stream": [], "whole": []}
    first_fraction = []
    for p in prompts:
        assert streamed(p)[0] == whole(p), "streaming must commit the same ids"  # also compiles both
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ids, first = streamed(p)
            t_stream = time.perf_counter() - t0
            first_fraction.append((first - t0) / t_stream)
            t0 = time.perf_counter()
            n = len(whole(p))
            t_whole = time.perf_counter() - t0
            rates["stream"].append(len(ids) / t_stream)
            rates["whole"].append(n / t_whole)
            ratios.append(t_whole / t_stream)
    print(f"embedded pair, {args.mode}, {len(prompts)} held-out code prompts x {args.repeats}, "
          f"{args.new_tokens} new tokens, greedy, chunk {args.chunk or 'default'}" + (f", block size {args.block_size}" if spec else ""))
    print(f"  non-streaming : {statistics.median(rates['whole']):8.1f} tokens/s (median)")
    print(f"  streaming     : {statistics.median(rates['stream']):8.1f} tokens/s (median)")
    print(f"  streaming / non-streaming: {statistics.median(ratios):.3f} (median of back-to-back ratios)")
    print(f"  first chunk after {100 * statistics.median(first_fraction):.0f}% of the streamed call (median)")
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
