"""Autoregressive decoding: the baseline every speedup is measured against.

``ar_decode`` is one jitted function: a ragged prefill, then one token per step inside a
single ``jax.lax.while_loop`` over an explicit state pytree. Shapes are bucketed on the host
(``prepare_prompts``) so a new prompt length rarely recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache
from .config import Qwen3Config
from .sampling import Sampling, sample_logits
from .sharding import constrain_cache
from . import target as target_model

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The smallest bucket >= n (multiples of the largest bucket beyond it)."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


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
) -> PreparedPrompts:
    """Validate and pad ragged prompts on the host, before anything is compiled.

    ``cache_len`` defaults to a bucket of (longest prompt + max_new_tokens + extra_cache).
    """
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    longest = max(lengths)
    if cache_len is None:
        cache_len = bucket(longest + max_new_tokens + extra_cache)
    if longest > cache_len:
        raise ValueError(
            f"prompt of {longest} tokens does not fit the KV cache of {cache_len} positions; "
            f"raise the cache length or shorten the prompt"
        )
    padded = np.zeros((len(prompts), bucket(longest)), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = np.asarray(p, np.int32)
    return PreparedPrompts(padded, np.asarray(lengths, np.int32), int(cache_len))


def run_target(params, cfg: Qwen3Config, tokens: jax.Array, cache: KVCache, *, feature_layers=(), with_logits=True, mesh=None):
    """``target.forward``, or its tensor-parallel ``shard_map`` version when a mesh is given."""
    if mesh is None:
        return target_model.forward(params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits)
    from .sharding import sharded_forward

    return sharded_forward(mesh, params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits)


def prefill(params, cfg: Qwen3Config, tokens: jax.Array, lengths: jax.Array, cache: KVCache, feature_layers=(), mesh=None):
    """Run right-padded prompts ``tokens [B, P]`` (valid lengths ``[B]``) into an empty cache.

    Returns the ForwardOutput of the whole padded chunk (padding rows are garbage), the float32
    logits ``[B, V]`` at each prompt's last token, and the cache advanced to ``lengths``.
    """
    out, cache = run_target(params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=False, mesh=mesh)
    last_hidden = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    last_logits = target_model.compute_logits(params, last_hidden)
    return out, last_logits, cache.advance(lengths)


def is_eos(tokens: jax.Array, eos_ids: Sequence[int]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ARState:
    output: jax.Array  # [B, N] generated ids (garbage past num_generated)
    num_generated: jax.Array  # [B]
    done: jax.Array  # [B] bool
    last_token: jax.Array  # [B] newest token, not yet in the cache
    cache: KVCache
    key: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "buffer_len", "cache_len", "eos_ids", "mesh"))
def ar_decode(
    params,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    max_new_tokens: jax.Array,
    *,
    cfg: Qwen3Config,
    sampling: Sampling,
    buffer_len: int,
    cache_len: int,
    eos_ids: tuple[int, ...],
    mesh=None,
) -> tuple[jax.Array, jax.Array]:
    """Prefill ragged prompts and decode until EOS, ``max_new_tokens`` or a full cache.

    prompt_tokens ``[B, P]`` right-padded, prompt_lengths ``[B]``; ``max_new_tokens`` is a
    traced scalar (<= buffer_len), so changing it does not recompile. Returns generated ids
    ``[B, buffer_len]`` (the EOS included, garbage after) and their counts ``[B]``.
    """
    B = prompt_tokens.shape[0]
    cache = constrain_cache(target_model.init_cache(cfg, B, cache_len, params.embed.dtype), mesh)
    _, logits, cache = prefill(params, cfg, prompt_tokens, prompt_lengths, cache, mesh=mesh)
    key, sub = jax.random.split(key)
    first = sample_logits(sub, logits, sampling)
    done = is_eos(first, eos_ids) | (max_new_tokens <= 1) | (cache.lengths >= cache_len)
    state = ARState(
        output=jnp.zeros((B, buffer_len), jnp.int32).at[:, 0].set(first),
        num_generated=jnp.ones((B,), jnp.int32),
        done=done,
        last_token=first,
        cache=cache,
        key=key,
    )

    def step(s: ARState) -> ARState:
        out, cache = run_target(params, cfg, s.last_token[:, None], s.cache, mesh=mesh)
        key, sub = jax.random.split(s.key)
        token = sample_logits(sub, out.logits[:, 0], sampling)
        live = ~s.done
        token = jnp.where(live, token, s.last_token)
        cache = cache.advance(live.astype(jnp.int32))
        # finished rows write out of bounds, which "drop" discards
        slot = jnp.where(live, s.num_generated, buffer_len)
        output = s.output.at[jnp.arange(B), slot].set(token, mode="drop")
        num_generated = s.num_generated + live
        done = s.done | is_eos(token, eos_ids) | (num_generated >= max_new_tokens) | (cache.lengths >= cache_len)
        return ARState(output, num_generated, done, token, cache, key)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
    return state.output, state.num_generated


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
) -> list[list[int]]:
    """Host-side convenience: validate, bucket, decode, and return each sample's new ids.

    With a ``(data, model)`` mesh (``sharding.make_mesh``) the target runs tensor-parallel."""
    prepared = prepare_prompts(prompts, cfg.vocab_size, max_new_tokens, cache_len)
    if mesh is not None:
        from .sharding import check_batch, shard_target

        params, cfg = shard_target(params, cfg, mesh)
        check_batch(len(prompts), mesh)
    tokens, counts = ar_decode(
        params,
        jnp.asarray(prepared.tokens),
        jnp.asarray(prepared.lengths),
        jax.random.key(seed),
        jnp.int32(max_new_tokens),
        cfg=cfg,
        sampling=sampling,
        buffer_len=bucket(max_new_tokens),
        cache_len=prepared.cache_len,
        eos_ids=cfg.eos_token_ids,
        mesh=mesh,
    )
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[i, : counts[i]].tolist() for i in range(len(prompts))]
