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

from .cache import KVCache, cache_batch_axes

SHARED = -1  # in a batch-axes pytree (``DecodeState.batch_axes``): a leaf every row shares


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

    def batch_axes(self) -> "DecodeState":
        """The batch axis of every leaf (``SHARED``: no batch axis, e.g. one key for all rows or
        the scheduler's SPS table), as a pytree of this state's structure: what ``take_rows``,
        ``put_rows`` and ``copy_row`` follow. Each part declares its own (``batch_axes``)."""
        per_row = lambda a: 0 if a.ndim else SHARED
        axes_of = lambda part: None if part is None else part.batch_axes()
        return DecodeState(
            output=0, num_generated=0, done=0, anchor=0, target_cache=cache_batch_axes(self.target_cache),
            key=per_row(self.key), max_new_tokens=per_row(self.max_new_tokens),
            stop_ids=None if self.stop_ids is None else 0,
            sampling=None if self.sampling is None else jax.tree.map(lambda _: 0, self.sampling),
            draft_cache=None if self.draft_cache is None else cache_batch_axes(self.draft_cache),
            schedule=axes_of(self.schedule), stats=axes_of(self.stats), trace=axes_of(self.trace),
        )


def take_rows(tree, axes, width: int):
    """Rows ``[0:width]`` of every batched leaf of ``tree`` (``axes``: its ``batch_axes``);
    shared leaves as they are. A static slice: the copy holds ``width`` rows."""
    return jax.tree.map(lambda a, axis: a if axis == SHARED else jax.lax.slice_in_dim(a, 0, width, axis=axis),
                        tree, axes)


def put_rows(tree, rows, axes):
    """``rows`` (``take_rows(tree, axes, width)``, advanced) written over rows ``[0:width]`` of
    ``tree``; shared leaves become ``rows``'. On a donated ``tree`` the write is in place."""
    return jax.tree.map(
        lambda a, r, axis: r if axis == SHARED else jax.lax.dynamic_update_slice_in_dim(a, r, 0, axis), tree, rows, axes)


def copy_row(tree, axes, src, dst):
    """Row ``src`` of every batched leaf copied into row ``dst`` (traced indices); shared
    leaves untouched."""
    def copy(a, axis):
        if axis == SHARED:
            return a
        return jax.lax.dynamic_update_slice_in_dim(a, jax.lax.dynamic_slice_in_dim(a, src, 1, axis), dst, axis)

    return jax.tree.map(copy, tree, axes)


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
