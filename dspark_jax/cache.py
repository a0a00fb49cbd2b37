"""Key/value caches as explicit pytrees, with ragged writes and the masks that read them.

Layout: ``k, v [layers, batch, max_len, kv_heads, head_dim]`` and ``lengths [batch]``.
A forward only reads the cache (``attention.Context`` takes blocks of layer l straight from
the stacked arrays) and writes a chunk's keys once after the layer stack (``write_layers``),
so no cache-sized buffer is ever copied; kv_heads is its own axis so tensor parallelism can
split it. Entry ``[l, b, s]`` holds the key of token position
``s`` of sequence ``b``; entries at ``s >= lengths[b]`` are garbage that is never read and may be
overwritten. Rolling back rejected draft tokens is therefore free: do not advance ``lengths``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys/values of committed tokens plus per-sequence valid lengths."""

    k: jax.Array  # [L, B, S, K, Dh]
    v: jax.Array  # [L, B, S, K, Dh]
    lengths: jax.Array  # [B] int32

    @classmethod
    def init(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def advance(self, n: jax.Array) -> "KVCache":
        """Commit ``n [B]`` (or a scalar) more entries per sequence."""
        return dataclasses.replace(self, lengths=self.lengths + jnp.asarray(n, jnp.int32))


def cache_batch_axes(cache):
    """The batch axis of every leaf of a cache (``KVCache`` or a family's, e.g. Gemma 4's), as
    a pytree of the cache's structure: key/value stacks are ``[layers, B, ...]``, lengths ``[B]``."""
    return dataclasses.replace(jax.tree.map(lambda _: 1, cache), lengths=0)


def chunk_positions(lengths: jax.Array, chunk: int) -> jax.Array:
    """Positions ``[B, T]`` of a chunk of T new tokens written after each sequence's length."""
    return lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]


def write_chunk(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter ``new [B, T, K, Dh]`` into ``cache_layer [B, S, K, Dh]`` at ``positions [B, T]``.

    Positions past the end of the cache are dropped (never wrapped or clamped onto valid
    entries); the decoding loops stop before a sequence needs them.
    """
    batch_index = jnp.arange(new.shape[0])[:, None]
    return cache_layer.at[batch_index, positions].set(new.astype(cache_layer.dtype), mode="drop")


def write_layers(cache: KVCache, new_k: jax.Array, new_v: jax.Array, positions: jax.Array) -> KVCache:
    """Write a chunk's keys/values of every layer, ``[L, B, T, K, Dh]``, at ``positions [B, T]``.

    One scatter per array after the layer stack, on a buffer the caller donates or carries
    through a loop: XLA updates it in place (tests/test_inplace_cache.py checks the HLO)."""
    write = jax.vmap(write_chunk, in_axes=(0, 0, None))
    return dataclasses.replace(cache, k=write(cache.k, new_k, positions), v=write(cache.v, new_v, positions))
