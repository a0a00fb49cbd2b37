"""One attention interface for every use, with backends per platform.

Every attention in the package (target prefill chunks, decoding, dense and packed
verification, the drafter's context + block, training) is the same call::

    attend(q, k, v, mask, context=None, backend="auto")

``q [B, T, H, Dh]`` are the queries of a chunk of tokens and ``k, v [B, T, K, Dh]`` the keys and
values of *the same tokens* (the chunk). ``context`` is an optional key store indexed by
position, ``Context(k [L, B, S, K, Dh], v, layer)``: the KV cache, the drafter's context
cache, or the training context. It is only read, never copied or written here: the caller
writes the chunk's keys into the cache after the layer stack, with one scatter.

A context may be a ring (``Context.positions``: the position each slot holds, e.g. a
sliding-window layer's cache that keeps only its window); keys are then matched by the
position they hold, never by their slot.

``AttentionMask`` is the single description of which keys a query may read. Query t of row
b sits at position ``q_pos[b, t]`` and reads

* context key s  iff  ``s < context_len[b, t]`` and ``q_pos[b, t] - s < window``;
* chunk key u    iff  ``segment[b, u] == segment[b, t] >= 0``, ``q_pos[b, u] <= q_pos[b, t]``
  when ``causal``, and ``q_pos[b, t] - q_pos[b, u] < window`` (a negative segment marks a
  token that reads no chunk key and whose key nobody reads).

That covers a causal prefill/decode/verify chunk after a cache (context = the committed
prefix), a packed verification grid, the drafter's bidirectional block after its context,
and training's many blocks per sequence (segment = block id, context_len = the block's
anchor). ``window`` (sliding-window layers; ``NO_WINDOW`` otherwise) is traced, so layers
with different windows share one ``lax.scan``.

Backends (``BACKENDS``; ``register_backend`` adds one, e.g. a Pallas TPU kernel):

* ``dense``: the reference. Reads the whole context capacity in one softmax. Tests, training.
* ``blockwise``: online softmax over context blocks of ``BLOCK`` keys, from the first block
  inside the window to the last block holding a readable key (a dynamic trip count), so a
  step costs what the used length costs, not the capacity. The default for cache reads.
* ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU),
  context and chunk in two calls merged through their log-sum-exp.

``auto`` picks per platform and use (``default_backend``). All backends agree with ``dense``
to float32 rounding (tests/test_attention.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .cache import chunk_positions

NO_WINDOW = int(np.iinfo(np.int32).max)
BLOCK = 256  # context keys per blockwise step
MASKED_SCORE = float(np.finfo(np.float32).min)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
    """Which keys each query reads (see the module docstring)."""

    q_pos: jax.Array  # [B, T] int32 position of each chunk token
    context_len: jax.Array  # [B, T] int32: context keys s < context_len are readable
    segment: jax.Array  # [B, T] int32: chunk keys are read within the same segment only
    window: jax.Array  # [] int32: keys at distance >= window are not read (NO_WINDOW: none)
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @classmethod
    def make(cls, q_pos, context_len=None, segment=None, window=None, causal=True) -> "AttentionMask":
        """Broadcast the optional parts: ``context_len [B] | [B, T]`` (default 0: no context),
        ``segment`` (default one segment), ``window`` (default none)."""
        q_pos = jnp.asarray(q_pos, jnp.int32)
        B, T = q_pos.shape
        context_len = jnp.zeros((B,), jnp.int32) if context_len is None else jnp.asarray(context_len, jnp.int32)
        if context_len.ndim == 1:
            context_len = jnp.broadcast_to(context_len[:, None], (B, T))
        segment = jnp.zeros((B, T), jnp.int32) if segment is None else jnp.asarray(segment, jnp.int32)
        window = jnp.int32(NO_WINDOW) if window is None else jnp.asarray(window, jnp.int32)
        return cls(q_pos, context_len, segment, window, causal)

    def with_window(self, window: jax.Array) -> "AttentionMask":
        return dataclasses.replace(self, window=jnp.asarray(window, jnp.int32))

    def context_visible(self, key_pos: jax.Array) -> jax.Array:
        """``[B, T, S']`` for context keys at positions ``key_pos [S'] | [B, S']`` (a negative
        position: an empty slot, never read)."""
        s = key_pos[None, None, :] if key_pos.ndim == 1 else key_pos[:, None, :]
        return (s >= 0) & (s < self.context_len[:, :, None]) & (self.q_pos[:, :, None] - s < self.window)

    def chunk_visible(self) -> jax.Array:
        """``[B, T, T]``: query t reads chunk key u."""
        qp, kp = self.q_pos[:, :, None], self.q_pos[:, None, :]
        same = (self.segment[:, :, None] == self.segment[:, None, :]) & (self.segment[:, None, :] >= 0)
        visible = same & (qp - kp < self.window)
        return visible & (kp <= qp) if self.causal else visible

    def dense(self, capacity: int = 0, key_pos: jax.Array | None = None) -> jax.Array:
        """The whole mask ``[B, T, capacity + T]`` over [context slots ; chunk]; slot s holds
        position ``key_pos[..., s]`` (default s)."""
        key_pos = jnp.arange(capacity) if key_pos is None else key_pos
        return jnp.concatenate([jnp.broadcast_to(self.context_visible(key_pos), self.q_pos.shape + (capacity,)),
                                self.chunk_visible()], -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Context:
    """A read-only key store: stacked per-layer keys/values and the layer being run."""

    k: jax.Array  # [L, B, S, K, Dh]
    v: jax.Array  # [L, B, S, K, Dh]
    layer: jax.Array  # [] int32
    positions: jax.Array | None = None  # [B, S] int32 position held by each slot (a ring); None: slot s = position s

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def key_positions(self) -> jax.Array:
        """``[S] | [B, S]``: the position of the key in each slot (negative: empty)."""
        return jnp.arange(self.capacity) if self.positions is None else self.positions

    def layer_kv(self) -> tuple[jax.Array, jax.Array]:
        """This layer's whole ``[B, S, K, Dh]`` keys/values (the dense backends)."""
        take = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False)
        return take(self.k), take(self.v)


# ---------------------------------------------------------------------------- softmax pieces


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Partial:
    """An unnormalised softmax over some keys: running max, sum and weighted values."""

    m: jax.Array  # [B, K, G, T] float32 (-inf where no key was readable)
    l: jax.Array  # [B, K, G, T] float32
    acc: jax.Array  # [B, K, G, T, Dh] float32


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    B, T, H, Dh = q.shape
    return q.reshape(B, T, kv_heads, H // kv_heads, Dh)


def _scale(q, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _partial(q5, k, v, visible, scale=None) -> Partial:
    """Softmax pieces of grouped queries ``q5 [B, T, K, G, Dh]`` over keys ``k, v [B, S, K, Dh]``
    under ``visible [B, T, S]``."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q5, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores * _scale(q5, scale), -jnp.inf)
    m = jnp.max(scores, axis=-1)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)[..., None])
    acc = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return Partial(m, jnp.sum(p, axis=-1), acc)


def _merge(a: Partial, b: Partial) -> Partial:
    m = jnp.maximum(a.m, b.m)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(a.m - safe), jnp.exp(b.m - safe)
    return Partial(m, wa * a.l + wb * b.l, wa[..., None] * a.acc + wb[..., None] * b.acc)


def _finish(part: Partial, shape, dtype) -> jax.Array:
    """Normalise and lay out as ``[B, T, H, Dh]``; a row with no readable key gives 0."""
    out = part.acc / jnp.where(part.l > 0, part.l, 1.0)[..., None]
    B, T, H, Dh = shape
    return jnp.moveaxis(out, 3, 1).reshape(B, T, H, Dh).astype(dtype)


# ---------------------------------------------------------------------------- backends


def dense_attention(q, k, v, mask: AttentionMask, context: Context | None, scale: float | None = None) -> jax.Array:
    """The reference: one softmax over [the whole context capacity ; the chunk]. A row with no
    readable key yields a uniform average (as eager PyTorch with a finfo.min mask does)."""
    visible = mask.dense(0) if context is None else mask.dense(context.capacity, context.key_positions())
    if context is not None:
        ck, cv = context.layer_kv()
        k = jnp.concatenate([ck, k.astype(ck.dtype)], axis=1)
        v = jnp.concatenate([cv, v.astype(cv.dtype)], axis=1)
    q5 = _grouped(q, k.shape[2])
    scores = jnp.einsum("btkgd,bskd->bkgts", q5, k, preferred_element_type=jnp.float32) * _scale(q, scale)
    scores = jnp.where(visible[:, None, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(q.shape).astype(q.dtype)


def context_block_range(mask: AttentionMask, capacity: int, block: int) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last context block holding a key some query reads (traced)."""
    hi = jnp.minimum(jnp.max(mask.context_len), capacity)
    lo = jnp.maximum(jnp.min(mask.q_pos) - mask.window + 1, 0)  # window's lower edge
    lo = jnp.where(mask.window >= NO_WINDOW, 0, lo)
    return jnp.minimum(lo, hi) // block, -(-hi // block)


def blockwise_attention(q, k, v, mask: AttentionMask, context: Context | None, scale: float | None = None,
                        block: int = BLOCK) -> jax.Array:
    """Online softmax over the used context blocks, then the chunk. A block that would run
    past the capacity is shifted back and its already-counted keys masked, so any capacity
    works. A ring context (a window's worth of slots) is read whole."""
    q5 = _grouped(q, k.shape[2])
    part = _partial(q5, k, v, mask.chunk_visible(), scale)
    if context is None:
        return _finish(part, q.shape, q.dtype)
    S = context.capacity
    size = min(block, S)
    if context.positions is None:
        first, last = context_block_range(mask, S, size)
    else:
        first, last = 0, -(-S // size)

    def body(j, part):
        start = jnp.minimum(j * size, S - size)
        index = (context.layer, 0, start, 0, 0)
        shape = (1,) + context.k.shape[1:2] + (size,) + context.k.shape[3:]
        kb = jax.lax.dynamic_slice(context.k, index, shape)[0]
        vb = jax.lax.dynamic_slice(context.v, index, shape)[0]
        slots = start + jnp.arange(size)
        key_pos = slots if context.positions is None else jax.lax.dynamic_slice_in_dim(context.positions, start, size, 1)
        visible = mask.context_visible(key_pos) & (slots >= j * size)[None, None, :]
        return _merge(part, _partial(q5, kb, vb, visible, scale))

    part = jax.lax.fori_loop(first, last, body, part)
    return _finish(part, q.shape, q.dtype)


def _dot_product(implementation: str) -> Callable:
    def run(q, k, v, mask: AttentionMask, context: Context | None, scale: float | None = None) -> jax.Array:
        def call(keys, values, visible):
            return jax.nn.dot_product_attention(
                q, keys.astype(q.dtype), values.astype(q.dtype), mask=visible[:, None], scale=scale,
                return_residual=True, implementation=implementation,
            )

        out, lse = call(k, v, mask.chunk_visible())  # out [B, T, H, Dh], lse [B, T, H]
        if context is None:
            return out
        ck, cv = context.layer_kv()
        visible = jnp.broadcast_to(mask.context_visible(context.key_positions()), mask.q_pos.shape + (context.capacity,))
        c_out, c_lse = call(ck, cv, visible)
        # a context with no readable key comes back with a huge negative lse: weight ~0
        m = jnp.maximum(lse, c_lse)
        w, c_w = jnp.exp(lse - m), jnp.exp(c_lse - m)
        mixed = (w[..., None] * out.astype(jnp.float32) + c_w[..., None] * c_out.astype(jnp.float32))
        return (mixed / (w + c_w)[..., None]).astype(q.dtype)

    return run


AttentionFn = Callable[..., jax.Array]
BACKENDS: dict[str, AttentionFn] = {
    "dense": dense_attention,
    "blockwise": blockwise_attention,
    "xla": _dot_product("xla"),
    "cudnn": _dot_product("cudnn"),
}
# Cache reads go blockwise on every platform: its cost follows the used length, where the
# dense and dot_product kernels read the whole capacity. Chunk-only attention (training,
# cache-less forwards) is dense on CPU/TPU and cuDNN flash attention on GPU in half precision.
DEFAULT_BACKEND = {"cpu": "blockwise", "gpu": "blockwise", "tpu": "blockwise"}


def register_backend(name: str, fn: AttentionFn):
    """Add a backend ``fn(q, k, v, mask, context[, scale=]) -> out`` (e.g. a Pallas kernel);
    ``scale`` (the score scale, default ``Dh ** -0.5``) is passed only when a model sets it."""
    BACKENDS[name] = fn


def default_backend(platform: str, has_context: bool, dtype) -> str:
    if not has_context:
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if platform == "gpu" and half else "dense"
    return DEFAULT_BACKEND.get(platform, "blockwise")


def check_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (one of auto, {', '.join(BACKENDS)})")
    return name


def attend(q, k, v, mask: AttentionMask, context: Context | None = None, backend: str = "auto",
           scale: float | None = None) -> jax.Array:
    """Grouped-query attention of a chunk over [context ; chunk] under ``mask``.

    q ``[B, T, H, Dh]``; k, v ``[B, T, K, Dh]`` (H a multiple of K); returns ``[B, T, H, Dh]``.
    Scores (q . k times ``scale``, default ``Dh ** -0.5``; Gemma 4 uses 1) and softmax in float32."""
    if backend == "auto":
        backend = default_backend(jax.default_backend(), context is not None, q.dtype)
    fn = BACKENDS[check_backend(backend)]
    return fn(q, k, v, mask, context) if scale is None else fn(q, k, v, mask, context, scale=scale)


def packed_attention(attend_chunk: Callable, seq_ids: jax.Array, slots: jax.Array, lengths: jax.Array,
                     chunk_len: int) -> tuple[Callable, AttentionMask]:
    """Attention for packed tokens (``[N, 1, ...]``: token i is the ``slots[i]``-th new token of
    sequence ``seq_ids[i]``, padding ``seq_ids == batch``, each sequence's tokens before the
    next's and padding last, as ``speculative.packed_layout`` lays them) over a cache with
    ``lengths [B]``, through a chunk attention ``attend_chunk(q, k, v, mask, context)``.
    Returns ``(attend_fn, mask)`` with the same signature and the mask it reads.

    Several sequences are laid out on a ``[B, chunk_len]`` grid (a scatter in, a gather out).
    One sequence (B = 1) needs no grid: its tokens come first, so the packed axis is its own
    chunk at positions ``lengths + i`` (padding after every real token; no real query reads
    it), which saves the scatter and gather of every layer (embedded target, one row, separate
    calls on a 2-core CPU: 1 token 13% faster, 8 tokens 4%)."""
    B, N = lengths.shape[0], seq_ids.shape[0]
    if B == 1:
        axis = lambda x: jnp.swapaxes(x, 0, 1)  # [N, 1, ...] <-> [1, N, ...]

        def attend_fn(q, k, v, mask, context):
            return axis(attend_chunk(axis(q), axis(k), axis(v), mask, context))
    else:
        rows = jnp.minimum(seq_ids, B - 1)

        def grid(x):
            return jnp.zeros((B, chunk_len) + x.shape[2:], x.dtype).at[seq_ids, slots].set(x[:, 0], mode="drop")

        def attend_fn(q, k, v, mask, context):
            return attend_chunk(grid(q), grid(k), grid(v), mask, context)[rows, slots][:, None]

    positions = chunk_positions(lengths, N if B == 1 else chunk_len)
    return attend_fn, AttentionMask.make(positions, context_len=lengths)
