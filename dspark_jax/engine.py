"""A continuous-batching serving engine on the decode core.

A fixed number of batch slots live on the device as one ``commit.DecodeState`` (per-slot
caches, keys, sampling settings, stop ids and token limits as traced rows). The host loop
follows JetStream's split: **prefill** a waiting request's prompt (chunked, into a one-row
target cache and drafter context), **insert** that row into a free slot of the donated
state, and **generate**: a few AR steps or speculative rounds for every slot inside the one
decoding loop (``decoding.loop_until_done``). A slot whose request finished is refilled by the
next waiting request while the others keep their caches and continue.

**Width.** A round costs what its rows cost (the drafter over every row's block and context,
the verification, the bookkeeping), so the engine runs only the rows in use: running requests
sit in the lowest slots (a new one takes the lowest free slot; when a slot frees below a running
request, ``move_row`` moves that request down), and ``generate`` is compiled per width W in
``engine_widths(slots)`` = {1, 2, 4, ..., slots}: it slices rows ``[0:W]`` out of the donated
state, runs the rounds on them and writes them back in place. At low load a request decodes at
batch-1 cost, not at the cost of ``slots`` rows; AR decoding gets the same treatment. Each width
may have its own SPS profile (``profile_widths``), since fewer rows draft and verify cheaper.

Compiled shapes are bounded: one generate graph per width (log2(slots) + 1), one row move, one
insert graph per prompt bucket (``decoding.prompt_bucket``). Every request has its own PRNG
stream (from its seed), so its output does not depend on its slot, its neighbours, its moves or
when it arrived.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections import deque
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .drafters import family_of
from . import draft as draft_model
from . import target as target_model
from .cache import KVCache
from .commit import DecodeState, copy_row, put_rows, take_rows
from .commit import start as start_state
from .decoding import PREFILL_CHUNK, ar_step, bucket, check_context, loop_until_done, prefill, prompt_bucket
from .sampling import RowSampling, Sampling, sample_logits, split
from . import speculative as spec
from . import schedule as schedule_lib

MAX_STOP_IDS = spec.MAX_STOP_IDS  # per-request stop ids a slot holds (besides the model's EOS ids)
# the key of a request's first-confidence block: fold_in(key, i) is split(key, n)[i] (JAX's
# partitionable threefry), so a small i would be a key its first round draws its drafts with
PROBE_STREAM = 0x7FFFFFFF


@dataclasses.dataclass
class Request:
    """A submitted request and what it produced so far (times from ``time.perf_counter``)."""

    id: int
    prompt: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: tuple[int, ...]
    seed: int
    submitted: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    started_at: float | None = None  # inserted into a slot (prefill begins)
    first_token_at: float | None = None
    finished_at: float | None = None
    slot: int | None = None  # its row: the lowest free one at insertion, lower when ``Engine._pack`` moves it
    rounds: int = 0  # decoding rounds (AR steps) it took part in
    verified: int = 0  # target tokens run to verify it (anchors + drafts offered)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def budget(self) -> float:
        """Mean verification budget per round (tokens the target ran for this request)."""
        return self.verified / max(self.rounds, 1)


def _put_rows(batch, row, slot, axis: int = 0):
    """Write the one-row pytree ``row`` into ``batch`` at ``slot`` along ``axis`` of every leaf."""
    return jax.tree.map(lambda b, r: jax.lax.dynamic_update_slice_in_dim(b, r.astype(b.dtype), slot, axis), batch, row)


def _put_cache(batch: KVCache, row: KVCache, slot) -> KVCache:
    return KVCache(_put_rows(batch.k, row.k, slot, 1), _put_rows(batch.v, row.v, slot, 1),
                   _put_rows(batch.lengths, row.lengths, slot))


def _row_cache(cache: KVCache, slot) -> KVCache:
    take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis)
    return KVCache(take(cache.k, 1), take(cache.v, 1), jnp.zeros((1,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("scfg", "tcfg", "prefill_chunk"), donate_argnames=("state",))
def insert(target, draft, state: DecodeState, slot, tokens, length, key, max_new_tokens, stop_ids, sampling: RowSampling,
           *, scfg, tcfg, prefill_chunk: int) -> DecodeState:
    """Prefill one prompt ``tokens [1, P]`` (valid ``length [1]``) into slot ``slot`` of the
    donated engine state: the slot's target cache (and drafter context), its first token,
    key, limits and sampling; the slot's statistics restart. Other slots are untouched; the
    budget schedulers' run of skips (the batch's) restarts at ``FIRST_REFRESH``, so a refresh
    interval that earlier requests doubled never delays a new request's first verified round."""
    cache = _row_cache(state.target_cache, slot)
    on_chunk, carry = None, None
    if state.draft_cache is not None:
        on_chunk = functools.partial(draft_model.append_context, draft, scfg.draft)
        carry = _row_cache(state.draft_cache, slot)
    logits, cache, draft_cache = prefill(target, tcfg, tokens, length, cache, chunk_size=prefill_chunk,
                                         feature_layers=scfg.draft.target_layer_ids if scfg else (),
                                         on_chunk=on_chunk, carry=carry)
    key, sub = split(key)
    first = sample_logits(sub, logits, sampling)
    eos_ids = tcfg.eos_token_ids
    row = start_state(first, jnp.ones((1,), bool), cache, key, max_new_tokens, state.output.shape[1], eos_ids,
                      stop_ids=stop_ids, sampling=sampling)
    put = lambda name: _put_rows(getattr(state, name), getattr(row, name), slot)
    new = dataclasses.replace(
        state, **{name: put(name) for name in ("output", "num_generated", "done", "anchor", "key", "max_new_tokens",
                                                "stop_ids", "sampling")},
        target_cache=_put_cache(state.target_cache, cache, slot),
    )
    if state.draft_cache is None:
        return new
    sched, stats = state.schedule, state.stats
    first_survival = first_confidences(target, draft, draft_cache, first, key, sampling, sched, scfg)
    sched = dataclasses.replace(sched, stale_survival=_put_rows(sched.stale_survival, first_survival, slot, 1),
                                mean_survival=_put_rows(sched.mean_survival, first_survival[1], slot))
    if scfg.may_skip_drafting:  # the run of skips restarts: the new request gets its first look as early as any
        sched = dataclasses.replace(sched, skipped=jnp.zeros_like(sched.skipped),
                                    refresh_after=jnp.full_like(sched.refresh_after, spec.FIRST_REFRESH))
    per_row = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats) if f.name != "compute_tokens"}
    fresh = {name: _put_rows(a, jnp.zeros((1,) + a.shape[1:], a.dtype), slot) for name, a in per_row.items()}
    return dataclasses.replace(new, draft_cache=_put_cache(state.draft_cache, draft_cache, slot), schedule=sched,
                               stats=dataclasses.replace(stats, **fresh))


def first_confidences(target, draft, draft_cache, first, key, sampling: RowSampling, sched, scfg) -> jax.Array:
    """A new request's confidence history ``[2, 1, K]`` before its first round. The budget
    schedulers (which may skip drafting) draft one block for the request alone from its first
    token, right after its prefill, and start from that block's survival: the request's own
    evidence, at the cost of one 1-row drafter call per request (not a round of every slot).
    The block is never verified, and its key is a stream of its own (``PROBE_STREAM``), so the
    rounds draw what they would draw without it: deciding from it is deciding from the past
    (lossless). Other schedulers read no history: all ones."""
    K = sched.stale_survival.shape[-1]
    if not scfg.may_skip_drafting:
        return jnp.ones((2, 1, K), jnp.float32)
    probe_key = jax.vmap(lambda k: jax.random.fold_in(k, PROBE_STREAM))(key)
    block, _ = family_of(scfg.draft).propose(probe_key, draft, scfg.draft, target, draft_cache, first, sampling, K)
    temperatures = spec.confidence_temperatures(sched.temperatures, sampling)
    return jnp.broadcast_to(schedule_lib.survival(block.confidence_logits, temperatures), (2, 1, K))


def engine_widths(slots: int) -> tuple[int, ...]:
    """The widths ``generate`` compiles for an engine of ``slots`` rows: the powers of two
    below ``slots``, and ``slots`` (log2(slots) + 1 programs at most)."""
    widths, w = [], 1
    while w < slots:
        widths.append(w)
        w *= 2
    return tuple(widths) + (slots,)


def width_for(rows: int, slots: int) -> int:
    """The smallest compiled width that holds rows ``[0:rows]``."""
    return next(w for w in engine_widths(slots) if w >= rows)


@functools.partial(jax.jit, static_argnames=("scfg", "tcfg", "max_steps", "width", "anchor_steps"),
                   donate_argnames=("state",))
def generate(target, draft, state: DecodeState, sps_table=None, draft_seconds=None, known=None, *, scfg, tcfg,
             max_steps: int, width: int, anchor_steps: bool = True):
    """Up to ``max_steps`` AR steps (``scfg`` None) or speculative rounds for the live slots
    among rows ``[0:width]`` (the engine keeps its requests there), then what the host reads
    for those rows in one int32 array ``[width, REPORT + buffer]`` (one device-to-host copy
    per call): columns ``REPORT_COLUMNS`` (committed count, done flag, rounds, verified tokens,
    rounds run as AR steps, rounds known to skip drafting after the call), then the ids.

    The rows are sliced out of the donated state, advanced, and written back in place, so a
    round costs what ``width`` rows cost (drafter, verification, bookkeeping), not all slots.
    ``sps_table``/``draft_seconds`` (speculative): the scheduler's SPS profile at this width.
    ``anchor_steps`` (budget schedulers): the rounds run as ``speculative.decode_rounds`` runs
    them, each run of rounds known to skip drafting whatever they commit (``skips_ahead``, read
    from the state on the device) as plain AR steps (``speculative.anchor_steps``) and the
    drafted rounds without a branch; False: every round decides in a ``lax.cond`` (for
    comparison). ``known``: the run of skips ahead, at least ``max_steps``, read by
    the host from an earlier report (``Engine.step``); the call is then only those AR steps,
    with neither the skip decision nor the rounds' loop in its program (each cost a call of
    4 steps ~5% at width 1 on a 2-core CPU)."""
    axes = state.batch_axes()
    rows = take_rows(state, axes, width)
    ran = ahead = jnp.int32(0)  # AR steps run for known skips; the run of skips left after the call
    if scfg is None:
        step = functools.partial(ar_step, target, cfg=tcfg, sampling=Sampling(), eos_ids=tcfg.eos_token_ids)
        rows = loop_until_done(step, rows, max_steps)
    else:
        rows = dataclasses.replace(rows, schedule=dataclasses.replace(rows.schedule, sps_table=sps_table,
                                                                      draft_seconds=draft_seconds))
        if known is not None:  # the host's run: AR steps only, counted down
            skips = jnp.asarray(known, jnp.int32)
            ran = jnp.minimum(skips, max_steps)
            rows = spec.anchor_steps(target, draft, rows, ran, scfg=scfg, chunk=min(max_steps, spec.ANCHOR_CHUNK))
            ahead = skips - ran
        elif anchor_steps:  # runs of skips as AR steps, drafted rounds without a branch
            skipped = rows.stats.skipped
            rows = spec.decode_rounds(target, draft, rows, max_steps, scfg=scfg)
            ran = jnp.max(rows.stats.skipped - skipped)  # 0 for a scheduler that never skips
            ahead = spec.skips_ahead(rows, scfg)  # 0 for a scheduler that never skips
        else:  # every round decides (for comparison)
            rows = loop_until_done(functools.partial(spec.speculative_round, target, draft, scfg=scfg), rows,
                                   max_steps)
    state = put_rows(state, rows, axes)
    rounds, verified = (rows.num_generated, rows.num_generated) if rows.stats is None else (rows.stats.rounds,
                                                                                              rows.stats.verified)
    columns = (rows.num_generated, rows.done, rounds, verified) + tuple(
        jnp.broadcast_to(c, rows.done.shape) for c in (ran, ahead))
    report = jnp.concatenate([jnp.stack([c.astype(jnp.int32) for c in columns], 1), rows.output], 1)
    return state, report


REPORT_COLUMNS = ("count", "done", "rounds", "verified", "anchor_steps", "skips_ahead")  # before the ids
# ("skips_ahead": the rounds known to skip drafting after the call, ``speculative.skips_ahead``)


@functools.partial(jax.jit, donate_argnames=("state",))
def move_row(state: DecodeState, src, dst) -> DecodeState:
    """Move the request in row ``src`` to the free row ``dst`` (every per-row array: caches,
    drafter context, confidence history, statistics, key, output, limits, sampling) and mark
    ``src`` done: the engine keeps its live requests in the lowest rows. In place on the
    donated state: one row is read and one written per array."""
    state = copy_row(state, state.batch_axes(), src, dst)
    return dataclasses.replace(state, done=state.done.at[src].set(True))


def forced_costs(state: DecodeState, costs, mode: str, tokens: int | None = None):
    """The state and a width's ``(sps_table, draft_seconds)`` with the budget schedulers' skip
    decision forced, for timing: ``"skip"`` (nothing survives and the run of skips never ends)
    or ``"drafted"`` (every round drafts; with ``tokens``, Algorithm 1 verifies exactly that many
    tokens in all, anchors included: the table pays nothing past them; else every draft).
    The drafting's cost is made negative, so that even a round with nothing to verify (``tokens``
    equal to the rows) drafts."""
    sps_table, draft_seconds = costs
    sched = state.schedule
    if mode == "skip":
        sched = dataclasses.replace(sched, skipped=jnp.int32(-10**6), stale_survival=jnp.zeros_like(sched.stale_survival),
                                    mean_survival=jnp.zeros_like(sched.mean_survival))
    elif mode == "drafted":  # and the confidence history restarts as "every draft survives"
        budget = jnp.arange(sps_table.shape[0])
        sps_table = jnp.ones_like(sps_table) if tokens is None else jnp.where(budget <= tokens, 1.0, 1e-9)
        draft_seconds = jnp.float32(-1.0)
        sched = dataclasses.replace(sched, skipped=jnp.zeros_like(sched.skipped),
                                    stale_survival=jnp.ones_like(sched.stale_survival),
                                    mean_survival=jnp.ones_like(sched.mean_survival))
    else:
        raise ValueError(f"mode must be 'skip' or 'drafted', got {mode!r}")
    return dataclasses.replace(state, schedule=sched), (sps_table.astype(jnp.float32), draft_seconds)


def loop_round_seconds(engine: "Engine", width: int, mode: str, prompts, rounds: int, tokens: int | None = None) -> float:
    """Seconds per round of ``engine``'s own decoding loop at ``width`` with ``prompts`` (one per
    row, ``width`` of them) just inserted, the skip decision forced (``forced_costs``; ``mode``
    "ar" for an AR engine; ``tokens``: the verified tokens of a drafted round; forced skips run
    as AR steps where the engine runs known skips so, ``Engine(anchor_steps=True)``). The
    requests are replaced on every call; none may end inside it."""
    engine.running.clear()
    engine.waiting.clear()
    for p in prompts[:width]:
        engine.submit(p)
    engine.admit()
    costs = engine._costs[width]
    if mode != "ar":
        engine.state, costs = forced_costs(engine.state, costs, mode, tokens)
    jax.block_until_ready(engine.state)
    start = time.perf_counter()
    known = jnp.int32(rounds) if mode == "skip" and engine.anchor_steps else None  # a run of skips, as the engine runs it
    engine.state, out = generate(engine.target, engine.draft, engine.state, *costs, known, scfg=engine.scfg,
                                 tcfg=engine.tcfg, max_steps=rounds, width=width, anchor_steps=engine.anchor_steps)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / rounds
    if mode != "ar":
        stats = engine.state.stats
        skipped = np.asarray(stats.skipped[:width])
        verified = int(np.asarray(stats.verified[:width]).sum())
        held = (skipped == (rounds if mode == "skip" else 0)).all() and (tokens is None or verified == tokens * rounds)
        if not held:
            raise RuntimeError(f"timing {mode!r} rounds: the forced decision did not hold (skipped {skipped.tolist()} "
                               f"of {rounds}, {verified} tokens verified" + (f", forced {tokens * rounds})" if tokens else ")"))
    return seconds


def profile_widths(target, tcfg, draft, dcfg, slots: int, block_size: int | None = None, context: int = 128,
                   repeats: int = 7, rounds: int = 4, seed: int = 0) -> dict:
    """``{width: SPSProfile}`` for every width an engine of ``slots`` rows runs, timed where the
    engine spends its time: rounds of its own decoding loop (``generate`` at that width, the
    decision forced by ``loop_round_seconds``) that draft and verify each packed bucket's
    worth of tokens (``speculative.packed_buckets``), and rounds that skip drafting; ``rounds``
    per call (the engine's ``steps_per_call``: each call's host overhead is shared out over its
    rounds), every kind in turn ``repeats`` times, on random prompts of ``context`` tokens with
    no EOS. Separate jitted calls miss what a round costs in the loop (on a 2-core CPU a drafted
    round at width 1 measured ~3.4 AR steps in the loop and ~2.4 as separate calls), and
    buckets timed one after another take the machine's drift for their shape: a scheduler
    reading either drafts where drafting does not pay. ``level_profile`` makes the table;
    ``draft_seconds`` is what a skipped round saves, so ``schedule.drafting_pays`` compares
    against the loop's own skipped-round cost."""
    if min(context, repeats, rounds) < 1:
        raise ValueError(f"profile_widths needs context, repeats and rounds >= 1, got {context}, {repeats}, {rounds}")
    K = block_size or dcfg.block_size
    max_new = rounds * (K + 1)
    no_eos = dataclasses.replace(tcfg, eos_token_ids=())  # no timed row may end early
    engine = Engine(target, no_eos, draft, dcfg, slots=slots, max_len=context + max_new + K + 2, max_new_tokens=max_new,
                    scheduler="algorithm1", block_size=K)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, tcfg.vocab_size, context).tolist() for _ in range(slots)]
    profiles = {}
    for w in engine.widths:
        kinds = [("skip", None)] + [("drafted", size) for size in spec.packed_buckets(w, K)]
        loop_round_seconds(engine, w, "skip", prompts, rounds)  # compile (every kind runs one program)
        times = {kind: [] for kind in kinds}
        for _ in range(repeats):
            for kind in kinds:
                times[kind].append(loop_round_seconds(engine, w, kind[0], prompts, rounds, kind[1]))
        drafted = {size: t for (mode, size), t in times.items() if mode == "drafted"}
        profiles[w] = level_profile(drafted, times[("skip", None)], w * (K + 1))
    return profiles


def level_profile(drafted: dict[int, Sequence[float]], skipped: Sequence[float], max_tokens: int) -> schedule_lib.SPSProfile:
    """A width's SPS profile from in-loop round times taken in turn: ``drafted {bucket: [s]}``
    (rounds verifying that many tokens) and ``skipped [s]``. The full bucket's round costs its
    median; every other kind costs that times the median of its per-turn ratio to the full
    round, so machine drift between turns cancels (a difference of two medians swung 0.5-2.4 ms
    at width 1 on this CPU). ``draft_seconds`` = the anchors-only bucket's round less the
    skipped round (what skipping the drafting saves)."""
    full = max(drafted)
    base = np.asarray(drafted[full])
    level = float(np.median(base))
    relative = lambda times: level * float(np.median(np.asarray(times) / base))
    seconds = {size: relative(times) for size, times in drafted.items()}
    saved = min(max(seconds[min(drafted)] - relative(skipped), 0.0), 0.95 * min(seconds.values()))
    return schedule_lib.profile_from_bucket_times(seconds, max_tokens, saved)


class Engine:
    """Continuous batching over ``slots`` device rows (see the module docstring).

    ``draft``/``dcfg`` None (or ``scheduler='ar'``) decodes autoregressively; else speculative
    rounds with ``scheduler`` (fixed | threshold | algorithm1 | async). ``max_len`` is each
    slot's cache capacity (prompt + new tokens + one round), ``max_new_tokens`` the largest a
    request may ask for (the output buffer), ``steps_per_call`` the rounds between two visits
    of the host (where finished slots are refilled). ``sps_profile`` (algorithm1 / async): one
    ``schedule.SPSProfile`` for every width or ``{width: profile}`` (``profile_widths``).
    ``anchor_steps``: the rounds a call knows will skip drafting run first as plain AR steps
    (``speculative.anchor_steps``; False: as skipped rounds, for comparison)."""

    def __init__(self, target, tcfg, draft=None, dcfg=None, *, slots: int = 8, max_len: int = 512,
                 max_new_tokens: int = 128, scheduler: str | None = None, block_size: int | None = None,
                 confidence_threshold: float = 0.0, sps_profile=None, calibration=None, min_expected: float = 0.0,
                 steps_per_call: int = 4, prefill_chunk: int = PREFILL_CHUNK, tokenizer=None, chat_template=None,
                 anchor_steps: bool = True):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.target, self.tcfg, self.draft = target, tcfg, draft
        self.slots, self.max_len, self.steps_per_call, self.prefill_chunk = slots, max_len, steps_per_call, prefill_chunk
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.max_new_tokens, self.buffer_len = max_new_tokens, bucket(max_new_tokens)
        if scheduler == "ar" or draft is None:
            self.scfg, K = None, 0
        else:
            family = family_of(dcfg)
            if family.name != "dspark":  # slots hold a KVCache drafter context (DSpark / DFlash)
                raise ValueError(f"the engine serves DSpark / DFlash drafters; a {family.name!r} drafter runs "
                                 f"through speculative_generate")
            family.check_compatible(dcfg, tcfg)
            K = block_size or dcfg.block_size
            if scheduler is not None and scheduler not in schedule_lib.SCHEDULERS:  # no plug-ins here
                raise ValueError(f"unknown scheduler {scheduler!r} (one of ar, {', '.join(schedule_lib.SCHEDULERS)})")
            scheduler = spec.check_scheduler_applies(draft, dcfg, scheduler, confidence_threshold)
            self.scfg = spec.SpecConfig(target=tcfg, draft=dcfg, block_size=K if K != dcfg.block_size else 0,
                                        eos_ids=tcfg.eos_token_ids, scheduler=scheduler, prefill_chunk=prefill_chunk)
        self.extra_cache = K + 1 if K else 0
        self.widths = engine_widths(slots)
        no_costs = {w: (None, None) for w in self.widths}  # AR rounds read no profile
        self._costs = self._width_costs(K, sps_profile) if self.scfg is not None else no_costs
        self.state = self._empty_state(K, confidence_threshold, calibration, min_expected)
        self.row_moves = 0  # requests moved down to a lower free slot (``_pack``)
        self.inserted = 0  # requests prefilled into a slot
        self.anchor_steps = anchor_steps  # rounds known to skip drafting run as AR steps (``generate``)
        self.anchor_steps_run = 0  # rounds the engine ran that way
        self.anchor_calls = 0  # calls that ran only such steps (the count known from an earlier report)
        self._skips_known = 0  # rounds still known to skip drafting (0 once a row was inserted, moved or finished)
        self.widths_run: list[int] = []  # the width of every generate call, in order
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._seen = np.zeros(slots, np.int64)

    @property
    def scheduler(self) -> str:
        return "ar" if self.scfg is None else self.scfg.scheduler

    def _width_costs(self, K, sps_profile) -> dict[int, tuple[jax.Array, jax.Array]]:
        """Per compiled width: the SPS table (steps/s by verified tokens, cut or extended flat
        to the slots' largest budget) and the drafting's seconds per round. ``sps_profile``:
        one ``schedule.SPSProfile`` for every width, or ``{width: profile}`` (``profile_widths``:
        a round of fewer rows drafts and verifies cheaper); None: the synthetic linear one."""
        size = self.slots * (K + 1) + 1
        if sps_profile is None:
            sps_profile = schedule_lib.linear_cost_profile(size - 1)
        if not isinstance(sps_profile, dict):
            sps_profile = {w: sps_profile for w in self.widths}
        missing = [w for w in self.widths if w not in sps_profile]
        if missing:
            raise ValueError(f"sps_profile has no profile for widths {missing} (an engine of {self.slots} slots runs "
                             f"widths {list(self.widths)}; engine.profile_widths measures them)")
        return {w: (jnp.asarray(sps_profile[w].budget_table(size - 1)), jnp.float32(sps_profile[w].draft_seconds))
                for w in self.widths}

    def _empty_state(self, K, threshold, calibration, min_expected) -> DecodeState:
        B, S, dtype = self.slots, self.max_len, self.target.embed.dtype
        fields = {}
        if self.scfg is not None:
            table, draft_seconds = self._costs[B]
            fields = dict(
                draft_cache=draft_model.init_context_cache(self.scfg.draft, B, S, dtype),
                schedule=spec.init_schedule_state(B, K, threshold, np.asarray(table), calibration, min_expected,
                                                  float(draft_seconds)),
                stats=spec.init_stats(B, K),
            )
        return DecodeState(
            output=jnp.zeros((B, self.buffer_len), jnp.int32), num_generated=jnp.zeros((B,), jnp.int32),
            done=jnp.ones((B,), bool), anchor=jnp.zeros((B,), jnp.int32),
            target_cache=target_model.init_cache(self.tcfg, B, S, dtype),
            key=jax.random.split(jax.random.key(0), B), max_new_tokens=jnp.zeros((B,), jnp.int32),
            stop_ids=jnp.full((B, MAX_STOP_IDS), -1, jnp.int32),
            sampling=RowSampling.of([Sampling()] * B), **fields,
        )

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: Sequence[int] | None = None, *, messages=None, sampling: Sampling = Sampling(),
               max_new_tokens: int | None = None, stop: Sequence[int] = (), seed: int | None = None) -> int:
        """Queue a request (token ids, or chat ``messages`` with the engine's tokenizer and
        template); returns its id. ``max_new_tokens`` defaults to the engine's; ``seed`` to the
        request id. Validated here, before anything runs."""
        if max_new_tokens is None:
            max_new_tokens = self.max_new_tokens
        if (prompt is None) == (messages is None):
            raise ValueError("give either prompt token ids or messages")
        stop = tuple(int(t) for t in stop)
        if messages is not None:
            if self.tokenizer is None or self.chat_template is None:
                raise ValueError("messages need an engine built with tokenizer= and chat_template=")
            from .chat import encode_chat, end_of_turn_id

            prompt = encode_chat(self.tokenizer, self.chat_template, messages)
            end = end_of_turn_id(self.tokenizer, self.chat_template)
            stop = stop + ((end,) if end is not None and end not in stop else ())
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt; a request needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.tcfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {self.tcfg.vocab_size})")
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_new_tokens} (the engine's max_new_tokens), "
                             f"got {max_new_tokens}")
        if len(stop) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids per request, got {len(stop)}")
        check_context(len(prompt), max_new_tokens, self.tcfg.max_position_embeddings)
        need = len(prompt) + max_new_tokens + self.extra_cache
        if need > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} needs {need} cache "
                             f"positions; the engine's slots hold max_len={self.max_len}")
        rid = next(self._ids)
        req = Request(rid, prompt, sampling, int(max_new_tokens), stop, rid if seed is None else int(seed),
                      time.perf_counter())
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def _insert(self, slot: int, req: Request):
        started = time.perf_counter()
        P = prompt_bucket(len(req.prompt), self.prefill_chunk)
        tokens = np.zeros((1, P), np.int32)
        tokens[0, : len(req.prompt)] = req.prompt
        stop = np.full((1, MAX_STOP_IDS), -1, np.int32)
        stop[0, : len(req.stop)] = req.stop
        self.state = insert(
            self.target, self.draft, self.state, jnp.int32(slot), jnp.asarray(tokens),
            jnp.asarray([len(req.prompt)], jnp.int32), jax.random.key(req.seed)[None],
            jnp.asarray([req.max_new_tokens], jnp.int32), jnp.asarray(stop), RowSampling.of([req.sampling]),
            scfg=self.scfg, tcfg=self.tcfg, prefill_chunk=self.prefill_chunk,
        )
        req.slot, req.started_at = slot, started
        self.running[slot] = req
        self.inserted += 1
        self._skips_known = 0
        self._seen[slot] = 0

    def admit(self):
        """Prefill waiting requests into the free slots, first come, first served, each into the
        lowest free one (with ``_pack``, the running requests stay in the lowest rows)."""
        for slot in range(self.slots):
            if slot not in self.running and self.waiting:
                self._insert(slot, self.waiting.popleft())

    @property
    def width(self) -> int:
        """The rows the next ``generate`` runs: the smallest compiled width holding every running slot."""
        return width_for(max(self.running, default=0) + 1, self.slots)

    def _pack(self):
        """Move the highest running requests down into the free slots below them (``move_row``),
        so the running ones fill rows ``[0:n]`` and the next rounds run the smallest width
        (after ``admit``: a slot the queue refills needs no move)."""
        n = len(self.running)
        holes = [slot for slot in range(n) if slot not in self.running]
        above = sorted((slot for slot in self.running if slot >= n), reverse=True)
        for dst, src in zip(holes, above):
            self.state = move_row(self.state, jnp.int32(src), jnp.int32(dst))
            req = self.running.pop(src)
            req.slot = dst
            self.running[dst] = req
            self._seen[dst] = self._seen[src]
            self.row_moves += 1
            self._skips_known = 0

    def step(self) -> dict[int, list[int]]:
        """Refill free slots from the queue (``admit``), move running requests down into the
        slots it could not fill (``_pack``), run ``steps_per_call`` rounds on the running rows'
        width, and return each running request's newly committed ids ``{request id: ids}``."""
        self.admit()
        if not self.running:
            return {}
        self._pack()
        width = self.width
        self.widths_run.append(width)
        sps_table, draft_seconds = self._costs[width]
        # a run of skips read from an earlier report holds while no row is inserted, moved or
        # finished (the decision reads the rows' past rounds, their live flags and the width's
        # costs, and the run only counts down): the call runs it without deciding it again
        anchors_only = self._skips_known >= self.steps_per_call
        known = jnp.int32(self._skips_known) if anchors_only else None
        self.state, report = generate(
            self.target, self.draft, self.state, sps_table, draft_seconds, known,
            scfg=self.scfg, tcfg=self.tcfg, max_steps=self.steps_per_call, width=width, anchor_steps=self.anchor_steps)
        report = np.asarray(report)
        counts, done, rounds, verified, ran, skips = report[:, : len(REPORT_COLUMNS)].T
        output = report[:, len(REPORT_COLUMNS):]
        self.anchor_steps_run += int(ran[0])
        self.anchor_calls += anchors_only
        finished = any(done[slot] for slot in self.running)
        self._skips_known = 0 if finished else int(skips[0])
        now = time.perf_counter()
        new = {}
        for slot, req in list(self.running.items()):
            ids = output[slot, self._seen[slot]: counts[slot]].tolist()
            self._seen[slot] = counts[slot]
            if ids:
                if req.first_token_at is None:
                    req.first_token_at = now
                req.tokens += ids
                new[req.id] = ids
            if self.scfg is not None:
                req.rounds, req.verified = int(rounds[slot]), int(verified[slot])
            else:
                req.rounds = req.verified = max(len(req.tokens) - 1, 0)
            if done[slot]:
                req.finished_at = now
                del self.running[slot]
        return new

    def run_until_done(self) -> dict[int, list[int]]:
        """Step until every submitted request finished; returns ``{request id: ids}``."""
        while self.waiting or self.running:
            self.step()
        return {rid: r.tokens for rid, r in self.requests.items()}

    def result(self, rid: int) -> list[int]:
        """The ids request ``rid`` committed so far (all of them once it is done)."""
        return self.requests[rid].tokens
