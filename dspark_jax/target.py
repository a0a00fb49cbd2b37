"""The Qwen3 target model as pure functions over a parameter pytree and a KV cache.

``forward`` runs T new tokens per sequence against the cache: T = prompt length for a
prefill, 1 for decoding, gamma + 1 for verification. It writes the chunk's keys/values at
each sequence's own offset (``cache.lengths``) but does not advance ``lengths``: the caller
commits as many entries as it accepts (``KVCache.advance``), so rejected drafts cost nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from .cache import KVCache, causal_cache_mask, chunk_positions, write_chunk
from .config import Qwen3Config
from .layers import DecoderLayerParams, attention, decoder_layer, init_decoder_layers, rms_norm, rope_cos_sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen3Params:
    embed: jax.Array  # [V, D]
    layers: DecoderLayerParams  # stacked over [L]
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


def init_params(key: jax.Array, cfg: Qwen3Config, dtype=jnp.float32, std: float = 0.02) -> Qwen3Params:
    """Random Qwen3 weights (normal(std) matrices, unit norms)."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    D, V = cfg.hidden_size, cfg.vocab_size
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = (std * jax.random.normal(k_head, (D, V), jnp.float32)).astype(dtype)
    return Qwen3Params(
        embed=(std * jax.random.normal(k_embed, (V, D), jnp.float32)).astype(dtype),
        layers=init_decoder_layers(k_layers, cfg, cfg.num_hidden_layers, dtype, std),
        final_norm=jnp.ones((D,), dtype),
        lm_head=lm_head,
    )


def init_cache(cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    return KVCache.init(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype)


def output_head(params: Qwen3Params) -> jax.Array:
    """The ``[D, V]`` output projection (the transposed embedding when tied)."""
    return params.embed.T if params.lm_head is None else params.lm_head


def compute_logits(params: Qwen3Params, hidden: jax.Array) -> jax.Array:
    """float32 logits ``[..., V]`` from final-normed hidden states ``[..., D]``."""
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


def _run_layers(params, cfg, tokens, cos, sin, layer_caches, attend_fn, feature_layers, with_logits, tp_axis, remat):
    """The decoder stack shared by every entry point: embed, a ``lax.scan`` over layers (each
    attending through ``attend_fn(q, k, v, layer_cache) -> (out, new_layer_cache)``), feature
    collection, final norm and logits."""
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
        layer, layer_cache, slot = scanned
        x, new_layer_cache = decoder_layer(
            layer, cfg, x, cos, sin, lambda q, k, v: attend_fn(q, k, v, layer_cache), tp_axis
        )
        safe_slot = jnp.maximum(slot, 0)
        kept = jnp.where(slot >= 0, x, collected[safe_slot])
        collected = jax.lax.dynamic_update_index_in_dim(collected, kept, safe_slot, 0)
        return (x, collected), new_layer_cache

    if remat:
        body = jax.checkpoint(body)
    (x, collected), new_kv = jax.lax.scan(body, (x, collected), (params.layers, layer_caches, slot_of_layer))
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
    ``with_logits``, and the cache with the chunk written (lengths unchanged).
    With ``cache=None`` the chunk is a whole sequence at positions 0..T-1 under a causal
    mask (training, feature extraction) and no cache is returned. ``remat`` recomputes
    each layer in the backward pass instead of storing its activations.
    """
    feature_layers = check_feature_layers(cfg, feature_layers)
    B, T = tokens.shape
    lengths = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    positions = chunk_positions(lengths, T)
    cos, sin = rope_cos_sin(cfg, positions)
    mask = causal_cache_mask(positions, T if cache is None else cache.max_len)

    def attend(q, k, v, layer_cache):
        if layer_cache is None:
            return attention(q, k, v, mask), None
        k_cache, v_cache = layer_cache
        k_all = write_chunk(k_cache, k, positions)
        v_all = write_chunk(v_cache, v, positions)
        return attention(q, k_all, v_all, mask), (k_all, v_all)

    cache_kv = None if cache is None else (cache.k, cache.v)
    out, new_kv = _run_layers(params, cfg, tokens, cos, sin, cache_kv, attend, feature_layers, with_logits, tp_axis, remat)
    new_cache = None if cache is None else dataclasses.replace(cache, k=new_kv[0], v=new_kv[1])
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
    ``slots < chunk_len``. Projections and MLPs run on the N packed tokens (they dominate the
    cost of a short chunk). Attention scatters queries and the chunk's own keys into a
    ``[batch, chunk_len]`` grid and reads [cache ; chunk] per sequence, so the cache is only
    read here: the new keys/values come back packed, ``[L, N, K, Dh]`` each, for
    ``write_packed`` (which keeps the big cache out of control-flow operands that would copy
    it). Padding tokens carry ``seq_ids == batch``. Outputs have shape ``[N, 1, ...]``.
    """
    feature_layers = check_feature_layers(cfg, feature_layers)
    B, S = cache.batch, cache.max_len
    rows = jnp.minimum(seq_ids, B - 1)
    cos, sin = rope_cos_sin(cfg, (cache.lengths[rows] + slots)[:, None])
    t = jnp.arange(chunk_len)
    # a grid query (b, t) reads the committed cache of b and the chunk's slots <= t
    in_grid = jnp.zeros((B, chunk_len), bool).at[seq_ids, slots].set(True, mode="drop")
    mask = jnp.concatenate(
        [
            jnp.broadcast_to((jnp.arange(S)[None, :] < cache.lengths[:, None])[:, None, :], (B, chunk_len, S)),
            (t[None, None, :] <= t[None, :, None]) & in_grid[:, None, :],
        ],
        axis=-1,
    )

    def grid(x):
        return jnp.zeros((B, chunk_len) + x.shape[2:], x.dtype).at[seq_ids, slots].set(x[:, 0], mode="drop")

    def attend(q, k, v, layer_cache):
        k_cache, v_cache = layer_cache
        k_all = jnp.concatenate([k_cache, grid(k).astype(k_cache.dtype)], axis=1)
        v_all = jnp.concatenate([v_cache, grid(v).astype(v_cache.dtype)], axis=1)
        out = attention(grid(q), k_all, v_all, mask)
        return out[rows, slots][:, None], (k[:, 0], v[:, 0])

    out, new_kv = _run_layers(params, cfg, tokens[:, None], cos, sin, (cache.k, cache.v), attend, feature_layers, with_logits, tp_axis, False)
    return out, new_kv


def write_packed(cache: KVCache, new_k: jax.Array, new_v: jax.Array, seq_ids: jax.Array, slots: jax.Array) -> KVCache:
    """Scatter packed keys/values ``[L, N, K, Dh]`` at (sequence, lengths + slot); padding
    tokens (``seq_ids == batch``) are dropped. Lengths are not advanced."""
    B = cache.batch
    rows = jnp.minimum(seq_ids, B - 1)
    positions = jnp.where(seq_ids < B, cache.lengths[rows] + slots, cache.max_len)
    k = cache.k.at[:, rows, positions].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, positions].set(new_v.astype(cache.v.dtype), mode="drop")
    return dataclasses.replace(cache, k=k, v=v)
