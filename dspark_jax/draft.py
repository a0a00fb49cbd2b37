"""The DSpark / DFlash drafter: a parallel backbone with KV injection plus sequential heads.

Backbone: the target's features at ``target_layer_ids`` are projected once per committed
position (``H_ctx = hidden_norm(fc(features))``) into a per-layer context cache of keys and
values (``append_context``). A block of ``block_size`` inputs ``[anchor, mask, ...]`` then
runs through the draft layers in one pass, attending to [context (< anchor) ; the whole
block] (``backbone``). Base logits come from the target's own lm_head.

Sequential stage: the Markov head adds a bias B_k that depends on the previous token of the
block (vanilla / gated / rnn; none = DFlash; or a plug-in) and the confidence head (DeepSpec's
linear one, or a plug-in) predicts the survival of each drafted token. Both are Flax NNX modules (``heads.py``) whose states sit
in ``DraftParams``; one step function (``head_step``) merges them with their static graph
definitions and is used teacher-forced over whole blocks for training and inside a
``lax.scan`` for sampling at decode time. The backbone stays pure functions over pytrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from .attention import AttentionMask, Context, attend
from .cache import KVCache, chunk_positions, write_layers
from .config import ConfigError, Qwen3Config
from .layers import (
    DecoderLayerParams,
    decoder_layer,
    decoder_layer_decl,
    project_kv,
    rms_norm,
    rope_cos_sin,
    run_layers,
    stack_layers,
    unstack_layers,
)
from . import heads as heads_lib
from .params import ParamDecl, init_param, init_tree
from .plugins import is_import_path
from .sampling import Sampling, distribution, sample, split
from .target import Qwen3Params, compute_logits, embed_tokens, resolve_layer_layout
from . import gemma4

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A DeepSpec draft ``config.json``: Qwen3 (or Gemma 4) layer shapes plus the DSpark fields."""

    layers: Qwen3Config | gemma4.Gemma4Config  # num_hidden_layers = number of draft layers
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    markov_rank: int = 0
    markov_head_type: str = "vanilla"  # a built-in name, or a plug-in's import path package.module:Name
    markov_head_args: tuple[tuple[str, Any], ...] = ()  # a plug-in head's constructor arguments (sorted)
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True
    confidence_head_type: str = "linear"  # DeepSpec's, or a plug-in's import path package.module:Name
    confidence_head_args: tuple[tuple[str, Any], ...] = ()  # a plug-in confidence head's constructor arguments
    num_anchors: int = 512
    num_target_layers: int | None = None

    def __post_init__(self):
        if getattr(self.layers, "per_layer_weights", False):  # the drafter's layers stay stacked
            object.__setattr__(self, "layers", dataclasses.replace(self.layers, per_layer_weights=False))
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.markov_rank < 0:
            raise ConfigError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.markov_rank and not self.plugin_head and self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ConfigError(
                f"markov_head_type {self.markov_head_type!r} not supported ({', '.join(MARKOV_HEAD_TYPES)}, "
                "or an import path package.module:Name)"
            )
        if self.markov_head_args and not self.plugin_head:
            raise ConfigError(f"markov_head_args {dict(self.markov_head_args)} given for the built-in head "
                              f"{self.head_type!r} (they are for plug-in heads)")
        if not self.plugin_confidence_head and self.confidence_head_type != "linear":
            raise ConfigError(f"confidence_head_type {self.confidence_head_type!r} not supported (linear, or an import "
                              "path package.module:Name)")
        if self.confidence_head_args and not self.plugin_confidence_head:
            raise ConfigError(f"confidence_head_args {dict(self.confidence_head_args)} given for the built-in "
                              "confidence head (they are for plug-in heads)")
        if self.plugin_confidence_head and not self.enable_confidence_head:
            raise ConfigError(f"confidence_head_type {self.confidence_head_type!r} given with "
                              "enable_confidence_head false")
        if not self.target_layer_ids:
            raise ConfigError("target_layer_ids is empty")
        if not 0 <= self.mask_token_id < self.layers.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} outside the vocabulary [0, {self.layers.vocab_size})")

    @property
    def plugin_head(self) -> bool:
        """A Markov head defined outside the package (``markov_head_type`` is its import path)."""
        return is_import_path(self.markov_head_type)

    @property
    def plugin_confidence_head(self) -> bool:
        """A confidence head defined outside the package (``confidence_head_type`` is its import path)."""
        return is_import_path(self.confidence_head_type)

    @property
    def plugin_heads(self) -> bool:
        """Any head defined outside the package (the DeepSpec format has no names for its weights)."""
        return self.plugin_head or self.plugin_confidence_head

    @property
    def head_type(self) -> str:
        """'none' for DFlash (markov_rank 0), else the Markov head type (or a plug-in's path)."""
        return self.markov_head_type if self.markov_rank or self.plugin_head else "none"

    @property
    def confidence_uses_markov(self) -> bool:
        """A built-in confidence head reads the Markov head's previous-token embedding too."""
        return self.confidence_head_with_markov and self.markov_rank > 0

    @property
    def hidden_size(self) -> int:
        return self.layers.hidden_size

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], where: str = "config.json") -> "DraftConfig":
        for field in ("block_size", "target_layer_ids", "mask_token_id"):
            if raw.get(field) is None:
                raise ConfigError(f"{where}: missing DSpark field {field!r}")
        return cls(
            layers=(gemma4.Gemma4Config.from_hf(raw, where) if gemma4.is_gemma4_config(raw)
                    else Qwen3Config.from_hf(raw, where)),
            block_size=int(raw["block_size"]),
            target_layer_ids=tuple(int(i) for i in raw["target_layer_ids"]),
            mask_token_id=int(raw["mask_token_id"]),
            markov_rank=int(raw.get("markov_rank") or 0),
            markov_head_type=_head_type_of(raw.get("markov_head_type")),
            markov_head_args=_head_args_of(raw.get("markov_head_args"), where, "markov_head_args"),
            enable_confidence_head=bool(raw.get("enable_confidence_head", False)),
            confidence_head_with_markov=bool(raw.get("confidence_head_with_markov", True)),
            confidence_head_type=str(raw.get("confidence_head_type") or "linear"),
            confidence_head_args=_head_args_of(raw.get("confidence_head_args"), where, "confidence_head_args"),
            num_anchors=int(raw.get("num_anchors") or 512),
            num_target_layers=raw.get("num_target_layers"),
        )

    @property
    def is_gemma4(self) -> bool:
        return isinstance(self.layers, gemma4.Gemma4Config)

    def to_hf(self) -> dict[str, Any]:
        gemma = self.is_gemma4
        out = self.layers.to_hf_text() if gemma else self.layers.to_hf()
        out.update(
            architectures=["Gemma4DSparkModel" if gemma else "Qwen3DSparkModel"],
            layer_types=["full_attention"] * self.layers.num_hidden_layers,
            block_size=self.block_size,
            target_layer_ids=list(self.target_layer_ids),
            mask_token_id=self.mask_token_id,
            markov_rank=self.markov_rank,
            markov_head_type=self.markov_head_type,
            enable_confidence_head=self.enable_confidence_head,
            confidence_head_with_markov=self.confidence_head_with_markov,
            num_anchors=self.num_anchors,
        )
        if self.markov_head_args:
            out["markov_head_args"] = dict(self.markov_head_args)
        if self.plugin_confidence_head:  # DeepSpec's configs have no such fields: written for plug-ins only
            out["confidence_head_type"] = self.confidence_head_type
            if self.confidence_head_args:
                out["confidence_head_args"] = dict(self.confidence_head_args)
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        if gemma:
            out.update(tie_word_embeddings=False, target_model_type="gemma4", target_text_model_type="gemma4_text")
        return out


def _head_type_of(value) -> str:
    value = str(value or "vanilla")
    return value if is_import_path(value) else value.lower()  # an import path is case-sensitive


def _head_args_of(value, where: str, field: str) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or any(isinstance(v, (list, dict)) for v in value.values()):
        raise ConfigError(f"{where}: {field} must be an object of numbers, booleans and strings, got {value!r}")
    return tuple(sorted((str(k), v) for k, v in value.items()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftParams:
    """Draft weights. The embedding and lm_head are the target's (passed in, never copied)."""

    fc: jax.Array  # [m * D, D]
    hidden_norm: jax.Array  # [D]
    layers: DecoderLayerParams
    final_norm: jax.Array  # [D]
    # the heads' NNX states as pure dicts (``heads.py``; None: no parameters / no head), e.g.
    # vanilla {"w1": [V, r], "w2": [r, V]}, gated + {"gate_w", "gate_b"}, rnn + {"joint_w", "joint_b"}
    markov: dict | None
    confidence: dict | None  # linear: {"w": [D (+ feature_size)], "b": []}; a plug-in: its own state


def draft_decl(dcfg: DraftConfig) -> DraftParams:
    """The declaration of every drafter weight, with the names of a DeepSpec checkpoint. The
    checkpoint's ``embed_tokens`` / ``lm_head`` are the target's (``DRAFT_SHARED_TENSORS``);
    the heads' declarations are those their modules carry (``heads.head_structure``)."""
    D = dcfg.hidden_size
    m = len(dcfg.target_layer_ids)
    structure = heads_lib.head_structure(dcfg)
    return DraftParams(
        fc=ParamDecl((m * D, D), ("features", "embed"), "fc.weight", 1),
        hidden_norm=ParamDecl((D,), ("embed",), "hidden_norm.weight", init="ones"),
        layers=(gemma4.draft_layers_decl(dcfg.layers) if dcfg.is_gemma4
                else decoder_layer_decl(dcfg.layers, dcfg.layers.num_hidden_layers, "layers")),
        final_norm=ParamDecl((D,), ("embed",), "norm.weight", init="ones"),
        markov=structure.markov_decls,
        confidence=structure.confidence_decls,
    )


# The draft checkpoint's copies of the target's tensors (DeepSpec writes them; the drafter
# uses the target's own arrays): name -> the target's array in the checkpoint's layout.
DRAFT_SHARED_TENSORS = {
    "embed_tokens.weight": lambda target: target.embed,
    "lm_head.weight": lambda target: target.embed if target.lm_head is None else target.lm_head.T,
}


def init_draft_params(key: jax.Array, dcfg: DraftConfig, dtype=jnp.float32, std: float = 0.02) -> DraftParams:
    """Random drafter weights: the heads from their modules' initialisers, the backbone from
    its declarations (normal(std), norms ones)."""
    k_heads, k_fc, k_layers = jax.random.split(key, 3)
    decl = draft_decl(dcfg)
    markov, confidence = heads_lib.init_heads(k_heads, dcfg, dtype, std)
    return DraftParams(
        fc=init_param(k_fc, decl.fc, dtype, std),
        hidden_norm=init_param(None, decl.hidden_norm, dtype),
        layers=init_tree(k_layers, decl.layers, dtype, std),
        final_norm=init_param(None, decl.final_norm, dtype),
        markov=markov,
        confidence=confidence,
    )


def check_compatible(dcfg: DraftConfig, tcfg: Qwen3Config, where: str = "draft"):
    """Clear errors when a drafter cannot run against a target."""
    if dcfg.layers.vocab_size != tcfg.vocab_size:
        raise ConfigError(f"{where}: vocab_size {dcfg.layers.vocab_size} != target vocab_size {tcfg.vocab_size}")
    if dcfg.hidden_size != tcfg.hidden_size:
        raise ConfigError(f"{where}: hidden_size {dcfg.hidden_size} != target hidden_size {tcfg.hidden_size}")
    if dcfg.num_target_layers is not None and dcfg.num_target_layers != tcfg.num_hidden_layers:
        raise ConfigError(
            f"{where}: num_target_layers {dcfg.num_target_layers} != the target's num_hidden_layers "
            f"{tcfg.num_hidden_layers} (the drafter was trained for another target)"
        )
    bad = [i for i in dcfg.target_layer_ids if not -1 <= i < tcfg.num_hidden_layers]
    if bad:
        raise ConfigError(
            f"{where}: target_layer_ids {bad} out of range for a target with "
            f"{tcfg.num_hidden_layers} layers (valid: -1..{tcfg.num_hidden_layers - 1})"
        )


def with_layer_layout(params: DraftParams, dcfg: DraftConfig, per_layer: bool | str = True) -> DraftParams:
    """A DSpark/DFlash drafter's layer weights one array per layer (``per_layer``: decoding's
    layout, as the target's: ``layers.run_layers``; ``"auto"``: where
    ``layers.per_layer_by_default`` says it pays) or stacked ``[L, ...]`` (training's, export's:
    the declaration stays stacked). Other drafters are returned as they are."""
    if not isinstance(dcfg, DraftConfig) or dcfg.is_gemma4:
        return params
    per_layer = resolve_layer_layout(per_layer, dcfg.layers, params.fc.dtype)
    if isinstance(params.layers, tuple) == per_layer:
        return params
    return dataclasses.replace(params, layers=unstack_layers(params.layers) if per_layer else stack_layers(params.layers))


def init_context_cache(dcfg: DraftConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """The drafter's context cache: keys/values of projected target features, per draft layer."""
    c = dcfg.layers
    if dcfg.is_gemma4:  # every draft layer has the full-attention geometry
        return KVCache.init(c.num_hidden_layers, batch, max_len, c.num_global_key_value_heads, c.global_head_dim, dtype)
    return KVCache.init(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim, dtype)


# ---------------------------------------------------------------------------- backbone


def project_context(params: DraftParams, dcfg: DraftConfig, features: jax.Array) -> jax.Array:
    """``H_ctx [B, T, D] = hidden_norm(fc(features [B, T, m*D]))``."""
    return rms_norm(features @ params.fc, params.hidden_norm, dcfg.layers.rms_norm_eps)


def context_kv(params: DraftParams, dcfg: DraftConfig, features: jax.Array, positions: jax.Array):
    """Context keys/values ``[L, B, T, K, Dh]`` of every draft layer for target features at
    ``positions [B, T]``. H_ctx enters k_proj/v_proj as is (no input_layernorm)."""
    h_ctx = project_context(params, dcfg, features)
    if dcfg.is_gemma4:
        return gemma4.draft_context_kv(params.layers, dcfg.layers, h_ctx, positions)
    cos, sin = rope_cos_sin(dcfg.layers, positions)
    kv = lambda layer: project_kv(layer, dcfg.layers, h_ctx, cos, sin)
    if isinstance(params.layers, tuple):  # one array per layer (with_layer_layout)
        return jax.tree.map(lambda *a: jnp.stack(a), *[kv(layer) for layer in params.layers])
    return jax.vmap(kv)(params.layers)


def append_context(
    params: DraftParams, dcfg: DraftConfig, cache: KVCache, features: jax.Array, num_new: jax.Array
) -> KVCache:
    """Append the target features ``[B, T, m*D]`` of newly committed tokens to the context cache.

    Row b contributes its first ``num_new[b]`` positions (ragged); the rest lands past the
    sequence's length, where it is never read.
    """
    positions = chunk_positions(cache.lengths, features.shape[1])
    k, v = context_kv(params, dcfg, features, positions)
    return write_layers(cache, k, v, positions).advance(num_new)


def draft_layers(
    params: DraftParams,
    dcfg: DraftConfig,
    x: jax.Array,
    mask: AttentionMask,
    ctx_k: jax.Array,
    ctx_v: jax.Array,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run block inputs ``x [B, T, D]`` at positions ``mask.q_pos`` through the draft layers.

    Layer l attends to the context ``ctx_k[l], ctx_v[l]`` (``[L, B, S, K, Dh]``, read in
    place) and the block's own keys, as ``mask`` says. Returns the final-normed hidden
    ``[B, T, D]`` and each layer's residual output ``[L, B, T, D]``.
    """
    c = dcfg.layers
    backend = backend or c.attention_backend
    if dcfg.is_gemma4:
        return gemma4.draft_layers(params.layers, params.final_norm, c, x, mask, ctx_k, ctx_v, backend)
    cos, sin = rope_cos_sin(c, mask.q_pos)

    def body(x, scanned):
        layer, index = scanned
        context = Context(ctx_k, ctx_v, index)
        x, _ = decoder_layer(layer, c, x, cos, sin, lambda q, k, v: (attend(q, k, v, mask, context, backend), None))
        return x, x

    x, layer_out = run_layers(body, x, params.layers, jnp.arange(c.num_hidden_layers, dtype=jnp.int32))
    return rms_norm(x, params.final_norm, c.rms_norm_eps), layer_out


def block_inputs(dcfg: DraftConfig, anchor: jax.Array, block_size: int) -> jax.Array:
    """Anchor-first block ``[B, block] = [anchor, mask, ..., mask]``."""
    B = anchor.shape[0]
    masks = jnp.full((B, block_size - 1), dcfg.mask_token_id, jnp.int32)
    return jnp.concatenate([anchor[:, None].astype(jnp.int32), masks], axis=1)


def backbone(
    params: DraftParams,
    dcfg: DraftConfig,
    target: Qwen3Params,
    cache: KVCache,
    anchor: jax.Array,
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decode-time backbone pass for one block per sequence.

    The anchor sits at position ``cache.lengths[b]`` (the context holds every position before
    it); the block is bidirectional and sees context entries < that length only. Returns the
    block hidden ``[B, block, D]`` (final-normed) and layer outputs ``[L, B, block, D]``.
    """
    block_size = block_size or dcfg.block_size
    tokens = block_inputs(dcfg, anchor, block_size)
    # the block is bidirectional and reads the context before its anchor
    mask = AttentionMask.make(chunk_positions(cache.lengths, block_size), context_len=cache.lengths, causal=False)
    x = embed_tokens(target, tokens)
    return draft_layers(params, dcfg, x, mask, cache.k, cache.v)


# ---------------------------------------------------------------------------- heads


def head_step(
    params: DraftParams,
    dcfg: DraftConfig,
    state: Any,
    prev_token: jax.Array,
    base_logits: jax.Array,
    hidden: jax.Array,
) -> tuple[Any, jax.Array, jax.Array]:
    """One sequential step at block position k.

    state: the Markov head's carried state (``initial_state``), prev_token ``[...]`` (x_{k-1};
    the anchor at k = 0), base_logits ``[..., V]`` (U_k), hidden ``[..., D]`` (h_k). Returns
    ``(new_state, logits U_k + B_k (float32), confidence logit [...])``.
    """
    markov, confidence_head = heads_lib.merge_heads(dcfg, params.markov, params.confidence)
    confidence = jnp.zeros(base_logits.shape[:-1], jnp.float32)
    if confidence_head is not None:
        features = (markov.features(hidden, prev_token, state) if heads_lib.confidence_feature_size(dcfg, markov)
                    else jnp.zeros(hidden.shape[:-1] + (0,), hidden.dtype))  # [..., feature_size]
        confidence = confidence_head(hidden, prev_token, features).astype(jnp.float32)
    bias, state = markov(hidden, prev_token, state)
    return state, base_logits.astype(jnp.float32) + bias, confidence


def initial_head_state(params: DraftParams, dcfg: DraftConfig, lead: tuple[int, ...]) -> Any:
    """The Markov head's state before block position 0 for leading shape ``lead``."""
    markov, _ = heads_lib.merge_heads(dcfg, params.markov, params.confidence)
    return markov.initial_state(lead)


def teacher_forced_heads(
    params: DraftParams, dcfg: DraftConfig, base_logits: jax.Array, hidden: jax.Array, prev_tokens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Heads over whole blocks with known previous tokens (training, scoring a path).

    base_logits ``[..., K, V]``, hidden ``[..., K, D]``, prev_tokens ``[..., K]``. Returns the
    corrected logits ``[..., K, V]`` and confidence logits ``[..., K]``.
    """
    lead = prev_tokens.shape[:-1]
    state = initial_head_state(params, dcfg, lead)

    def step(state, xs):
        prev, base, h = xs
        state, logits, conf = head_step(params, dcfg, state, prev, base, h)
        return state, (logits, conf)

    move = lambda a: jnp.moveaxis(a, len(lead), 0)  # scan over the block axis
    _, (logits, conf) = jax.lax.scan(step, state, (move(prev_tokens), move(base_logits), move(hidden)))
    return jnp.moveaxis(logits, 0, len(lead)), jnp.moveaxis(conf, 0, len(lead))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftBlock:
    tokens: jax.Array  # [B, K] drafted ids
    probs: jax.Array  # [B, K, V] distributions actually sampled from (after warping)
    logits: jax.Array  # [B, K, V] corrected logits (before warping)
    confidence_logits: jax.Array  # [B, K] along the drafted path


def sample_block(
    key: jax.Array,
    params: DraftParams,
    dcfg: DraftConfig,
    base_logits: jax.Array,
    hidden: jax.Array,
    anchor: jax.Array,
    sampling: Sampling,
) -> DraftBlock:
    """Draft a block left to right inside one ``lax.scan``: position k samples from
    ``distribution(U_k + B_k(x_{k-1}))`` with x_{-1} = anchor."""
    B, K, _ = base_logits.shape
    state = initial_head_state(params, dcfg, (B,))

    def step(carry, xs):
        state, prev = carry
        base, h, k = xs
        state, logits, conf = head_step(params, dcfg, state, prev, base, h)
        probs = distribution(logits, sampling)
        token = jnp.argmax(probs, -1).astype(jnp.int32) if sampling.greedy else sample(k, probs)
        return (state, token), (token, probs, logits, conf)

    xs = (jnp.moveaxis(base_logits, 1, 0), jnp.moveaxis(hidden, 1, 0), split(key, K))
    _, (tokens, probs, logits, conf) = jax.lax.scan(step, (state, anchor.astype(jnp.int32)), xs)
    swap = lambda a: jnp.moveaxis(a, 0, 1)
    return DraftBlock(swap(tokens), swap(probs), swap(logits), swap(conf))


def draft_block(
    key: jax.Array,
    params: DraftParams,
    dcfg: DraftConfig,
    target: Qwen3Params,
    cache: KVCache,
    anchor: jax.Array,
    sampling: Sampling,
    block_size: int | None = None,
) -> tuple[DraftBlock, jax.Array]:
    """Backbone + sequential sampling: the drafter's whole work for one round.

    Returns the drafted block and the block hidden states ``[B, K, D]``."""
    hidden, _ = backbone(params, dcfg, target, cache, anchor, block_size)
    base_logits = compute_logits(target, hidden)
    return sample_block(key, params, dcfg, base_logits, hidden, anchor, sampling), hidden
