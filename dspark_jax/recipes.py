"""End-to-end training recipes behind ``dspark-jax train-target`` and ``dspark-jax train-draft``.

Each recipe works in one directory: everything it derives (tokenizer, tokenized data,
regenerated answers) is cached there, checkpoints go to ``checkpoints/``, metrics to
``metrics.jsonl``, and the final model is exported in the Hugging Face / DeepSpec format with a
``manifest.json`` recording the command, config, data, steps, time and final losses. Running the
same command again resumes where the last run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import data as data_lib
from . import train as train_lib
from .checkpoint import cast_tree, load_target, save_draft, save_draft_orbax, save_qwen3
from .config import Qwen3Config
from .draft import DraftConfig
from .drafters import family_of
from .heads import CONFIDENCE_HEADS, MARKOV_HEADS, head_structure
from .plugins import parse_plugin_args
from .target import draft_layers_config, init_params
from .tokenizer import Tokenizer
from .trainer import data_parallel_mesh, replicate, run_training


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _last_metrics(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    return json.loads(lines[-1]) if lines else {}


def _training_seconds(workdir: str) -> float:
    """Wall time of the whole training, all resumed runs together, from the logged seconds per step
    (a step logged twice, before an interruption and after the resume, counts once)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0.0
    per_step = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if "seconds_per_step" in row:
                per_step[row["step"]] = row["seconds_per_step"]
    total, prev = 0.0, 0
    for step in sorted(per_step):
        total += per_step[step] * (step - prev)
        prev = step
    return total


def _command_line(args) -> str:
    argv = getattr(args, "argv", None)
    return "dspark-jax " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def _corpus_docs(sources, split):
    if sources == ["stdlib"]:
        return data_lib.stdlib_corpus(split)
    if split == "held-out":
        return []
    return data_lib.text_corpus(sources)


# ---------------------------------------------------------------------------- target


def prepare_target_data(args, workdir: str) -> tuple[Tokenizer, dict]:
    tok_path = os.path.join(workdir, "tokenizer.json")
    if not os.path.exists(tok_path):
        if args.tokenizer:
            with open(args.tokenizer) as src, open(tok_path, "w") as dst:
                dst.write(src.read())
        else:
            print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on the training split")
            data_lib.train_tokenizer((d.text for d in _corpus_docs(args.corpus, "train")), args.vocab_size, tok_path)
    tok = Tokenizer(tok_path)
    data_path = os.path.join(workdir, f"data_seq{args.seq_len}.npz")
    if not os.path.exists(data_path):
        eos = tok.token_id(data_lib.EOS_TOKEN)
        arrays = {}
        for split in ("train", "held-out"):
            docs = _corpus_docs(args.corpus, split)
            if docs:
                arrays[split.replace("-", "_")] = data_lib.pack_documents((tok.encode(d.text) for d in docs), args.seq_len, eos)
        np.savez(data_path, **arrays)
    with np.load(data_path) as z:
        arrays = {k: z[k] for k in z.files}
    return tok, arrays


def train_target_recipe(args):
    workdir = args.out
    os.makedirs(workdir, exist_ok=True)
    tok, arrays = prepare_target_data(args, workdir)
    eos = tok.token_id(data_lib.EOS_TOKEN)
    cfg = Qwen3Config(
        vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, tie_word_embeddings=not args.untied, eos_token_ids=(eos,),
        max_position_embeddings=max(2048, args.seq_len),
    )
    train_rows = arrays["train"]
    print(f"target {cfg.num_hidden_layers}L d{cfg.hidden_size} vocab {cfg.vocab_size}: "
          f"{train_rows.shape[0]} training rows of {args.seq_len} tokens "
          f"({train_rows.size / 1e6:.1f}M tokens), {args.steps} steps of {args.batch_size}")
    oc = train_lib.OptimConfig(learning_rate=args.lr, warmup_fraction=args.warmup, total_steps=args.steps,
                               weight_decay=args.weight_decay, clip_norm=args.clip_norm)
    optimizer = train_lib.make_optimizer(oc)
    params = init_params(jax.random.key(args.seed), cfg, jnp.float32)
    state = train_lib.init_train_state(params, optimizer)
    mesh = data_parallel_mesh(args.data_parallel)

    def step_fn(state, batch, key):
        return train_lib.target_train_step(state, batch["tokens"], cfg=cfg, optimizer=optimizer, remat=args.remat)

    eval_fn = None
    held = arrays.get("held_out")
    if held is not None and len(held):
        eval_rows = jnp.asarray(held[: 4 * args.batch_size])

        def eval_fn(state):
            return {"loss": train_lib.target_eval_loss(state.params, eval_rows, cfg=cfg)}

    meta = {"kind": "target", "config": cfg.to_hf(), "command": _command_line(args)}
    t0 = time.time()
    state, step = run_training(
        state=state, step_fn=step_fn, batches=data_lib.BatchStream({"tokens": train_rows}, args.batch_size, args.seed),
        total_steps=args.steps, workdir=workdir, meta=meta, seed=args.seed, save_every=args.save_every,
        log_every=args.log_every, mesh=mesh, progress=not args.no_progress, eval_fn=eval_fn,
        eval_every=args.eval_every, description="train-target",
    )
    if step >= args.steps and jax.process_index() == 0:  # the state is replicated: one host exports it
        export_dir = os.path.join(workdir, "model")
        save_qwen3(export_dir, jax.device_get(state.params), cfg, dtype=args.export_dtype,
                   max_shard_size=getattr(args, "max_shard_size", None))
        with open(os.path.join(workdir, "tokenizer.json")) as src, open(os.path.join(export_dir, "tokenizer.json"), "w") as dst:
            dst.write(src.read())
        _write_json(os.path.join(export_dir, "manifest.json"), {
            "recipe": meta["command"], "config": cfg.to_hf(), "steps": step, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "learning_rate": args.lr, "corpus": args.corpus,
            "python": sys.version.split()[0], "jax": jax.__version__,
            "train_tokens": int(train_rows.size), "training_seconds": round(_training_seconds(workdir)),
            "seconds_this_run": round(time.time() - t0),
            "final_metrics": _last_metrics(workdir),
        })
        print(f"exported {export_dir}")
    return state


# ---------------------------------------------------------------------------- draft


def default_target_layer_ids(num_layers: int, count: int = 2) -> tuple[int, ...]:
    """Evenly spread non-final layers (DeepSpec refuses the last layer)."""
    if num_layers < 2:
        return (0,)
    ids = np.linspace(1, num_layers - 2, count).round().astype(int) if num_layers > 2 else np.array([0])
    return tuple(sorted(set(int(i) for i in ids)))


def regenerate_answers(target, tcfg, prompts, answer_tokens, temperature, batch, seed, progress=True):
    """The target's own answers to ``prompts`` (as DeepSpec trains on), batched."""
    from tqdm.auto import tqdm

    from .decoding import generate_ar
    from .sampling import Sampling

    answers = []
    sampling = Sampling(temperature=temperature)
    for i in tqdm(range(0, len(prompts), batch), desc="regenerate", disable=not progress):
        chunk = prompts[i : i + batch]
        pad = batch - len(chunk)
        out = generate_ar(target, tcfg, list(chunk) + [chunk[0]] * pad, max_new_tokens=answer_tokens,
                          sampling=sampling, seed=seed + i)
        answers.extend(out[: len(chunk)])
    return answers


def prepare_draft_data(args, workdir, target, tcfg, tok: Tokenizer):
    path = os.path.join(workdir, "regenerated.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    rng = np.random.default_rng(args.seed)
    if args.prose_fraction is not None:  # stdlib prompts only (check_draft_data_args)
        prompts = data_lib.domain_mixed_prompts(data_lib.stdlib_corpus("train"), args.prompt_tokens, tok.encode,
                                                args.num_prompts, args.prose_fraction, rng)
    else:
        if args.prompts == ["stdlib"]:
            docs = data_lib.stdlib_corpus("train")
            prompts = data_lib.prompts_from_documents(docs, args.prompt_tokens, tok.encode)
        else:
            prompts = [tok.encode(p) for f in args.prompts for p in data_lib.read_prompts(f)]
            prompts = [p[-args.prompt_tokens :] for p in prompts if p]
        prompts = [prompts[i] for i in rng.permutation(len(prompts))[: args.num_prompts]]
    temperatures = np.atleast_1d(args.regen_temperature).tolist()
    answers = []
    for temperature, part in zip(temperatures, np.array_split(np.arange(len(prompts)), len(temperatures))):
        print(f"regenerating {len(part)} answers of {args.answer_tokens} tokens with the target at temperature {temperature}")
        answers += regenerate_answers(target, tcfg, [prompts[i] for i in part], args.answer_tokens, temperature,
                                      args.regen_batch, args.seed + int(part[0]) if len(part) else args.seed,
                                      not args.no_progress)
    pad = tok.token_id(data_lib.PAD_TOKEN)
    arrays = data_lib.answers_dataset(prompts, answers, args.seq_len, pad if pad is not None else 0)
    if jax.process_index() == 0:  # every host regenerates the same rows; one writes them, whole or not at all
        with open(path + ".partial", "wb") as f:
            np.savez(f, **arrays)
        os.replace(path + ".partial", path)
    return arrays


def precompute_features(target, tcfg, dcfg, arrays, batch):
    fn = jax.jit(lambda t: train_lib.target_features(target, tcfg, dcfg, t))
    feats, last = [], []
    for i in range(0, len(arrays["tokens"]), batch):
        f, h = fn(jnp.asarray(arrays["tokens"][i : i + batch]))
        feats.append(np.asarray(f))
        last.append(np.asarray(h))
    return {**arrays, "features": np.concatenate(feats), "last_hidden": np.concatenate(last)}


def check_draft_data_args(args):
    """The regeneration options, checked before anything loads."""
    if args.prose_fraction is not None and args.prompts != ["stdlib"]:
        raise ValueError("--prose-fraction applies to --prompts stdlib only (JSONL prompts have no domain)")
    if args.prose_fraction is not None and not 0.0 <= args.prose_fraction <= 1.0:
        raise ValueError(f"--prose-fraction must be in [0, 1], got {args.prose_fraction}")
    if any(t < 0 for t in np.atleast_1d(args.regen_temperature)):
        raise ValueError(f"--regen-temperature values must be >= 0, got {args.regen_temperature}")
    check_plugin_args(args)


def check_plugin_args(args):
    """--head / --head-arg / --confidence-head / --confidence-head-arg / --loss-term: importable,
    well-formed, before anything loads."""
    head = getattr(args, "head", "vanilla")
    if parse_plugin_args(getattr(args, "head_arg", None)) and MARKOV_HEADS.is_builtin(head):
        raise ValueError(f"--head-arg is for plug-in heads (package.module:Name); the built-in head {head!r} "
                         "takes --markov-rank")
    MARKOV_HEADS.resolve(head)
    confidence = getattr(args, "confidence_head", None) or "linear"
    confidence_args = parse_plugin_args(getattr(args, "confidence_head_arg", None), "--confidence-head-arg")
    if confidence_args and CONFIDENCE_HEADS.is_builtin(confidence):
        raise ValueError("--confidence-head-arg is for a plug-in confidence head (--confidence-head package.module:Name)")
    if getattr(args, "confidence_head", None) and (getattr(args, "no_confidence", False)
                                                   or getattr(args, "drafter", "dspark") != "dspark"):
        raise ValueError("--confidence-head needs a DSpark drafter with a confidence head "
                         "(not --no-confidence, not --drafter eagle3)")
    CONFIDENCE_HEADS.resolve(confidence)
    train_lib.loss_terms_from_args(getattr(args, "loss_term", None))


def train_draft_recipe(args):
    check_draft_data_args(args)
    workdir = args.out
    os.makedirs(workdir, exist_ok=True)
    target, tcfg = load_target(args.target, "float32")
    tok = Tokenizer(args.tokenizer if getattr(args, "tokenizer", None) else args.target)
    mask_id = tok.token_id(data_lib.MASK_TOKEN)
    if mask_id is None:
        mask_id = tcfg.vocab_size - 1
    layer_ids = tuple(int(i) for i in args.target_layer_ids.split(",")) if args.target_layer_ids else None
    if getattr(args, "drafter", "dspark") == "eagle3":
        from . import eagle3

        # DeepSpec's build_draft_config: the target's (text) config with one full-attention layer
        dcfg = eagle3.Eagle3Config(
            layers=dataclasses.replace(draft_layers_config(tcfg, 1), tie_word_embeddings=False),
            target_layer_ids=layer_ids or eagle3.default_target_layer_ids(tcfg.num_hidden_layers),
            ttt_length=args.block_size, step_loss_decay=args.step_loss_decay, num_target_layers=tcfg.num_hidden_layers,
        )
    else:
        dcfg = DraftConfig(
            layers=draft_layers_config(tcfg, args.layers),
            block_size=args.block_size, target_layer_ids=layer_ids or default_target_layer_ids(tcfg.num_hidden_layers),
            mask_token_id=mask_id, markov_rank=0 if args.head == "none" else args.markov_rank,
            markov_head_type="vanilla" if args.head == "none" else args.head,
            markov_head_args=parse_plugin_args(getattr(args, "head_arg", None)),
            enable_confidence_head=not args.no_confidence, num_anchors=args.num_anchors,
            num_target_layers=tcfg.num_hidden_layers,
            confidence_head_type=getattr(args, "confidence_head", None) or "linear",
            confidence_head_args=parse_plugin_args(getattr(args, "confidence_head_arg", None), "--confidence-head-arg"),
        )
        head_structure(dcfg)  # plug-in heads are built (abstractly) now: a bad constructor fails before the data
    family = family_of(dcfg)
    family.check_compatible(dcfg, tcfg)
    layer_ids = dcfg.target_layer_ids
    arrays = prepare_draft_data(args, workdir, target, tcfg, tok)
    if args.precompute:
        arrays = precompute_features(target, tcfg, dcfg, arrays, args.batch_size)
    oc = train_lib.OptimConfig(learning_rate=args.lr, warmup_fraction=args.warmup, total_steps=args.steps,
                               weight_decay=args.weight_decay, clip_norm=args.clip_norm)
    optimizer = train_lib.make_optimizer(oc)
    lc = train_lib.LossConfig(extra_terms=train_lib.loss_terms_from_args(getattr(args, "loss_term", None)))
    params = family.init_params(jax.random.key(args.seed), dcfg)
    state = train_lib.init_train_state(params, optimizer)
    mesh = data_parallel_mesh(args.data_parallel)
    step_target = replicate(target, mesh)  # on every device of the mesh (of every host), like the state

    def step_fn(state, batch, key):
        if family.name == "eagle3":
            from .eagle3 import train_step

            return train_step(state, step_target, batch, key, cfg=dcfg, tcfg=tcfg, optimizer=optimizer)
        return train_lib.draft_train_step(state, step_target, batch, key, dcfg=dcfg, tcfg=tcfg, optimizer=optimizer,
                                          lc=lc)

    print(f"drafter head={dcfg.head_type} block={dcfg.block_size} layers={dcfg.layers.num_hidden_layers} "
          f"target_layer_ids={layer_ids}: {len(arrays['tokens'])} sequences, {args.steps} steps of {args.batch_size}")
    meta = {"kind": "draft", "config": dcfg.to_hf(), "command": _command_line(args)}
    t0 = time.time()
    state, step = run_training(
        state=state, step_fn=step_fn, batches=data_lib.BatchStream(arrays, args.batch_size, args.seed),
        total_steps=args.steps, workdir=workdir, meta=meta, seed=args.seed, save_every=args.save_every,
        log_every=args.log_every, mesh=mesh, progress=not args.no_progress, description=f"train-draft[{dcfg.head_type}]",
    )
    if step >= args.steps and jax.process_index() == 0:  # the state is replicated: one host exports it
        export_dir = os.path.join(workdir, "draft")
        params = jax.device_get(state.params)
        if getattr(dcfg, "plugin_heads", None):  # the DeepSpec format has no names for a plug-in's weights: its NNX state in orbax
            save_draft_orbax(export_dir, cast_tree(params, args.export_dtype), dcfg)
        else:
            save_draft(export_dir, params, dcfg, target, dtype=args.export_dtype,
                       embedding_copies=not getattr(args, "no_embedding_copies", False),
                       max_shard_size=getattr(args, "max_shard_size", None))
        _write_json(os.path.join(export_dir, "manifest.json"), {
            "recipe": meta["command"], "config": dcfg.to_hf(), "target": args.target,
            "steps": step, "batch_size": args.batch_size, "seq_len": args.seq_len, "learning_rate": args.lr,
            "sequences": int(len(arrays["tokens"])), "training_seconds": round(_training_seconds(workdir)),
            "python": sys.version.split()[0], "jax": jax.__version__,
            "seconds_this_run": round(time.time() - t0),
            "final_metrics": _last_metrics(workdir),
        })
        print(f"exported {export_dir}")
    return state
