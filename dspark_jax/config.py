"""Frozen, hashable model configs read from Hugging Face / DeepSpec ``config.json`` files.

Configs are plain frozen dataclasses, so they hash and compare by value and can be passed
to ``jax.jit`` as static arguments. Every field that the math needs is here; anything else
in ``config.json`` is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


class ConfigError(ValueError):
    """A config.json that this library cannot use, with the reason in the message."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as transformers writes them (``rope_parameters``)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn
    partial_rotary_factor: float = 1.0  # proportional (Gemma 4): the share of frequencies that rotate

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], where: str = "config.json") -> "RopeConfig":
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions
        # write `rope_theta` at top level and an optional `rope_scaling` dict.
        params = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: rope_type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast", 32.0)),
            beta_slow=float(params.get("beta_slow", 1.0)),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.rope_type}
        if self.rope_type != "default":
            out["factor"] = self.factor
            if self.original_max_position_embeddings is not None:
                out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type == "proportional":
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
        return out


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture of a Qwen3 decoder (the target, and the shape of draft layers)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig = RopeConfig()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int = 32768
    # sliding-window layers (transformers' layer_types): layer i reads only the last
    # sliding_window keys when layer_types[i] == "sliding_attention" and sliding_window is set
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # None: every layer full attention
    # not part of the checkpoint: which attention.py backend runs ("auto": per platform)
    attention_backend: str = "auto"
    # not part of the checkpoint: the layer weights as one array per layer and weight (the
    # decoding layout, layers.run_layers) instead of stacked [L, ...] (training's)
    per_layer_weights: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ConfigError(f"layer_types {bad} not supported ({', '.join(LAYER_TYPES)})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per-layer attention window (None = full attention)."""
        types = self.layer_types or ("full_attention",) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], where: str = "config.json") -> "Qwen3Config":
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in raw
        ]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
        if raw.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias=true is not a Qwen3 layout (unsupported)")
        # transformers' rule: the window applies only with use_sliding_window, to the layers
        # layer_types marks (default: layers >= max_window_layers)
        sliding_window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        layers = int(raw["num_hidden_layers"])
        # without a window every layer is full attention whatever layer_types says
        layer_types = raw.get("layer_types") if sliding_window is not None else None
        if layer_types is None and sliding_window is not None:
            first = int(raw.get("max_window_layers", 28))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Qwen3 uses silu)")
        heads = int(raw["num_attention_heads"])
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
            rope=RopeConfig.from_hf(raw, where),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            sliding_window=None if sliding_window is None else int(sliding_window),
            layer_types=None if layer_types is None else tuple(str(t) for t in layer_types),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers-compatible ``config.json`` dict (Qwen3ForCausalLM)."""
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": self.rope.to_hf(),
            "rope_theta": self.rope.theta,
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.num_hidden_layers,
            "layer_types": list(self.layer_types or ("full_attention",) * self.num_hidden_layers),
            "dtype": "float32",
        }


def read_json(path: str | os.PathLike, what: str = "file", error: type[ValueError] = ConfigError) -> Any:
    """The parsed JSON of ``path``; a missing file is a FileNotFoundError and a malformed one an
    ``error``, both naming the path and ``what`` it is."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from None


def load_qwen3_config(model_dir: str | os.PathLike) -> Qwen3Config:
    """Read a Hugging Face Qwen3 ``config.json`` (and eos ids from generation_config.json)."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    raw = read_json(path)
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != "qwen3" or (archs and archs[0] not in ("Qwen3ForCausalLM", "Qwen3Model")):
        raise ConfigError(
            f"{path}: unsupported architecture (model_type={model_type!r}, "
            f"architectures={archs!r}); expected a Qwen3ForCausalLM"
        )
    return with_generation_eos(Qwen3Config.from_hf(raw, path), model_dir)


def with_generation_eos(cfg, model_dir: str | os.PathLike):
    """``cfg`` (any config dataclass with ``eos_token_ids``) stopping at the union of its eos ids
    and generation_config.json's: transformers' generate stops at the latter (Qwen3 instruct
    models list two there, one in config.json)."""
    gen_path = os.path.join(os.fspath(model_dir), "generation_config.json")
    if os.path.exists(gen_path):
        eos = _eos_ids(read_json(gen_path).get("eos_token_id"))
        merged = tuple(dict.fromkeys(cfg.eos_token_ids + eos))
        if merged != cfg.eos_token_ids:
            cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg
