"""Checks at the edges: command-line values, files a command reads or writes, loaded arrays.

Each check is a small pure function that returns nothing (or the checked value) and raises a
named error whose one-line message names the option, file, tensor and values involved. The
command line maps ``UsageError`` to exit status 2 and every other ``ValueError`` / ``OSError``
to exit status 1 (see ``cli.main``); library callers get ordinary exceptions.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import warnings
from typing import Any, Iterable, Mapping


class UsageError(ValueError):
    """A command-line value out of range or contradicting another option (exit status 2)."""


class DataError(ValueError):
    """A file or array whose content cannot be used (exit status 1); the message names it."""


class NonFiniteError(DataError):
    """NaN or infinity where only finite numbers make sense (weights, losses, tables)."""


class DSparkWarning(UserWarning):
    """Something a user may mean, done as documented, but worth knowing (printed as ``warning:``)."""


# ---------------------------------------------------------------------------- scalar options


def option_name(dest: str) -> str:
    """``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + dest.replace("_", "-")


def check_count(option: str, value: int, minimum: int = 1):
    if value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")


def check_float(option: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False):
    """A finite float in [low, high] (or (low, high] with ``low_open``)."""
    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        if high is None:
            raise UsageError(f"{option} must be {'>' if low_open else '>='} {low:g}, got {value}")
        lo = "-inf" if low is None else f"{low:g}"
        raise UsageError(f"{option} must be in {'(' if low_open else '['}{lo}, {high:g}], got {value}")


# option dest -> smallest allowed value; a None value (option left out) is not checked
COUNT_OPTIONS: dict[str, int] = {
    "max_new_tokens": 1, "num_samples": 1, "repeats": 1, "tensor_parallel": 1, "data_parallel": 1,
    "block_size": 1, "num_prompts": 1, "prompt_tokens": 1, "batch_size": 1, "batch": 1, "context": 1,
    "cache_len": 1, "prefill_chunk": 1, "top_k": 0,
    "steps": 1, "seq_len": 2, "save_every": 1, "log_every": 1, "eval_every": 0,
    "vocab_size": 1, "layers": 1, "hidden": 1, "heads": 1, "kv_heads": 1, "head_dim": 1, "intermediate": 1,
    "markov_rank": 0, "num_anchors": 1, "answer_tokens": 1, "regen_batch": 1, "min_rounds": 1,
}

# option dest -> (low, high, low_open): every float option must also be finite
FLOAT_OPTIONS: dict[str, tuple[float | None, float | None, bool]] = {
    "temperature": (0.0, None, False),
    "top_p": (0.0, 1.0, True),
    "confidence_threshold": (0.0, 1.0, False),
    "lr": (0.0, None, True),
    "warmup": (0.0, 1.0, False),
    "weight_decay": (0.0, None, False),
    "clip_norm": (0.0, None, True),
    "prose_fraction": (0.0, 1.0, False),
    "regen_temperature": (0.0, None, False),
}

# schedulers that read a verification-speed profile
SPS_SCHEDULERS = ("algorithm1", "async")


def check_args(args) -> None:
    """Every command's options, before anything is loaded: counts, finite ranges, and the
    combinations that cannot mean what the user wants. ``args`` is an argparse namespace."""
    values = vars(args)
    for dest, minimum in COUNT_OPTIONS.items():
        if values.get(dest) is not None:
            check_count(option_name(dest), values[dest], minimum)
    for dest, (low, high, low_open) in FLOAT_OPTIONS.items():
        value = values.get(dest)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                check_float(option_name(dest) + (" values" if isinstance(value, list) else ""), v, low, high,
                            low_open)
    heads, kv_heads = values.get("heads"), values.get("kv_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise UsageError(f"--kv-heads {kv_heads} must divide --heads {heads} (each key/value head serves a group of "
                         "query heads)")
    if values.get("sps_profile") and values.get("scheduler") not in SPS_SCHEDULERS:
        warnings.warn(f"--sps-profile is read by --scheduler {' or '.join(SPS_SCHEDULERS)} only; ignored with "
                      f"--scheduler {values.get('scheduler') or '(default)'}", DSparkWarning, stacklevel=2)
    if values.get("max_shard_size") is not None:
        from .safetensors_io import parse_size

        try:
            size = parse_size(values["max_shard_size"])
        except ValueError as e:
            raise UsageError(f"--max-shard-size: {e}") from None
        if size < 1:
            raise UsageError(f"--max-shard-size must be positive, got {values['max_shard_size']!r}")
    check_input_files(values)
    if values.get("command") == "calibrate":  # every round commits >= 1 token: an upper bound, known now
        most = values["num_prompts"] * values["max_new_tokens"]
        if most < values["min_rounds"]:
            raise UsageError(f"--num-prompts {values['num_prompts']} x --max-new-tokens {values['max_new_tokens']} "
                             f"records at most {most} rounds, fewer than --min-rounds {values['min_rounds']} "
                             "that a calibration needs")
    if values.get("command") in ("train-target", "train-draft"):
        check_output_dir("--out", values["out"])
    elif values.get("command") == "eval":
        check_output_dir("--out", values["out"])
    elif values.get("command") == "profile-sps":
        check_output_file("--out", values["out"])
    elif values.get("command") == "calibrate" and values.get("out"):
        out = values["out"]
        check_output_file("--out", out) if out.endswith(".json") else check_output_dir("--out", out)


def check_input_files(values: Mapping[str, Any]):
    """Cheap reads of the small files a command will use (SPS profile, drafter config, STS
    calibration), so a bad one fails before any model is loaded."""
    from .checkpoint import load_draft_config
    from .schedule import Calibration, SPSProfile

    if values.get("sps_profile") and values.get("scheduler") in SPS_SCHEDULERS:
        SPSProfile.load(values["sps_profile"])
    drafts = values.get("draft") or []
    for d in drafts if isinstance(drafts, list) else [drafts]:
        if os.path.isfile(os.path.join(d, "config.json")):
            Calibration.load(d, load_draft_config(d).block_size)


# ---------------------------------------------------------------------------- output paths


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(option: str, path: str):
    """``path`` is (or can be created as) a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path}: exists and is not a directory")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise UsageError(f"{option} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {base} is not writable")


def check_output_file(option: str, path: str):
    """``path`` can be written as a file (its directory exists and is writable)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: directory {parent} is not writable")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2):
    """Write ``obj`` as strict JSON to ``path`` through a temporary file and a rename, so a
    reader sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    text = strict_json(obj, indent=indent)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- JSON


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return json_safe(obj.item())
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """Valid JSON (RFC 8259): undefined numbers become ``null``."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON of ``path``; a missing or malformed file is an error naming it (DataError)."""
    from .config import read_json

    return read_json(path, what, DataError)


# ---------------------------------------------------------------------------- numbers in files


def finite_list(values: Any, where: str, what: str, positive: bool = False, min_len: int = 1) -> list[float]:
    """A list of finite (optionally > 0) numbers read from a file, or a DataError naming it."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in values):
        raise DataError(f"{where}: {what} must be a list of numbers, got {str(values)[:60]}")
    if len(values) < min_len:
        raise DataError(f"{where}: {what} has {len(values)} entries, needs at least {min_len}")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v) or (positive and v <= 0)]
    if bad:
        cond = "finite and > 0" if positive else "finite"
        raise NonFiniteError(f"{where}: {what}[{bad[0]}] = {values[bad[0]]} ({len(bad)} entries not {cond})")
    return [float(v) for v in values]


# ---------------------------------------------------------------------------- drafter configs

# fields of a drafter's config.json that must be what it was trained with
TRAINED_FIELDS = ("block_size", "target_layer_ids", "mask_token_id", "markov_rank", "markov_head_type",
                  "enable_confidence_head", "confidence_head_type", "num_hidden_layers")


def check_trained_config(config: Mapping[str, Any], manifest_path: str, config_path: str):
    """A drafter's config.json against the config its training recorded in manifest.json (when
    there is one): an edited ``block_size`` would run the drafter on blocks it never saw."""
    if not os.path.isfile(manifest_path):
        return
    manifest = read_json_file(manifest_path, "training manifest")
    trained = manifest.get("config") if isinstance(manifest, Mapping) else None
    if not isinstance(trained, Mapping):
        return
    for field in TRAINED_FIELDS:
        if field in trained and field in config and config[field] != trained[field]:
            hint = " (to verify fewer drafts per round, pass --block-size instead)" if field == "block_size" else ""
            raise DataError(f"{config_path}: {field} {config[field]!r} differs from {trained[field]!r}, the value the "
                            f"drafter was trained with ({manifest_path}){hint}")


# ---------------------------------------------------------------------------- arrays


_all_finite = None


def _all_finite_fn():
    global _all_finite  # one jitted reduction; jax caches its compilations by shape and dtype
    if _all_finite is None:
        import jax
        import jax.numpy as jnp

        _all_finite = jax.jit(lambda a: jnp.isfinite(a).all())
    return _all_finite


@functools.cache
def _float_bits():
    """dtype -> (mask of the bits without the sign, exponent mask): a value is NaN or infinite
    when its exponent bits are all set, i.e. when its bits without the sign reach the mask."""
    import ml_dtypes
    import numpy as np

    return {np.dtype(t): (abs_mask, exponent) for t, abs_mask, exponent in (
        (ml_dtypes.bfloat16, 0x7FFF, 0x7F80), (np.float16, 0x7FFF, 0x7C00),
        (np.float32, 0x7FFFFFFF, 0x7F800000), (np.float64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000))}


def bits_view(array):
    """The same memory as unsigned integers of the dtype's size (bit tests, and copies that
    skip ml_dtypes' slower element-wise casts)."""
    import numpy as np

    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def host_all_finite(array, chunk_bytes: int = 64 << 20) -> bool:
    """Whether a host array holds no NaN / inf, checked on its bits a chunk at a time (the
    temporary is one chunk, not a bool per element)."""
    import numpy as np

    if array.dtype not in _float_bits() or array.size == 0:
        return True
    abs_mask, exponent = _float_bits()[array.dtype]
    flat = bits_view(np.ascontiguousarray(array).reshape(-1))
    step = max(1, chunk_bytes // array.dtype.itemsize)
    mask = flat.dtype.type(abs_mask)
    return all(int(np.bitwise_and(flat[i:i + step], mask).max()) < exponent for i in range(0, flat.size, step))


def check_finite(name: str, array, where: str = ""):
    """Raise NonFiniteError when a floating array holds NaN or inf (one jitted reduction, run
    where the array lives)."""
    import jax.numpy as jnp

    if not jnp.issubdtype(array.dtype, jnp.floating) or array.size == 0:
        return
    if not bool(_all_finite_fn()(array)):
        import numpy as np

        host = np.asarray(array, np.float32)
        nan, inf = int(np.isnan(host).sum()), int(np.isinf(host).sum())
        raise NonFiniteError(f"{where + ': ' if where else ''}tensor {name!r} {list(array.shape)} holds "
                             f"{nan} NaN and {inf} infinite value(s); the checkpoint is damaged")


_leaves_finite = None


def _leaves_finite_fn():
    global _leaves_finite  # one jitted reduction per tree structure, not one per leaf shape
    if _leaves_finite is None:
        import jax
        import jax.numpy as jnp

        _leaves_finite = jax.jit(lambda leaves: [jnp.isfinite(a).all() for a in leaves])
    return _leaves_finite


def check_finite_tree(tree, where: str):
    """check_finite on every leaf of a pytree, named by its path (``layers.q_proj``): the
    floating leaves are checked in one jitted call, a failing one is then counted and named."""
    import jax
    import jax.numpy as jnp

    named = [(jax.tree_util.keystr(path, simple=True, separator="."), leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
             if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size]
    if not named:
        return
    flags = _leaves_finite_fn()([leaf for _, leaf in named])
    for (name, leaf), finite in zip(named, flags):
        if not bool(finite):
            check_finite(name, leaf, where)


# ---------------------------------------------------------------------------- tokenizer / model


def undecodable_ids(samples: Iterable[Iterable[int]], tokenizer_vocab: int) -> list[int]:
    """Generated ids the tokenizer has no token for (the model's vocab is larger)."""
    return sorted({int(t) for s in samples for t in s if int(t) >= tokenizer_vocab})


def warn_undecodable(samples, tokenizer_vocab: int, model_vocab: int, tokenizer_path: str):
    """A model whose vocab is larger than its tokenizer's (Qwen3 pads its embedding) is normal;
    a generated id past the tokenizer decodes to nothing, which the user is told."""
    if model_vocab <= tokenizer_vocab:
        return
    ids = undecodable_ids(samples, tokenizer_vocab)
    if ids:
        warnings.warn(f"{tokenizer_path}: generated id(s) {ids[:5]} have no token (the tokenizer has "
                      f"{tokenizer_vocab}, the model's vocab_size is {model_vocab}); they are left out of the text "
                      "(the ids are in 'samples')", DSparkWarning, stacklevel=2)
