"""Verification latency vs number of draft tokens: the SPS(B) profile the scheduler needs.

For a target with random weights (Qwen3-4B shape by default on accelerators, a small shape on
CPU), time one jitted verification forward of T = 1 + drafts tokens per sequence against a
filled KV cache, for drafts in 1..16 and several batch sizes; unsharded, and tensor-parallel
over all local devices when there are several. Prints a table of ms per call and verification
steps per second.

    python bench/bench_verify.py                      # qwen3-4b shape on GPU/TPU, small on CPU
    python bench/bench_verify.py --preset qwen3-4b --batch 1 4 16 --context 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import jax
import jax.numpy as jnp

from dspark_jax import target as target_model
from dspark_jax.checkpoint import resolve_dtype
from dspark_jax.config import Qwen3Config
from dspark_jax.sharding import make_mesh, shard_target, sharded_forward
from dspark_jax.timing import median_seconds

PRESETS = {
    # Qwen3-4B: 36 layers, d 2560, 32 heads / 8 kv heads, head_dim 128, MLP 9728, vocab 151936
    "qwen3-4b": Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "small": Qwen3Config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}


def profile(params, cfg, mesh, batches, drafts, context, repeats):
    rows = []
    for B in batches:
        cache = target_model.init_cache(cfg, B, context + max(drafts) + 1, params.embed.dtype).advance(context)
        for d in drafts:
            tokens = jnp.zeros((B, d + 1), jnp.int32)
            if mesh is None:
                fn = jax.jit(lambda p, t, c: target_model.forward(p, cfg, t, c)[0].logits)
            else:
                fn = jax.jit(lambda p, t, c: sharded_forward(mesh, p, cfg, t, c)[0].logits)
            sec = median_seconds(fn, params, tokens, cache, repeats=repeats)
            rows.append((B, d, sec))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: qwen3-4b on accelerators, small on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-drafts", type=int, default=16)
    ap.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    cfg = PRESETS[args.preset or ("small" if on_cpu else "qwen3-4b")]
    dtype = resolve_dtype(args.dtype)
    cfg = dataclasses.replace(cfg, per_layer_weights=target_model.resolve_layer_layout("auto", cfg, dtype))  # decoding's layout
    params = target_model.init_params(jax.random.key(0), cfg, dtype)
    drafts = list(range(1, args.max_drafts + 1))
    print(f"backend={jax.default_backend()} devices={len(jax.devices())} dtype={jnp.dtype(dtype).name} "
          f"target={args.preset or ('small' if on_cpu else 'qwen3-4b')} context={args.context}")

    setups = [("unsharded", params, cfg, None)]
    n = len(jax.devices())
    if n > 1:
        mesh = make_mesh(model=n)
        sparams, scfg = shard_target(params, cfg, mesh)
        setups.append((f"tp={n}", sparams, scfg, mesh))
    for name, p, c, mesh in setups:
        rows = profile(p, c, mesh, args.batch, drafts, args.context, args.repeats)
        print(f"\n{name}: verification latency (ms) and steps/s by batch B and draft tokens d (T = d + 1)")
        print("   d " + "".join(f"| B={B:<4} ms   steps/s " for B in args.batch))
        for d in drafts:
            cells = [next(sec for (b, dd, sec) in rows if b == B and dd == d) for B in args.batch]
            print(f"{d:4d} " + "".join(f"| {1e3 * s:9.2f} {1 / s:9.1f} " for s in cells))


if __name__ == "__main__":
    main()
