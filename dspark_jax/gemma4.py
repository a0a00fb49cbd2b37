"""The Gemma 4 text target (``Gemma4ForConditionalGeneration``'s language model) as pure
functions over a parameter pytree and a KV cache, beside the Qwen3 target (``target.py``).

What differs from Qwen3, all read from the checkpoint's config:

* the layers are not all alike: ``layer_types`` mixes sliding-window layers (``head_dim``,
  ``num_key_value_heads``, default RoPE) and full-attention layers (``global_head_dim``,
  ``num_global_key_value_heads`` with ``attention_k_eq_v``, proportional RoPE with
  ``partial_rotary_factor``), so the stack is a Python loop over per-layer weights (``layers``
  is a tuple) instead of one ``lax.scan``;
* with ``attention_k_eq_v`` the full layers' values are the raw key projection; values are
  ``v_norm``'ed (an RMSNorm without weight); attention scores are not scaled (q, k are normed);
* the last ``num_kv_shared_layers`` layers have no key/value projections: each attends with
  its own queries over the keys/values of the last earlier layer of its type (cache included),
  and stores nothing; with ``use_double_wide_mlp`` their MLPs are twice as wide;
* sandwich norms (post-attention / pre- and post-feed-forward), gelu-tanh MLPs, a
  ``layer_scalar`` per layer, the embedding scaled by sqrt(hidden), logits soft-capped.

The cache (``Gemma4Cache``) holds the stored layers only, full layers at every position and
sliding layers in a ring of their window plus one chunk (``ring_capacity``), read through
``attention.Context.positions``. Features a checkpoint may use that this port does not run
(per-layer inputs, the MoE block, bidirectional attention) are refused when the config is read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from .attention import AttentionMask, Context, attend, packed_attention
from .cache import chunk_positions
from .config import ConfigError, RopeConfig, _eos_ids, read_json, with_generation_eos
from .layers import apply_rope, rms_norm, rope_tables, tp_sum
from .params import ParamDecl, init_tree

SLIDING, FULL = "sliding_attention", "full_attention"
TEXT_PREFIX = "model.language_model"
# tensors of a Gemma4ForConditionalGeneration checkpoint that a text model does not run
TOWER_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")
ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4Model", "Gemma4TextModel")
MAX_CHUNK = 512  # the longest chunk a sliding ring is sized for (decoding.PREFILL_CHUNK)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The geometry of one Gemma 4 layer, derived from the config."""

    sliding: bool
    head_dim: int
    kv_heads: int
    mlp_width: int
    values_from_keys: bool  # attention_k_eq_v on a full layer: no v_proj
    shared: bool  # no K/V of its own: reads those of layer ``source``
    source: int  # the layer whose keys/values this layer attends (itself unless shared)
    slot: int  # index of the source layer in its type's cache stack

    @property
    def kind(self) -> str:
        return SLIDING if self.sliding else FULL

    def signature(self) -> tuple:
        """What two layers must share to run as one scanned body: geometry, and for shared
        layers the keys/values they read (a stored layer's slot follows from its position)."""
        return (self.sliding, self.head_dim, self.kv_heads, self.mlp_width, self.values_from_keys, self.shared,
                self.slot if self.shared else None)


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Consecutive layers that repeat one period of layer geometries ``specs``: layer
    ``start + r * len(specs) + j`` (repeat r) runs as ``specs[j]``, its weights stacked over
    the repeats, and the group runs as one ``lax.scan`` over them."""

    start: int
    repeats: int
    specs: tuple[LayerSpec, ...]  # the first repeat's layers

    @property
    def period(self) -> int:
        return len(self.specs)

    def layer_ids(self, j: int) -> tuple[int, ...]:
        """The model layers that position ``j`` of the period is, one per repeat."""
        return tuple(self.start + r * self.period + j for r in range(self.repeats))

    def slot_stride(self, kind: str) -> int:
        """Stored layers of ``kind`` per repeat: how far a stored layer's cache slot moves per repeat."""
        return sum(1 for s in self.specs if s.kind == kind and not s.shared)


def group_layers(specs: Sequence[LayerSpec]) -> tuple[LayerGroup, ...]:
    """The partition of the layers into repeated periods with the fewest layer bodies to
    compile (the sum of the periods; then the fewest groups): Gemma 4's repeating
    sliding/full pattern becomes one scanned period, the KV-shared tail its own groups (a
    group never mixes the two, so a shared layer's keys/values come from an earlier group)."""
    sigs = [s.signature() for s in specs]
    n = len(sigs)
    first_shared = next((i for i, s in enumerate(specs) if s.shared), n)

    @functools.cache
    def best(i: int) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
        """((bodies, groups), ((period, repeats), ...)) for layers i.."""
        if i == n:
            return (0, 0), ()
        options = []
        end = first_shared if i < first_shared else n
        for period in range(1, end - i + 1):
            repeats = 1
            while (i + (repeats + 1) * period <= end
                   and sigs[i + repeats * period : i + (repeats + 1) * period] == sigs[i : i + period]):
                repeats += 1
            (bodies, groups), rest = best(i + repeats * period)
            options.append(((bodies + period, groups + 1), ((period, repeats),) + rest))
        return min(options)

    groups, start = [], 0
    for period, repeats in best(0)[1]:
        groups.append(LayerGroup(start, repeats, tuple(specs[start : start + period])))
        start += period * repeats
    return tuple(groups)


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    """Architecture of a Gemma 4 text decoder (hashable: a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int  # kv heads of full layers (= num_key_value_heads without k_eq_v)
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_sliding: RopeConfig = RopeConfig()
    rope_full: RopeConfig = RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25)
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int = 131072
    attention_backend: str = "auto"  # not part of the checkpoint: which attention.py backend runs

    def __post_init__(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"layer_types {bad} not supported ({SLIDING}, {FULL})")
        for kind, kv in ((SLIDING, self.num_key_value_heads), (FULL, self.num_global_key_value_heads)):
            if kind in self.layer_types and self.num_attention_heads % kv:
                raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of the "
                                  f"{kind} layers' {kv} kv heads")
        if self.num_kv_shared_layers < 0:
            raise ConfigError(f"num_kv_shared_layers must be >= 0, got {self.num_kv_shared_layers}")
        if self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        self.layer_specs()  # a shared layer type without a producer is refused here

    @property
    def family(self) -> str:
        return "gemma4"

    @property
    def first_shared_layer(self) -> int:
        """The first KV-shared (and double-wide) layer; none when ``num_kv_shared_layers`` covers
        every layer (transformers 5.10.2, DeepSpec's pin: ``layer_idx >= first > 0``), as in a
        drafter whose config copies the target's ``num_kv_shared_layers``."""
        first = self.num_hidden_layers - self.num_kv_shared_layers
        return first if first > 0 else self.num_hidden_layers

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Per-layer geometry; shared layers point at the last earlier stored layer of their type."""
        first_shared = self.first_shared_layer
        slots: dict[str, int] = {SLIDING: 0, FULL: 0}
        producer: dict[str, tuple[int, int]] = {}  # kind -> (layer, slot) of the last stored layer
        specs = []
        for i, kind in enumerate(self.layer_types):
            sliding = kind == SLIDING
            shared = i >= first_shared
            if shared:
                if kind not in producer:
                    raise ConfigError(f"layer {i} ({kind}) shares keys/values but no earlier {kind} layer stores any")
                source, slot = producer[kind]
            else:
                source, slot = i, slots[kind]
                producer[kind] = (i, slot)
                slots[kind] += 1
            specs.append(LayerSpec(
                sliding=sliding,
                head_dim=self.head_dim if sliding else self.global_head_dim,
                kv_heads=self.num_key_value_heads if sliding else self.num_global_key_value_heads,
                mlp_width=self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1),
                values_from_keys=self.attention_k_eq_v and not sliding,
                shared=shared, source=source, slot=slot,
            ))
        return tuple(specs)

    def layer_groups(self) -> tuple[LayerGroup, ...]:
        return _layer_groups(self)

    def stored_layers(self, kind: str) -> int:
        return sum(1 for s in self.layer_specs() if s.kind == kind and not s.shared)

    def rope_of(self, kind: str) -> tuple[RopeConfig, int]:
        return (self.rope_sliding, self.head_dim) if kind == SLIDING else (self.rope_full, self.global_head_dim)

    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], where: str = "config.json") -> "Gemma4Config":
        """From a Gemma 4 config: the multimodal top level (its ``text_config``) or a text config.
        Unsupported features are a ConfigError naming the field."""
        text = raw.get("text_config") if "text_config" in raw else raw
        if not isinstance(text, Mapping):
            raise ConfigError(f"{where}: text_config is not an object")
        # transformers reads the top-level flag of the multimodal class
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        check_supported(text, where)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in text]
        if missing:
            raise ConfigError(f"{where}: text_config is missing field(s) {', '.join(missing)}")
        layers, heads = int(text["num_hidden_layers"]), int(text["num_attention_heads"])
        layer_types = list(text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(layers)])
        if layer_types:
            layer_types[-1] = FULL  # transformers forces the last layer to full attention
        kv = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or 256)
        k_eq_v = bool(text.get("attention_k_eq_v", False))
        global_head_dim = int(text.get("global_head_dim") or 512)
        global_kv = int((text.get("num_global_key_value_heads") if k_eq_v else None) or kv)
        if text.get("per_layer_config"):  # how newer transformers write the global geometry
            global_head_dim, global_kv = _per_layer_geometry(text["per_layer_config"], layer_types, head_dim, kv, where)
        rope = dict(text.get("rope_parameters") or {})
        return cls(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv,
            layer_types=tuple(str(t) for t in layer_types),
            sliding_window=int(text.get("sliding_window") or 512),
            rope_sliding=_rope(rope.get(SLIDING, {"rope_type": "default", "rope_theta": 10000.0}), where, SLIDING),
            rope_full=_rope(rope.get(FULL, {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1e6}), where, FULL),
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=int(text.get("num_kv_shared_layers") or 0),
            use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
            final_logit_softcapping=None if text.get("final_logit_softcapping") is None
            else float(text["final_logit_softcapping"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(tie),
            eos_token_ids=_eos_ids(text.get("eos_token_id", raw.get("eos_token_id"))),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        )

    def to_hf_text(self) -> dict[str, Any]:
        """The ``text_config`` fields this port reads (transformers ``Gemma4TextConfig``)."""
        eos = list(self.eos_token_ids)
        return {
            "model_type": "gemma4_text", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads, "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {SLIDING: _rope_to_hf(self.rope_sliding), FULL: _rope_to_hf(self.rope_full)},
            "attention_k_eq_v": self.attention_k_eq_v, "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp, "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
            "max_position_embeddings": self.max_position_embeddings, "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size_per_layer_input": 0, "enable_moe_block": False, "attention_bias": False,
        }


@functools.lru_cache(maxsize=64)
def _layer_groups(cfg: Gemma4Config) -> tuple[LayerGroup, ...]:
    return group_layers(cfg.layer_specs())


def _per_layer_geometry(per_layer: Mapping, layer_types, head_dim: int, kv: int, where: str) -> tuple[int, int]:
    """(head_dim, kv heads) of the full layers from transformers' ``per_layer_config``; a geometry
    that differs between layers of one type is refused."""
    def geometry(i):
        over = per_layer.get(str(i)) or per_layer.get(i) or {}
        return int(over.get("head_dim", head_dim)), int(over.get("num_key_value_heads", kv))

    for kind in (SLIDING, FULL):
        found = sorted({geometry(i) for i, t in enumerate(layer_types) if t == kind})
        if len(found) > 1 or (kind == SLIDING and found and found[0] != (head_dim, kv)):
            raise ConfigError(f"{where}: per_layer_config gives the {kind} layers (head_dim, kv heads) {found}: "
                              f"only one geometry per layer type is supported")
    full = [geometry(i) for i, t in enumerate(layer_types) if t == FULL]
    return full[0] if full else (head_dim, kv)


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out = rope.to_hf()
    if rope.rope_type == "proportional" and rope.factor == 1.0:
        del out["factor"]  # as transformers writes Gemma 4's
    return out


def _rope(params: Mapping[str, Any], where: str, kind: str) -> RopeConfig:
    return RopeConfig.from_hf({"rope_parameters": dict(params)}, f"{where} (rope_parameters.{kind})")


def check_supported(text: Mapping[str, Any], where: str):
    """Refuse the Gemma 4 features this port does not run, naming the field."""
    # transformers' default for a missing field is 256: per-layer inputs on
    ple = text.get("hidden_size_per_layer_input", 256)
    if ple:
        raise ConfigError(f"{where}: hidden_size_per_layer_input={ple}: per-layer inputs (PLE) are not supported "
                          f"(DeepSpec's Gemma 4 drafters need 0 too)")
    if text.get("enable_moe_block"):
        raise ConfigError(f"{where}: enable_moe_block=true: the Gemma 4 MoE block is not supported")
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{where}: use_bidirectional_attention='all' (a non-causal text model) is not supported")
    if text.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for Gemma 4")
    act = text.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{where}: hidden_activation {act!r} is not supported (Gemma 4 uses gelu_pytorch_tanh)")


def is_gemma4_config(raw: Mapping[str, Any]) -> bool:
    archs = raw.get("architectures") or []
    return raw.get("model_type") in ("gemma4", "gemma4_text") or any(a in ARCHITECTURES for a in archs)


def load_gemma4_config(model_dir: str | os.PathLike) -> Gemma4Config:
    """Read a Gemma 4 ``config.json`` (eos ids merged with generation_config.json's)."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    raw = read_json(path)
    if not is_gemma4_config(raw):
        raise ConfigError(f"{path}: model_type={raw.get('model_type')!r} is not a Gemma 4 checkpoint")
    return with_generation_eos(Gemma4Config.from_hf(raw, path), model_dir)


# ---------------------------------------------------------------------------- parameters


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma4LayerParams:
    """One Gemma 4 layer; k_proj / k_norm / v_proj are None where the layer has none."""

    input_norm: jax.Array  # [D]
    q_proj: jax.Array  # [D, H, Dh]
    q_norm: jax.Array  # [Dh]
    k_proj: jax.Array | None  # [D, K, Dh]; None on shared layers
    k_norm: jax.Array | None  # [Dh]
    v_proj: jax.Array | None  # [D, K, Dh]; None on shared layers and with k_eq_v
    o_proj: jax.Array  # [H, Dh, D]
    post_attention_norm: jax.Array  # [D]
    pre_feedforward_norm: jax.Array  # [D]
    post_feedforward_norm: jax.Array  # [D]
    gate_proj: jax.Array  # [D, F]
    up_proj: jax.Array  # [D, F]
    down_proj: jax.Array  # [F, D]
    layer_scalar: jax.Array  # [1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma4Params:
    embed: jax.Array  # [V, D] (unscaled, as stored)
    # per layer group (``Gemma4Config.layer_groups``), per layer of its period: stacked over the repeats
    layers: tuple[tuple[Gemma4LayerParams, ...], ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to embed
    # final_logit_softcapping travels with the head it caps, so every caller of
    # target.compute_logits (prefill, the drafter, training) applies it
    logit_softcap: float | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def dtype(self):
        return self.embed.dtype


def layer_decl(spec: LayerSpec, cfg: Gemma4Config, prefix: str,
               layer_ids: tuple[int, ...] | None = None, attn_in: int | None = None) -> Gemma4LayerParams:
    """The declaration of one layer whose tensors are ``{prefix}.<Hugging Face name>``, or with
    ``layer_ids`` of a stack of such layers (``prefix`` with ``{layer}`` in it), one per id.
    ``attn_in`` is the width q/k/v project from (default hidden_size; Eagle-3: 2 x hidden)."""
    D, H, K, Dh, F = cfg.hidden_size, cfg.num_attention_heads, spec.kv_heads, spec.head_dim, spec.mlp_width
    A = attn_in or D
    stack = () if layer_ids is None else (len(layer_ids),)

    def weight(name, shape, axes, n_in=0, init="normal"):
        return ParamDecl(stack + tuple(shape), ("layers",) * len(stack) + tuple(axes), f"{prefix}.{name}", n_in, init,
                         layer_ids=layer_ids)

    own_kv = not spec.shared
    return Gemma4LayerParams(
        input_norm=weight("input_layernorm.weight", (D,), ("embed",), init="ones"),
        q_proj=weight("self_attn.q_proj.weight", (A, H, Dh), ("embed", "heads", "head_dim"), 1),
        q_norm=weight("self_attn.q_norm.weight", (Dh,), ("head_dim",), init="ones"),
        k_proj=weight("self_attn.k_proj.weight", (A, K, Dh), ("embed", "kv_heads", "head_dim"), 1) if own_kv else None,
        k_norm=weight("self_attn.k_norm.weight", (Dh,), ("head_dim",), init="ones") if own_kv else None,
        v_proj=weight("self_attn.v_proj.weight", (A, K, Dh), ("embed", "kv_heads", "head_dim"), 1)
        if own_kv and not spec.values_from_keys else None,
        o_proj=weight("self_attn.o_proj.weight", (H, Dh, D), ("heads", "head_dim", "embed"), 2),
        post_attention_norm=weight("post_attention_layernorm.weight", (D,), ("embed",), init="ones"),
        pre_feedforward_norm=weight("pre_feedforward_layernorm.weight", (D,), ("embed",), init="ones"),
        post_feedforward_norm=weight("post_feedforward_layernorm.weight", (D,), ("embed",), init="ones"),
        gate_proj=weight("mlp.gate_proj.weight", (D, F), ("embed", "mlp"), 1),
        up_proj=weight("mlp.up_proj.weight", (D, F), ("embed", "mlp"), 1),
        down_proj=weight("mlp.down_proj.weight", (F, D), ("mlp", "embed"), 1),
        layer_scalar=weight("layer_scalar", (1,), (None,), init="ones"),
    )


def target_decl(cfg: Gemma4Config) -> Gemma4Params:
    """Every text weight of a ``Gemma4ForConditionalGeneration`` checkpoint (``model.language_model.*``)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    return Gemma4Params(
        embed=ParamDecl((V, D), ("vocab", "embed"), f"{TEXT_PREFIX}.embed_tokens.weight"),
        layers=tuple(tuple(layer_decl(spec, cfg, f"{TEXT_PREFIX}.layers.{{layer}}", group.layer_ids(j))
                           for j, spec in enumerate(group.specs)) for group in cfg.layer_groups()),
        final_norm=ParamDecl((D,), ("embed",), f"{TEXT_PREFIX}.norm.weight", init="ones"),
        lm_head=None if cfg.tie_word_embeddings else ParamDecl((D, V), ("embed", "vocab"), "lm_head.weight", 1),
        logit_softcap=cfg.final_logit_softcapping,
    )


def init_params(key: jax.Array, cfg: Gemma4Config, dtype=jnp.float32, std: float = 0.02) -> Gemma4Params:
    """Random weights: normal(std) matrices, unit norms and layer scalars."""
    return init_tree(key, target_decl(cfg), dtype, std)


def is_tower_tensor(name: str) -> bool:
    return name.startswith(TOWER_PREFIXES)


# ---------------------------------------------------------------------------- cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma4Cache:
    """Keys/values of the stored layers, one stack per layer type, and the committed lengths.

    ``full_k [Lf, B, S, Kf, Dhf]``: position s at slot s, as ``cache.KVCache``.
    ``sliding_k [Ls, B, R, Ks, Dhs]``: a ring, position p at slot p % R, with R the window plus
    one chunk (``ring_capacity``), so a chunk written after the window's keys (a verify step
    whose drafts are then rejected) never overwrites a key a later query still reads.
    Shared layers have no entries. Entries past ``lengths`` are never read.
    """

    full_k: jax.Array
    full_v: jax.Array
    sliding_k: jax.Array
    sliding_v: jax.Array
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.full_k.shape[2]

    @property
    def batch(self) -> int:
        return self.full_k.shape[1]

    @property
    def ring(self) -> int:
        return self.sliding_k.shape[2]

    def advance(self, n: jax.Array) -> "Gemma4Cache":
        return dataclasses.replace(self, lengths=self.lengths + jnp.asarray(n, jnp.int32))


def ring_capacity(cfg: Gemma4Config, max_len: int, max_chunk: int = MAX_CHUNK) -> int:
    """Slots of a sliding layer's ring: the window's W - 1 earlier keys plus one chunk (capped
    by the cache length, where the ring is a plain cache)."""
    return min(max_len, cfg.sliding_window - 1 + max_chunk)


def init_cache(cfg: Gemma4Config, batch: int, max_len: int, dtype=jnp.float32, max_chunk: int = MAX_CHUNK) -> Gemma4Cache:
    full = (cfg.stored_layers(FULL), batch, max_len, cfg.num_global_key_value_heads, cfg.global_head_dim)
    ring = (cfg.stored_layers(SLIDING), batch, ring_capacity(cfg, max_len, max_chunk), cfg.num_key_value_heads,
            cfg.head_dim)
    zeros = lambda shape: jnp.zeros(shape, dtype)
    return Gemma4Cache(zeros(full), zeros(full), zeros(ring), zeros(ring), jnp.zeros((batch,), jnp.int32))


def cache_bytes(cfg: Gemma4Config, batch: int, cache_len: int, dtype) -> int:
    """Bytes of a Gemma 4 cache (keys and values of the stored layers)."""
    full = cfg.stored_layers(FULL) * cache_len * cfg.num_global_key_value_heads * cfg.global_head_dim
    ring = cfg.stored_layers(SLIDING) * ring_capacity(cfg, cache_len) * cfg.num_key_value_heads * cfg.head_dim
    return 2 * batch * (full + ring) * jnp.dtype(dtype).itemsize


def ring_positions(lengths: jax.Array, ring: int) -> jax.Array:
    """``[B, R]``: the position slot s holds once ``lengths`` positions are written (the newest
    p < lengths with p % R == s; negative where none)."""
    last = lengths[:, None] - 1
    return last - jnp.mod(last - jnp.arange(ring, dtype=jnp.int32)[None, :], ring)


def _check_chunk(cache: Gemma4Cache, cfg: Gemma4Config, T: int):
    if cache.ring < cache.max_len and T > cache.ring - cfg.sliding_window + 1:
        raise ValueError(f"a chunk of {T} tokens does not fit the sliding ring of {cache.ring} slots "
                         f"(window {cfg.sliding_window}); build the cache with max_chunk >= {T}")


def _write(cache_layers: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter ``new [L, B, T, K, Dh]`` at ``slots [B, T]`` (out of range: dropped) of every layer."""
    rows = jnp.arange(new.shape[1])[:, None]
    return cache_layers.at[:, rows, slots].set(new.astype(cache_layers.dtype), mode="drop")


def write_cache(cache: Gemma4Cache, new_kv: dict, positions: jax.Array) -> Gemma4Cache:
    """Write a chunk's keys/values (``new_kv[kind] = (k, v)`` stacked over the stored layers)
    at ``positions [B, T]``; positions past the cache are dropped. Lengths unchanged."""
    S, R = cache.max_len, cache.ring
    full_slots = jnp.where(positions < S, positions, S)
    ring_slots = jnp.where(positions < S, jnp.mod(positions, R), R)
    out = cache
    if new_kv.get(FULL) is not None:
        k, v = new_kv[FULL]
        out = dataclasses.replace(out, full_k=_write(out.full_k, k, full_slots),
                                  full_v=_write(out.full_v, v, full_slots))
    if new_kv.get(SLIDING) is not None:
        k, v = new_kv[SLIDING]
        out = dataclasses.replace(out, sliding_k=_write(out.sliding_k, k, ring_slots),
                                  sliding_v=_write(out.sliding_v, v, ring_slots))
    return out


def layer_context(cache: Gemma4Cache | None, spec: LayerSpec, slot: jax.Array | int) -> Context | None:
    """What a layer like ``spec`` reads of the cache: the keys/values of stored layer ``slot``
    of its type (its own, or its source's; a ring for sliding layers shorter than the cache)."""
    if cache is None:
        return None
    slot = jnp.asarray(slot, jnp.int32)
    if not spec.sliding:
        return Context(cache.full_k, cache.full_v, slot)
    positions = None if cache.ring >= cache.max_len else ring_positions(cache.lengths, cache.ring)
    return Context(cache.sliding_k, cache.sliding_v, slot, positions)


# ---------------------------------------------------------------------------- forward


def scaled_embedding(embed: jax.Array, tokens: jax.Array) -> jax.Array:
    """``embed[tokens] * sqrt(hidden)``, the scale rounded to the weight dtype (as transformers)."""
    scale = jnp.asarray(math.sqrt(embed.shape[-1]), jnp.float32).astype(embed.dtype)
    return embed[tokens] * scale


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def output_head(params: Gemma4Params) -> jax.Array:
    return params.embed.T if params.lm_head is None else params.lm_head


def compute_logits(params: Gemma4Params, hidden: jax.Array) -> jax.Array:
    """Soft-capped float32 logits ``[..., V]`` from final-normed hidden states ``[..., D]``."""
    logits = jnp.einsum("...d,dv->...v", hidden, output_head(params), preferred_element_type=jnp.float32)
    return softcap(logits, params.logit_softcap)


def project_kv(p: Gemma4LayerParams, eps: float, h: jax.Array, cos, sin):
    """Keys (k_norm, RoPE) and values (v_norm of v_proj, or of the raw keys with k_eq_v) of ``h [B, T, D]``."""
    raw_k = jnp.einsum("btd,dkh->btkh", h, p.k_proj)
    k = apply_rope(rms_norm(raw_k, p.k_norm, eps), cos, sin)
    v = raw_k if p.v_proj is None else jnp.einsum("btd,dkh->btkh", h, p.v_proj)
    return k, rms_norm(v, 1.0, eps)


def project_q(p: Gemma4LayerParams, eps: float, h: jax.Array, cos, sin):
    return apply_rope(rms_norm(jnp.einsum("btd,dnh->btnh", h, p.q_proj), p.q_norm, eps), cos, sin)


def layer_output(p: Gemma4LayerParams, eps: float, x: jax.Array, attn: jax.Array, tp_axis: str | None) -> jax.Array:
    """The rest of a layer after attention ``attn [B, T, H, Dh]``: sandwich-normed residuals,
    the gelu-tanh MLP, the layer scalar."""
    x = x + rms_norm(tp_sum(jnp.einsum("btnh,nhd->btd", attn, p.o_proj), tp_axis), p.post_attention_norm, eps)
    h = rms_norm(x, p.pre_feedforward_norm, eps)
    mlp = jax.nn.gelu(h @ p.gate_proj, approximate=True) * (h @ p.up_proj)
    x = x + rms_norm(tp_sum(mlp @ p.down_proj, tp_axis), p.post_feedforward_norm, eps)
    return x * p.layer_scalar.astype(x.dtype)


def check_feature_layers(cfg: Gemma4Config, feature_layers: Sequence[int]) -> tuple[int, ...]:
    ids = tuple(int(i) for i in feature_layers)
    bad = [i for i in ids if not -1 <= i < cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"feature layer ids {bad} out of range for a target with {cfg.num_hidden_layers} layers "
                         f"(valid: -1 for the scaled embedding output, 0..{cfg.num_hidden_layers - 1})")
    return ids


def after_every_read(new_kv, x: jax.Array):
    """``new_kv`` made data-dependent on the last layer's output ``x``, so that writing it into
    the cache comes after every read of the cache. Layers of a later group (a KV-shared layer
    reads an earlier layer's cache) read a cache whose chunk write depends only on earlier
    groups; with no dependency XLA orders the write first and keeps the old cache alive by
    copying it whole, every step. (``lax.optimization_barrier`` does not survive to XLA's copy
    insertion on CPU.) Adds +-0, exact for finite ``x`` (NaN where ``x`` already is)."""
    zero = jnp.zeros((), x.dtype) * x.reshape(-1)[0]
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), new_kv)


def run_layers(params: Gemma4Params, cfg: Gemma4Config, tokens, positions, mask: AttentionMask, cache, feature_layers,
               with_logits: bool, tp_axis=None, remat: bool = False, attend_fn=None):
    """The stack shared by every entry point: scaled embedding, the layer groups in order
    (each one ``lax.scan`` over its repeats, every layer attending through ``attention.attend``
    with ``mask`` and its source layer's cache, or ``attend_fn(q, k, v, mask, context)``),
    features, final norm, logits. Returns the ForwardOutput and the chunk's keys/values per
    layer type, stacked over the stored layers ``[L, B, T, K, Dh]``."""
    from .target import ForwardOutput

    eps = cfg.rms_norm_eps
    if attend_fn is None:
        def attend_fn(q, k, v, m, context):
            return attend(q, k, v, m, context, cfg.attention_backend, scale=1.0)
    tables = {kind: rope_tables(*cfg.rope_of(kind), cfg.max_position_embeddings, positions) for kind in (SLIDING, FULL)}
    masks = {SLIDING: mask.with_window(cfg.sliding_window), FULL: mask}

    def layer(p, x, spec, slot, shared_kv):
        cos, sin = tables[spec.kind]
        h = rms_norm(x, p.input_norm, eps)
        q = project_q(p, eps, h, cos, sin)
        k, v = shared_kv if spec.shared else project_kv(p, eps, h, cos, sin)
        attn = attend_fn(q, k, v, masks[spec.kind], layer_context(cache, spec, slot))
        return layer_output(p, eps, x, attn, tp_axis), (k, v)

    if remat:
        layer = jax.checkpoint(layer, static_argnums=(2,))
    x = scaled_embedding(params.embed, tokens)
    outputs = {-1: x}  # feature layer -> its output
    new_kv: dict[str, list] = {SLIDING: [], FULL: []}  # per type: [n, B, T, K, Dh] per group, in slot order
    for group, weights in zip(cfg.layer_groups(), params.layers):
        # a shared layer reads the chunk keys/values of a stored layer of an earlier group
        shared = {j: tuple(jnp.concatenate(parts)[spec.slot] for parts in zip(*new_kv[spec.kind]))
                  for j, spec in enumerate(group.specs) if spec.shared}
        kept = [j for j in range(group.period) if set(group.layer_ids(j)) & set(feature_layers)]

        def period(x, scanned, group=group, shared=shared, kept=kept):
            w, r = scanned
            kvs, outs = [], []
            for j, (spec, p) in enumerate(zip(group.specs, w)):
                slot = spec.slot if spec.shared else spec.slot + r * group.slot_stride(spec.kind)
                x, kv = layer(p, x, spec, slot, shared.get(j))
                if not spec.shared:
                    kvs.append(kv)
                if j in kept:
                    outs.append(x)
            return x, (tuple(kvs), tuple(outs))

        if group.repeats == 1:  # no loop for a single repeat
            x, ys = period(x, (jax.tree.map(lambda a: a[0], weights), 0))
            kvs, outs = jax.tree.map(lambda a: a[None], ys)
        else:
            x, (kvs, outs) = jax.lax.scan(period, x, (weights, jnp.arange(group.repeats, dtype=jnp.int32)))
        stored = [spec for spec in group.specs if not spec.shared]
        for kind in (SLIDING, FULL):
            mine = [kv for spec, kv in zip(stored, kvs) if spec.kind == kind]
            if mine:  # [R, n, B, T, K, Dh] -> slot order (repeat-major) [R * n, B, T, K, Dh]
                new_kv[kind].append(tuple(jnp.stack(a, 1).reshape((-1,) + a[0].shape[1:]) for a in zip(*mine)))
        for j, out in zip(kept, outs):
            outputs.update(zip(group.layer_ids(j), out))
    B, T = tokens.shape
    parts = [outputs[i] for i in feature_layers]
    features = jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((B, T, 0), x.dtype)
    stacked = {kind: tuple(jnp.concatenate(a) for a in zip(*parts)) if parts else None for kind, parts in new_kv.items()}
    stacked = after_every_read(stacked, x)
    hidden = rms_norm(x, params.final_norm, eps)
    logits = compute_logits(params, hidden) if with_logits else None
    return ForwardOutput(hidden=hidden, features=features, logits=logits), stacked


def forward(params: Gemma4Params, cfg: Gemma4Config, tokens: jax.Array, cache: Gemma4Cache | None, *,
            feature_layers: Sequence[int] = (), with_logits: bool = True, tp_axis: str | None = None,
            remat: bool = False):
    """``target.forward`` for Gemma 4: ``tokens [B, T]`` at positions ``cache.lengths + t``,
    reading the committed cache and the chunk causally (sliding layers within their window),
    writing the chunk's keys/values of the stored layers (lengths unchanged). Feature id -1 is
    the scaled embedding, id i the output of layer i (after its layer scalar). ``cache=None``:
    a whole sequence at positions 0..T-1, no cache returned."""
    feature_layers = check_feature_layers(cfg, feature_layers)
    B, T = tokens.shape
    if cache is not None:
        _check_chunk(cache, cfg, T)
    lengths = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    positions = chunk_positions(lengths, T)
    mask = AttentionMask.make(positions, context_len=lengths)
    out, new_kv = run_layers(params, cfg, tokens, positions, mask, cache, feature_layers, with_logits, tp_axis, remat)
    return out, None if cache is None else write_cache(cache, new_kv, positions)


# ---------------------------------------------------------------------------- checkpoint


def tensor_accounting(names, decls) -> dict[str, Any]:
    """Where every tensor of a checkpoint goes: the text model's, and the towers' (ignored),
    counted per prefix, so nothing is dropped without being named."""
    from .params import checkpoint_tensors

    text = set(checkpoint_tensors(decls))
    towers: dict[str, int] = {}
    for name in names:
        if is_tower_tensor(name):
            prefix = next(p for p in TOWER_PREFIXES if name.startswith(p)).rstrip(".")
            towers[prefix] = towers.get(prefix, 0) + 1
    return {"text": len(text & set(names)), "ignored": dict(sorted(towers.items()))}


def load_gemma4(model_dir: str | os.PathLike, dtype=None, *, mesh=None, chunk_bytes: int | None = None):
    """Load the text model of a Gemma 4 directory (config.json + safetensors) without torch.
    The vision/audio towers' tensors are skipped and counted (logged, ``tensor_accounting``);
    any other tensor the declarations do not name is an error, as is a missing one."""
    import logging

    from . import checkpoint as ckpt

    cfg = load_gemma4_config(model_dir)
    dtype = ckpt.resolve_dtype(dtype)
    decls = target_decl(cfg)
    with ckpt.TensorSource(model_dir) as source:
        names = source.names()
        ignored = {n for n in names if is_tower_tensor(n)}
        if cfg.tie_word_embeddings:
            ignored |= {"lm_head.weight"} & names  # a redundant copy of the tied head
        ckpt.check_tensors(source, decls, ignored)
        accounting = tensor_accounting(names, decls)
        if accounting["ignored"]:
            logging.getLogger("dspark_jax").info(
                "%s: loaded %d text tensors; ignored the multimodal towers (%s)", os.fspath(model_dir),
                accounting["text"], ", ".join(f"{k}: {v} tensors" for k, v in accounting["ignored"].items()))
        shardings = None
        if mesh is not None:
            from .sharding import target_shardings

            shardings = target_shardings(cfg, mesh)
        kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        return ckpt.load_tree(source, decls, dtype, shardings, **kw), cfg


# ---------------------------------------------------------------------------- DSpark drafter layers


def draft_layer_specs(cfg: Gemma4Config) -> tuple[LayerSpec, ...]:
    """The layers of DeepSpec's ``Gemma4DSparkModel`` (``cfg`` = the draft's config): every layer
    has the full-attention geometry (global head dim, global kv heads and no v_proj with
    k_eq_v) and its own keys/values (no window, no sharing); MLP widths follow transformers'
    rule on the draft config (double-wide from layer n - num_kv_shared_layers on, when > 0)."""
    first_wide = cfg.first_shared_layer
    return tuple(LayerSpec(sliding=False, head_dim=cfg.global_head_dim, kv_heads=cfg.num_global_key_value_heads,
                           mlp_width=cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and i >= first_wide else 1),
                           values_from_keys=cfg.attention_k_eq_v, shared=False, source=i, slot=i)
                 for i in range(cfg.num_hidden_layers))


def draft_layers_config(cfg: Gemma4Config, num_layers: int) -> Gemma4Config:
    """The layer config of a DSpark drafter for target ``cfg`` (DeepSpec's ``build_draft_config``:
    a copy of the target's text config with ``num_layers`` full-attention layers, untied)."""
    return dataclasses.replace(cfg, num_hidden_layers=num_layers, layer_types=(FULL,) * num_layers, eos_token_ids=(),
                               tie_word_embeddings=False)


def draft_layers_decl(cfg: Gemma4Config, prefix: str = "layers") -> tuple[Gemma4LayerParams, ...]:
    return tuple(layer_decl(s, cfg, f"{prefix}.{i}") for i, s in enumerate(draft_layer_specs(cfg)))


def draft_rope(cfg: Gemma4Config, positions: jax.Array):
    return rope_tables(cfg.rope_full, cfg.global_head_dim, cfg.max_position_embeddings, positions)


def draft_context_kv(layers: Sequence[Gemma4LayerParams], cfg: Gemma4Config, h_ctx: jax.Array, positions: jax.Array):
    """Context keys/values ``[L, B, T, K, Dh]`` of every draft layer from the projected context
    ``h_ctx [B, T, D]`` (no input norm) at ``positions [B, T]``."""
    cos, sin = draft_rope(cfg, positions)
    kv = [project_kv(p, cfg.rms_norm_eps, h_ctx, cos, sin) for p in layers]
    return jnp.stack([k for k, _ in kv]), jnp.stack([v for _, v in kv])


def draft_layers(layers: Sequence[Gemma4LayerParams], final_norm: jax.Array, cfg: Gemma4Config, x: jax.Array,
                 mask: AttentionMask, ctx_k: jax.Array, ctx_v: jax.Array, backend: str):
    """Block inputs ``x [B, T, D]`` through the draft layers, layer l attending to the context
    ``ctx_k[l], ctx_v[l]`` and the block as ``mask`` says. Returns the final-normed hidden and
    each layer's output ``[L, B, T, D]`` (after its layer scalar)."""
    eps = cfg.rms_norm_eps
    cos, sin = draft_rope(cfg, mask.q_pos)
    outs = []
    for i, p in enumerate(layers):
        context = Context(ctx_k, ctx_v, jnp.int32(i))
        x, _ = draft_layer(p, eps, x, rms_norm(x, p.input_norm, eps), cos, sin,
                           lambda q, k, v: (attend(q, k, v, mask, context, backend, scale=1.0), None))
        outs.append(x)
    return rms_norm(x, final_norm, eps), jnp.stack(outs)


def draft_layer(p: Gemma4LayerParams, eps: float, x: jax.Array, h: jax.Array, cos, sin, attend_fn):
    """One drafter layer (full-attention geometry, keys/values of its own) over the residual
    ``x [B, T, D]``, q/k/v projected from ``h [B, T, A]`` (DSpark: ``input_norm(x)``; Eagle-3:
    ``[input_norm(embedding) ; hidden_norm(x)]``). ``attend_fn(q, k, v) -> (out, aux)`` attends
    with the caller's mask and context (unscaled scores: q and k are normed). Returns ``(x, aux)``."""
    q = project_q(p, eps, h, cos, sin)
    k, v = project_kv(p, eps, h, cos, sin)
    attn, aux = attend_fn(q, k, v)
    return layer_output(p, eps, x, attn, None), aux


# ---------------------------------------------------------------------------- packed verification


def forward_packed(params: Gemma4Params, cfg: Gemma4Config, tokens: jax.Array, seq_ids: jax.Array, slots: jax.Array,
                   cache: Gemma4Cache, *, chunk_len: int, feature_layers: Sequence[int] = (), with_logits: bool = True,
                   tp_axis: str | None = None):
    """``target.forward_packed`` for Gemma 4: ``tokens [N]`` of several sequences on one axis
    (token i is the ``slots[i]``-th new token of sequence ``seq_ids[i]``); attention reads them
    over the cache through ``attention.packed_attention``. Returns outputs ``[N, 1, ...]`` and the
    packed keys/values per layer type, ``{kind: [L, N, K, Dh]}``, for ``write_packed``."""
    feature_layers = check_feature_layers(cfg, feature_layers)
    _check_chunk(cache, cfg, chunk_len)
    B = cache.batch
    rows = jnp.minimum(seq_ids, B - 1)
    positions = (cache.lengths[rows] + slots)[:, None]
    attend_chunk = functools.partial(attend, backend=cfg.attention_backend, scale=1.0)
    attend_packed, packed_mask = packed_attention(attend_chunk, seq_ids, slots, cache.lengths, chunk_len)
    out, new_kv = run_layers(params, cfg, tokens[:, None], positions, packed_mask, cache, feature_layers, with_logits,
                             tp_axis, False, attend_packed)
    new_k = {kind: kv[0][:, :, 0] for kind, kv in new_kv.items() if kv is not None}
    new_v = {kind: kv[1][:, :, 0] for kind, kv in new_kv.items() if kv is not None}
    return out, (new_k, new_v)


def write_packed(cache: Gemma4Cache, new_k: dict, new_v: dict, seq_ids: jax.Array, slots: jax.Array) -> Gemma4Cache:
    """Scatter packed keys/values ``{kind: [L, N, K, Dh]}`` at (sequence, lengths + slot);
    padding tokens (``seq_ids == batch``) are dropped. Lengths are not advanced."""
    B, S, R = cache.batch, cache.max_len, cache.ring
    rows = jnp.minimum(seq_ids, B - 1)
    positions = jnp.where(seq_ids < B, cache.lengths[rows] + slots, S)
    where = {FULL: (jnp.where(positions < S, positions, S), "full_k", "full_v"),
             SLIDING: (jnp.where(positions < S, jnp.mod(positions, R), R), "sliding_k", "sliding_v")}
    out = cache
    for kind, k in new_k.items():
        at, k_name, v_name = where[kind]
        ck, cv = getattr(out, k_name), getattr(out, v_name)
        out = dataclasses.replace(out, **{k_name: ck.at[:, rows, at].set(k.astype(ck.dtype), mode="drop"),
                                          v_name: cv.at[:, rows, at].set(new_v[kind].astype(cv.dtype), mode="drop")})
    return out
