"""Autoregressive decoding speed: our jitted ``ar_decode`` vs transformers ``generate``.

Builds a random Qwen3 with transformers, saves it, loads the same weights with
``dspark_jax.checkpoint.load_qwen3``, and times greedy decoding of both in one run:

* prefill: a call with ``max_new_tokens=1`` (the prompt pass plus the first token);
* per-token decode latency: (time for N new tokens - time for 1) / (N - 1);
* decode tokens/s = batch / per-token latency, end-to-end tokens/s = batch * N / time for N.

Ours is compiled once per shape (``max_new_tokens`` is a traced scalar, so the 1-token and
the N-token calls share one program); the first call's extra time is reported as compile
time. transformers runs eager attention with torch's default thread count (``--torch-threads``
to change it: on a busy machine, OpenMP oversubscription can slow torch several-fold).

    python bench/bench_ar.py                      # 4 layers, hidden 256, vocab 8192
    python bench/bench_ar.py --batch-sizes 1 --new-tokens 64 --layers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen3Config as HFQwen3Config  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from dspark_jax.checkpoint import load_qwen3  # noqa: E402
from dspark_jax.decoding import ar_decode, bucket, new_cache, prepare_prompts  # noqa: E402
from dspark_jax.sampling import GREEDY  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=str, default="1,8", help="comma-separated, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads for transformers (default 0: leave torch's default)")
    p.add_argument("--model-dir", type=str, default=None, help="where to save the model (default: a temp dir)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (per-token latency is a difference of two runs)")
    return args


def build_hf_model(args, path: str) -> Qwen3ForCausalLM:
    torch.manual_seed(args.seed)
    cfg = HFQwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, 2 * (args.prompt_len + args.new_tokens)),
        tie_word_embeddings=False,
        eos_token_id=None,  # no EOS: both sides decode exactly --new-tokens tokens
        bos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that greedy outputs are not near-ties
        for name, w in model.named_parameters():
            w.copy_(1 + 0.1 * torch.randn_like(w) if "norm" in name else 0.08 * torch.randn_like(w))
    model.save_pretrained(path)
    return model.to(getattr(torch, args.dtype))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ours(params, cfg, prompts: np.ndarray, new_tokens: int, repeats: int):
    prepared = prepare_prompts(prompts.tolist(), cfg.vocab_size, new_tokens)
    tokens, lengths = jnp.asarray(prepared.tokens), jnp.asarray(prepared.lengths)
    key = jax.random.key(0)
    static = dict(
        cfg=cfg,
        sampling=GREEDY,
        buffer_len=bucket(new_tokens),
        eos_ids=cfg.eos_token_ids,
    )
    cache = [new_cache(cfg, len(prompts), prepared.cache_len, params.embed.dtype)]

    def run(n):  # the cache is donated and handed back: allocated once, as in a server
        out, counts, cache[0] = ar_decode(params, tokens, lengths, key, jnp.int32(n), cache[0], **static)
        return jax.block_until_ready((out, counts))

    t0 = time.perf_counter()
    run(new_tokens)  # compiles (once: max_new_tokens is traced)
    first_call = time.perf_counter() - t0
    t_one = median_time(lambda: run(1), repeats)
    t_all = median_time(lambda: run(new_tokens), repeats)
    out, counts = run(new_tokens)
    assert np.all(np.asarray(counts) == new_tokens), np.asarray(counts)
    return dict(compile=first_call - t_all, t_one=t_one, t_all=t_all, tokens=np.asarray(out)[:, :new_tokens])


def bench_hf(model, prompts: np.ndarray, new_tokens: int, repeats: int):
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    run(2)  # warm-up
    t_one = median_time(lambda: run(1), repeats)
    t_all = median_time(lambda: run(new_tokens), repeats)
    out = run(new_tokens)[:, prompts.shape[1] :].numpy()
    assert out.shape[1] == new_tokens, out.shape
    return dict(compile=0.0, t_one=t_one, t_all=t_all, tokens=out)


def row(name, batch, r, new_tokens):
    per_token = (r["t_all"] - r["t_one"]) / (new_tokens - 1)
    return dict(
        name=name,
        batch=batch,
        compile=r["compile"],
        prefill_ms=1e3 * r["t_one"],
        per_token_ms=1e3 * per_token,
        decode_tps=batch / per_token,
        e2e_tps=batch * new_tokens / r["t_all"],
    )


def main(argv=None):
    args = parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), cpu cores {os.cpu_count()}"
    )
    print(
        f"model: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads}kv "
        f"head_dim={args.head_dim} mlp={args.intermediate} vocab={args.vocab} dtype={args.dtype}; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_dir or tmp
        hf_model = build_hf_model(args, path)
        params, cfg = load_qwen3(path, dtype=args.dtype, per_layer="auto")
        print(f"parameters: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M")

        rows, agreement = [], []
        rng = np.random.RandomState(args.seed)
        for batch in args.batch_sizes:
            prompts = rng.randint(0, args.vocab, (batch, args.prompt_len)).astype(np.int32)
            ours = bench_ours(params, cfg, prompts, args.new_tokens, args.repeats)
            hf = bench_hf(hf_model, prompts, args.new_tokens, args.repeats)
            rows += [row("dspark_jax ar_decode", batch, ours, args.new_tokens),
                     row("transformers generate", batch, hf, args.new_tokens)]
            same = [bool(np.array_equal(a, b)) for a, b in zip(ours["tokens"], hf["tokens"])]
            agreement.append((batch, sum(same), len(same), float(np.mean(ours["tokens"] == hf["tokens"]))))

    header = (f"{'backend':<22} {'batch':>5} {'compile s':>9} {'prefill+1 ms':>12} {'ms/token':>9} "
              f"{'decode tok/s':>12} {'e2e tok/s':>10}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        compile_s = f"{r['compile']:.2f}" if r["name"].startswith("dspark") else "-"
        print(f"{r['name']:<22} {r['batch']:>5} {compile_s:>9} {r['prefill_ms']:>12.2f} {r['per_token_ms']:>9.3f} "
              f"{r['decode_tps']:>12.1f} {r['e2e_tps']:>10.1f}")
    print()
    for i in range(0, len(rows), 2):
        ours, hf = rows[i], rows[i + 1]
        print(f"batch {ours['batch']}: per-token latency speedup {hf['per_token_ms'] / ours['per_token_ms']:.2f}x, "
              f"end-to-end tokens/s ratio {ours['e2e_tps'] / hf['e2e_tps']:.2f}x (ours / transformers)")
    for batch, same, total, frac in agreement:
        print(f"batch {batch}: greedy outputs identical to transformers for {same}/{total} sequences "
              f"({frac:.1%} of tokens)")


if __name__ == "__main__":
    main()
