"""Autoregressive decoding: the baseline every speedup is measured against.

``ar_decode`` is one jitted function: a ragged prefill, then one token per step inside a
single ``jax.lax.while_loop`` over an explicit state pytree. Shapes are bucketed on the host
(``prepare_prompts``) so a new prompt length rarely recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache
from .commit import DecodeState, commit, is_stop
from .commit import start as start_state
from .config import Qwen3Config
from .sampling import Sampling, sample_logits, split
from .sharding import constrain_cache
from . import target as target_model

PREFILL_CHUNK = 512  # prompt tokens per prefill forward (memory O(chunk x context))
# Capacities: powers of two up to 2048, then multiples of 2048, so a long prompt's cache is at
# most 2047 positions too long (a 16,400-token request gets 18,432, not 32,768).
CACHE_STEP = 2048


def bucket(n: int, buckets: Sequence[int] | None = None, step: int = CACHE_STEP) -> int:
    """The smallest power of two >= n (from 16) up to ``step``, then a multiple of ``step``.
    With explicit ``buckets``: the smallest bucket >= n (multiples of the largest beyond it)."""
    if buckets is None:
        if n > step:
            return -(-n // step) * step
        return max(16, 1 << max(int(n) - 1, 0).bit_length())
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def prompt_bucket(n: int, chunk_size: int) -> int:
    """Padded prompt length: a power-of-two bucket for one chunk, else whole chunks."""
    return bucket(n, step=chunk_size) if n > chunk_size else min(bucket(n), max(chunk_size, 16))


class ContextError(ValueError):
    """A request that does not fit the model's context or the cache."""


def check_context(longest: int, max_new_tokens: int, max_positions: int, allow_long_context: bool = False):
    """A request must fit the positions the model was trained for, unless the user insists."""
    need = longest + max_new_tokens
    if need > max_positions and not allow_long_context:
        raise ContextError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {need} positions exceeds the "
            f"model's context of {max_positions} (max_position_embeddings); shorten the prompt, lower "
            f"max_new_tokens, or pass allow_long_context=True (CLI: --allow-long-context)"
        )


def available_memory_bytes() -> int | None:
    """Free memory of the default device (accelerators: bytes_limit - in use; CPU: MemAvailable)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_cache_memory(nbytes: int, what: str):
    """Fail before compiling when the KV caches alone cannot fit in memory."""
    free = available_memory_bytes()
    if free is not None and nbytes > free:
        raise ContextError(
            f"{what} needs {nbytes / 2**30:.2f} GiB but the device has {free / 2**30:.2f} GiB free; "
            f"shorten the prompt, lower max_new_tokens or the batch"
        )


def cache_bytes(cfg: Qwen3Config, batch: int, cache_len: int, dtype) -> int:
    """Bytes of a target KV cache (keys and values of every layer)."""
    if (family := target_model.family_of(cfg)) is not None:
        return family.cache_bytes(cfg, batch, cache_len, dtype)
    per_entry = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return 2 * batch * cache_len * per_entry


@dataclasses.dataclass(frozen=True)
class PreparedPrompts:
    tokens: np.ndarray  # [B, P_bucket] int32, right-padded with 0
    lengths: np.ndarray  # [B] int32
    cache_len: int


def prepare_prompts(
    prompts: Sequence[Sequence[int]],
    vocab_size: int,
    max_new_tokens: int,
    cache_len: int | None = None,
    extra_cache: int = 0,
    *,
    max_positions: int | None = None,
    allow_long_context: bool = False,
    chunk_size: int = PREFILL_CHUNK,
) -> PreparedPrompts:
    """Validate and pad ragged prompts on the host, before anything is compiled.

    ``cache_len`` defaults to a bucket of (longest prompt + max_new_tokens + extra_cache); an
    explicit one caps generation (decoding stops when the cache is full). Prompts are padded
    to a bucket that whole prefill chunks of ``chunk_size`` cover. With ``max_positions``
    (the model's context) a longer request is an error unless ``allow_long_context``.
    """
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    longest = max(lengths)
    if max_positions is not None:
        check_context(longest, max_new_tokens, max_positions, allow_long_context)
    if cache_len is None:
        cache_len = bucket(longest + max_new_tokens + extra_cache)
    if longest > cache_len:
        raise ValueError(
            f"prompt of {longest} tokens does not fit the KV cache of {cache_len} positions; "
            f"raise the cache length or shorten the prompt"
        )
    padded = np.zeros((len(prompts), prompt_bucket(longest, chunk_size)), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = np.asarray(p, np.int32)
    return PreparedPrompts(padded, np.asarray(lengths, np.int32), int(cache_len))


def run_target(params, cfg: Qwen3Config, tokens: jax.Array, cache: KVCache, *, feature_layers=(), with_logits=True, mesh=None):
    """``target.forward``, or its tensor-parallel ``shard_map`` version when a mesh is given."""
    if mesh is None:
        return target_model.forward(params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits)
    from .sharding import sharded_forward

    return sharded_forward(mesh, params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits)


def prefill(
    params,
    cfg: Qwen3Config,
    tokens: jax.Array,
    lengths: jax.Array,
    cache: KVCache,
    *,
    chunk_size: int = PREFILL_CHUNK,
    feature_layers=(),
    mesh=None,
    on_chunk: Callable | None = None,
    carry=None,
):
    """Run right-padded prompts ``tokens [B, P]`` (valid lengths ``[B]``) into an empty cache,
    ``chunk_size`` tokens per forward inside one ``lax.scan`` (memory O(chunk x context)).

    ``on_chunk(carry, features [B, C, F], num_new [B]) -> carry`` folds each chunk's
    ``feature_layers`` outputs (e.g. into the drafter's context cache); ``num_new`` counts the
    chunk's prompt tokens per row. Returns the float32 logits ``[B, V]`` at each prompt's last
    token, the cache advanced to ``lengths``, and the carry.
    """
    B, P = tokens.shape
    C = min(chunk_size, P)
    n = -(-P // C)
    chunks = jnp.pad(tokens, ((0, 0), (0, n * C - P))).reshape(B, n, C).swapaxes(0, 1)  # [n, B, C]

    def body(state, scanned):
        cache, last_hidden, carry = state
        chunk, index = scanned
        start = index * C
        out, cache = run_target(params, cfg, chunk, cache, feature_layers=feature_layers, with_logits=False, mesh=mesh)
        num_new = jnp.clip(lengths - start, 0, C)
        last = lengths - 1 - start  # the prompt's last token, if this chunk holds it
        picked = jnp.take_along_axis(out.hidden, jnp.clip(last, 0, C - 1)[:, None, None], axis=1)[:, 0]
        last_hidden = jnp.where(((last >= 0) & (last < C))[:, None], picked, last_hidden)
        if on_chunk is not None:
            carry = on_chunk(carry, out.features, num_new)
        return (cache.advance(num_new), last_hidden, carry), None

    last_hidden = jnp.zeros((B, cfg.hidden_size), params.embed.dtype)
    (cache, last_hidden, carry), _ = jax.lax.scan(body, (cache, last_hidden, carry), (chunks, jnp.arange(n)))
    return target_model.compute_logits(params, last_hidden), cache, carry


def is_eos(tokens: jax.Array, eos_ids: Sequence[int]) -> jax.Array:
    """The model's EOS ids (``commit.is_stop`` adds a request's own stop ids)."""
    return is_stop(tokens, eos_ids)


def loop_until_done(step: Callable, state, max_steps: int = 0):
    """``state = step(state)`` while any row is live, inside one ``lax.while_loop``; with
    ``max_steps > 0`` at most that many steps, so a stream can return to the host between
    chunks and continue from the state (every decoding loop, chunked or not, is this one).
    ``max_steps`` may be traced (the engine's rounds left after its known skips)."""
    if isinstance(max_steps, int) and not max_steps:
        return jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)

    def cond(carry):
        s, i = carry
        return ~jnp.all(s.done) & (i < max_steps)

    state, _ = jax.lax.while_loop(cond, lambda c: (step(c[0]), c[1] + 1), (state, jnp.int32(0)))
    return state


ARState = DecodeState  # the AR loop's state: the decode core's, without the speculative parts


def row_sampling(s: DecodeState, sampling: Sampling):
    """The state's per-row sampling settings when it carries them, else the static ones."""
    return sampling if s.sampling is None else s.sampling


def ar_start(params, prompt_tokens, prompt_lengths, key, max_new_tokens, cache: KVCache, active=None, *,
             cfg: Qwen3Config, sampling: Sampling, buffer_len: int, eos_ids: tuple[int, ...], mesh=None,
             prefill_chunk: int = PREFILL_CHUNK) -> DecodeState:
    """Prefill ragged prompts ``[B, P]`` into ``cache`` (any cache of the batch's shape: its
    lengths are reset, its entries overwritten) and sample each first token: the state
    ``ar_step`` advances. ``active [B]`` (default all) marks real rows; padding starts done."""
    B = prompt_tokens.shape[0]
    cache = constrain_cache(dataclasses.replace(cache, lengths=jnp.zeros_like(cache.lengths)), mesh)
    logits, cache, _ = prefill(params, cfg, prompt_tokens, prompt_lengths, cache, chunk_size=prefill_chunk, mesh=mesh)
    key, sub = split(key)
    first = sample_logits(sub, logits, sampling)
    active = jnp.ones((B,), bool) if active is None else active
    return start_state(first, active, cache, key, max_new_tokens, buffer_len, eos_ids)


def ar_step(params, s: DecodeState, *, cfg: Qwen3Config, sampling: Sampling, eos_ids: tuple[int, ...],
            mesh=None) -> DecodeState:
    """One token for every live row."""
    return ar_step_with_features(params, s, cfg=cfg, sampling=sampling, eos_ids=eos_ids, mesh=mesh)[0]


def ar_step_with_features(params, s: DecodeState, *, cfg: Qwen3Config, sampling: Sampling, eos_ids: tuple[int, ...],
                          mesh=None, feature_layers=()) -> tuple[DecodeState, jax.Array | None]:
    """``ar_step``, also returning the target features ``[B, F]`` of the position it ran (the
    anchor's; None without ``feature_layers``): what a drafter's context receives."""
    out, cache = run_target(params, cfg, s.anchor[:, None], s.target_cache, feature_layers=feature_layers, mesh=mesh)
    key, sub = split(s.key)
    token = sample_logits(sub, out.logits[:, 0], row_sampling(s, sampling))
    live = ~s.done
    token = jnp.where(live, token, s.anchor)
    cache = cache.advance(live.astype(jnp.int32))
    output, num_generated, done, _ = commit(s, token[:, None], jnp.ones_like(s.num_generated), cache, eos_ids)
    new = dataclasses.replace(s, output=output, num_generated=num_generated, done=done, anchor=token,
                              target_cache=cache, key=key)
    return new, (out.features[:, 0] if feature_layers else None)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "buffer_len", "eos_ids", "mesh", "prefill_chunk"),
                   donate_argnames=("cache",))
def ar_decode(
    params,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    max_new_tokens: jax.Array,
    cache: KVCache,
    active: jax.Array | None = None,
    *,
    cfg: Qwen3Config,
    sampling: Sampling,
    buffer_len: int,
    eos_ids: tuple[int, ...],
    mesh=None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Prefill ragged prompts and decode until EOS, ``max_new_tokens`` or a full cache.

    prompt_tokens ``[B, P]`` right-padded, prompt_lengths ``[B]``; ``max_new_tokens`` is a
    traced scalar (<= buffer_len), so changing it does not recompile. ``cache`` is any
    ``[layers, B, capacity, ...]`` cache (``new_cache``): its lengths are reset and its
    entries overwritten. It is donated and returned, so a caller that decodes again with the
    same shapes passes the returned cache back and never allocates (or zero-fills) one again.
    Returns generated ids ``[B, buffer_len]`` (the EOS included, garbage after), their counts
    ``[B]`` and the cache. ``active [B]`` (default all) marks real rows (batch padding: False).
    """
    state = ar_start(params, prompt_tokens, prompt_lengths, key, max_new_tokens, cache, active, cfg=cfg, sampling=sampling,
                     buffer_len=buffer_len, eos_ids=eos_ids, mesh=mesh, prefill_chunk=prefill_chunk)
    step = functools.partial(ar_step, params, cfg=cfg, sampling=sampling, eos_ids=eos_ids, mesh=mesh)
    state = loop_until_done(step, state)
    return state.output, state.num_generated, state.target_cache


def new_cache(cfg: Qwen3Config, batch: int, cache_len: int, dtype, mesh=None) -> KVCache:
    """An empty target cache for ``ar_decode``, placed as the (sharded) forward reads it."""
    cache = target_model.init_cache(cfg, batch, cache_len, dtype)
    if mesh is None:
        return cache
    from .sharding import cache_sharding

    return jax.device_put(cache, cache_sharding(cache, mesh))


ar_prefill = jax.jit(ar_start, static_argnames=("cfg", "sampling", "buffer_len", "eos_ids", "mesh", "prefill_chunk"),
                     donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_ids", "mesh", "max_steps"), donate_argnames=("state",))
def ar_continue(params, state: ARState, *, cfg: Qwen3Config, sampling: Sampling, eos_ids: tuple[int, ...], mesh=None,
                max_steps: int = 0) -> ARState:
    """Up to ``max_steps`` more tokens (0: until done) from a donated state: a streaming chunk."""
    step = functools.partial(ar_step, params, cfg=cfg, sampling=sampling, eos_ids=eos_ids, mesh=mesh)
    return loop_until_done(step, state, max_steps)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def pad_batch(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad the batch to a bucket with copies of row 0 marked inactive."""
    B = tokens.shape[0]
    Bb = bucket(B, BATCH_BUCKETS)
    rows = np.concatenate([np.arange(B), np.zeros(Bb - B, np.int64)])
    return tokens[rows], lengths[rows], np.arange(Bb) < B


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """A validated, padded, bucketed (and, with a mesh, sharded) request of either mode."""

    params: object  # the target's, sharded over the mesh when there is one
    cfg: Qwen3Config
    tokens: np.ndarray  # [B_bucket, P_bucket] int32, right-padded
    lengths: np.ndarray  # [B_bucket] int32
    active: np.ndarray  # [B_bucket] bool: False rows are batch padding
    cache_len: int
    buffer_len: int  # output buffer: a bucket of max_new_tokens
    rows: int  # real prompts


def prepare_batch(
    params,
    cfg: Qwen3Config,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    cache_len: int | None = None,
    extra_cache: int = 0,
    mesh=None,
    prefill_chunk: int = PREFILL_CHUNK,
    allow_long_context: bool = False,
    extra_state_bytes: Callable[[int, int, object], int] | None = None,
) -> PreparedBatch:
    """The host entry point of every decoding mode: validate the prompts (vocabulary, the
    model's context, the cache), pad them and the batch to buckets, check that the KV caches
    (the target's, plus ``extra_state_bytes(batch, cache_len, dtype)``, e.g. the drafter's
    state) fit in memory, and shard the target over ``mesh``: all before anything compiles."""
    prepared = prepare_prompts(prompts, cfg.vocab_size, max_new_tokens, cache_len, extra_cache=extra_cache,
                               chunk_size=prefill_chunk, max_positions=cfg.max_position_embeddings,
                               allow_long_context=allow_long_context)
    tokens, lengths, active = pad_batch(prepared.tokens, prepared.lengths)
    B, dtype = tokens.shape[0], params.embed.dtype
    nbytes = cache_bytes(cfg, B, prepared.cache_len, dtype)
    if extra_state_bytes is not None:
        nbytes += extra_state_bytes(B, prepared.cache_len, dtype)
    check_cache_memory(nbytes, "the KV cache" if extra_state_bytes is None else "the target and drafter KV caches")
    if mesh is not None:
        from .sharding import check_batch, shard_target

        check_batch(B, mesh)
        params, cfg = shard_target(params, cfg, mesh)
    return PreparedBatch(params, cfg, tokens, lengths, active, prepared.cache_len, bucket(max_new_tokens), len(prompts))


@dataclasses.dataclass(frozen=True)
class ARRun:
    """A validated, bucketed ``ar`` request: what ``ar_prefill`` / ``ar_decode`` are called with."""

    params: object
    args: tuple  # (prompt_tokens, prompt_lengths, key, max_new_tokens, cache, active): the cache is donated
    static: dict  # cfg, sampling, buffer_len, eos_ids, mesh, prefill_chunk
    rows: int


def prepare_ar(
    params,
    cfg: Qwen3Config,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    cache_len: int | None = None,
    mesh=None,
    prefill_chunk: int = PREFILL_CHUNK,
    allow_long_context: bool = False,
) -> ARRun:
    """Validate and bucket on the host, before anything compiles (see ``generate_ar``)."""
    b = prepare_batch(params, cfg, prompts, max_new_tokens=max_new_tokens, cache_len=cache_len, mesh=mesh,
                      prefill_chunk=prefill_chunk, allow_long_context=allow_long_context)
    args = (jnp.asarray(b.tokens), jnp.asarray(b.lengths), jax.random.key(seed), jnp.int32(max_new_tokens),
            new_cache(b.cfg, b.tokens.shape[0], b.cache_len, b.params.embed.dtype, mesh), jnp.asarray(b.active))
    static = dict(cfg=b.cfg, sampling=sampling, buffer_len=b.buffer_len, eos_ids=b.cfg.eos_token_ids,
                  mesh=mesh, prefill_chunk=prefill_chunk)
    return ARRun(b.params, args, static, b.rows)


def generate_ar(
    params,
    cfg: Qwen3Config,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    cache_len: int | None = None,
    mesh=None,
    prefill_chunk: int = PREFILL_CHUNK,
    allow_long_context: bool = False,
) -> list[list[int]]:
    """Host-side convenience: validate, bucket, decode, and return each sample's new ids.

    With a ``(data, model)`` mesh (``sharding.make_mesh``) the target runs tensor-parallel.
    Prompts are prefilled ``prefill_chunk`` tokens at a time. A prompt + max_new_tokens past
    the model's ``max_position_embeddings`` is an error unless ``allow_long_context``."""
    run = prepare_ar(params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                     cache_len=cache_len, mesh=mesh, prefill_chunk=prefill_chunk, allow_long_context=allow_long_context)
    tokens, counts, _ = ar_decode(run.params, *run.args, **run.static)
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[i, : counts[i]].tolist() for i in range(run.rows)]
