"""The decode core: one state and one commit rule for AR steps and speculative rounds.

An AR step proposes one token per row, a speculative round up to K + 1 (accepted drafts and
the bonus); both hand them to ``commit``, which appends what each live row may keep (up to
its first stop token and its ``max_new_tokens``) and updates the done flags (stop token,
token limit, full cache). The state carries the speculative parts (drafter context,
scheduler, statistics, trace) as optional fields, ``None`` for plain AR decoding, and the
per-request settings (stop ids, sampling, ``max_new_tokens``) as traced per-row arrays, so
the serving engine mixes requests in one compiled graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from .cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything a decoding loop carries (``loop_until_done`` advances it)."""

    output: jax.Array  # [B, N] generated ids (garbage past num_generated)
    num_generated: jax.Array  # [B]
    done: jax.Array  # [B] bool
    anchor: jax.Array  # [B] newest committed token, not yet in the target cache
    target_cache: KVCache
    key: jax.Array  # one key, or per-row keys [B] (each request its own stream)
    max_new_tokens: jax.Array  # [] or [B] int32
    stop_ids: jax.Array | None = None  # [B, M] per-request stop ids (-1 = none), besides the model's EOS
    sampling: Any = None  # sampling.RowSampling: per-row settings (None: the static Sampling)
    draft_cache: KVCache | None = None  # speculative only: the drafter's context cache
    schedule: Any = None  # speculative only: speculative.ScheduleState
    stats: Any = None  # speculative only: speculative.SpecStats
    trace: Any = None  # speculative only: speculative.SpecTrace


def is_stop(tokens: jax.Array, eos_ids: Sequence[int], stop_ids: jax.Array | None = None) -> jax.Array:
    """``tokens [B, T]`` that end a request: the model's EOS ids (static) or the row's own stop
    ids ``[B, M]`` (-1 pads, never a token)."""
    hit = jnp.zeros(tokens.shape, bool)
    if eos_ids:
        hit = jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))
    if stop_ids is not None:
        hit = hit | jnp.any(tokens[:, :, None] == stop_ids[:, None, :], -1)
    return hit


def finished(s: DecodeState, num_generated: jax.Array, stopped: jax.Array, cache: KVCache) -> jax.Array:
    """Done flags ``[B]``: already done, a stop token committed, the token limit, a full cache."""
    return s.done | stopped | (num_generated >= s.max_new_tokens) | (cache.lengths >= cache.max_len)


def commit(s: DecodeState, candidates: jax.Array, available: jax.Array, target_cache: KVCache, eos_ids: Sequence[int]):
    """Append ``candidates [B, T]`` (the first ``available [B]`` of each row are real) to the
    live rows, stopping after the first stop token and at ``max_new_tokens``.

    ``target_cache`` is the cache after the step (its lengths decide "cache full"). Returns
    (output, num_generated, done, count [B] of tokens appended)."""
    B, N = s.output.shape
    T = candidates.shape[1]
    live = ~s.done
    slots = jnp.arange(T)[None, :]
    stop_hit = is_stop(candidates, eos_ids, s.stop_ids) & (slots < available[:, None])
    first_stop = jnp.where(jnp.any(stop_hit, -1), jnp.argmax(stop_hit, -1), T)
    count = jnp.minimum(jnp.minimum(available, first_stop + 1), s.max_new_tokens - s.num_generated)
    count = jnp.where(live, count, 0)
    # slots past the count (and every slot of a finished row) write out of bounds: dropped
    write_at = jnp.where(slots < count[:, None], s.num_generated[:, None] + slots, N)
    output = s.output.at[jnp.arange(B)[:, None], write_at].set(candidates, mode="drop")
    num_generated = s.num_generated + count
    stopped = jnp.any(stop_hit & (slots < count[:, None]), -1)
    return output, num_generated, finished(s, num_generated, stopped, target_cache), count


def start(first: jax.Array, active: jax.Array, target_cache: KVCache, key: jax.Array, max_new_tokens, buffer_len: int,
          eos_ids: Sequence[int], **fields) -> DecodeState:
    """The state after a prefill: each active row's first token ``first [B]`` committed by the
    same rule as every later one (inactive rows, batch padding, start done)."""
    B = first.shape[0]
    empty = DecodeState(
        output=jnp.zeros((B, buffer_len), jnp.int32),
        num_generated=jnp.zeros((B,), jnp.int32),
        done=~active,
        anchor=first,
        target_cache=target_cache,
        key=key,
        max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32),
        **fields,
    )
    output, num_generated, done, _ = commit(empty, first[:, None], jnp.ones((B,), jnp.int32), target_cache, eos_ids)
    return dataclasses.replace(empty, output=output, num_generated=num_generated, done=done)
