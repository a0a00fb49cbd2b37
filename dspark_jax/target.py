"""The Qwen3 target model as pure functions over a parameter pytree and a KV cache, and the
entry points every decoding loop calls for any target family (``family_of``: Gemma 4 runs
in ``gemma4.py``, chosen by its config / parameter types).

``forward`` runs T new tokens per sequence against the cache: T = prompt length for a
prefill, 1 for decoding, gamma + 1 for verification. It writes the chunk's keys/values at
each sequence's own offset (``cache.lengths``) but does not advance ``lengths``: the caller
commits as many entries as it accepts (``KVCache.advance``), so rejected drafts cost nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from .attention import NO_WINDOW, AttentionMask, Context, attend, packed_attention
from .cache import KVCache, chunk_positions, write_layers
from .config import Qwen3Config
from .layers import (DecoderLayerParams, decoder_layer, decoder_layer_decl, layer_bytes, per_layer_by_default,
                     rms_norm, rope_cos_sin, run_layers, stack_layers, unstack_layers)
from .params import ParamDecl, init_param, init_tree


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen3Params:
    embed: jax.Array  # [V, D]
    layers: DecoderLayerParams | tuple[DecoderLayerParams, ...]  # stacked over [L], or one per layer
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to embed

    @property
    def dtype(self):
        return self.embed.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
    hidden: jax.Array  # [B, T, D] final-normed
    features: jax.Array  # [B, T, len(feature_layers) * D] concatenated layer outputs
    logits: jax.Array | None  # [B, T, V] float32, when asked for


def family_of(x):
    """The module that runs a target given its config, parameters or cache: None for Qwen3
    (this module), ``gemma4`` for Gemma 4 (the family is read from the checkpoint at load)."""
    from . import gemma4

    if isinstance(x, (gemma4.Gemma4Config, gemma4.Gemma4Params, gemma4.Gemma4Cache)):
        return gemma4
    return None


def target_decl(cfg: Qwen3Config) -> Qwen3Params:
    """The declaration of every Qwen3 weight (``params.ParamDecl`` leaves), with the names of
    a Hugging Face ``Qwen3ForCausalLM`` checkpoint (Gemma 4: ``gemma4.target_decl``)."""
    if (family := family_of(cfg)) is not None:
        return family.target_decl(cfg)
    D, V = cfg.hidden_size, cfg.vocab_size
    return Qwen3Params(
        embed=ParamDecl((V, D), ("vocab", "embed"), "model.embed_tokens.weight"),
        layers=decoder_layer_decl(cfg, cfg.num_hidden_layers, "model.layers", per_layer=cfg.per_layer_weights),
        final_norm=ParamDecl((D,), ("embed",), "model.norm.weight", init="ones"),
        lm_head=None if cfg.tie_word_embeddings else ParamDecl((D, V), ("embed", "vocab"), "lm_head.weight", 1),
    )


def init_params(key: jax.Array, cfg: Qwen3Config, dtype=jnp.float32, std: float = 0.02) -> Qwen3Params:
    """Random Qwen3 weights (normal(std) matrices, unit norms)."""
    decl = target_decl(cfg)
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    return Qwen3Params(
        embed=init_param(k_embed, decl.embed, dtype, std),
        layers=init_tree(k_layers, decl.layers, dtype, std),
        final_norm=init_param(None, decl.final_norm, dtype),
        lm_head=None if decl.lm_head is None else init_param(k_head, decl.lm_head, dtype, std),
    )


def init_cache(cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    if (family := family_of(cfg)) is not None:
        return family.init_cache(cfg, batch, max_len, dtype)
    return KVCache.init(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype)


def draft_layers_config(cfg: Qwen3Config, num_layers: int) -> Qwen3Config:
    """The layer config of a drafter trained for this target: its shapes with ``num_layers``
    layers and no stop ids (Gemma 4: every layer full attention, as DeepSpec builds it)."""
    if (family := family_of(cfg)) is not None:
        return family.draft_layers_config(cfg, num_layers)
    return dataclasses.replace(cfg, num_hidden_layers=num_layers, eos_token_ids=(), per_layer_weights=False)


def resolve_layer_layout(per_layer: bool | str, cfg: Qwen3Config, dtype) -> bool:
    """``per_layer`` as a bool: ``"auto"`` = ``layers.per_layer_by_default`` for this config's
    layer size in ``dtype`` (Gemma 4 targets: False, they keep their layer groups)."""
    if family_of(cfg) is not None:
        return False
    if per_layer == "auto":
        return per_layer_by_default(layer_bytes(cfg, dtype))
    if not isinstance(per_layer, bool):
        raise ValueError(f"per_layer must be True, False or 'auto', got {per_layer!r}")
    return per_layer


def with_layer_layout(params: Qwen3Params, cfg: Qwen3Config,
                      per_layer: bool | str = True) -> tuple[Qwen3Params, Qwen3Config]:
    """The target with its layer weights one array per layer (``per_layer``, the decoding
    layout: ``layers.run_layers`` says why; ``"auto"``: where ``layers.per_layer_by_default``
    says it pays) or stacked ``[L, ...]``, and the config that declares that layout. A copy of
    the layer weights unless already so (load with ``checkpoint.load_target(...,
    per_layer=...)`` to read them that way directly). Gemma 4 targets keep their own layout."""
    per_layer = resolve_layer_layout(per_layer, cfg, params.embed.dtype)
    if family_of(cfg) is not None or cfg.per_layer_weights == per_layer:
        return params, cfg
    layers = unstack_layers(params.layers) if per_layer else stack_layers(params.layers)
    return dataclasses.replace(params, layers=layers), dataclasses.replace(cfg, per_layer_weights=per_layer)


def embed_tokens(params: Qwen3Params, tokens: jax.Array) -> jax.Array:
    """The input embedding of ``tokens`` as the family's first layer sees it (Gemma 4: scaled)."""
    if (family := family_of(params)) is not None:
        return family.scaled_embedding(params.embed, tokens)
    return params.embed[tokens]


def output_head(params: Qwen3Params) -> jax.Array:
    """The ``[D, V]`` output projection (the transposed embedding when tied)."""
    return params.embed.T if params.lm_head is None else params.lm_head


def compute_logits(params: Qwen3Params, hidden: jax.Array) -> jax.Array:
    """float32 logits ``[..., V]`` from final-normed hidden states ``[..., D]``."""
    if (family := family_of(params)) is not None:
        return family.compute_logits(params, hidden)
    return jnp.einsum("...d,dv->...v", hidden, output_head(params), preferred_element_type=jnp.float32)


def check_feature_layers(cfg: Qwen3Config, feature_layers: Sequence[int]) -> tuple[int, ...]:
    ids = tuple(int(i) for i in feature_layers)
    bad = [i for i in ids if not -1 <= i < cfg.num_hidden_layers]
    if bad:
        raise ValueError(
            f"feature layer ids {bad} out of range for a target with {cfg.num_hidden_layers} "
            f"layers (valid: -1 for the embedding output, 0..{cfg.num_hidden_layers - 1})"
        )
    return ids


def _attend_by_config(cfg: Qwen3Config, q, k, v, mask, context):
    return attend(q, k, v, mask, context, cfg.attention_backend)


def layer_windows(cfg: Qwen3Config) -> jax.Array:
    """Per-layer attention windows ``[L]`` (``NO_WINDOW`` for full-attention layers)."""
    return jnp.asarray([NO_WINDOW if w is None else w for w in cfg.layer_windows()], jnp.int32)


def _run_layers(params, cfg, tokens, cos, sin, mask, context, feature_layers, with_logits, tp_axis, remat,
                attend_fn=None):
    """The decoder stack shared by every entry point: embed, a ``lax.scan`` over layers (each
    attending through ``attention.attend`` with ``mask`` over the read-only ``context``
    (k, v) arrays or None; ``attend_fn(q, k, v, mask, context)`` replaces that call, e.g. to
    lay packed tokens out on a grid), feature collection, final norm and logits. Returns
    the ForwardOutput and the chunk's keys/values of every layer ``[L, B, T, K, Dh]``."""
    if attend_fn is None:
        attend_fn = functools.partial(_attend_by_config, cfg)
    B, T = tokens.shape
    x = params.embed[tokens]
    # Feature collection inside the layer scan: slot_of_layer[l] is where layer l's output
    # goes in `collected`, or -1. Only the selected layers are kept (no [L, B, T, D] stack).
    decoder_ids = list(dict.fromkeys(i for i in feature_layers if i >= 0))  # a repeated id is collected once
    slot_of_layer = jnp.full((cfg.num_hidden_layers,), -1, jnp.int32)
    for slot, layer_id in enumerate(decoder_ids):
        slot_of_layer = slot_of_layer.at[layer_id].set(slot)
    collected = jnp.zeros((max(len(decoder_ids), 1), B, T, cfg.hidden_size), x.dtype)

    def body(carry, scanned):
        x, collected = carry
        layer, index, window, slot = scanned
        layer_mask = mask.with_window(window)
        layer_context = None if context is None else Context(context[0], context[1], index)

        def layer_attend(q, k, v):
            return attend_fn(q, k, v, layer_mask, layer_context), (k, v)

        x, new_kv = decoder_layer(layer, cfg, x, cos, sin, layer_attend, tp_axis)
        safe_slot = jnp.maximum(slot, 0)
        kept = jnp.where(slot >= 0, x, collected[safe_slot])
        collected = jax.lax.dynamic_update_index_in_dim(collected, kept, safe_slot, 0)
        return (x, collected), new_kv

    if remat:
        body = jax.checkpoint(body)
    L = cfg.num_hidden_layers
    (x, collected), new_kv = run_layers(body, (x, collected), params.layers, jnp.arange(L, dtype=jnp.int32),
                                        layer_windows(cfg), slot_of_layer)
    embed_out = params.embed[tokens]
    parts = [embed_out if i == -1 else collected[decoder_ids.index(i)] for i in feature_layers]
    features = jnp.concatenate(parts, axis=-1) if parts else jnp.zeros((B, T, 0), x.dtype)
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    logits = compute_logits(params, hidden) if with_logits else None
    return ForwardOutput(hidden=hidden, features=features, logits=logits), new_kv


def forward(
    params: Qwen3Params,
    cfg: Qwen3Config,
    tokens: jax.Array,
    cache: KVCache | None,
    *,
    feature_layers: Sequence[int] = (),
    with_logits: bool = True,
    tp_axis: str | None = None,
    remat: bool = False,
) -> tuple[ForwardOutput, KVCache | None]:
    """Run ``tokens [B, T]`` at positions ``cache.lengths[b] + t`` against the cache.

    Returns the final-normed hidden states, the concatenated outputs of ``feature_layers``
    (id i = output of decoder layer i, -1 = embedding output), float32 logits when
    ``with_logits``, and the cache with the chunk written (lengths unchanged). The chunk
    reads the committed cache (positions < lengths) and itself causally; attention reads
    only the used part of the cache and the chunk is written after the layers, in place.
    With ``cache=None`` the chunk is a whole sequence at positions 0..T-1 under a causal
    mask (training, feature extraction) and no cache is returned. ``remat`` recomputes
    each layer in the backward pass instead of storing its activations.
    """
    if (family := family_of(cfg)) is not None:
        return family.forward(params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits,
                              tp_axis=tp_axis, remat=remat)
    feature_layers = check_feature_layers(cfg, feature_layers)
    B, T = tokens.shape
    lengths = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    positions = chunk_positions(lengths, T)
    cos, sin = rope_cos_sin(cfg, positions)
    mask = AttentionMask.make(positions, context_len=lengths)
    context = None if cache is None else (cache.k, cache.v)
    out, (new_k, new_v) = _run_layers(params, cfg, tokens, cos, sin, mask, context, feature_layers, with_logits, tp_axis, remat)
    new_cache = None if cache is None else write_layers(cache, new_k, new_v, positions)
    return out, new_cache


def forward_packed(
    params: Qwen3Params,
    cfg: Qwen3Config,
    tokens: jax.Array,
    seq_ids: jax.Array,
    slots: jax.Array,
    cache: KVCache,
    *,
    chunk_len: int,
    feature_layers: Sequence[int] = (),
    with_logits: bool = True,
    tp_axis: str | None = None,
) -> tuple[ForwardOutput, tuple[jax.Array, jax.Array]]:
    """Ragged (packed) chunk: ``tokens [N]`` of several sequences on one flat axis; token i is
    the ``slots[i]``-th new token of sequence ``seq_ids[i]`` (position ``lengths + slot``),
    ``slots < chunk_len``, each sequence's slots a prefix 0..l_b. Projections and MLPs run on
    the N packed tokens (they dominate the cost of a short chunk). Attention
    (``attention.packed_attention``) scatters queries and the chunk's own keys into a
    ``[batch, chunk_len]`` grid that reads the committed cache and itself causally (empty grid
    slots lie after every real one, so no real query reads them; one sequence is its own
    chunk, no grid). Each sequence's tokens come before the next's, padding last
    (``speculative.packed_layout``). The cache is only read: the new keys/values come back packed,
    ``[L, N, K, Dh]`` each, for ``write_packed``. Padding tokens carry ``seq_ids == batch``.
    Outputs have shape ``[N, 1, ...]``.
    """
    if (family := family_of(cfg)) is not None:
        return family.forward_packed(params, cfg, tokens, seq_ids, slots, cache, chunk_len=chunk_len,
                                     feature_layers=feature_layers, with_logits=with_logits, tp_axis=tp_axis)
    feature_layers = check_feature_layers(cfg, feature_layers)
    B = cache.batch
    rows = jnp.minimum(seq_ids, B - 1)
    cos, sin = rope_cos_sin(cfg, (cache.lengths[rows] + slots)[:, None])
    attend_packed, packed_mask = packed_attention(functools.partial(_attend_by_config, cfg), seq_ids, slots,
                                                  cache.lengths, chunk_len)
    out, (new_k, new_v) = _run_layers(params, cfg, tokens[:, None], cos, sin, packed_mask, (cache.k, cache.v),
                                      feature_layers, with_logits, tp_axis, False, attend_packed)
    return out, (new_k[:, :, 0], new_v[:, :, 0])


def write_packed(cache: KVCache, new_k: jax.Array, new_v: jax.Array, seq_ids: jax.Array, slots: jax.Array) -> KVCache:
    """Scatter packed keys/values ``[L, N, K, Dh]`` at (sequence, lengths + slot); padding
    tokens (``seq_ids == batch``) are dropped. Lengths are not advanced."""
    if (family := family_of(cache)) is not None:
        return family.write_packed(cache, new_k, new_v, seq_ids, slots)
    B = cache.batch
    rows = jnp.minimum(seq_ids, B - 1)
    positions = jnp.where(seq_ids < B, cache.lengths[rows] + slots, cache.max_len)
    k = cache.k.at[:, rows, positions].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, positions].set(new_v.astype(cache.v.dtype), mode="drop")
    return dataclasses.replace(cache, k=k, v=v)
