"""Checkpoints in and out: Hugging Face / DeepSpec safetensors directories, and orbax.

What is read and written follows the parameter declarations (``params.ParamDecl``: shape,
logical axes, checkpoint name and layout of every weight), so loading and export cannot
drift apart. Loading needs no torch and is memory-bounded: each weight is read piece by
piece (``safetensors_io``: row ranges, at most ``chunk_bytes`` a piece), cast, and placed
straight into its final array, on one device or, given a mesh, with its ``NamedSharding``
(``jax.make_array_from_callback``: each device's callback reads only the slice that device
holds, so under ``jax.distributed`` each process reads only what its own devices hold).
Host memory peaks near one piece, not near the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import Qwen3Config, load_qwen3_config, read_json
from .heads import CONFIDENCE_HEADS, MARKOV_HEADS
from .params import ParamDecl, abstract_tree, checkpoint_tensors, export_tensors, map_decls
from .safetensors_io import CheckpointError, TensorSource, save_tensors
from .target import Qwen3Params, target_decl
from .validate import bits_view, check_finite, check_finite_tree, check_trained_config, host_all_finite

# The most a loader reads at once (one piece of one weight): with the piece on its way to
# an accelerator, this bounds loading's host memory above the weights themselves.
CHUNK_BYTES = 64 << 20
HOST_ALIGNMENT = 64  # bytes: XLA:CPU aliases host buffers aligned to this instead of copying them
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


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


# ---------------------------------------------------------------------------- loading


def check_tensors(source: TensorSource, decls, allowed_unused: set[str] = frozenset()):
    """Before reading anything: every declared tensor is there with its declared shape, and
    the checkpoint holds nothing else (except ``allowed_unused``)."""
    expected = checkpoint_tensors(decls)
    for name, shape in expected.items():
        found = source.shape(name)  # names a missing tensor
        if found != tuple(shape):
            raise CheckpointError(
                f"{source.model_dir}: tensor {name!r} has shape {list(found)}, "
                f"expected {list(shape)} from config.json"
            )
    unexpected = sorted(source.names() - set(expected) - set(allowed_unused))
    if unexpected:
        raise CheckpointError(
            f"{source.model_dir}: unexpected tensor(s) {unexpected[:8]}"
            + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        )


def host_buffer(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array aligned to 64 bytes: XLA:CPU then takes it as a
    device buffer without copying (``jax.device_put`` aliases it), so a weight placed on a
    CPU device is the buffer it was read into."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def copy_cast(dest: np.ndarray, src: np.ndarray):
    """``dest[...] = src`` in ``dest``'s dtype (strided views allowed): same dtypes copy their
    bits; bfloat16 -> float32 is a 16-bit shift of the bits; other casts are numpy's."""
    if dest.dtype == src.dtype:
        np.copyto(bits_view(dest), bits_view(src))
    elif src.dtype == BFLOAT16 and dest.dtype == np.float32:
        wide = bits_view(dest)
        np.copyto(wide, bits_view(src))
        np.left_shift(wide, 16, out=wide)
    else:
        np.copyto(dest, src, casting="unsafe")


def fill_tensor(source: TensorSource, decl: ParamDecl, name: str, region, out: np.ndarray, chunk_bytes: int):
    """``out[...] = ours[region]`` of checkpoint tensor ``name`` (one layer's, our layout),
    ``region`` a (start, stop) per axis of ``decl.tensor_shape``. Reads only the checkpoint rows
    the region needs, at most ``chunk_bytes`` at a time, cast into ``out`` piece by piece (rows
    in our layout go straight from the file into ``out``)."""
    shape, n_in = decl.tensor_shape, decl.n_in
    keep = tuple(slice(a, b) for a, b in region)
    if decl.hf_shape_override is not None or not shape or n_in == len(shape):  # small: read whole
        w = source.read_rows(name)
        copy_cast(out, decl.from_hf(w)[keep] if shape else w.reshape(()))
        return
    axis = n_in  # our axis whose ranges are contiguous checkpoint rows (0: the same layout)
    rows_per_index = math.prod(shape[axis + 1:]) if axis else 1
    row_bytes = math.prod(decl.hf_shape[1:]) * source.dtype(name).itemsize
    step = max(1, chunk_bytes // max(1, rows_per_index * row_bytes))
    whole_rows = axis == 0 and all(r == (0, n) for r, n in zip(region[1:], shape[1:]))
    (a, b) = region[axis]
    for start in range(a, b, step):
        stop = min(start + step, b)
        into = out[(slice(None),) * axis + (slice(start - a, stop - a),)]
        if whole_rows and into.dtype == source.dtype(name) and into.flags.c_contiguous:
            source.read_rows(name, start, stop, out=into)
            continue
        rows = source.read_rows(name, start * rows_per_index, stop * rows_per_index)
        if axis == 0:
            piece = rows[(slice(None),) + keep[1:]]
        else:  # rows = our output axes fused: [rows, in] -> ours[..., start:stop, ...]
            piece = rows.T.reshape(shape[:axis] + (stop - start,) + shape[axis + 1:])
            piece = piece[keep[:axis] + (slice(None),) + keep[axis + 1:]]
        copy_cast(into, piece)


def fill_region(source: TensorSource, decl: ParamDecl, region, dtype, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """``weight[region]`` of one declared weight in a new host buffer (``host_buffer``), read
    from ``source`` piece by piece: the host holds the buffer and one piece, never a second
    copy of the region. ``region`` is a (start, stop) per axis of ``decl.shape``."""
    out = host_buffer(tuple(b - a for a, b in region), dtype)
    if decl.stacked:
        (l0, l1), rest = region[0], region[1:]
        for i in range(l0, l1):  # layer by layer: no stacked copy
            fill_tensor(source, decl, decl.tensor_name(i), rest, out[i - l0, ...], chunk_bytes)
    else:
        fill_tensor(source, decl, decl.name, region, out, chunk_bytes)
    return out


def _region(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _piece_axis(decl: ParamDecl) -> int:
    """The axis a large weight is placed along piece by piece: layers, else the axis whose
    ranges are contiguous rows of the checkpoint tensor."""
    if decl.stacked or decl.n_in == 0 or decl.n_in >= len(decl.shape):
        return 0
    return decl.n_in


def _on_host(sharding) -> bool:
    """Whether the weight's devices are CPU devices, whose buffers are host memory."""
    if sharding is None:
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in sharding.device_set)


@functools.partial(jax.jit, static_argnames="axis", donate_argnums=0)
def _update_slice(buffer: jax.Array, piece: jax.Array, start, axis: int) -> jax.Array:
    """``buffer`` with ``piece`` written at ``start`` along ``axis``, in place (donated)."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, piece, start, axis)


def _place(shape, sharding, read) -> jax.Array:
    """An array of ``shape`` whose contents ``read(region)`` gives (a host array), on
    ``sharding``'s devices (each addressable device's callback reads its own slice), or on the
    default device. On CPU devices the host arrays become the device buffers (no copy)."""
    if sharding is None:
        return jax.device_put(read(tuple((0, n) for n in shape)))
    last = {}  # devices holding the same slice (replicated axes) come one after another: read it once

    def read_slice(index):
        region = _region(index, shape)
        if region not in last:
            last.clear()
            last[region] = read(region)
        return last[region]  # shared by CPU devices: a donation copies it, never writes to it

    return jax.make_array_from_callback(shape, sharding, read_slice)


def _read_weight(source: TensorSource, decl: ParamDecl, dtype, sharding=None, chunk_bytes: int = CHUNK_BYTES):
    """One declared weight read from ``source`` into its final array. Returns the array and
    whether every value is finite (checked on the host, as each slice is read).

    On CPU devices each device's slice is filled piece by piece in a host buffer that becomes
    its device buffer: no device-side update, no second copy. On accelerators, a weight larger
    than ``chunk_bytes`` is placed in pieces along the layer axis (or the checkpoint's row
    axis), each written in place into a donated device buffer, so the host holds one piece."""
    dtype = np.dtype(dtype)
    finite = [True]

    def read(region):
        out = fill_region(source, decl, region, dtype, chunk_bytes)
        finite[0] = finite[0] and host_all_finite(out, chunk_bytes)
        return out

    shape = decl.shape
    axis = _piece_axis(decl)
    unit = math.prod(shape) // max(shape[axis] if shape else 1, 1) * dtype.itemsize
    step = max(1, chunk_bytes // max(unit, 1))
    if _on_host(sharding) or not shape or step >= shape[axis]:
        return _place(shape, sharding, read), finite[0]
    buffer = jnp.zeros(shape, dtype, device=sharding)
    for start in range(0, shape[axis], step):
        stop = min(start + step, shape[axis])
        piece_shape = shape[:axis] + (stop - start,) + shape[axis + 1:]

        def read_piece(region, start=start):
            return read(region[:axis] + ((region[axis][0] + start, region[axis][1] + start),) + region[axis + 1:])

        piece = _place(piece_shape, sharding, read_piece)
        # one update in flight: unblocked, dispatch runs ahead of the device and every piece
        # read so far waits in memory (a second copy of the weight)
        buffer.block_until_ready()
        buffer = _update_slice(buffer, piece, start, axis)
    return buffer, finite[0]


def load_weight(source: TensorSource, decl: ParamDecl, dtype, sharding=None, chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """``_read_weight``, and a clear error when the weight holds NaN/inf (the tensor named)."""
    weight, finite = _read_weight(source, decl, dtype, sharding, chunk_bytes)
    if not finite:
        check_finite(decl.name.replace("{layer}", "*"), weight, source.model_dir)  # counts them, names it
    return weight


def load_tree(source: TensorSource, decls, dtype, shardings=None, chunk_bytes: int = CHUNK_BYTES):
    """Every weight of a declaration tree, loaded with ``load_weight`` (with the matching
    sharding of ``shardings`` when given)."""
    if shardings is None:
        return map_decls(lambda d: load_weight(source, d, dtype, None, chunk_bytes), decls)
    return map_decls(lambda d, s: load_weight(source, d, dtype, s, chunk_bytes), decls, shardings)


# ---------------------------------------------------------------------------- Qwen3 target


def _checked_target(cfg: Qwen3Config, source: TensorSource) -> Qwen3Params:
    """The declarations of a Qwen3 target, after checking that ``source`` holds exactly the
    declared tensors with their shapes (before any tensor is read)."""
    decls = target_decl(cfg)
    # Tied checkpoints sometimes carry a redundant lm_head copy; it is not used.
    check_tensors(source, decls, {"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return decls


def _target_shardings(cfg: Qwen3Config, mesh):
    if mesh is None:
        return None
    from .sharding import target_shardings

    return target_shardings(cfg, mesh)


def load_qwen3(model_dir: str | os.PathLike, dtype=None, *, mesh=None, chunk_bytes: int = CHUNK_BYTES,
               per_layer: bool | str = False) -> tuple[Qwen3Params, Qwen3Config]:
    """Load a Hugging Face Qwen3 directory (config.json + safetensors, one file or sharded)
    without torch. With a ``(data, model)`` mesh every weight is placed directly with the
    sharding the tensor-parallel forward uses (``sharding.target_shardings``). ``per_layer``:
    each layer's weights their own arrays (``config.Qwen3Config.per_layer_weights``; ``"auto"``:
    where ``layers.per_layer_by_default`` says it pays)."""
    from .target import resolve_layer_layout

    cfg = load_qwen3_config(model_dir)
    dtype = resolve_dtype(dtype)
    cfg = dataclasses.replace(cfg, per_layer_weights=resolve_layer_layout(per_layer, cfg, dtype))
    with TensorSource(model_dir) as source:
        decls = _checked_target(cfg, source)
        return load_tree(source, decls, dtype, _target_shardings(cfg, mesh), chunk_bytes), cfg


def abstract_qwen3(model_dir: str | os.PathLike, dtype=None, *, mesh=None) -> tuple[Qwen3Params, Qwen3Config]:
    """What ``load_qwen3`` would return, as ``jax.ShapeDtypeStruct`` leaves (with their
    shardings on a mesh), after every check it makes before reading: reads no tensor data,
    so a checkpoint's shapes can be checked (and ``jax.eval_shape`` run) without loading it."""
    cfg = load_qwen3_config(model_dir)
    with TensorSource(model_dir) as source:
        decls = _checked_target(cfg, source)
    return abstract_tree(decls, resolve_dtype(dtype), _target_shardings(cfg, mesh)), cfg


def qwen3_to_hf_tensors(params: Qwen3Params, cfg: Qwen3Config) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of a target, as one dict (small models; ``save_qwen3`` streams)."""
    return {name: make() for name, _, _, make in _export_entries(target_decl(cfg), params)}


def _export_entries(decls, params, dtype=None) -> list:
    """(name, shape, dtype, make) per checkpoint tensor, cast to ``dtype`` when given, in
    layer order (the order transformers fills its shards in)."""
    entries = export_tensors(decls, params, None if dtype is None else np.dtype(resolve_dtype(dtype)))
    return sorted(entries, key=lambda e: _layer_of(e[0]))  # stable: declaration order within a layer


def _layer_of(name: str) -> int:
    """i for a per-layer tensor ``...layers.{i}...``, -1 for the others."""
    parts = name.split(".")
    return next((int(parts[i + 1]) for i in range(len(parts) - 1) if parts[i] == "layers" and parts[i + 1].isdigit()), -1)


def _hf_dtype_name(entries) -> str:
    return str(np.dtype(entries[0][2])) if entries else "float32"


def cast_tree(tree, dtype):
    """Every floating array of a pytree in ``dtype`` (None: unchanged), e.g. bfloat16 for a
    compact checkpoint; loading computes in whatever dtype is asked for."""
    if dtype is None:
        return tree
    dtype = resolve_dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def save_qwen3(model_dir: str | os.PathLike, params: Qwen3Params, cfg: Qwen3Config, extra_config: Mapping | None = None,
               dtype=None, max_shard_size: int | str | None = None):
    """Export to a directory that ``transformers.Qwen3ForCausalLM.from_pretrained`` opens, one
    tensor at a time; ``max_shard_size`` (bytes or "2GB") splits it into shards + index."""
    model_dir = os.fspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    entries = _export_entries(target_decl(cfg), params, dtype)
    save_tensors(model_dir, entries, max_shard_size)
    config = cfg.to_hf() | {"dtype": _hf_dtype_name(entries)} | dict(extra_config or {})
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
    """A parameter pytree saved by ``save_orbax``, restored straight into the shardings of
    ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves): each device reads its own slice,
    whatever mesh the checkpoint was saved from."""
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


def restore_qwen3_orbax(path, dtype=None, *, mesh=None) -> tuple[Qwen3Params, Qwen3Config]:
    """A target saved by ``save_qwen3_orbax``; on a mesh, restored straight into the
    tensor-parallel shardings (``sharding.target_shardings``), whatever mesh it was saved from."""
    cfg = load_qwen3_config(path)
    dtype = resolve_dtype(dtype)
    abstract = abstract_tree(target_decl(cfg), dtype, _target_shardings(cfg, mesh))
    return restore_orbax(path, abstract), cfg


def load_target(path, dtype=None, *, mesh=None, per_layer: bool | str = False) -> tuple[Qwen3Params, Qwen3Config]:
    """A target from either a Hugging Face directory or one of our orbax checkpoints, on a
    mesh placed directly with the tensor-parallel shardings. ``per_layer``: the layer weights
    one array per layer (the decoding layout, ``target.with_layer_layout``; ``"auto"``: where
    it pays), read that way from a Hugging Face directory."""
    from .target import with_layer_layout

    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        return with_layer_layout(*restore_qwen3_orbax(path, dtype, mesh=mesh), per_layer)
    if target_family(path) == "gemma4":
        from .gemma4 import load_gemma4

        return load_gemma4(path, dtype, mesh=mesh)
    return load_qwen3(path, dtype, mesh=mesh, per_layer=per_layer)


def load_target_config(model_dir):
    """The config of a Hugging Face target directory, of whichever family it is."""
    if target_family(model_dir) == "gemma4":
        from .gemma4 import load_gemma4_config

        return load_gemma4_config(model_dir)
    return load_qwen3_config(model_dir)


def target_family(model_dir) -> str:
    """The model family of a Hugging Face directory, from its config's model_type / architectures."""
    from .gemma4 import is_gemma4_config

    config_path = os.path.join(os.fspath(model_dir), "config.json")
    if os.path.isfile(config_path) and is_gemma4_config(read_json(config_path)):
        return "gemma4"
    return "qwen3"


# ---------------------------------------------------------------------------- DeepSpec drafts


def load_draft_config(draft_dir: str | os.PathLike):
    """A drafter's config (``DraftConfig`` or ``Eagle3Config``: the family its
    ``architectures`` name, ``drafters.family_for_architectures``)."""
    from .config import ConfigError
    from .drafters import family_for_architectures

    path = os.path.join(os.fspath(draft_dir), "config.json")
    raw = read_json(path)
    try:
        family = family_for_architectures(raw.get("architectures") or [], path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_trained_config(raw, os.path.join(os.fspath(draft_dir), "manifest.json"), path)
    return family.config_from_hf(raw, path)


def _check_shared_tensor_shapes(source: TensorSource, target_cfg: Qwen3Config):
    """The draft's copies of the target's tensors, when present, have the target's shapes."""
    from .draft import DRAFT_SHARED_TENSORS

    expected = (target_cfg.vocab_size, target_cfg.hidden_size)  # embed_tokens and lm_head: [V, D]
    for name in DRAFT_SHARED_TENSORS:
        if name in source.file_of and source.shape(name) != expected:
            raise CheckpointError(f"{source.model_dir}: tensor {name!r} has shape {list(source.shape(name))}, "
                                  f"expected {list(expected)} from config.json")


def _shared_tensor_differs(source: TensorSource, name: str, ours) -> bool:
    if name not in source.file_of:
        return False
    step = max(1, CHUNK_BYTES // max(1, 4 * math.prod(ours.shape[1:])))
    for start in range(0, ours.shape[0], step):  # compared piece by piece: no host copy of the whole
        theirs = source.read_rows(name, start, start + step).astype(np.float32)
        if not np.array_equal(theirs, np.asarray(ours[start:start + step], np.float32)):
            return True
    return False


def _checked_draft(draft_dir, target_cfg: Qwen3Config):
    """The config and declarations of a DeepSpec draft directory, checked against its target
    and against the tensors it holds (before any tensor is read), and its opened tensors."""
    from .draft import DRAFT_SHARED_TENSORS
    from .drafters import family_of

    dcfg = load_draft_config(draft_dir)
    family = family_of(dcfg)
    family.check_compatible(dcfg, target_cfg, where=os.path.join(os.fspath(draft_dir), "config.json"))
    decls = family.decl(dcfg)
    source = TensorSource(draft_dir)
    try:
        check_tensors(source, decls, set(DRAFT_SHARED_TENSORS))
        _check_shared_tensor_shapes(source, target_cfg)
    except BaseException:
        source.close()
        raise
    return decls, dcfg, source


def load_draft(draft_dir: str | os.PathLike, target: Qwen3Params, target_cfg: Qwen3Config, dtype=None):
    """Load a DeepSpec-format draft directory (config.json + safetensors, one file or sharded).

    The draft's ``embed_tokens`` / ``lm_head`` are checked against the target's and then not
    kept: the drafter always uses the target's arrays (a warning says so when they differ).
    """
    import warnings

    from .draft import DRAFT_SHARED_TENSORS

    dtype = resolve_dtype(dtype)
    decls, dcfg, source = _checked_draft(draft_dir, target_cfg)
    with source:
        params = load_tree(source, decls, dtype)
        for name, of_target in DRAFT_SHARED_TENSORS.items():
            if _shared_tensor_differs(source, name, of_target(target)):
                warnings.warn(
                    f"{draft_dir}: draft {name} differs from the target's; using the target's "
                    f"(the drafter shares the target's embedding and lm_head)",
                    stacklevel=2,
                )
    return params, dcfg


def abstract_draft(draft_dir: str | os.PathLike, target_cfg: Qwen3Config, dtype=None):
    """What ``load_draft`` would return, as ``jax.ShapeDtypeStruct`` leaves, after every check
    it makes before reading (config, compatibility with the target, tensor names and shapes)."""
    decls, dcfg, source = _checked_draft(draft_dir, target_cfg)
    source.close()
    return abstract_tree(decls, resolve_dtype(dtype)), dcfg


def _draft_entries(params, dcfg, target: Qwen3Params, dtype=None, embedding_copies: bool = True) -> list:
    from .draft import DRAFT_SHARED_TENSORS
    from .drafters import family_of

    if getattr(dcfg, "plugin_heads", None):
        plugin = dcfg.head_type if dcfg.plugin_head else dcfg.confidence_head_type
        raise CheckpointError(f"the DeepSpec format is for the built-in heads ({', '.join(MARKOV_HEADS.names())}; "
                              f"confidence {', '.join(CONFIDENCE_HEADS.names())}); the plug-in head {plugin!r} is "
                              "saved as an orbax checkpoint (save_draft_orbax)")
    entries = _export_entries(family_of(dcfg).decl(dcfg), params, dtype)
    if embedding_copies:
        out_dtype = entries[0][2]
        for name, of_target in DRAFT_SHARED_TENSORS.items():
            array = of_target(target)
            entries.append((name, tuple(array.shape), out_dtype,
                            lambda a=array: np.ascontiguousarray(np.asarray(a).astype(out_dtype))))
    return entries


def draft_to_hf_tensors(params, target: Qwen3Params, embedding_copies: bool = True, dcfg=None) -> dict[str, np.ndarray]:
    """The DeepSpec tensors of a drafter, as one dict (``save_draft`` streams them)."""
    dcfg = dcfg or _draft_config_of(params, target)
    return {name: make() for name, _, _, make in _draft_entries(params, dcfg, target, None, embedding_copies)}


def _draft_config_of(params, target: Qwen3Params):
    """A DraftConfig with the shapes of ``params`` (enough for its declaration)."""
    from .draft import DraftConfig

    L, D, H, Dh = params.layers.q_proj.shape
    V = target.embed.shape[0]
    layers = Qwen3Config(vocab_size=V, hidden_size=D, intermediate_size=params.layers.gate_proj.shape[-1],
                         num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=params.layers.k_proj.shape[2],
                         head_dim=Dh)
    mk = params.markov or {}
    r = mk["w1"].shape[1] if "w1" in mk else 0
    head = "gated" if "gate_w" in mk else "rnn" if "joint_w" in mk else "vanilla"
    conf = params.confidence
    return DraftConfig(layers=layers, block_size=1, target_layer_ids=tuple(range(params.fc.shape[0] // D)),
                       mask_token_id=0, markov_rank=r, markov_head_type=head, enable_confidence_head=conf is not None,
                       confidence_head_with_markov=conf is not None and conf["w"].shape[0] > D)


def save_draft(draft_dir: str | os.PathLike, params, dcfg, target: Qwen3Params, dtype=None,
               embedding_copies: bool = True, max_shard_size: int | str | None = None):
    """Export a drafter to the DeepSpec format (embed_tokens / lm_head copied from the target, as
    DeepSpec writes them; ``embedding_copies=False`` leaves them out: ``load_draft`` always uses
    the target's arrays, and the file is 2 x vocab x hidden smaller). ``max_shard_size`` shards it."""
    draft_dir = os.fspath(draft_dir)
    os.makedirs(draft_dir, exist_ok=True)
    entries = _draft_entries(params, dcfg, target, dtype, embedding_copies)
    save_tensors(draft_dir, entries, max_shard_size)
    with open(os.path.join(draft_dir, "config.json"), "w") as f:
        json.dump(dcfg.to_hf() | {"dtype": _hf_dtype_name(entries)}, f, indent=2)


def save_draft_orbax(path, params, dcfg):
    save_orbax(path, params, dcfg.to_hf())


def restore_draft_orbax(path, dtype=None):
    from .drafters import family_of

    dcfg = load_draft_config(path)
    dtype = resolve_dtype(dtype)
    abstract = abstract_tree(family_of(dcfg).decl(dcfg), dtype)
    return restore_orbax(path, abstract), dcfg


def restore_training_drafter(workdir, dtype=None):
    """The drafter of the latest checkpoint of a ``train-draft`` run (``workdir/checkpoints``),
    finished or still training: its parameters in ``dtype`` and its config."""
    from . import train as train_lib
    from .drafters import config_from_hf, family_of
    from .trainer import restore_latest_params

    workdir = os.fspath(workdir)

    def draft_config(meta):
        if meta.get("kind") != "draft":
            raise ValueError(f"{workdir}: the training checkpoints are a {meta.get('kind')!r} run, not a drafter")
        return config_from_hf(meta["config"], where=f"{workdir}/checkpoints metadata")

    def abstract_state(meta):
        # The optimiser's state has the same structure whatever its hyperparameters.
        optimizer = train_lib.make_optimizer(train_lib.OptimConfig())
        dcfg = draft_config(meta)
        return jax.eval_shape(lambda: train_lib.init_train_state(
            family_of(dcfg).init_params(jax.random.key(0), dcfg), optimizer))

    params, meta = restore_latest_params(workdir, abstract_state)
    check_finite_tree(params, f"{workdir}/checkpoints")
    return cast_tree(params, resolve_dtype(dtype)), draft_config(meta)


def load_drafter(path, target: Qwen3Params, target_cfg: Qwen3Config, dtype=None, *, per_layer: bool | str = False):
    """A drafter from a DeepSpec directory, one of our orbax checkpoints, or the work directory
    of a ``train-draft`` run (its latest checkpoint, so a run can be evaluated while it trains).
    ``per_layer``: a DSpark/DFlash drafter's layer weights one array per layer (decoding's
    layout, ``draft.with_layer_layout``; ``"auto"``: where it pays)."""
    from .draft import with_layer_layout
    from .drafters import family_of

    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        params, dcfg = restore_draft_orbax(path, dtype)
        family_of(dcfg).check_compatible(dcfg, target_cfg, where=os.path.join(path, "config.json"))
    elif not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        params, dcfg = restore_training_drafter(path, dtype)
        family_of(dcfg).check_compatible(dcfg, target_cfg, where=os.path.join(path, "checkpoints"))
    else:
        params, dcfg = load_draft(path, target, target_cfg, dtype)
    return with_layer_layout(params, dcfg, per_layer), dcfg


# ---------------------------------------------------------------------------- embedded pair

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
EMBEDDED_MODELS = ("target", "dspark", "dflash", "eagle3")


def embedded_path(name: str = "target", root: str | os.PathLike | None = None) -> str:
    """Directory of an embedded checkpoint (``target``, ``dspark``, ``dflash`` or ``eagle3``) in ``checkpoints/``.

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
