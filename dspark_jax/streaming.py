"""Streaming: the same jitted decoding loops, returned to the host every few rounds.

``stream_generate`` runs the ``ar`` or speculative ``while_loop`` (``decoding.loop_until_done``,
the one loop body of each mode) for at most ``chunk`` steps / rounds per dispatch, the state
donated, and yields each sample's newly committed ids between dispatches. A chunk is one
dispatch (the loop and copies of the ids the host reads); the next chunk is dispatched before
the previous one's ids are read, so the host's work overlaps the device's and the stream costs
a few dispatches, not a different loop.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import numpy as np

from .decoding import ar_continue, ar_prefill, prepare_ar


def _progress(state):
    """Copies of what the host reads between chunks (the state itself is donated onward)."""
    return state.output + 0, state.num_generated + 0, state.done.all()


_with_progress = jax.jit(lambda state: (state, _progress(state)), donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_ids", "mesh", "max_steps"), donate_argnames=("state",))
def _ar_chunk(params, state, *, cfg, sampling, eos_ids, mesh, max_steps):
    # one dispatch per chunk: the loop (ar_continue, inlined) and the progress copies
    state = ar_continue(params, state, cfg=cfg, sampling=sampling, eos_ids=eos_ids, mesh=mesh, max_steps=max_steps)
    return state, _progress(state)


@functools.partial(jax.jit, static_argnames=("scfg", "max_rounds"), donate_argnames=("state",))
def _speculative_chunk(target, draft, state, *, scfg, max_rounds):
    from .speculative import speculative_decode

    state = speculative_decode(target, draft, state, scfg=scfg, max_rounds=max_rounds)
    return state, _progress(state)


def _stream(advance, state, rows: int) -> Iterator[list[list[int]]]:
    """Yield each row's new ids per chunk; ``advance(state) -> (state, progress)`` runs one chunk."""
    seen = np.zeros(rows, np.int64)
    state, pending = _with_progress(state)  # the prefill's first token
    while True:
        # dispatched asynchronously: the chunk runs while the host reads the previous one's ids
        state, progress = advance(state)
        output, counts, all_done = (np.asarray(x) for x in pending)
        counts = counts[:rows]
        new = [output[i, seen[i]: counts[i]].tolist() for i in range(rows)]
        seen = np.maximum(seen, counts)
        if any(new):
            yield new
        if all_done:
            return state
        pending = progress


def stream_generate(
    target,
    tcfg,
    prompts: Sequence[Sequence[int]],
    *,
    draft=None,
    dcfg=None,
    max_new_tokens: int,
    chunk: int | None = None,
    trace: bool = False,
    **kw,
):
    """Decode ``prompts`` and yield, every ``chunk`` target steps (``ar``, default 32) or rounds
    (speculative, when a ``draft`` is given; default 8, ~30 tokens at tau 3.5), a list with each sample's newly committed ids
    (empty for a sample that committed nothing new). The concatenated chunks are exactly what
    ``generate_ar`` / ``speculative_generate`` return for the same arguments; the generator's
    return value (``StopIteration.value``) is that call's result: the samples for ``ar``, the
    ``SpecResult`` (statistics, trace) for speculative decoding. ``kw`` are theirs."""
    if chunk is None:  # each dispatch costs ~1 ms on a CPU host: a chunk of ar steps is longer
        chunk = 32 if draft is None else 8
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 step, got {chunk}")
    if draft is None:
        run = prepare_ar(target, tcfg, prompts, max_new_tokens=max_new_tokens, **kw)
        static = {k: run.static[k] for k in ("cfg", "sampling", "eos_ids", "mesh")}
        advance = functools.partial(_ar_chunk, run.params, max_steps=chunk, **static)
        state = ar_prefill(run.params, *run.args, **run.static)
        state = yield from _stream(advance, state, run.rows)
        output, counts = np.asarray(state.output), np.asarray(state.num_generated)
        return [output[i, : counts[i]].tolist() for i in range(run.rows)]
    from .speculative import speculative_start

    run = speculative_start(target, tcfg, draft, dcfg, prompts, max_new_tokens=max_new_tokens, trace=trace, **kw)
    advance = functools.partial(_speculative_chunk, run.target, run.draft, scfg=run.scfg, max_rounds=chunk)
    state = yield from _stream(advance, run.state, run.rows)
    return run.result(state, trace)
