"""Speculative decoding vs autoregressive decoding on one random target, in one run.

The target is a random Qwen3 (default 6 layers, hidden 256, vocab 4096) whose next-token
distribution depends mostly on the current token (``--context`` scales the attention/MLP
residual writes); the drafter is the "near-bigram oracle" of ``tests/spec_models.py``: a
DSpark vanilla Markov head whose bias for previous token t is ``alpha * M[t]``, M the
target's bigram logits, through the exact factorisation M = H @ lm_head (markov_rank =
hidden). Its drafts are partly accepted, so tau > 1 (printed).

Measured (after a warm-up run that compiles; speculative and AR end-to-end runs alternate, and the
speedup is the median of the back-to-back ratios, robust to bursts of load on a shared machine):
  * end-to-end tokens/s of ``speculative_generate`` and ``generate_ar`` (greedy by default,
    no EOS, so every sample produces ``--new-tokens``), per batch size;
  * one round, each part jitted alone on a prepared (prefilled) state and repeated inside a
    ``fori_loop`` (so dispatch is amortised and caches update in place, as in the decoding
    loop): draft = the drafter family's proposal (``draft.draft_block``, Eagle-3's chain); verify = target ``forward`` of K + 1 tokens (with
    the feature layers; ``packed_verify`` at its full bucket for the packed schedulers, an
    upper bound there); round = ``speculative_round``; overhead = round - draft - verify
    (scheduling, acceptance, commit, cache bookkeeping, the drafter's context append,
    statistics); plus one AR step (target forward of 1 token) for scale.

    python bench/bench_speculative.py [--layers 6 --hidden 256 --vocab 4096 --batch 1 8]

With ``--embedded`` (or ``--target DIR --draft DIR``) it measures trained checkpoints instead, on
held-out prompts (``--prompts held-out-code|held-out-prose|FILE.jsonl``); samples then stop at
EOS as in real use, and tokens/s counts the tokens actually generated:

    python bench/bench_speculative.py --embedded --batch 1 --block-size 7 [--draft checkpoints/dflash]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dspark_jax.drafters import family_of  # noqa: E402
from dspark_jax import speculative as spec  # noqa: E402
from dspark_jax import target as target_model  # noqa: E402
from dspark_jax.decoding import bucket, generate_ar, prepare_prompts  # noqa: E402
from dspark_jax.sampling import Sampling  # noqa: E402
from spec_models import draft_config, make_draft, make_target, random_prompts, target_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--block-size", type=int, help="drafts per round (default: 5, or a trained drafter's block size)")
    ap.add_argument("--alpha", type=float, default=1.0, help="Markov bias = alpha * bigram logits")
    ap.add_argument("--context", type=float, default=0.03, help="scale of the target's residual writes")
    ap.add_argument("--threshold", type=float, default=0.0, help="static confidence threshold")
    ap.add_argument("--scheduler", choices=spec_schedulers(), default=None,
                    help="verification scheduler (default: 'threshold' if --threshold > 0, else 'fixed')")
    ap.add_argument("--embedded", action="store_true", help="the embedded pair: checkpoints/target + checkpoints/dspark")
    ap.add_argument("--target", help="a trained target directory (instead of the random one)")
    ap.add_argument("--draft", help="a trained drafter directory (with --target or --embedded)")
    ap.add_argument("--prompts", default="held-out-code", help="with a trained pair: held-out-code|held-out-prose|FILE.jsonl")
    ap.add_argument("--num-prompts", type=int, default=8, help="with a trained pair: prompts decoded, --batch at a time")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--round-repeats", type=int, default=5, help="timed calls of each per-round loop")
    ap.add_argument("--round-iters", type=int, default=20, help="iterations inside each per-round loop")
    return ap.parse_args(argv)


def spec_schedulers():
    from dspark_jax.schedule import SCHEDULERS

    return SCHEDULERS


def paired_times(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Wall times (s) of ``fn_a()`` and ``fn_b()`` (each must block until its result is ready),
    run alternately after one warm-up call each, so a burst of load on this noisy machine hits
    both. Returns (median a, median b, median of the per-pair ratios b / a)."""
    fn_a(), fn_b()
    pairs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn_a()
        t_a = time.perf_counter() - t
        t = time.perf_counter()
        fn_b()
        pairs.append((t_a, time.perf_counter() - t))
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(b / a for a, b in pairs))


def block(x):
    return jax.block_until_ready(x)


# Per-round parts, each repeated ``n`` times inside one jitted fori_loop (one dispatch, caches
# updated in place as in the decoding loop). Every iteration feeds on the previous one's
# output, so XLA cannot hoist the work out of the loop.


@functools.partial(jax.jit, static_argnames=("dcfg", "sampling", "K", "n"))
def draft_loop(draft, target, state, key, *, dcfg, sampling, K, n):
    family = family_of(dcfg)  # DSpark / DFlash: draft.draft_block; Eagle-3: the K-token chain

    def body(i, carry):
        # the drafter's state is carried (Eagle-3's proposal writes its cache and ignores the
        # anchor): no iteration is loop-invariant, so none can be hoisted out of the loop
        anchor, draft_state = carry
        blk, draft_state = family.propose(jax.random.fold_in(key, i), draft, dcfg, target, draft_state, anchor,
                                          sampling, K)
        return blk.tokens[:, -1], draft_state

    return jax.lax.fori_loop(0, n, body, (state.anchor, state.draft_cache))[0]


@functools.partial(jax.jit, static_argnames=("cfg", "feature_layers", "K", "n", "packed"), donate_argnames=("cache",))
def verify_loop(target, anchor, cache, *, cfg, feature_layers, K, n, packed):
    """Verification of all K + 1 tokens per sequence: the dense forward ('fixed'), or the
    packed one the other schedulers use (at its largest bucket: every draft offered)."""
    B = anchor.shape[0]

    def body(_, carry):
        tokens, cache = carry
        if packed:
            lengths, live = jnp.full((B,), K, jnp.int32), jnp.ones((B,), bool)
            logits, features, cache, _ = spec.packed_verify(target, cfg, cache, tokens, lengths, live, feature_layers)
        else:
            out, cache = target_model.forward(target, cfg, tokens, cache, feature_layers=feature_layers)
            logits, features = out.logits, out.features
        # the next tokens depend on logits and features, so neither is dead code
        next_tokens = jnp.argmax(logits, -1).astype(jnp.int32) + (features[..., 0] > 0)
        return next_tokens % cfg.vocab_size, cache

    tokens = jnp.broadcast_to(anchor[:, None], (anchor.shape[0], K + 1))
    return jax.lax.fori_loop(0, n, body, (tokens, cache))


@functools.partial(jax.jit, static_argnames=("cfg", "n"), donate_argnames=("cache",))
def ar_step_loop(target, anchor, cache, *, cfg, n):
    def body(_, carry):
        token, cache = carry
        out, cache = target_model.forward(target, cfg, token[:, None], cache)
        return jnp.argmax(out.logits[:, 0], -1).astype(jnp.int32), cache.advance(1)

    return jax.lax.fori_loop(0, n, body, (anchor, cache))


@functools.partial(jax.jit, static_argnames=("scfg", "n"), donate_argnames=("state",))
def round_loop(target, draft, state, *, scfg, n):
    return jax.lax.fori_loop(0, n, lambda _, s: spec.speculative_round(target, draft, s, scfg=scfg), state)


def merge_stats(stats: list[dict]) -> dict:
    """Run statistics of several calls as one: tau over all rounds, acceptance at k over all
    rounds that reached k."""
    if len(stats) == 1:
        return stats[0]
    rounds = sum(s["rounds"] for s in stats)
    accepted = sum(s["accepted_tokens"] for s in stats)
    reached = [sum(col) for col in zip(*(s["reached_by_position"] for s in stats))]
    acc = [sum(col) for col in zip(*(s["accepted_by_position"] for s in stats))]
    return {"rounds": rounds, "tau": 1 + accepted / max(rounds, 1),
            "accept_rate_by_position": [a / r if r else None for a, r in zip(acc, reached)]}


def per_iteration(loop, make_args, n: int, repeats: int) -> float:
    """Median seconds per loop iteration; ``make_args()`` builds fresh (donatable) inputs
    outside the timed region."""
    times = []
    for r in range(repeats + 1):  # the first (compiling) call is the warm-up
        args = block(make_args())
        t = time.perf_counter()
        block(loop(*args))
        if r:
            times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def prepared_state(target, tcfg, draft, dcfg, prompts, sampling, K, scheduler, threshold, max_new):
    """A prefilled SpecState for ``prompts`` (as ``speculative_generate`` builds it)."""
    prepared = prepare_prompts(prompts, tcfg.vocab_size, max_new, None, extra_cache=K + 1)
    tokens, lengths, active = spec.pad_batch(prepared.tokens, prepared.lengths)
    scfg = spec.SpecConfig(
        tcfg, dcfg, sampling, K if K != dcfg.block_size else 0, tcfg.eos_token_ids, 0, scheduler=scheduler
    )
    schedule = spec.init_schedule_state(tokens.shape[0], K, threshold)
    state = spec.speculative_prefill(
        target, draft, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(active), jax.random.key(0),
        jnp.int32(max_new), schedule, scfg=scfg, buffer_len=bucket(max_new), cache_len=prepared.cache_len,
    )
    return block(state), scfg


def trained_pair(args):
    """(target, tcfg, draft, dcfg, prompts_for(B), description) from checkpoint directories."""
    from dspark_jax.checkpoint import embedded_path, load_drafter, load_target
    from dspark_jax.evaluate import load_prompt_set
    from dspark_jax.tokenizer import Tokenizer

    target_dir = args.target or embedded_path("target")
    draft_dir = args.draft or embedded_path("dspark")
    target, tcfg = load_target(target_dir, per_layer="auto")
    draft, dcfg = load_drafter(draft_dir, target, tcfg, per_layer="auto")
    _, pool = load_prompt_set(args.prompts, Tokenizer(target_dir).encode, args.prompt_len,
                              max(args.num_prompts, max(args.batch)))
    desc = (f"target {target_dir} ({tcfg.num_hidden_layers} layers, hidden {tcfg.hidden_size}, vocab {tcfg.vocab_size}) | "
            f"drafter {draft_dir} ({dcfg.layers.num_hidden_layers} layers, block {dcfg.block_size}, head {dcfg.head_type}) | "
            f"prompts {args.prompts}, temperature {args.temperature}")
    # every batch size decodes the same prompts, B at a time (one prompt is not a fair sample)
    return target, tcfg, draft, dcfg, (lambda B: [pool[i : i + B] for i in range(0, len(pool), B)]), desc


def main(argv=None):
    args = parse_args(argv)
    if args.embedded or args.target:
        target, tcfg, draft, dcfg, prompts_for, desc = trained_pair(args)
        return run(args, target, tcfg, draft, dcfg, prompts_for, desc, stops_at_eos=True)
    args.block_size = args.block_size or 5
    tcfg = target_config(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate=3 * args.hidden,
    )
    ids = tuple(sorted({round(i * (args.layers - 1) / 2) for i in range(3)}))  # first, middle, last
    dcfg = draft_config(
        tcfg, "vanilla", args.block_size, ids, confidence=True, markov_rank=args.hidden, draft_layers=args.draft_layers
    )
    target = make_target(tcfg, 0, context=args.context)
    draft = make_draft(target, tcfg, dcfg, 1, alpha=args.alpha)
    desc = (f"target: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab} | "
            f"drafter: {args.draft_layers} layer(s), block {args.block_size}, vanilla Markov head = {args.alpha} x bigram "
            f"logits (rank {args.hidden}), target_layer_ids {ids} | context {args.context}, temperature {args.temperature}")
    prompts_for = lambda B: [random_prompts(B, args.vocab, args.prompt_len, args.prompt_len, seed=B)]
    return run(args, target, tcfg, draft, dcfg, prompts_for, desc, stops_at_eos=False)


def run(args, target, tcfg, draft, dcfg, prompts_for, desc, stops_at_eos):
    sampling = Sampling(temperature=args.temperature)
    K = args.block_size or dcfg.block_size
    scheduler = args.scheduler or ("threshold" if args.threshold > 0 else "fixed")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs) | {desc} | "
          f"scheduler {scheduler}, threshold {args.threshold}, {K} drafts per round")
    print(f"prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens per sample"
          f"{' (or up to EOS)' if stops_at_eos else ', no EOS'}; "
          f"median of {args.repeats} runs (end to end) / of {args.round_repeats} loops of {args.round_iters} "
          f"iterations (per round, ms per iteration) after a warm-up\n")

    rows = []
    for B in args.batch:
        chunks = prompts_for(B)
        prompts = chunks[0]

        def run_spec():
            results = [spec.speculative_generate(
                target, tcfg, draft, dcfg, chunk, max_new_tokens=args.new_tokens, sampling=sampling,
                block_size=K, confidence_threshold=args.threshold, scheduler=scheduler,
            ) for chunk in chunks]
            return spec.SpecResult(
                samples=[s for r in results for s in r.samples],
                stats=merge_stats([r.stats for r in results]), trace=None,
            )

        def run_ar():
            return [s for chunk in chunks for s in generate_ar(
                target, tcfg, chunk, max_new_tokens=args.new_tokens, sampling=sampling)]

        t_spec, t_ar, paired = paired_times(run_spec, run_ar, args.repeats)
        res, ar = run_spec(), run_ar()
        if not stops_at_eos:
            assert all(len(s) == args.new_tokens for s in res.samples)
        if sampling.greedy:
            assert res.samples == ar, "greedy speculative output differs from AR"
        spec_total, ar_total = sum(map(len, res.samples)), sum(map(len, ar))

        # a prefilled state with room for n full rounds (no sequence finishes inside the loop)
        n = args.round_iters
        # (no EOS here, so every round of the loop does full work)
        state, scfg = prepared_state(
            target, dataclasses.replace(tcfg, eos_token_ids=()), draft, dcfg, prompts, sampling, K, scheduler,
            args.threshold, n * (K + 1) + 2,
        )
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        key = jax.random.key(1)
        reps = args.round_repeats
        t_draft = per_iteration(
            lambda *a: draft_loop(*a, dcfg=dcfg, sampling=sampling, K=K, n=n), lambda: (draft, target, state, key), n, reps
        )
        t_verify = per_iteration(
            lambda *a: verify_loop(*a, cfg=tcfg, feature_layers=dcfg.target_layer_ids, K=K, n=n, packed=scfg.packed),
            lambda: (target, state.anchor, copy(state.target_cache)), n, reps,
        )
        t_round = per_iteration(lambda *a: round_loop(*a, scfg=scfg, n=n), lambda: (target, draft, copy(state)), n, reps)
        t_step = per_iteration(
            lambda *a: ar_step_loop(*a, cfg=tcfg, n=n), lambda: (target, state.anchor, copy(state.target_cache)), n, reps
        )
        rows.append(dict(
            B=B, spec_tps=spec_total / t_spec, ar_tps=ar_total / t_ar, tau=res.stats["tau"],
            speedup=paired * spec_total / ar_total,
            rates=res.stats["accept_rate_by_position"], draft=t_draft, verify=t_verify, round=t_round, step=t_step,
        ))

    print(f"{'batch':>5} {'spec tok/s':>11} {'AR tok/s':>9} {'speedup':>8} {'tau':>5} | {'round ms':>8} {'draft ms':>8} "
          f"{'verify ms':>9} {'overhead ms':>11} | {'AR step ms':>10} {'round/step':>10} {'tau*step/round':>14}")
    for r in rows:
        overhead = r["round"] - r["draft"] - r["verify"]
        print(
            f"{r['B']:>5} {r['spec_tps']:>11.1f} {r['ar_tps']:>9.1f} {r['speedup']:>7.2f}x {r['tau']:>5.2f} | "
            f"{1e3 * r['round']:>8.2f} {1e3 * r['draft']:>8.2f} {1e3 * r['verify']:>9.2f} {1e3 * overhead:>11.2f} | "
            f"{1e3 * r['step']:>10.2f} {r['round'] / r['step']:>10.2f} {r['tau'] * r['step'] / r['round']:>14.2f}"
        )
    print()
    for r in rows:
        overhead = r["round"] - r["draft"] - r["verify"]
        shares = ", ".join(f"{name} {100 * t / r['round']:.0f}%" for name, t in (("draft", r["draft"]), ("verify", r["verify"]), ("overhead", overhead)))
        rates = ", ".join("-" if a is None else f"{a:.2f}" for a in r["rates"])
        print(f"batch {r['B']}: round = {shares}; acceptance by position [{rates}]")
    print("\nspeedup = spec tok/s / AR tok/s, the median over back-to-back pairs of runs; tau*step/round = the speedup the per-round timings predict "
          "(tau tokens per round vs one token per AR step)")


if __name__ == "__main__":
    main()
