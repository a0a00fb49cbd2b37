"""Checkpoints in and out: Hugging Face / DeepSpec safetensors directories, and orbax.

Hugging Face stores linear weights as ``[out, in]`` with heads fused into one axis; this
package keeps heads as their own axis (``q_proj [D, H, Dh]``). The mapping is one table
(``LAYER_TENSORS``) used in both directions, so loading and export cannot drift apart.
Loading needs no torch: safetensors' numpy reader (bfloat16 through ml_dtypes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import Qwen3Config, load_qwen3_config, read_json
from .layers import DecoderLayerParams, decoder_layer_shapes
from .target import Qwen3Params, init_params
from .validate import check_finite, check_finite_tree, check_trained_config


class CheckpointError(ValueError):
    """A checkpoint that does not match what its config promises; the message names the problem."""


def open_safetensors(path: str):
    """``safe_open`` with a damaged file (truncated, not safetensors) named in a CheckpointError."""
    try:
        return safe_open(path, "np")
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the download or copy may be "
                              "incomplete") from None


# field of DecoderLayerParams -> (Hugging Face name inside a layer, number of leading
# "input" axes of our layout). HF weight = ours.reshape(prod(shape[:n_in]), -1).T
LAYER_TENSORS: dict[str, tuple[str, int]] = {
    "input_norm": ("input_layernorm.weight", 0),
    "q_proj": ("self_attn.q_proj.weight", 1),
    "k_proj": ("self_attn.k_proj.weight", 1),
    "v_proj": ("self_attn.v_proj.weight", 1),
    "o_proj": ("self_attn.o_proj.weight", 2),
    "q_norm": ("self_attn.q_norm.weight", 0),
    "k_norm": ("self_attn.k_norm.weight", 0),
    "post_norm": ("post_attention_layernorm.weight", 0),
    "gate_proj": ("mlp.gate_proj.weight", 1),
    "up_proj": ("mlp.up_proj.weight", 1),
    "down_proj": ("mlp.down_proj.weight", 1),
}

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_dtype():
    """float32 on CPU (bfloat16 matmuls are ~10x slower there), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def resolve_dtype(dtype) -> Any:
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, str):
        try:
            return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
        except KeyError:
            raise ValueError(f"unsupported dtype {dtype!r} (float32, bfloat16, float16 or auto)") from None
    return dtype


# ---------------------------------------------------------------------------- HF layout


def hf_to_ours(weight: np.ndarray, our_shape: tuple[int, ...], n_in: int) -> np.ndarray:
    return weight if n_in == 0 else weight.T.reshape(our_shape)


def ours_to_hf(weight: np.ndarray, n_in: int) -> np.ndarray:
    if n_in == 0:
        return weight
    return weight.reshape(math.prod(weight.shape[:n_in]), -1).T


def hf_shape(our_shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
    if n_in == 0:
        return tuple(our_shape)
    return (math.prod(our_shape[n_in:]), math.prod(our_shape[:n_in]))


class TensorSource:
    """Lazy access to the tensors of a safetensors directory (single file or sharded index)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = os.fspath(model_dir)
        index_path = os.path.join(self.model_dir, "model.safetensors.index.json")
        single_path = os.path.join(self.model_dir, "model.safetensors")
        if os.path.exists(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            self.file_of = {name: os.path.join(self.model_dir, f) for name, f in weight_map.items()}
            for path in sorted(set(self.file_of.values())):
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path}: shard listed in {index_path} not found")
        elif os.path.exists(single_path):
            with open_safetensors(single_path) as f:
                self.file_of = {name: single_path for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.model_dir}: no model.safetensors or model.safetensors.index.json found"
            )
        self._handles: dict[str, Any] = {}

    def names(self) -> set[str]:
        return {n for n in self.file_of if not n.endswith(IGNORED_SUFFIXES)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name!r}")
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = open_safetensors(path)
        return self._handles[path]


class TensorReader:
    """Reads named tensors with shape checks, records what it used, converts dtype."""

    def __init__(self, source: TensorSource, dtype):
        self.source, self.dtype, self.used = source, dtype, set()

    def read(self, name: str, expected_hf_shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.source.file_of:
            raise CheckpointError(f"{self.source.model_dir}: missing tensor {name!r}")
        shape = self.source.shape(name)
        if shape != tuple(expected_hf_shape):
            raise CheckpointError(
                f"{self.source.model_dir}: tensor {name!r} has shape {list(shape)}, "
                f"expected {list(expected_hf_shape)} from config.json"
            )
        self.used.add(name)
        return self.source.get(name)

    def read_ours(self, name: str, our_shape: tuple[int, ...], n_in: int = 0) -> jax.Array:
        w = self.read(name, hf_shape(our_shape, n_in))
        out = jnp.asarray(hf_to_ours(w, our_shape, n_in), self.dtype)
        check_finite(name, out, self.source.model_dir)
        return out

    def read_layers(self, layer_name: Callable[[int, str], str], shapes: DecoderLayerParams) -> DecoderLayerParams:
        values = {}
        for field, (suffix, n_in) in LAYER_TENSORS.items():
            stacked_shape = getattr(shapes, field)
            per_layer = stacked_shape[1:]
            values[field] = jnp.stack(
                [self.read_ours(layer_name(i, suffix), per_layer, n_in) for i in range(stacked_shape[0])]
            )
        return DecoderLayerParams(**values)

    def check_all_used(self, allowed_unused: set[str] = frozenset()):
        unexpected = sorted(self.source.names() - self.used - set(allowed_unused))
        if unexpected:
            raise CheckpointError(
                f"{self.source.model_dir}: unexpected tensor(s) {unexpected[:8]}"
                + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            )


def layers_to_hf(layers: DecoderLayerParams, layer_name: Callable[[int, str], str]) -> dict[str, np.ndarray]:
    out = {}
    for field, (suffix, n_in) in LAYER_TENSORS.items():
        stacked = np.asarray(getattr(layers, field))
        for i in range(stacked.shape[0]):
            out[layer_name(i, suffix)] = np.ascontiguousarray(ours_to_hf(stacked[i], n_in))
    return out


# ---------------------------------------------------------------------------- Qwen3 target


def _target_layer_name(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


def load_qwen3(model_dir: str | os.PathLike, dtype=None) -> tuple[Qwen3Params, Qwen3Config]:
    """Load a Hugging Face Qwen3 directory (config.json + safetensors) without torch."""
    cfg = load_qwen3_config(model_dir)
    dtype = resolve_dtype(dtype)
    reader = TensorReader(TensorSource(model_dir), dtype)
    D, V = cfg.hidden_size, cfg.vocab_size
    params = Qwen3Params(
        embed=reader.read_ours("model.embed_tokens.weight", (V, D)),
        layers=reader.read_layers(_target_layer_name, decoder_layer_shapes(cfg, cfg.num_hidden_layers)),
        final_norm=reader.read_ours("model.norm.weight", (D,)),
        lm_head=None if cfg.tie_word_embeddings else reader.read_ours("lm_head.weight", (D, V), 1),
    )
    # Tied checkpoints sometimes carry a redundant lm_head copy; it is not used.
    reader.check_all_used({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return params, cfg


def qwen3_to_hf_tensors(params: Qwen3Params) -> dict[str, np.ndarray]:
    tensors = {
        "model.embed_tokens.weight": np.asarray(params.embed),
        "model.norm.weight": np.asarray(params.final_norm),
        **layers_to_hf(params.layers, _target_layer_name),
    }
    if params.lm_head is not None:
        tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(params.lm_head).T)
    return tensors


def _hf_dtype_name(tensors: Mapping[str, np.ndarray]) -> str:
    dt = next(iter(tensors.values())).dtype
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dt), str(dt))


def cast_tree(tree, dtype):
    """Every floating array of a pytree in ``dtype`` (None: unchanged), e.g. bfloat16 for a
    compact checkpoint; loading computes in whatever dtype is asked for."""
    if dtype is None:
        return tree
    dtype = resolve_dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def save_qwen3(model_dir: str | os.PathLike, params: Qwen3Params, cfg: Qwen3Config, extra_config: Mapping | None = None,
               dtype=None):
    """Export to a directory that ``transformers.Qwen3ForCausalLM.from_pretrained`` opens."""
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    tensors = qwen3_to_hf_tensors(cast_tree(params, dtype))
    config = cfg.to_hf() | {"dtype": _hf_dtype_name(tensors)} | dict(extra_config or {})
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    eos = list(cfg.eos_token_ids)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None}, f, indent=2)


# ---------------------------------------------------------------------------- orbax


def save_orbax(path: str | os.PathLike, params: Any, config_json: Mapping[str, Any]):
    """Save a parameter pytree with orbax plus its ``config.json`` beside it."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params, force=True)
        ckptr.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config_json), f, indent=2)


def restore_orbax(path: str | os.PathLike, abstract_params: Any) -> Any:
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir}: no orbax checkpoint here")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, abstract_params)
    check_finite_tree(params, params_dir)
    return params


def save_qwen3_orbax(path, params: Qwen3Params, cfg: Qwen3Config):
    save_orbax(path, params, cfg.to_hf())


def restore_qwen3_orbax(path, dtype=None) -> tuple[Qwen3Params, Qwen3Config]:
    cfg = load_qwen3_config(path)
    dtype = resolve_dtype(dtype)
    abstract = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg, dtype))
    return restore_orbax(path, abstract), cfg


def load_target(path, dtype=None) -> tuple[Qwen3Params, Qwen3Config]:
    """A target from either a Hugging Face directory or one of our orbax checkpoints."""
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        return restore_qwen3_orbax(path, dtype)
    return load_qwen3(path, dtype)


# ---------------------------------------------------------------------------- DeepSpec drafts


def _draft_layer_name(i: int, suffix: str) -> str:
    return f"layers.{i}.{suffix}"


def load_draft_config(draft_dir: str | os.PathLike):
    from .draft import DraftConfig

    path = os.path.join(os.fspath(draft_dir), "config.json")
    raw = read_json(path)
    archs = raw.get("architectures") or []
    if archs and not any("DSpark" in a or "DFlash" in a for a in archs):
        raise CheckpointError(f"{path}: architectures {archs} is not a DSpark/DFlash draft")
    check_trained_config(raw, os.path.join(os.fspath(draft_dir), "manifest.json"), path)
    return DraftConfig.from_hf(raw, path)


def _shared_tensor_differs(reader: TensorReader, name: str, ours: np.ndarray) -> bool:
    if name not in reader.source.file_of:
        return False
    theirs = reader.read(name, ours.shape)
    return not np.array_equal(np.asarray(theirs, np.float32), np.asarray(ours, np.float32))


def load_draft(draft_dir: str | os.PathLike, target: Qwen3Params, target_cfg: Qwen3Config, dtype=None):
    """Load a DeepSpec-format draft directory (config.json + model.safetensors).

    The draft's ``embed_tokens`` / ``lm_head`` are checked against the target's and then not
    kept: the drafter always uses the target's arrays (a warning says so when they differ).
    """
    import warnings

    from .draft import ConfidenceParams, DraftParams, MarkovParams, check_compatible

    dcfg = load_draft_config(draft_dir)
    check_compatible(dcfg, target_cfg, where=os.path.join(os.fspath(draft_dir), "config.json"))
    dtype = resolve_dtype(dtype)
    reader = TensorReader(TensorSource(draft_dir), dtype)
    D, V, r = dcfg.hidden_size, dcfg.layers.vocab_size, dcfg.markov_rank
    m = len(dcfg.target_layer_ids)

    markov = None
    if r:
        markov = MarkovParams(
            w1=reader.read_ours("markov_head.markov_w1.weight", (V, r)),
            w2=reader.read_ours("markov_head.markov_w2.weight", (r, V), 1),
        )
        if dcfg.head_type == "gated":
            markov.gate_w = reader.read_ours("markov_head.gate_proj.weight", (D + r, r), 1)
            markov.gate_b = reader.read_ours("markov_head.gate_proj.bias", (r,))
        elif dcfg.head_type == "rnn":
            markov.joint_w = reader.read_ours("markov_head.joint_proj.weight", (2 * r + D, 3 * r), 1)
            markov.joint_b = reader.read_ours("markov_head.joint_proj.bias", (3 * r,))
    confidence = None
    if dcfg.enable_confidence_head:
        width = D + (r if dcfg.confidence_uses_markov else 0)
        confidence = ConfidenceParams(
            w=reader.read_ours("confidence_head.proj.weight", (width,), 1),
            b=reader.read_ours("confidence_head.proj.bias", (1,)).reshape(()),
        )
    params = DraftParams(
        fc=reader.read_ours("fc.weight", (m * D, D), 1),
        hidden_norm=reader.read_ours("hidden_norm.weight", (D,)),
        layers=reader.read_layers(_draft_layer_name, decoder_layer_shapes(dcfg.layers, dcfg.layers.num_hidden_layers)),
        final_norm=reader.read_ours("norm.weight", (D,)),
        markov=markov,
        confidence=confidence,
    )
    shared = {
        "embed_tokens.weight": np.asarray(target.embed),
        "lm_head.weight": np.asarray(target.embed if target.lm_head is None else target.lm_head.T),
    }
    for name, ours in shared.items():
        if _shared_tensor_differs(reader, name, ours):
            warnings.warn(
                f"{draft_dir}: draft {name} differs from the target's; using the target's "
                f"(the drafter shares the target's embedding and lm_head)",
                stacklevel=2,
            )
    reader.check_all_used(set(shared))
    return params, dcfg


def draft_to_hf_tensors(params, target: Qwen3Params, embedding_copies: bool = True) -> dict[str, np.ndarray]:
    def hf(w, n_in=1):
        return np.ascontiguousarray(ours_to_hf(np.asarray(w), n_in))

    tensors = {
        "fc.weight": hf(params.fc),
        "hidden_norm.weight": np.asarray(params.hidden_norm),
        "norm.weight": np.asarray(params.final_norm),
        **layers_to_hf(params.layers, _draft_layer_name),
    }
    if embedding_copies:
        tensors["embed_tokens.weight"] = np.asarray(target.embed)
        tensors["lm_head.weight"] = np.ascontiguousarray(
            np.asarray(target.embed if target.lm_head is None else target.lm_head.T))
    mk = params.markov
    if mk is not None:
        tensors["markov_head.markov_w1.weight"] = np.asarray(mk.w1)
        tensors["markov_head.markov_w2.weight"] = hf(mk.w2)
        if mk.gate_w is not None:
            tensors["markov_head.gate_proj.weight"] = hf(mk.gate_w)
            tensors["markov_head.gate_proj.bias"] = np.asarray(mk.gate_b)
        if mk.joint_w is not None:
            tensors["markov_head.joint_proj.weight"] = hf(mk.joint_w)
            tensors["markov_head.joint_proj.bias"] = np.asarray(mk.joint_b)
    if params.confidence is not None:
        tensors["confidence_head.proj.weight"] = np.asarray(params.confidence.w)[None, :]
        tensors["confidence_head.proj.bias"] = np.asarray(params.confidence.b).reshape(1)
    return tensors


def save_draft(draft_dir: str | os.PathLike, params, dcfg, target: Qwen3Params, dtype=None,
               embedding_copies: bool = True):
    """Export a drafter to the DeepSpec format (embed_tokens / lm_head copied from the target, as
    DeepSpec writes them; ``embedding_copies=False`` leaves them out: ``load_draft`` always uses
    the target's arrays, and the file is 2 x vocab x hidden smaller)."""
    draft_dir = os.fspath(draft_dir)
    os.makedirs(draft_dir, exist_ok=True)
    tensors = draft_to_hf_tensors(cast_tree(params, dtype), cast_tree(target, dtype), embedding_copies)
    save_file(tensors, os.path.join(draft_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(draft_dir, "config.json"), "w") as f:
        json.dump(dcfg.to_hf() | {"dtype": _hf_dtype_name(tensors)}, f, indent=2)


def save_draft_orbax(path, params, dcfg):
    save_orbax(path, params, dcfg.to_hf())


def restore_draft_orbax(path, dtype=None):
    from .draft import init_draft_params

    dcfg = load_draft_config(path)
    dtype = resolve_dtype(dtype)
    abstract = jax.eval_shape(lambda: init_draft_params(jax.random.key(0), dcfg, dtype))
    return restore_orbax(path, abstract), dcfg


def restore_training_drafter(workdir, dtype=None):
    """The drafter of the latest checkpoint of a ``train-draft`` run (``workdir/checkpoints``),
    finished or still training: its parameters in ``dtype`` and its config."""
    from . import train as train_lib
    from .draft import DraftConfig, init_draft_params
    from .trainer import restore_latest_params

    workdir = os.fspath(workdir)

    def draft_config(meta):
        if meta.get("kind") != "draft":
            raise ValueError(f"{workdir}: the training checkpoints are a {meta.get('kind')!r} run, not a drafter")
        return DraftConfig.from_hf(meta["config"], where=f"{workdir}/checkpoints metadata")

    def abstract_state(meta):
        # The optimiser's state has the same structure whatever its hyperparameters.
        optimizer = train_lib.make_optimizer(train_lib.OptimConfig())
        return jax.eval_shape(lambda: train_lib.init_train_state(
            init_draft_params(jax.random.key(0), draft_config(meta)), optimizer))

    params, meta = restore_latest_params(workdir, abstract_state)
    check_finite_tree(params, f"{workdir}/checkpoints")
    return cast_tree(params, resolve_dtype(dtype)), draft_config(meta)


def load_drafter(path, target: Qwen3Params, target_cfg: Qwen3Config, dtype=None):
    """A drafter from a DeepSpec directory, one of our orbax checkpoints, or the work directory
    of a ``train-draft`` run (its latest checkpoint, so a run can be evaluated while it trains)."""
    from .draft import check_compatible

    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        params, dcfg = restore_draft_orbax(path, dtype)
        check_compatible(dcfg, target_cfg, where=os.path.join(path, "config.json"))
        return params, dcfg
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        params, dcfg = restore_training_drafter(path, dtype)
        check_compatible(dcfg, target_cfg, where=os.path.join(path, "checkpoints"))
        return params, dcfg
    return load_draft(path, target, target_cfg, dtype)


# ---------------------------------------------------------------------------- embedded pair

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
EMBEDDED_MODELS = ("target", "dspark", "dflash")


def embedded_path(name: str = "target", root: str | os.PathLike | None = None) -> str:
    """Directory of an embedded checkpoint (``target``, ``dspark`` or ``dflash``) in ``checkpoints/``.

    They ship with a clone of the repository (``pip install -e .``); a wheel built without the
    repository has none, and the error says so instead of failing later on a missing file.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded checkpoint {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}")
    path = os.path.join(os.fspath(root) if root is not None else EMBEDDED_DIR, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no embedded {name} checkpoint at {path} (it ships with a clone of the "
                                "repository: git clone ... && pip install -e .)")
    return path
