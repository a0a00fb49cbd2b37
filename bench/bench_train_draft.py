"""Draft training throughput: tokens/s and blocks/s of the jitted draft step, with the frozen
target run inside the step ("online") vs target features read from a precomputed cache.

    python bench/bench_train_draft.py                    # defaults: the embedded-default shapes
    python bench/bench_train_draft.py --batch 8 --seq-len 256 --anchors 32 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import draft as draft_model
from dspark_jax import target as target_model
from dspark_jax import train as train_lib
from dspark_jax.config import Qwen3Config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--target-layers", type=int, default=6)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    tcfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.target_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=args.hidden // 4, tie_word_embeddings=True)
    dcfg = draft_model.DraftConfig(layers=dataclasses.replace(tcfg, num_hidden_layers=args.draft_layers),
                                   block_size=args.block_size, target_layer_ids=(1, args.target_layers - 2),
                                   mask_token_id=args.vocab - 1, markov_rank=args.markov_rank,
                                   enable_confidence_head=True, num_anchors=args.anchors)
    target = target_model.init_params(jax.random.key(0), tcfg)
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(total_steps=1000))
    lc = train_lib.LossConfig()
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, args.vocab - 1, (args.batch, args.seq_len)), jnp.int32)
    loss_mask = jnp.ones_like(tokens).at[:, :16].set(0)
    online = {"tokens": tokens, "loss_mask": loss_mask}
    feats, last = train_lib.target_features(target, tcfg, dcfg, tokens)
    precomputed = {**online, "features": feats, "last_hidden": last}

    print(f"backend={jax.default_backend()} target {args.target_layers}L d{args.hidden} V{args.vocab}, "
          f"draft {args.draft_layers}L block {args.block_size} rank {args.markov_rank}, "
          f"batch {args.batch} x {args.seq_len} tokens, {args.anchors} anchors/sequence")
    results = {}
    for name, batch in (("online", online), ("precomputed", precomputed)):
        state = train_lib.init_train_state(draft_model.init_draft_params(jax.random.key(1), dcfg), optimizer)
        state, m = train_lib.draft_train_step(state, target, batch, jax.random.key(0), dcfg=dcfg, tcfg=tcfg,
                                              optimizer=optimizer, lc=lc)
        jax.block_until_ready(m["loss"])  # compile
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            state, m = train_lib.draft_train_step(state, target, batch, jax.random.key(i), dcfg=dcfg, tcfg=tcfg,
                                                  optimizer=optimizer, lc=lc)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        results[name] = sec
        print(f"{name:12s} {1e3 * sec:8.1f} ms/step  {args.batch * args.seq_len / sec:9.0f} tokens/s  "
              f"{args.batch * args.anchors / sec:8.0f} blocks/s")
    print(f"precomputed / online speed: {results['online'] / results['precomputed']:.2f}x")


if __name__ == "__main__":
    main()
