"""The ``dspark-jax`` command line.

  dspark-jax generate --prompt TEXT          the embedded target + DSpark drafter (checkpoints/)
  dspark-jax generate --target DIR [--draft DIR] (--prompt TEXT | --prompt-ids 1,2,3) ...
  dspark-jax eval --draft DIR [--draft DIR]   Table 1 / Figure 2 / Figure 6 on held-out code and prose
  dspark-jax demo     builds a small random target/drafter pair and runs AR vs speculative
  dspark-jax export-draft SRC OUT [--with-embeddings]   a drafter in DeepSpec's format
  dspark-jax train-target --out DIR ...   train a small Qwen3 LM (resumable)
  dspark-jax train-draft --target DIR --out DIR --head vanilla|gated|rnn|none|package.module:Name ...   (resumable)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

from . import checkpoint as _checkpoint_lib
from .validate import DataError, UsageError, check_args, strict_json, warn_undecodable


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _add_generate_args(p: argparse.ArgumentParser):
    p.add_argument("--mode", choices=("ar", "speculative"), help="default: speculative when --draft is given, else ar")
    p.add_argument("--target", help="Qwen3 directory (Hugging Face format) or an orbax checkpoint of ours "
                   "(default: the embedded target in checkpoints/, with the embedded DSpark drafter)")
    p.add_argument("--draft", help="DSpark/DFlash draft directory (DeepSpec format), an orbax checkpoint of ours, "
                   "or a train-draft --out directory (its latest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the target directory or --tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    src.add_argument("--messages", metavar="FILE.json",
                     help="a conversation: a JSON list of {\"role\", \"content\"} objects, rendered with the chat template")
    p.add_argument("--tokenizer", help="path to a tokenizer.json (default: the target directory's)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap --prompt in the tokenizer's chat template (default: on when the tokenizer has one)")
    p.add_argument("--system", metavar="TEXT", help="a system message before the --prompt (chat)")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                   help="the template's thinking mode (default off: the released drafters were trained without it)")
    p.add_argument("--stream", action="store_true", help="print the text as it is committed (one sample)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="decode N independent samples of the prompt as one batch")
    p.add_argument("--block-size", type=int, help="drafts per round (default: the drafter's block size)")
    p.add_argument("--confidence-threshold", type=float, default=0.0,
                   help="verify only the prefix whose confidences are all >= this (0 = fixed length)")
    p.add_argument("--scheduler",
                   help="how many drafts each request verifies: fixed, threshold, algorithm1, async, or a plug-in "
                        "package.module:function (default: threshold if a threshold is given, else fixed)")
    p.add_argument("--sps-profile", help="saved SPS profile JSON (dspark-jax profile-sps); default: measured at start-up")
    p.add_argument("--cache-len", type=int, help="KV cache positions (default: prompt + max-new-tokens, bucketed)")
    _add_context_args(p)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="split the target over N devices (model axis)")
    p.add_argument("--data-parallel", type=int, default=1, help="split the batch over N devices (data axis)")
    p.add_argument("--trace", action="store_true", help="record every round (speculative)")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the first call (compile included) instead of a second, compiled call")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls after the compiling one; tokens/s is their median (default 3)")
    p.add_argument("--compare-ar", action="store_true",
                   help="also decode with ar (timed calls alternating with the speculative ones) and report the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_context_args(p: argparse.ArgumentParser):
    from .attention import BACKENDS
    from .decoding import PREFILL_CHUNK

    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help=f"prompt tokens per prefill forward (default {PREFILL_CHUNK}; memory grows with chunk x context)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="run a prompt + max-new-tokens longer than the model's max_position_embeddings")
    p.add_argument("--attention-backend", default="auto", choices=("auto",) + tuple(BACKENDS),
                   help="attention kernel (default auto: blockwise over the used cache, per platform)")


def with_attention_backend(cfg, backend: str):
    """A target or drafter config whose attention runs on ``backend``."""
    if hasattr(cfg, "layers"):  # a DraftConfig: its layers carry the backend
        return dataclasses.replace(cfg, layers=with_attention_backend(cfg.layers, backend))
    return dataclasses.replace(cfg, attention_backend=backend)


def check_request_fits(args, prompt_len: int, tcfg):
    """Prompt + --max-new-tokens against the model's context and --cache-len, before loading."""
    from .decoding import check_context

    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    check_context(prompt_len, args.max_new_tokens, tcfg.max_position_embeddings, args.allow_long_context)
    need = prompt_len + args.max_new_tokens
    if args.cache_len is not None and args.cache_len < need:
        raise UsageError(
            f"--cache-len {args.cache_len} is shorter than the prompt ({prompt_len} tokens) + --max-new-tokens "
            f"({args.max_new_tokens}) = {need}: generation would stop early; raise --cache-len or leave it out"
        )


def run_generate(args, on_first_result=None, on_text=None) -> dict:
    """Decode as ``args`` say; ``on_first_result(samples, texts, seconds, prompt_text)`` is called as soon as the
    first (compiling) call returns, before the timed second call and the ``--compare-ar`` run.
    With ``--stream`` that first call is streamed, each new piece of text passed to ``on_text``."""
    from .chat import with_stop_id
    from .checkpoint import load_drafter, load_target, load_target_config
    from .decoding import generate_ar
    from .sampling import Sampling
    from .speculative import check_scheduler_applies, speculative_generate
    from .tokenizer import Tokenizer

    if args.target is None:
        args.target = _target_or_embedded(None)
        embedded_draft = os.path.join(os.path.dirname(args.target), "dspark")
        if args.draft is None and args.mode != "ar" and os.path.isdir(embedded_draft):
            args.draft = embedded_draft
    mode = args.mode or ("speculative" if args.draft else "ar")
    if mode == "speculative" and not args.draft:
        raise UsageError("--mode speculative needs --draft DIR")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.stream and (args.json or args.num_samples != 1):
        raise UsageError("--stream prints one sample's text as it comes: drop --json / --num-samples")
    tokenizer = None
    if args.prompt is not None or args.messages is not None or args.tokenizer:
        tokenizer = Tokenizer(args.tokenizer or args.target)
    prompt, chat, end_of_turn = prompt_ids(args, tokenizer)
    check_request_fits(args, len(prompt), load_target_config(args.target))
    mesh = None
    if args.tensor_parallel > 1 or args.data_parallel > 1:
        from .sharding import make_mesh

        mesh = make_mesh(model=args.tensor_parallel, data=args.data_parallel)
    # each weight straight onto its devices (one array per layer on CPU: the decoding layout)
    target, tcfg = load_target(args.target, args.dtype, mesh=mesh, per_layer="auto")
    tcfg = with_attention_backend(tcfg, args.attention_backend)
    tcfg = with_stop_id(tcfg, end_of_turn)  # a chat answer ends with the template's end-of-turn token
    prompts = [prompt] * args.num_samples
    context_kw = dict(prefill_chunk=args.prefill_chunk, allow_long_context=args.allow_long_context)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)

    ar_kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, cache_len=args.cache_len,
                 mesh=mesh, **context_kw)
    stream_kw = ar_kw

    def ar_call():
        return generate_ar(target, tcfg, prompts, **ar_kw), None

    if mode == "ar":
        call = ar_call
    else:
        from .schedule import Calibration, SPSProfile, check_scheduler

        check_scheduler(args.scheduler)  # a plug-in scheduler imports before the drafter loads
        draft, dcfg = load_drafter(args.draft, target, tcfg, args.dtype, per_layer="auto")
        dcfg = with_attention_backend(dcfg, args.attention_backend)

        check_scheduler_applies(draft, dcfg, args.scheduler, args.confidence_threshold)  # before the SPS profile
        calibration = Calibration.load(args.draft, dcfg.block_size)
        profile = None
        if args.sps_profile and args.scheduler not in (None, "fixed", "threshold"):  # algorithm1, async, plug-ins
            profile = SPSProfile.load(args.sps_profile)
        elif args.scheduler in ("algorithm1", "async"):
            from .decoding import BATCH_BUCKETS, bucket
            from .speculative import profile_verification

            profile = profile_verification(target, tcfg, bucket(args.num_samples, BATCH_BUCKETS),
                                           args.block_size or dcfg.block_size, draft=draft, dcfg=dcfg)

        spec_kw = dict(ar_kw, block_size=args.block_size, confidence_threshold=args.confidence_threshold,
                       trace=args.trace, scheduler=args.scheduler, sps_profile=profile, calibration=calibration)
        stream_kw = dict(spec_kw, draft=draft, dcfg=dcfg)

        def call():
            res = speculative_generate(target, tcfg, draft, dcfg, prompts, **spec_kw)
            return res.samples, res

    def stream_call():
        """The first call, streamed: ``on_text`` gets the text as it is committed."""
        from .streaming import stream_generate

        stream = stream_generate(target, tcfg, prompts, **stream_kw)
        on_text("[sample 0] " + ("" if chat else args.prompt or ""))
        ids, shown = [], ""
        while True:
            try:
                ids += next(stream)[0]
            except StopIteration as stop:
                result = stop.value
                break
            text = tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids)) + " "
            if not text.endswith("\ufffd"):  # a character split across chunks waits for its last byte
                on_text(text[len(shown):])
                shown = text
        on_text("\n")
        return (result, None) if mode == "ar" else (result.samples, result)

    def timed(fn):
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    (samples, res), first_call = timed(stream_call if args.stream else call)
    if tokenizer is not None:
        warn_undecodable(samples, tokenizer.vocab_size, tcfg.vocab_size, tokenizer.path)
    if on_first_result is not None:
        # a raw prompt is continued, so it is printed before the text; a chat answer stands alone
        on_first_result(samples, [tokenizer.decode(s) for s in samples] if tokenizer else None, first_call,
                        None if chat else args.prompt)
    compare = args.compare_ar and mode != "ar"
    times, ar_times = [first_call], []
    if compare:
        (ar_samples, _), t = timed(ar_call)
        ar_times.append(t)
    if not args.no_warmup:  # timed compiled calls; with --compare-ar the two modes alternate
        times, ar_times = [], []
        for _ in range(max(args.repeats, 1)):  # a short decode is milliseconds: one timing is noise
            (samples, res), t = timed(call)
            times.append(t)
            if compare:
                (ar_samples, _), t = timed(ar_call)
                ar_times.append(t)
    elapsed = statistics.median(times)
    generated = sum(len(s) for s in samples)
    out = {
        "mode": mode,
        "prompt_ids": prompt,
        "chat": chat,
        "stop_ids": list(tcfg.eos_token_ids),
        "samples": samples,
        "num_generated": [len(s) for s in samples],
        "tokens_per_second": generated / elapsed,
        "seconds": elapsed,
        "first_call_seconds": first_call,
    }
    if tokenizer is not None:
        out["texts"] = [tokenizer.decode(s) for s in samples]
    if compare:
        ar_generated = sum(len(s) for s in ar_samples)
        out["ar_tokens_per_second"] = ar_generated / statistics.median(ar_times)
        # the median of back-to-back ratios: robust to a burst of load during one of the runs
        out["speedup_over_ar"] = statistics.median(a / s for s, a in zip(times, ar_times)) * generated / ar_generated
        out["matches_ar"] = ar_samples == samples
        out["greedy"] = args.temperature == 0
        out["timed_seconds"], out["ar_timed_seconds"] = times, ar_times
    if res is not None:
        out.update(res.stats)
        if args.trace:
            out["trace"] = res.trace
    return out


def prompt_ids(args, tokenizer) -> tuple[list[int], bool, int | None]:
    """The ids fed to the model, whether the chat template made them, and its end-of-turn id.

    ``--prompt`` is wrapped in the tokenizer's chat template when it has one (``--no-chat``: raw
    text), after an optional ``--system`` message; ``--messages`` is a whole conversation. The
    generation prompt is added, thinking off unless ``--thinking``."""
    from .chat import chat_messages, encode_chat, end_of_turn_id, load_chat_template, read_messages

    if args.prompt_ids is not None:
        if args.chat or args.system is not None:
            raise SystemExit("error: --chat / --system need a text --prompt or --messages, not --prompt-ids")
        return _parse_ids(args.prompt_ids), False, None
    template = load_chat_template(tokenizer.path)
    if args.messages is not None and args.chat is False:
        raise SystemExit("error: --messages is a conversation for the chat template; it cannot be used with --no-chat")
    chat = args.chat if args.chat is not None else template is not None
    if (chat or args.messages is not None) and template is None:
        option = "--messages" if args.messages is not None else "--chat"
        raise SystemExit(f"error: {option}: the tokenizer at {os.path.dirname(tokenizer.path)} has no chat template "
                         f"(chat_template in tokenizer_config.json, or chat_template.jinja)")
    if not chat:
        if args.system is not None:
            raise SystemExit("error: --system needs the chat template (it is off: --no-chat)")
        return tokenizer.encode(args.prompt), False, None
    if args.messages is not None:
        if args.system is not None:
            raise SystemExit("error: --system: put the system message in the --messages file")
        messages = read_messages(args.messages)
    else:
        messages = chat_messages(args.prompt, args.system)
    ids = encode_chat(tokenizer, template, messages, enable_thinking=args.thinking)
    return ids, True, end_of_turn_id(tokenizer, template)


def _print_samples(samples, texts, first_call_seconds, prompt_text=None):
    for i, s in enumerate(samples):
        body = (prompt_text or "") + texts[i] if texts is not None else " ".join(map(str, s))
        print(f"[sample {i}] " + body)
    print(f"(first call, compile included: {first_call_seconds:.1f} s)", flush=True)


def _print_human(out: dict):
    line = f"mode={out['mode']}  tokens={sum(out['num_generated'])}  tokens/s={out['tokens_per_second']:.1f}"
    if "tau" in out:
        rates = ", ".join("-" if r is None else f"{r:.2f}" for r in out["accept_rate_by_position"])
        line += f"  rounds={out['rounds']}  tau={out['tau']:.2f}  accept@k=[{rates}]"
    if "speedup_over_ar" in out:
        line += f"\nar: {out['ar_tokens_per_second']:.1f} tokens/s -> speedup {out['speedup_over_ar']:.2f}x"
        if out["greedy"]:  # lossless: greedy speculative decoding must reproduce ar token for token
            line += f"; output identical to ar: {'yes' if out['matches_ar'] else 'NO'}"
        else:
            line += " (sampling: ar draws its own tokens, so the texts may differ)"
    print(line)


def cmd_generate(args):
    main = is_main_process()  # on several hosts every process decodes; process 0 prints
    try:
        report = None if args.json or not main else _print_samples
        if args.stream and main:  # the text is already out; only the compile time is left to say
            report = lambda samples, texts, seconds, prompt: print(f"(first call, compile included: {seconds:.1f} s)")
        out = run_generate(args, on_first_result=report,
                           on_text=lambda piece: main and print(piece, end="", flush=True))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if not main:
        return
    if args.json:
        print(strict_json(out))
    else:
        _print_human(out)


def cmd_demo(args):
    """Random small pair: shows that speculative output equals AR output, and the statistics."""
    import jax
    import numpy as np

    from .checkpoint import save_draft, save_qwen3
    from .config import Qwen3Config
    from .draft import DraftConfig, init_draft_params

    tcfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    dcfg = DraftConfig(layers=Qwen3Config(**{**tcfg.__dict__, "num_hidden_layers": 1}), block_size=4,
                       target_layer_ids=(0, 2), mask_token_id=511, markov_rank=32, enable_confidence_head=True)
    from .target import init_params

    target = init_params(jax.random.key(args.seed), tcfg, std=0.1)
    draft = init_draft_params(jax.random.key(args.seed + 1), dcfg, std=0.1)
    with tempfile.TemporaryDirectory() as d:
        save_qwen3(os.path.join(d, "target"), target, tcfg)
        save_draft(os.path.join(d, "draft"), draft, dcfg, target)
        prompt = ",".join(str(t) for t in np.random.RandomState(args.seed).randint(0, 500, 16))
        common = ["--target", os.path.join(d, "target"), "--prompt-ids", prompt, "--max-new-tokens", "32", "--json"]
        parser = build_parser()
        ar = run_generate(parser.parse_args(["generate", "--mode", "ar", *common]))
        sp = run_generate(parser.parse_args(["generate", "--draft", os.path.join(d, "draft"), *common]))
    print("demo: random-weight Qwen3 target (4 layers) + random DSpark drafter (saved and reloaded from disk)")
    print(f"  ar          : {ar['samples'][0][:12]}...  {ar['tokens_per_second']:.1f} tok/s")
    print(f"  speculative : {sp['samples'][0][:12]}...  {sp['tokens_per_second']:.1f} tok/s  tau={sp['tau']:.2f}")
    same = ar["samples"] == sp["samples"]
    print(f"  greedy outputs identical: {same} (an untrained drafter is rarely accepted: tau ~ 1)")
    if not same:
        raise SystemExit(1)


def _add_optim_args(p, lr, steps, batch, seq_len):
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=float, default=0.04, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-parallel", type=int, default=1, help="split each batch over N devices")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export-dtype", choices=("float32", "bfloat16"),
                   help="dtype of the exported safetensors (default: the training dtype, float32)")
    _add_max_shard_size(p)


def _add_max_shard_size(p):
    p.add_argument("--max-shard-size", help="split the exported safetensors into shards of at most this size "
                   "(bytes, or e.g. 2GB, 500MB) plus model.safetensors.index.json (default: one file)")


def cmd_calibrate(args):
    """STS: record rounds with every draft verified, fit per-position temperatures, save them
    beside the drafter, print ECE / AUROC before and after."""
    import numpy as np

    from .chat import with_stop_id
    from .checkpoint import load_draft_config, load_drafter, load_target
    from .data import read_prompts, prompts_from_documents, stdlib_corpus
    from .sampling import Sampling
    from .schedule import Calibration, check_sts_fit, fit_sts
    from .speculative import no_confidence_hint, speculative_generate
    from .tokenizer import Tokenizer

    dcfg = load_draft_config(args.draft)  # read before any weights load
    if not getattr(dcfg, "enable_confidence_head", False):
        raise UsageError(f"{args.draft}: the drafter has no confidence head to calibrate" + no_confidence_hint(dcfg))
    args.target = _target_or_embedded(args.target)
    target, tcfg = load_target(args.target, args.dtype, per_layer="auto")
    draft, dcfg = load_drafter(args.draft, target, tcfg, args.dtype, per_layer="auto")
    tok = Tokenizer(args.tokenizer or args.target)
    if args.prompts in ("held-out", "train"):
        docs = stdlib_corpus(args.prompts)
        prompts = prompts_from_documents(docs, args.prompt_tokens, tok.encode)
        prompts = [prompts[i] for i in np.random.default_rng(args.seed).permutation(len(prompts))]
    else:
        chat, end_of_turn = chat_rule(args, tok)
        tcfg = with_stop_id(tcfg, end_of_turn)
        encode = chat or (lambda text: tok.encode(text)[-args.prompt_tokens:])
        prompts = [encode(p) for p in read_prompts(args.prompts)]
    prompts = [p for p in prompts if p][: args.num_prompts]
    if not prompts:
        raise DataError(f"--prompts {args.prompts}: no non-empty prompt to calibrate on")
    K = dcfg.block_size
    logits, accepted = [], []
    for i in range(0, len(prompts), args.batch_size):
        res = speculative_generate(target, tcfg, draft, dcfg, prompts[i : i + args.batch_size],
                                   max_new_tokens=args.max_new_tokens, sampling=Sampling(args.temperature),
                                   seed=args.seed + i, trace=True, scheduler="fixed")
        for rounds in res.trace:
            for r in rounds:
                if len(r["proposed"]) == K:  # rounds capped by the cache offered fewer
                    logits.append(r["confidence_logits"])
                    accepted.append(r["accepted"])
    if len(accepted) < args.min_rounds:  # before the fit: fit_sts needs rounds at all
        check_sts_fit(None, np.asarray(accepted), args.min_rounds)
    fit = fit_sts(np.asarray(logits), np.asarray(accepted))
    check_sts_fit(fit, np.asarray(accepted), args.min_rounds)  # refused: the old file stays as it was
    fit.report.update(rounds=len(accepted), prompts=len(prompts), temperature=args.temperature)
    out = args.out or args.draft
    greedy = args.temperature == 0
    try:
        old = Calibration.load(out, K)
    except DataError as err:  # a file for another block size, or broken: this fit replaces it
        print(f"replacing {Calibration.path(out)}: {err}")
        old = None
    Calibration.fitted(fit, greedy, old).save(out)
    rep = fit.report
    regime = "greedy" if greedy else "sampled"
    kept = "" if old is None else f"; the {'sampled' if greedy else 'greedy'} set already there is kept"
    print(f"STS on {len(accepted)} rounds ({len(prompts)} prompts, T={args.temperature}): the {regime} set, saved to "
          f"{Calibration.path(out)}{kept}")
    print(" k   temp   ECE before  ECE after  AUROC(c_k)  AUROC prefix before/after")
    for k in range(K):
        print(f"{k + 1:2d} {rep['temperatures'][k]:6.2f}   {rep['ece_before'][k]:9.4f} {rep['ece_after'][k]:10.4f}"
              f"  {rep['auroc_before'][k]:10.3f}  {rep['auroc_prefix_before'][k]:.3f}/{rep['auroc_prefix_after'][k]:.3f}")


EMBEDDED_DIR = _checkpoint_lib.EMBEDDED_DIR


def _target_or_embedded(path):
    if path:
        return path
    try:
        return _checkpoint_lib.embedded_path("target", EMBEDDED_DIR)
    except FileNotFoundError as e:
        raise SystemExit(f"error: no --target given, and {e}") from None


def cmd_eval(args):
    """Table 1 / Figure 2 / Figure 6 for one or more drafters on one or more prompt sets."""
    from .chat import with_stop_id
    from .checkpoint import load_drafter, load_target
    from .evaluate import (evaluate_drafter, format_table, load_prompt_set, plot_acceptance, plot_reliability,
                           tau_ratios)
    from .sampling import Sampling
    from .schedule import Calibration
    from .tokenizer import Tokenizer

    target_dir = _target_or_embedded(args.target)
    try:
        target, tcfg = load_target(target_dir, args.dtype, per_layer="auto")
        tok = Tokenizer(args.tokenizer or target_dir)
        chat, end_of_turn = chat_rule(args, tok)
        tcfg = with_stop_id(tcfg, end_of_turn)
        sets = [load_prompt_set(p, tok.encode, args.prompt_tokens, args.num_prompts, chat=chat) for p in args.prompts]
        drafters = [(d, *load_drafter(d, target, tcfg, args.dtype, per_layer="auto")) for d in args.draft]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    results = []
    for (path, draft, dcfg), name in zip(drafters, drafter_names(args.draft)):
        for domain, prompts in sets:
            results.append(evaluate_drafter(
                target, tcfg, draft, dcfg, prompts, name=name, domain=domain, sampling=Sampling(args.temperature),
                block_size=args.block_size, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                seed=args.seed, calibration=Calibration.load(path, dcfg.block_size), progress=not args.json,
            ))
    os.makedirs(args.out, exist_ok=True)
    figures = {"acceptance": os.path.join(args.out, "acceptance_by_position.png"),
               "reliability": os.path.join(args.out, "confidence_reliability.png")}
    plot_acceptance(results, figures["acceptance"])
    plot_reliability(results, figures["reliability"])
    if args.json:
        print(strict_json({"results": [r.to_json() for r in results], "tau_ratios": tau_ratios(results),
                           "figures": figures, "temperature": args.temperature}))
    else:
        print(format_table(results))
        print(f"\nfigures: {figures['acceptance']}, {figures['reliability']}")


def drafter_names(paths: list[str]) -> list[str]:
    """Table labels for drafter directories: the directory name, or as many trailing path
    components as it takes to tell apart directories of the same name (``run-a/draft``)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise SystemExit(f"error: the same drafter directory is given twice: {', '.join(paths)}")


def cmd_profile_sps(args):
    from .checkpoint import load_target
    from .speculative import profile_verification

    target, tcfg = load_target(args.target, args.dtype, per_layer="auto")
    prof = profile_verification(target, tcfg, args.batch, args.block_size, args.context)
    prof.save(args.out)
    print(f"SPS profile (batch {args.batch}, {args.block_size} drafts) saved to {args.out}")
    for b in prof.buckets:
        print(f"  budget {b:4d} tokens: {prof(b):8.1f} steps/s")


def cmd_train_target(args):
    from .recipes import train_target_recipe
    from .trainer import workdir_lock

    with workdir_lock(args.out):  # taken before the data is prepared: a second run fails at once
        train_target_recipe(args)


def cmd_train_draft(args):
    from .recipes import train_draft_recipe
    from .trainer import workdir_lock

    try:
        with workdir_lock(args.out):
            train_draft_recipe(args)
    except ValueError as e:  # bad data options, or more prompts of a domain than the corpus holds
        raise SystemExit(f"error: {e}") from None


def chat_rule(args, tokenizer):
    """How calibrate / eval feed JSONL prompts: DeepSpec's chat rule (first turn, generation
    prompt, no thinking) when the tokenizer has a template, unless ``--no-chat``. Returns the
    ``text -> ids`` encoder (None: raw text) and the template's end-of-turn id."""
    from .chat import end_of_turn_id, first_turn_encoder, load_chat_template

    template = load_chat_template(tokenizer.path) if args.chat is not False else None
    if args.chat and template is None:
        raise SystemExit(f"error: --chat: the tokenizer at {os.path.dirname(tokenizer.path)} has no chat template "
                         f"(chat_template in tokenizer_config.json, or chat_template.jinja)")
    if template is None:
        return None, None
    return first_turn_encoder(tokenizer, template), end_of_turn_id(tokenizer, template)


def cmd_export_draft(args):
    """A drafter (DeepSpec directory, orbax checkpoint or train-draft run) written in DeepSpec's
    format; ``--with-embeddings`` adds the target's ``embed_tokens`` / ``lm_head`` copies, which
    DeepSpec's ``from_pretrained`` needs (without them it initialises both randomly)."""
    import shutil

    from .checkpoint import load_drafter, load_target, save_draft
    from .config import read_json

    target_dir = _target_or_embedded(args.target)
    try:
        target, tcfg = load_target(target_dir, "float32")
        draft, dcfg = load_drafter(args.src, target, tcfg, "float32")
        dtype = args.dtype
        if dtype is None:  # keep the source's dtype (DeepSpec and our exports record it in config.json)
            config = os.path.join(args.src, "config.json")
            dtype = read_json(config).get("dtype") if os.path.isfile(config) else None
            dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
        save_draft(args.out, draft, dcfg, target, dtype=dtype, embedding_copies=args.with_embeddings,
                   max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    calibration = os.path.join(args.src, "sts_calibration.json")
    if os.path.isfile(calibration):
        shutil.copy(calibration, os.path.join(args.out, "sts_calibration.json"))
    copies = "with" if args.with_embeddings else "without"
    print(f"exported {args.src} -> {args.out} ({dtype}, {copies} the target's embed_tokens / lm_head copies)")


def _add_prompt_run_args(p):
    """Options shared by calibrate and eval: which prompts, and how each is decoded."""
    p.add_argument("--tokenizer")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="JSONL prompts through the tokenizer's chat template, as DeepSpec evaluates (first turn, "
                        "generation prompt, no thinking; default: on when the tokenizer has a template)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)


def _add_distributed_args(p):
    g = p.add_argument_group("multi-host (run the same command on every host, one process per host)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="jax.distributed coordinator (process 0's address); 'auto' lets jax find it (TPU slices, "
                        "SLURM). The mesh then spans every host's devices; process 0 prints the results")
    g.add_argument("--num-processes", type=int, help="with --coordinator HOST:PORT: how many processes")
    g.add_argument("--process-id", type=int, help="with --coordinator HOST:PORT: this process's index, 0..N-1")


def init_distributed(args):
    """``jax.distributed.initialize`` from ``--coordinator`` / ``--num-processes`` /
    ``--process-id``, before anything else touches jax (a no-op without ``--coordinator``)."""
    if getattr(args, "coordinator", None) is None:
        for option in ("num_processes", "process_id"):
            if getattr(args, option, None) is not None:
                raise UsageError(f"--{option.replace('_', '-')} needs --coordinator HOST:PORT")
        return
    import jax

    if args.coordinator == "auto":
        jax.distributed.initialize()
        return
    if args.num_processes is None or args.process_id is None:
        raise UsageError("--coordinator HOST:PORT needs --num-processes N and --process-id I")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id {args.process_id} outside 0..{args.num_processes - 1} (--num-processes)")
    # CPU hosts exchange collectives through gloo (accelerators use their own interconnect)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)


def is_main_process() -> bool:
    """Process 0 of a multi-host run (or the only process): the one that prints results."""
    import jax

    return jax.process_index() == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-jax", description="DSpark speculative decoding in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate with a target (ar) or target + drafter (speculative)")
    _add_generate_args(g)
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("demo", help="random small model pair: AR vs speculative, outputs compared")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("calibrate", help="STS calibration of the confidence head (writes sts_calibration.json): "
                       "--temperature 0 fits the set greedy decoding reads, any other the sampled set; the other set "
                       "in the file is kept")
    c.add_argument("--target", help="default: the embedded target in checkpoints/")
    c.add_argument("--draft", required=True)
    c.add_argument("--prompts", default="held-out",
                   help="JSONL prompts, 'held-out' (stdlib held-out documents) or 'train' (the training split: keeps "
                        "the held-out documents for `eval`)")
    _add_prompt_run_args(c)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="auto")
    c.add_argument("--out", help="a .json file, or a directory for sts_calibration.json (default: the draft directory)")
    c.add_argument("--min-rounds", type=int, default=32,
                   help="refuse to fit (and keep the old file) on fewer rounds with all drafts offered (default 32)")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", help="tau and acceptance per domain and drafter (Table 1), Figure 2 and 6 plots")
    e.add_argument("--target", help="default: the embedded target in checkpoints/")
    e.add_argument("--draft", action="append", required=True,
                   help="a drafter directory, or a train-draft --out directory to evaluate its latest "
                        "checkpoint while it trains (repeatable)")
    e.add_argument("--prompts", nargs="+", default=["held-out-code", "held-out-prose"],
                   help="held-out-code, held-out-prose, or DeepSpec-format JSONL files")
    _add_prompt_run_args(e)
    e.add_argument("--block-size", type=int)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--out", default="eval_out", help="directory for the PNG figures")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export-draft", help="write a drafter in DeepSpec's format (--with-embeddings: loadable by "
                       "DeepSpec's from_pretrained)")
    x.add_argument("src", help="a drafter: DeepSpec directory, orbax checkpoint, or train-draft --out directory")
    x.add_argument("out", help="output directory (config.json + model.safetensors)")
    x.add_argument("--target", help="the drafter's target (default: the embedded target in checkpoints/)")
    x.add_argument("--with-embeddings", action="store_true",
                   help="include copies of the target's embed_tokens / lm_head (every key DeepSpec writes)")
    x.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the source's dtype")
    _add_max_shard_size(x)
    x.set_defaults(func=cmd_export_draft)

    s = sub.add_parser("profile-sps", help="measure verification steps/s by token budget (for algorithm1/async)")
    s.add_argument("--target", required=True)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--block-size", type=int, default=7)
    s.add_argument("--context", type=int, default=128)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_profile_sps)

    t = sub.add_parser("train-target", help="train a small Qwen3 target LM (stop any time, resume with the same command)")
    t.add_argument("--out", required=True, help="work directory: tokenizer, data, checkpoints, metrics, final model")
    t.add_argument("--corpus", nargs="+", default=["stdlib"],
                   help="'stdlib' (Python sources + pydoc topics, held-out split kept out) or text files/directories")
    t.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--intermediate", type=int, default=768)
    t.add_argument("--untied", action="store_true", help="separate lm_head (default: tied to the embedding)")
    t.add_argument("--remat", action="store_true", help="recompute layers in the backward pass (less memory)")
    _add_optim_args(t, lr=2e-3, steps=10000, batch=8, seq_len=256)
    t.set_defaults(func=cmd_train_target)

    r = sub.add_parser("train-draft", help="train a DSpark/DFlash drafter against a frozen target (resumable)")
    r.add_argument("--target", required=True, help="target directory (Hugging Face format, with tokenizer.json)")
    r.add_argument("--out", required=True, help="work directory: regenerated data, checkpoints, metrics, final draft")
    r.add_argument("--drafter", choices=("dspark", "eagle3"), default="dspark",
                   help="dspark: DSpark / DFlash (--head); eagle3: one layer drafting a chain, trained with DeepSpec's "
                        "training-time test of --block-size (ttt_length) steps")
    r.add_argument("--step-loss-decay", type=float, default=0.8, help="eagle3: weight of TTT step k is decay^k")
    r.add_argument("--head", default="vanilla",
                   help="vanilla, gated, rnn, none (= DFlash), or a plug-in Markov head package.module:Name "
                        "(a dspark_jax.heads.MarkovHead subclass, importable)")
    r.add_argument("--head-arg", action="append", metavar="KEY=VALUE",
                   help="a plug-in head's constructor argument (repeatable; values are JSON or strings)")
    r.add_argument("--confidence-head",
                   help="a plug-in confidence head package.module:Name (an nnx.Module built as Head(dcfg, "
                        "feature_size, *, rngs, **args), called as head(h_k, prev_token, features) -> logit; "
                        "default: DeepSpec's linear head)")
    r.add_argument("--confidence-head-arg", action="append", metavar="KEY=VALUE",
                   help="a plug-in confidence head's constructor argument (repeatable; values are JSON or strings)")
    r.add_argument("--loss-term", nargs=2, action="append", metavar=("PATH", "WEIGHT"),
                   help="an extra loss term package.module:function with its weight, beside DeepSpec's three "
                        "(repeatable; see train.LossConfig)")
    r.add_argument("--markov-rank", type=int, default=256, help="Markov head rank r (DeepSpec default 256)")
    r.add_argument("--no-confidence", action="store_true", help="no confidence head")
    r.add_argument("--block-size", type=int, default=7)
    r.add_argument("--layers", type=int, default=2, help="draft decoder layers")
    r.add_argument("--target-layer-ids", help="comma-separated (default: spread over the target's layers)")
    r.add_argument("--num-anchors", type=int, default=32)
    r.add_argument("--prompts", nargs="+", default=["stdlib"], help="'stdlib' or JSONL files ({'turns': [...]} / {'text': ...})")
    r.add_argument("--num-prompts", type=int, default=2048)
    r.add_argument("--prompt-tokens", type=int, default=64, help="prompt length cut from stdlib documents")
    r.add_argument("--answer-tokens", type=int, default=192, help="answer length regenerated by the target")
    r.add_argument("--regen-temperature", type=float, nargs="+", default=[1.0],
                   help="sampling temperature(s) of the regenerated answers (0 = greedy); several split the prompts evenly")
    r.add_argument("--prose-fraction", type=float,
                   help="with --prompts stdlib: this share of the prompts comes from the prose documents "
                        "(default: the corpus's own mix, a few percent prose)")
    r.add_argument("--regen-batch", type=int, default=64)
    r.add_argument("--no-embedding-copies", action="store_true",
                   help="export without the copies of the target's embed_tokens / lm_head (the loader uses the target's)")
    r.add_argument("--precompute", action="store_true", help="precompute target features instead of running the target in the step")
    _add_optim_args(r, lr=6e-4, steps=2000, batch=8, seq_len=256)
    r.set_defaults(func=cmd_train_draft)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
        _add_distributed_args(command)
    return parser


class CommandFailed(SystemExit):
    """The exit of a command that failed on the user's input: ``code`` is the exit status
    (2 usage, 1 data), ``str()`` the one-line message already printed to stderr."""

    def __init__(self, status: int, message: str):
        super().__init__(status)
        self.message = message

    def __str__(self):
        return self.message


def exit_status(error: BaseException) -> int | None:
    """2 for a usage error, 1 for unusable data or files, 128 + signal for an interrupted
    run, None for anything else (a bug: its traceback is shown)."""
    from .trainer import Interrupted

    if isinstance(error, UsageError):
        return 2
    if isinstance(error, Interrupted):
        return 128 + error.signum
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, (ValueError, OSError)):
        return 1
    return None


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None):
    """Run one command. A user's mistake prints one ``error: ...`` line and exits 2 (usage) or
    1 (data); ``--debug`` shows the traceback instead."""
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in training manifests as the re-runnable recipe
    show_warning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        check_args(args)
        init_distributed(args)
        args.func(args)
    except SystemExit as e:  # raised by a command with its message (older code paths: exit 1)
        if isinstance(e, CommandFailed) or not isinstance(e.code, str):
            raise
        cause = e.__context__  # the error the command turned into this exit
        if args.debug and cause is not None:
            raise cause
        message = e.code if e.code.startswith("error:") else f"error: {e.code}"
        print(message, file=sys.stderr)
        raise CommandFailed(exit_status(cause) or 1 if cause is not None else 1, message) from None
    except BaseException as e:
        status = exit_status(e)
        if status is None or args.debug:
            raise
        message = f"error: {str(e).strip() or type(e).__name__}"
        print(message, file=sys.stderr)
        raise CommandFailed(status, message) from None
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":
    main(sys.argv[1:])
