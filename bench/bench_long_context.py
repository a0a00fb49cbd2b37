"""Decoding cost vs context: capacity, used length, and a long prefill.

Prints, in one run (``--parts`` picks a subset):

(a) ``capacity``: ms/token of ``ar`` (``generate_ar``) on the embedded target with the same
    32-token prompt and 128 new tokens at cache capacities 256 .. 16384. A decode step reads
    only the used part of the cache, so the ratio to capacity 256 should stay near 1.
(b) ``used``: ms/token of ``ar`` and of one speculative round, and tokens/s, at used lengths
    1k / 4k / 16k on a Qwen3-0.6B-shaped random target (28 layers, hidden 1024, 16/8 heads,
    head_dim 128, vocab 151936, tied; float32), beside transformers on the same weights
    (``generate`` continuing a DynamicCache of the same length; torch threads = cores), and
    the roofline ratio: measured step time / ((weight bytes + used KV bytes) / measured read
    bandwidth). The caches are filled with random keys/values up to the used length (the
    cost of a step does not depend on their values), so no 16k-token prefill is needed.
    The drafter is a random 5-layer, block-7 DSpark shape: its acceptance is meaningless,
    so speculative tokens/s is given at the measured tau and as the round cost.
    ``--layouts stacked per-layer`` times ``ar`` with the target's layer weights in both
    layouts, alternating (``layers.run_layers``: stacked ``[L, ...]`` is training's layout,
    one array per layer decoding's); the first layout listed runs the speculative round.
(c) ``prefill``: peak resident memory and time of a ``--prefill-len`` (32k) token prefill
    on the 0.6B shape, in a child process, beside the weight and KV-cache bytes.

    python bench/bench_long_context.py                                  # everything (long)
    python bench/bench_long_context.py --parts capacity
    python bench/bench_long_context.py --parts used --used 1024 4096 --new-tokens 8
    python bench/bench_long_context.py --parts used --used 1024 --layouts per-layer stacked --no-transformers
    python bench/bench_long_context.py --parts prefill --prefill-len 32768
    python bench/bench_long_context.py --shape tiny --parts used prefill   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dspark_jax import draft as draft_model  # noqa: E402
from dspark_jax.cache import KVCache  # noqa: E402
from dspark_jax import target as target_model  # noqa: E402
from dspark_jax.config import Qwen3Config  # noqa: E402
from dspark_jax.decoding import (PREFILL_CHUNK, ar_decode, bucket, cache_bytes, generate_ar, new_cache,  # noqa: E402
                                 prefill, prepare_prompts)
from dspark_jax.sampling import GREEDY  # noqa: E402

SHAPES = {
    # Qwen3-0.6B: 28 layers, hidden 1024, intermediate 3072, 16/8 heads, head_dim 128, tied
    "0.6b": Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        max_position_embeddings=40960),
    "tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                        max_position_embeddings=40960),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["capacity", "used", "prefill"], choices=["capacity", "used", "prefill"])
    p.add_argument("--capacities", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--shape", choices=list(SHAPES), default="0.6b")
    p.add_argument("--used", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps timed per used length")
    p.add_argument("--block-size", type=int, default=7, help="drafts per speculative round")
    p.add_argument("--prefill-len", type=int, default=32768)
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--layouts", nargs="+", default=["per-layer"], choices=list(LAYOUTS),
                   help="layer-weight layouts to time ar with, alternating (the first also runs the round)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child-prefill", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


LAYOUTS = {"per-layer": True, "stacked": False}  # Qwen3Config.per_layer_weights


def median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def param_bytes(tree) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def read_bandwidth() -> float:
    """Bytes/s of a streaming read (a sum over 512 MiB of float32), the roofline's denominator."""
    x = jnp.ones((128 * 2**20,), jnp.float32)
    fn = jax.jit(jnp.sum)
    seconds = median_time(lambda: fn(x), 5)
    return x.size * 4 / seconds


# ---------------------------------------------------------------------------- (a) capacity


def part_capacity(args) -> list[dict]:
    from dspark_jax.checkpoint import embedded_path, load_target

    params, cfg = load_target(embedded_path("target"), "float32", per_layer="auto")
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, 32).tolist()
    prepared = prepare_prompts([prompt], cfg.vocab_size, 128, max(args.capacities), max_positions=None)
    tokens, lengths = jnp.asarray(prepared.tokens), jnp.asarray(prepared.lengths)
    static = dict(cfg=cfg, sampling=GREEDY, buffer_len=bucket(128), eos_ids=())
    fresh, reused, caches = {}, {}, {}
    for capacity in args.capacities:
        cfg_c = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, capacity))
        fresh[capacity] = lambda c=cfg_c, n=capacity: generate_ar(params, c, [prompt], max_new_tokens=128, cache_len=n)
        caches[capacity] = new_cache(cfg, 1, capacity, params.embed.dtype)

        def again(n=capacity):  # the donated cache handed back and decoded into again
            out, counts, caches[n] = ar_decode(params, tokens, lengths, jax.random.key(0), jnp.int32(128), caches[n], **static)
            return counts

        reused[capacity] = again
    # one warm-up each, then the capacities alternate so load bursts hit them alike
    times = {(kind, n): [] for kind in ("fresh", "reused") for n in args.capacities}
    for kind, fns in (("fresh", fresh), ("reused", reused)):
        for fn in fns.values():
            jax.block_until_ready(fn())
    for _ in range(args.repeats):
        for n in args.capacities:
            for kind, fns in (("fresh", fresh), ("reused", reused)):
                t = time.perf_counter()
                jax.block_until_ready(fns[n]())
                times[kind, n].append(time.perf_counter() - t)
    rows = []
    for n in args.capacities:
        rows.append({"capacity": n,
                     "ms_per_token": 1e3 * statistics.median(times["fresh", n]) / 128,
                     "ms_per_token_reused_cache": 1e3 * statistics.median(times["reused", n]) / 128})
    for key in ("ms_per_token", "ms_per_token_reused_cache"):
        for r in rows:
            r[key.replace("ms_per_token", "vs_smallest")] = r[key] / rows[0][key]
    return rows


# ---------------------------------------------------------------------------- (b) used length


def random_cache(cfg: Qwen3Config, batch: int, capacity: int, used: int, seed: int, dtype=jnp.float32):
    """A cache holding ``used`` random entries per sequence (values do not change the cost)."""
    shape = (cfg.num_hidden_layers, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
    k = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
    v = jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32).astype(dtype)
    return KVCache(k, v, jnp.full((batch,), used, jnp.int32))


def draft_config(cfg: Qwen3Config, block: int) -> draft_model.DraftConfig:
    """A dspark_qwen3_*_block7-like drafter for this target (5 layers, Markov rank 256)."""
    L = cfg.num_hidden_layers
    step = max((L - 4) // 4, 1)  # 36 layers: [1, 9, 17, 25, 33] as the released drafter
    ids = tuple(sorted({min(1 + step * i, L - 1) for i in range(5)}))
    return draft_model.DraftConfig(layers=dataclasses.replace(cfg, num_hidden_layers=min(5, L)), block_size=block,
                                   target_layer_ids=ids, mask_token_id=cfg.vocab_size - 1, markov_rank=256,
                                   enable_confidence_head=True)


def ar_steps_fn(params, cfg, steps: int):
    """``steps`` greedy decode steps from a filled cache: ar_decode's loop body (forward of
    one token, argmax, advance), jitted with the cache donated. The weights are an argument
    of the program (closed over, every compiled program would hold its own copy of them)."""

    def run(params, cache, token):
        def step(_, carry):
            cache, token = carry
            out, cache = target_model.forward(params, cfg, token[:, None], cache)
            return cache.advance(1), jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, step, (cache, token))

    program = jax.jit(run, donate_argnums=1)
    return lambda cache, token: program(params, cache, token)


def spec_round_fn(params, cfg, draft, dcfg, block: int):
    """One speculative round (speculative.speculative_round, fixed schedule, greedy); the
    weights are arguments, as in ``ar_steps_fn``."""
    from dspark_jax import speculative as spec

    scfg = spec.SpecConfig(target=cfg, draft=dcfg, sampling=GREEDY, block_size=block if block != dcfg.block_size else 0)

    def run(params, draft, state):
        return spec.speculative_round(params, draft, state, scfg=scfg)

    program = jax.jit(run, donate_argnums=2)
    return (lambda state: program(params, draft, state)), scfg


def spec_state(params, cfg, draft, dcfg, scfg, capacity, used, block, batch=1):
    """A SpecState whose caches hold ``used`` random entries, as after a prefill."""
    from dspark_jax import speculative as spec

    B, dtype = batch, params.embed.dtype
    target_cache = random_cache(cfg, B, capacity, used, 1, dtype)
    ctx = random_cache(dcfg.layers, B, capacity, used, 3, dtype)
    zeros = lambda: jnp.zeros((B,), jnp.int32)  # distinct buffers: the state is donated
    return spec.SpecState(
        output=jnp.zeros((B, 64), jnp.int32), num_generated=jnp.ones((B,), jnp.int32), done=jnp.zeros((B,), bool),
        anchor=zeros(), target_cache=target_cache, draft_cache=ctx, key=jax.random.key(0),
        max_new_tokens=jnp.int32(1 << 30), schedule=spec.init_schedule_state(B, block),
        stats=spec.SpecStats(zeros(), zeros(), zeros(), zeros(), jnp.zeros((B, block), jnp.int32),
                             jnp.zeros((B, block), jnp.int32), jnp.zeros((B,), jnp.float32), jnp.zeros((), jnp.int32),
                             zeros()),
        trace=None,
    )


def hf_model(params, cfg: Qwen3Config):
    """transformers Qwen3ForCausalLM holding the same weights (float32)."""
    import torch
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    from dspark_jax.checkpoint import qwen3_to_hf_tensors

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type", "dtype")})
    with torch.device("meta"):
        model = Qwen3ForCausalLM(hf_cfg)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in qwen3_to_hf_tensors(params, cfg).items()}
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg)  # its buffers were on meta
    model.tie_weights()
    return model.eval()


def hf_decode_seconds(model, cfg: Qwen3Config, used: int, steps: int, repeats: int) -> float:
    """Seconds per token of transformers ``generate`` continuing a cache of ``used`` entries."""
    import torch
    from transformers import DynamicCache

    torch.manual_seed(0)
    shape = (1, cfg.num_key_value_heads, used, cfg.head_dim)
    ids = torch.randint(0, cfg.vocab_size, (1, used + 1))

    def run():
        cache = DynamicCache()
        for layer in range(cfg.num_hidden_layers):
            kv = torch.randn(shape)
            cache.update(kv, kv * 0.5, layer)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        return time.perf_counter() - t

    run()
    return statistics.median(run() for _ in range(repeats)) / steps


def part_used(args) -> dict:
    base_cfg = SHAPES[args.shape]
    stacked = target_model.init_params(jax.random.key(0), base_cfg)
    layouts = {name: target_model.with_layer_layout(stacked, base_cfg, LAYOUTS[name]) for name in args.layouts}
    del stacked  # (kept by its layout when listed)
    params, cfg = layouts[args.layouts[0]]
    dcfg = draft_config(base_cfg, args.block_size)
    draft = draft_model.with_layer_layout(draft_model.init_draft_params(jax.random.key(1), dcfg), dcfg,
                                          LAYOUTS[args.layouts[0]])
    bandwidth = read_bandwidth()
    weights = param_bytes(params)
    model = None
    if not args.no_transformers:
        import torch

        torch.set_num_threads(os.cpu_count())
        model = hf_model(params, cfg)
    rows = []
    steps = {name: ar_steps_fn(p, c, args.new_tokens) for name, (p, c) in layouts.items()}
    round_fn, scfg = spec_round_fn(params, cfg, draft, dcfg, args.block_size)
    for used in args.used:
        capacity = bucket(used + args.new_tokens * (args.block_size + 1) + args.block_size + 1)
        # the donated cache is handed back and decoded into again (building a random cache of
        # 16k entries takes seconds: it stays out of the timing); each call adds new_tokens
        # entries, which the capacity leaves room for
        carries = {name: (random_cache(cfg, 1, capacity, used, 0), jnp.zeros((1,), jnp.int32)) for name in layouts}
        ar_times = {name: [] for name in layouts}
        for name in layouts:  # compile / warm up
            carries[name] = jax.block_until_ready(steps[name](*carries[name]))
        for _ in range(args.repeats):  # the layouts alternate
            for name in layouts:
                t = time.perf_counter()
                carries[name] = jax.block_until_ready(steps[name](*carries[name]))
                ar_times[name].append((time.perf_counter() - t) / args.new_tokens)
        ar_by_layout = {name: statistics.median(ts) for name, ts in ar_times.items()}
        ar_s = ar_by_layout[args.layouts[0]]
        del carries
        state = spec_state(params, cfg, draft, dcfg, scfg, capacity, used, args.block_size)
        holder = {"state": state}

        def one_round():
            holder["state"] = round_fn(holder["state"])
            return holder["state"].num_generated

        round_s = median_time(one_round, args.repeats)
        stats = holder["state"].stats
        tau = float((stats.accepted.sum() + stats.rounds.sum()) / max(int(stats.rounds.sum()), 1))
        kv = cache_bytes(cfg, 1, used, jnp.float32)
        row = {
            "used": used, "capacity": capacity,
            "ar_ms_per_token": 1e3 * ar_s, "ar_tokens_per_s": 1 / ar_s,
            "roofline_ms": 1e3 * (weights + kv) / bandwidth,
            "roofline_ratio": ar_s / ((weights + kv) / bandwidth),
            "spec_round_ms": 1e3 * round_s, "spec_tau_random_drafter": tau,
            "spec_tokens_per_s": tau / round_s,
            "spec_breakeven_tau": round_s / ar_s,
            "ar_ms_per_token_by_layout": {name: 1e3 * t for name, t in ar_by_layout.items()},
        }
        if model is not None:
            hf_s = hf_decode_seconds(model, cfg, used, args.new_tokens, args.repeats)
            row.update(transformers_ms_per_token=1e3 * hf_s, transformers_tokens_per_s=1 / hf_s, ours_vs_transformers=hf_s / ar_s)
        rows.append(row)
        del state, holder
    return {"shape": args.shape, "weight_bytes": weights, "read_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}


# ---------------------------------------------------------------------------- (c) long prefill


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_prefill(args) -> dict:
    """In a fresh process: init weights, prefill ``--prefill-len`` tokens, report peak RSS."""
    cfg = SHAPES[args.shape]
    cfg = dataclasses.replace(cfg, per_layer_weights=target_model.resolve_layer_layout("auto", cfg, jnp.float32))  # decoding's layout
    params = target_model.init_params(jax.random.key(0), cfg)
    jax.block_until_ready(params)
    after_weights = peak_rss_bytes()
    P = args.prefill_len
    capacity = bucket(P + 1)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, P)), jnp.int32)

    def run(params, tokens):  # the weights an argument, not constants folded into the program
        cache = target_model.init_cache(cfg, 1, capacity)
        logits, cache, _ = prefill(params, cfg, tokens, jnp.array([P], jnp.int32), cache, chunk_size=args.prefill_chunk)
        return jnp.argmax(logits, -1), cache.lengths

    t = time.perf_counter()
    compiled = jax.jit(run).lower(params, tokens).compile()
    compile_s = time.perf_counter() - t
    program = compiled.memory_analysis()
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens))
    seconds = time.perf_counter() - t
    return {
        "prefill_len": P, "chunk": args.prefill_chunk, "capacity": capacity,
        "weight_bytes": param_bytes(params), "kv_cache_bytes": cache_bytes(cfg, 1, capacity, jnp.float32),
        "peak_rss_bytes": peak_rss_bytes(), "rss_after_weights_bytes": after_weights,
        "program_temp_bytes": getattr(program, "temp_size_in_bytes", None),
        "compile_s": compile_s, "prefill_s": seconds, "tokens_per_s": P / seconds,
    }


def part_prefill(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-prefill", "--shape", args.shape,
           "--prefill-len", str(args.prefill_len), "--prefill-chunk", str(args.prefill_chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        why = (f"killed by signal {-out.returncode} (out of memory?)" if out.returncode < 0
               else (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1])
        return {"prefill_len": args.prefill_len, "error": why}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["budget_bytes"] = r["weight_bytes"] + r["kv_cache_bytes"] + int(1.5 * 2**30)
    r["within_budget"] = r["peak_rss_bytes"] <= r["budget_bytes"]
    return r


# ---------------------------------------------------------------------------- report


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def main(argv=None):
    args = parse_args(argv)
    if args.child_prefill:
        print(json.dumps(child_prefill(args)))
        return
    result = {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count()}
    if "capacity" in args.parts:
        result["capacity"] = part_capacity(args)
    if "used" in args.parts:
        result["used"] = part_used(args)
    if "prefill" in args.parts:
        result["prefill"] = part_prefill(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"device: {result['device']} ({result['cpus']} cpus)")
    if "capacity" in result:
        print("\n(a) ar on the embedded target, 32-token prompt, 128 new tokens, only the capacity changes")
        print("  fresh: generate_ar, a new (zero-filled) cache per call; reused: ar_decode handed its donated cache back")
        print(f"{'capacity':>9} {'fresh ms/tok':>13} {'vs smallest':>12} {'reused ms/tok':>14} {'vs smallest':>12}")
        for r in result["capacity"]:
            print(f"{r['capacity']:>9} {r['ms_per_token']:>13.3f} {r['vs_smallest']:>11.2f}x "
                  f"{r['ms_per_token_reused_cache']:>14.3f} {r['vs_smallest_reused_cache']:>11.2f}x")
    if "used" in result:
        u = result["used"]
        print(f"\n(b) {u['shape']} shape, float32, batch 1; weights {gib(u['weight_bytes'])}, "
              f"measured read bandwidth {u['read_bandwidth_gb_s']:.1f} GB/s")
        head = f"{'used':>6} {'ar ms/tok':>10} {'tok/s':>7} {'roofline ms':>12} {'ratio':>6} {'round ms':>9} {'breakeven tau':>14}"
        if not args.no_transformers:
            head += f" {'hf ms/tok':>10} {'ours/hf speed':>14}"
        others = args.layouts[1:]
        head += "".join(f" {'ar ' + name:>12}" for name in others)
        print(f"ar and the round: {args.layouts[0]} layer weights")
        print(head)
        for r in u["rows"]:
            line = (f"{r['used']:>6} {r['ar_ms_per_token']:>10.1f} {r['ar_tokens_per_s']:>7.2f} {r['roofline_ms']:>12.1f} "
                    f"{r['roofline_ratio']:>6.2f} {r['spec_round_ms']:>9.1f} {r['spec_breakeven_tau']:>14.2f}")
            if "transformers_ms_per_token" in r:
                line += f" {r['transformers_ms_per_token']:>10.1f} {r['ours_vs_transformers']:>13.2f}x"
            line += "".join(f" {r['ar_ms_per_token_by_layout'][name]:>12.1f}" for name in others)
            print(line)
        print("  (speculative: one round of block-size drafts; tokens/s = tau / round time; a random drafter's tau"
              " is ~1, so the break-even tau (round time / ar step) is the figure that carries over)")
    if "prefill" in result:
        r = result["prefill"]
        print(f"\n(c) prefill of {r['prefill_len']} tokens on the {args.shape} shape")
        if "error" in r:
            print(f"  failed: {r['error']}")
        else:
            print(f"  chunk {r['chunk']}, capacity {r['capacity']}: {r['prefill_s']:.1f} s ({r['tokens_per_s']:.0f} tokens/s), "
                  f"compile {r['compile_s']:.1f} s")
            print(f"  peak RSS {gib(r['peak_rss_bytes'])}; weights {gib(r['weight_bytes'])} + KV cache "
                  f"{gib(r['kv_cache_bytes'])} + 1.5 GiB = {gib(r['budget_bytes'])}: "
                  f"{'within' if r['within_budget'] else 'OVER'} budget")
            if r.get("program_temp_bytes") is not None:
                print(f"  (the compiled prefill's own buffers: {gib(r['program_temp_bytes'])} beside the weights)")


if __name__ == "__main__":
    main()
