"""One prepared benchmark for a GPU/TPU: a Qwen3-4B-shaped bf16 target and a
dspark_qwen3_4b_block7-shaped drafter (random weights), at contexts 512 and 8192.

* ``ar``: one decode step (batch 1/8/32) against the HBM roofline
  (weight bytes + used KV bytes) / measured read bandwidth;
* ``verify``: the target's verification forward of T = 1..16 tokens per sequence at batch
  1/8/32 (the SPS profile: verification steps per second by token count);
* ``round``: one whole speculative round (draft a block, verify, accept, commit).

    python bench/bench_accelerator.py                 # the 4B shapes (needs ~60 GB of device memory)
    python bench/bench_accelerator.py --json
    python bench/bench_accelerator.py --shape tiny    # seconds on a CPU (the tests' smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_long_context import (  # noqa: E402
    median_time, param_bytes, random_cache, read_bandwidth, spec_round_fn, spec_state,
)
from dspark_jax import draft as draft_model  # noqa: E402
from dspark_jax import target as target_model  # noqa: E402
from dspark_jax.config import Qwen3Config  # noqa: E402
from dspark_jax.decoding import bucket, cache_bytes  # noqa: E402

SHAPES = {
    # Qwen/Qwen3-4B and deepseek-ai/dspark_qwen3_4b_block7
    "4b": (Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960), 5, (1, 9, 17, 25, 33)),
    "tiny": (Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=40960), 1, (1, 2)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="4b")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--verify-tokens", type=int, nargs="+", default=list(range(1, 17)))
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def build(args):
    cfg, draft_layers, layer_ids = SHAPES[args.shape]
    dtype = jnp.dtype(args.dtype)
    cfg = dataclasses.replace(cfg, per_layer_weights=target_model.resolve_layer_layout("auto", cfg, dtype))  # decoding's layout
    params = jax.jit(lambda k: target_model.init_params(k, cfg, dtype))(jax.random.key(0))
    dcfg = draft_model.DraftConfig(layers=dataclasses.replace(cfg, num_hidden_layers=draft_layers),
                                   block_size=args.block_size, target_layer_ids=layer_ids,
                                   mask_token_id=cfg.vocab_size - 1, markov_rank=256, enable_confidence_head=True)
    draft = jax.jit(lambda k: draft_model.init_draft_params(k, dcfg, dtype))(jax.random.key(1))
    return cfg, params, dcfg, draft


def verify_seconds(params, cfg, batch: int, tokens: int, context: int, repeats: int) -> float:
    cache = random_cache(cfg, batch, bucket(context + 17), context, 0, params.embed.dtype)
    ids = jnp.zeros((batch, tokens), jnp.int32)
    fn = jax.jit(lambda c, t: target_model.forward(params, cfg, t, c)[0].logits)
    return median_time(lambda: fn(cache, ids), repeats)


def main(argv=None):
    args = parse_args(argv)
    cfg, params, dcfg, draft = build(args)
    dtype = params.embed.dtype
    bandwidth = read_bandwidth()
    weights = param_bytes(params)
    result = {"device": jax.devices()[0].device_kind, "shape": args.shape, "dtype": str(dtype),
              "weight_bytes": weights, "read_bandwidth_gb_s": bandwidth / 1e9, "contexts": []}
    for context in args.contexts:
        entry = {"context": context, "ar": [], "verify": [], "round": []}
        for batch in args.batches:
            seconds = verify_seconds(params, cfg, batch, 1, context, args.repeats)
            roofline = (weights + cache_bytes(cfg, batch, context, dtype)) / bandwidth
            entry["ar"].append({"batch": batch, "step_ms": 1e3 * seconds, "roofline_ms": 1e3 * roofline,
                                "roofline_ratio": seconds / roofline})
            steps = {t: verify_seconds(params, cfg, batch, t, context, args.repeats) for t in args.verify_tokens}
            entry["verify"].append({"batch": batch, "ms_by_tokens": {t: 1e3 * s for t, s in steps.items()},
                                    "sps_by_tokens": {t: 1 / s for t, s in steps.items()}})
            capacity = bucket(context + 4 * (args.block_size + 1))
            round_fn, scfg = spec_round_fn(params, cfg, draft, dcfg, args.block_size)
            holder = {"state": spec_state(params, cfg, draft, dcfg, scfg, capacity, context, args.block_size, batch)}

            def one_round():
                holder["state"] = round_fn(holder["state"])
                return holder["state"].num_generated

            entry["round"].append({"batch": batch, "round_ms": 1e3 * median_time(one_round, args.repeats)})
            del holder
        result["contexts"].append(entry)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"device: {result['device']}; {args.shape} target ({result['dtype']}, weights {weights / 2**30:.2f} GiB), "
          f"measured read bandwidth {result['read_bandwidth_gb_s']:.0f} GB/s")
    for entry in result["contexts"]:
        print(f"\ncontext {entry['context']}")
        print(f"{'batch':>5} {'ar ms':>8} {'roofline ms':>12} {'ratio':>6} {'round ms':>9}  verify ms for T = "
              + " ".join(f"{t:>5}" for t in args.verify_tokens))
        for ar, verify, rnd in zip(entry["ar"], entry["verify"], entry["round"]):
            times = " ".join(f"{verify['ms_by_tokens'][t]:>5.1f}" for t in args.verify_tokens)
            print(f"{ar['batch']:>5} {ar['step_ms']:>8.2f} {ar['roofline_ms']:>12.2f} {ar['roofline_ratio']:>6.2f} "
                  f"{rnd['round_ms']:>9.2f}  {' ' * 18}{times}")


if __name__ == "__main__":
    main()
