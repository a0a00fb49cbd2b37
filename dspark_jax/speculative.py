"""Lossless batched speculative decoding: one round as a pure function, the loop in one
``jax.lax.while_loop``.

One round, per sequence b (all vectorised over the batch):
  1. draft a block [d_1..d_K] from the anchor (the last committed token, not yet in the
     target cache) and the drafter's context cache;
  2. choose how many drafts to verify, l_b <= K (all of them, or the prefix whose
     confidences pass a threshold; capped so the round fits the cache);
  3. verify [anchor, d_1..d_K] with the target in one forward, written at the sequence's offset;
  4. accept d_k with probability min(1, p_{k-1}(d_k) / q_k(d_k)) left to right, up to l_b;
     at the first rejection draw the bonus from norm(max(0, p_n - q_{n+1})), else from p_{l_b};
  5. commit the n accepted drafts and the bonus (stopping at an EOS), advance the target
     cache by n + 1 (anchor + accepted: rejected entries are simply never read), append the
     target features of those n + 1 positions to the draft context cache; bonus = new anchor.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import draft as draft_model
from . import target as target_model
from .drafters import drafter_state_bytes, family_of
from .cache import KVCache
from .config import Qwen3Config
from .commit import SHARED, DecodeState, commit
from .commit import start as start_state
from .decoding import (PREFILL_CHUNK, ar_step_with_features, loop_until_done, pad_batch,  # noqa: F401 (re-exported)
                       prefill, prepare_batch, row_sampling, run_target)
from .sharding import Mesh, constrain_cache, sharded_forward_packed
from .draft import DraftConfig, DraftParams
from . import schedule as schedule_lib
from .sampling import RowSampling, Sampling, distribution, sample, sample_logits, split, uniform
from .target import Qwen3Params
from .validate import UsageError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecStats:
    """Per-sequence counters (sum them over the batch for run totals)."""

    rounds: jax.Array  # [B]
    accepted: jax.Array  # [B] accepted drafts, summed over rounds
    proposed: jax.Array  # [B] drafts offered for verification (sum of l_b)
    verified: jax.Array  # [B] tokens the target ran for verification
    reached: jax.Array  # [B, K] rounds in which position k was proposed and all before it accepted
    accepted_at: jax.Array  # [B, K] rounds in which position k was accepted
    expected_accepted: jax.Array  # [B] float32: sum of survival probabilities of the verified drafts
    compute_tokens: jax.Array  # [] tokens the target actually ran (packed bucket sizes, or B*(K+1))
    skipped: jax.Array  # [B] rounds that ran one AR step instead of drafting (see ``skip_drafting``)

    def batch_axes(self) -> "SpecStats":
        """Per-row counters on axis 0; the run's compute total is shared (``DecodeState.batch_axes``)."""
        return dataclasses.replace(jax.tree.map(lambda _: 0, self), compute_tokens=SHARED)


def init_stats(batch: int, num_drafts: int) -> SpecStats:
    """Zero counters (distinct buffers: the state is donated)."""
    zeros = lambda *shape: jnp.zeros((batch,) + shape, jnp.int32)
    return SpecStats(zeros(), zeros(), zeros(), zeros(), zeros(num_drafts), zeros(num_drafts),
                     jnp.zeros((batch,), jnp.float32), jnp.zeros((), jnp.int32), zeros())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecTrace:
    proposed: jax.Array  # [B, R, K] drafts offered (-1 past l_b)
    accepted: jax.Array  # [B, R]
    bonus: jax.Array  # [B, R]
    confidence_logits: jax.Array  # [B, R, K] along the drafted path (all K, offered or not)

    def batch_axes(self) -> "SpecTrace":
        return jax.tree.map(lambda _: 0, self)


SpecState = DecodeState  # the decode core's state, with the drafter context (the family's state), scheduler, stats and trace


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScheduleState:
    """What the verification scheduler reads (traced: changing values does not recompile)."""

    threshold: jax.Array  # [] static-threshold scheduler
    sps_table: jax.Array  # [B_max + 1] target verification steps/s by token budget
    temperatures: jax.Array  # [2, K] STS temperatures of the confidence logits: sampled rows, greedy rows
    stale_survival: jax.Array  # [2, B, K] survival of the two previous drafted rounds
    mean_survival: jax.Array  # [B, K] each row's survival over its drafted rounds (``SURVIVAL_DECAY``)
    min_expected: jax.Array | None = None  # [B]: a row whose last expected acceptance is below it verifies nothing
    draft_seconds: jax.Array | None = None  # [] the drafting's share of a step (schedule.SPSProfile.draft_seconds)
    skipped: jax.Array | None = None  # [] consecutive rounds that skipped drafting
    refresh_after: jax.Array | None = None  # [] skips in a row before a drafted round refreshes (``skip_drafting``)

    def batch_axes(self) -> "ScheduleState":
        """The confidence history ``[2, B, K]``, ``mean_survival [B, K]`` and ``min_expected [B]``
        are per row; the rest is the batch's (``DecodeState.batch_axes``)."""
        axes = dataclasses.replace(jax.tree.map(lambda _: SHARED, self), stale_survival=1, mean_survival=0)
        return axes if self.min_expected is None else dataclasses.replace(axes, min_expected=0)


def regime_temperatures(temperatures, num_drafts: int) -> np.ndarray:
    """STS temperatures as ``[2, K]`` (sampled rows, greedy rows) from None (all ones), one set
    ``[K]`` for both, a ``schedule.Calibration`` (its sampled and greedy sets, cut to K) or
    ``[2, K]``; a set of another length is an error (never stretched to fit a wrong file)."""
    if temperatures is None:
        temperatures = np.ones(num_drafts, np.float32)
    if isinstance(temperatures, schedule_lib.Calibration):
        temperatures = np.stack([temperatures.temperatures[:num_drafts], temperatures.for_greedy()[:num_drafts]])
    temperatures = np.asarray(temperatures, np.float32)
    if temperatures.ndim == 1:
        temperatures = np.stack([temperatures, temperatures])
    if temperatures.shape != (2, num_drafts):
        raise ValueError(f"{temperatures.shape[-1]} STS temperatures for {num_drafts} drafts per round")
    return temperatures


def confidence_temperatures(temperatures: jax.Array, sampling) -> jax.Array:
    """The STS temperatures ``[K]`` (one ``Sampling``) or ``[B, K]`` (per-row ``RowSampling``)
    of each row's regime: greedy rows read the greedy set (``schedule.Calibration``)."""
    if isinstance(sampling, RowSampling):
        return jnp.where((sampling.temperature == 0)[:, None], temperatures[1], temperatures[0])
    return temperatures[1 if sampling.greedy else 0]


def init_schedule_state(batch: int, num_drafts: int, threshold: float = 0.0, sps_table=None, temperatures=None,
                        min_expected: float = 0.0, draft_seconds: float = 0.0):
    from .schedule import linear_cost_profile

    if sps_table is None:
        sps_table = linear_cost_profile(batch * (num_drafts + 1)).table
    temperatures = regime_temperatures(temperatures, num_drafts)
    return ScheduleState(
        threshold=jnp.float32(threshold),
        sps_table=jnp.asarray(sps_table, jnp.float32),
        temperatures=jnp.asarray(temperatures),
        # before two rounds have passed, the async budget assumes every draft survives
        stale_survival=jnp.ones((2, batch, num_drafts), jnp.float32),
        mean_survival=jnp.ones((batch, num_drafts), jnp.float32),
        min_expected=jnp.full((batch,), min_expected, jnp.float32),
        skipped=jnp.zeros((), jnp.int32),
        refresh_after=jnp.int32(FIRST_REFRESH),
        draft_seconds=jnp.float32(draft_seconds),
    )


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Everything static about a speculative run (a jit static argument)."""

    target: Qwen3Config
    draft: DraftConfig
    sampling: Sampling = Sampling()
    block_size: int = 0  # drafts per round; 0 = the drafter's block_size
    eos_ids: tuple[int, ...] = ()
    trace_rounds: int = 0  # 0 = no trace
    mesh: Mesh | None = None  # (data, model) mesh: the target runs tensor-parallel
    scheduler: str = "fixed"  # fixed | threshold | algorithm1 | async | a plug-in's import path
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per prefill forward

    @property
    def num_drafts(self) -> int:
        return self.block_size or self.draft.block_size

    @property
    def may_skip_drafting(self) -> bool:
        """The budget schedulers may run a round as one AR step (``skip_drafting``)."""
        return self.scheduler in ("algorithm1", "async")

    @property
    def packed(self) -> bool:
        """Every scheduler but 'fixed' verifies a packed, bucketed token axis."""
        return self.scheduler != "fixed"


def no_confidence_hint(dcfg) -> str:
    """Why a drafter without a confidence head has none, where that is a choice."""
    if family_of(dcfg).name == "eagle3":
        return ("; Eagle-3 has none (and its draft probability q(d_k) depends on d_k itself, so a schedule "
                "read from it would not be lossless): use the 'fixed' scheduler")
    return ""


def check_scheduler_applies(draft, dcfg, scheduler: str | None, confidence_threshold: float = 0.0) -> str:
    """The scheduler a request runs (None: 'threshold' with a threshold, else 'fixed'), checked
    against the drafter before anything compiles: every scheduler but 'fixed' reads the
    confidence head, and a drafter without one is refused with a ``UsageError`` (an option
    that contradicts the drafter given)."""
    if confidence_threshold > 0 and draft.confidence is None:
        raise UsageError("confidence_threshold > 0 needs a drafter with a confidence head (enable_confidence_head)"
                         + no_confidence_hint(dcfg))
    if not 0 <= confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    scheduler = scheduler or ("threshold" if confidence_threshold > 0 else "fixed")
    schedule_lib.check_scheduler(scheduler)
    if scheduler != "fixed" and draft.confidence is None:
        raise UsageError(f"scheduler {scheduler!r} needs a drafter with a confidence head (enable_confidence_head)"
                         + no_confidence_hint(dcfg))
    return scheduler


def verify_lengths(confidence_logits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Static-threshold schedule: the longest prefix whose every confidence >= threshold."""
    return schedule_lib.threshold_lengths(jax.nn.sigmoid(confidence_logits), threshold)


def schedule_lengths(scheduler: str, confidence_logits, survival, live, sched: ScheduleState):
    """Drafts to verify per sequence ``[B]`` and the scheduler state for the next round, from
    the calibrated confidence logits ``[B, K]`` (divided by their STS temperatures) and the
    survival they make.

    Every rule decides "verify draft j" from confidences computed before draft j was sampled
    (c_j uses the previous token only), which is what keeps each of them lossless; 'async'
    sizes its budget from the survival of two rounds ago and admits the fresh top-K."""
    B, K = survival.shape
    if scheduler == "fixed":
        return jnp.full((B,), K, jnp.int32), sched
    # every confidence scheduler keeps the survival of its last two rounds (async's budget,
    # the draft-skip decision of the next rounds)
    pushed = dataclasses.replace(sched, stale_survival=jnp.stack([sched.stale_survival[1], survival]),
                                 mean_survival=SURVIVAL_DECAY * sched.mean_survival + (1 - SURVIVAL_DECAY) * survival)
    if scheduler == "threshold":
        return verify_lengths(confidence_logits, sched.threshold), pushed
    if scheduler == "algorithm1":
        return schedule_lib.algorithm1(survival, live, sched.sps_table), pushed
    if scheduler == "async":
        budget = schedule_lib.budget_from_stale(sched.stale_survival[0], live, sched.sps_table)
        return schedule_lib.top_k_lengths(survival, live, budget), pushed
    if scheduler not in schedule_lib.SCHEDULERS:  # a plug-in (package.module:function)
        return schedule_lib.plugin_lengths(scheduler, survival, live, sched)
    raise ValueError(f"unknown scheduler {scheduler!r} (one of {', '.join(schedule_lib.SCHEDULERS)})")


def packed_buckets(batch: int, num_drafts: int) -> tuple[int, ...]:
    """Static sizes of the packed verification axis: doubling from one block (K + 1 tokens, or
    the batch if larger) up to the full batch x (K + 1); each is compiled once inside the loop
    (a ``lax.switch`` branch). No bucket is smaller than a block: a forward over fewer tokens
    reads the same weights (decoding is weight-bound), while every branch of the switch costs
    the loop. On a 2-core CPU at width 1, in the engine's loop (one process, 15 alternations),
    one bucket made a round verifying all 7 drafts 3.12 AR steps against 3.50 with the four
    buckets 1..8, and a round verifying the anchor alone 2.99 against 2.50: the full block is
    what a drafted round verifies there (a flat cost table admits every surviving draft)."""
    full = batch * (num_drafts + 1)
    sizes, n = [], max(batch, num_drafts + 1, 1)
    while n < full:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (full,)


def packed_layout(lengths, live, chunk_len: int, size: int):
    """Where the anchor + ``lengths[b]`` drafts of every live sequence sit on a packed axis of
    ``size`` tokens: (sequence id ``[size]``, batch padding = B; row ``[size]``; slot
    ``[size]``), with each sequence's ``starts [B]`` and token ``counts [B]``."""
    B = lengths.shape[0]
    counts = jnp.where(live, lengths + 1, 0)
    ends = jnp.cumsum(counts)
    starts = ends - counts
    i = jnp.arange(size)
    seq = jnp.searchsorted(ends, i, side="right").astype(jnp.int32)
    row = jnp.minimum(seq, B - 1)
    slot = jnp.clip(i - starts[row], 0, chunk_len - 1)
    return jnp.where(i < ends[-1], seq, B), row, slot, starts, counts


def packed_read(target, tcfg, cache: KVCache, verify_tokens, lengths, live, feature_layers, mesh=None,
                buckets: Sequence[int] | None = None, pad_to: int | None = None):
    """The target over ``[anchor, d_1..d_l]`` of every live sequence on one packed token axis,
    reading the cache only: logits ``[B, T, V]`` and features ``[B, T, F]`` unpacked (entries
    past l_b repeat the last verified one and are never read), the new keys/values padded to
    ``pad_to`` tokens (default: the largest bucket; for ``packed_write``) and the bucket size used.

    The axis is padded to the smallest of ``buckets`` (default ``packed_buckets``) that holds
    every token, so verifying fewer tokens runs a smaller forward (one ``lax.switch`` branch
    per bucket)."""
    B, T = verify_tokens.shape
    every_bucket = packed_buckets(B, T - 1)
    buckets = tuple(buckets or every_bucket)
    largest = pad_to or every_bucket[-1]

    def branch(size):
        def run(cache):
            seq_ids, row, slot, starts, counts = packed_layout(lengths, live, T, size)
            args = (verify_tokens[row, slot], seq_ids, slot, cache)
            kw = dict(chunk_len=T, feature_layers=feature_layers)
            if mesh is None:
                out, (new_k, new_v) = target_model.forward_packed(target, tcfg, *args, **kw)
            else:
                out, (new_k, new_v) = sharded_forward_packed(mesh, target, tcfg, *args, **kw)
            unpack = starts[:, None] + jnp.minimum(jnp.arange(T)[None, :], jnp.maximum(counts - 1, 0)[:, None])
            unpack = jnp.minimum(unpack, size - 1)
            pad = ((0, 0), (0, largest - size), (0, 0), (0, 0))
            pad_all = lambda kv: jax.tree.map(lambda a: jnp.pad(a, pad), kv)  # a pytree per layer type (Gemma 4)
            return out.logits[unpack, 0], out.features[unpack, 0], pad_all(new_k), pad_all(new_v)

        return run

    total = jnp.sum(jnp.where(live, lengths + 1, 0))
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets), total, side="left"), len(buckets) - 1)
    logits, features, new_k, new_v = jax.lax.switch(index, [branch(n) for n in buckets], cache)
    return logits, features, (new_k, new_v), jnp.asarray(buckets, jnp.int32)[index]


def packed_write(cache: KVCache, new_kv, lengths, live, chunk_len: int) -> KVCache:
    """Write ``packed_read``'s new keys/values (lengths not advanced): once per round, after
    whatever chose what was computed, so no branch returns (and copies) a cache."""
    new_k, new_v = new_kv
    size = jax.tree.leaves(new_k)[0].shape[1]
    seq_ids, _, slot, _, _ = packed_layout(lengths, live, chunk_len, size)
    return target_model.write_packed(cache, new_k, new_v, seq_ids, slot)


def packed_verify(target, tcfg, cache: KVCache, verify_tokens, lengths, live, feature_layers, mesh=None):
    """Verify ``[anchor, d_1..d_l]`` of every live sequence on one packed token axis
    (``packed_read``, then ``packed_write``): logits ``[B, K+1, V]``, features
    ``[B, K+1, F]``, the cache (new entries written, lengths not advanced), the bucket size."""
    logits, features, new_kv, size = packed_read(target, tcfg, cache, verify_tokens, lengths, live, feature_layers,
                                                 mesh)
    cache = packed_write(cache, new_kv, lengths, live, verify_tokens.shape[1])
    return logits, features, cache, size


def accept_drafts(
    key: jax.Array,
    drafts: jax.Array,
    q: jax.Array,
    p: jax.Array,
    target_logits: jax.Array,
    lengths: jax.Array,
    sampling: "Sampling | RowSampling",
) -> tuple[jax.Array, jax.Array]:
    """The lossless accept/reject rule for a batch of blocks.

    drafts ``[B, K]``, q ``[B, K, V]`` (draft distributions sampled from), p ``[B, K+1, V]``
    (target distributions after anchor, d_1, ..., d_K), target_logits ``[B, K+1, V]``,
    lengths ``[B]`` = number of drafts offered (l_b <= K). Returns (n accepted ``[B]``,
    bonus ``[B]``).
    """
    B, K = drafts.shape
    k_accept, k_bonus = split(key)
    p_of_draft = jnp.take_along_axis(p[:, :K], drafts[..., None], -1)[..., 0]
    q_of_draft = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    u = uniform(k_accept, (B, K))
    ok = (u * q_of_draft < p_of_draft) & (jnp.arange(K)[None, :] < lengths[:, None])
    n = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1).astype(jnp.int32)

    p_n = jnp.take_along_axis(p, n[:, None, None], 1)[:, 0]
    if sampling.greedy:
        bonus = jnp.argmax(jnp.take_along_axis(target_logits, n[:, None, None], 1)[:, 0], -1)
        return n, bonus.astype(jnp.int32)
    q_next = jnp.take_along_axis(q, jnp.minimum(n, K - 1)[:, None, None], 1)[:, 0]
    residual = jnp.maximum(p_n - q_next, 0.0)
    mass = jnp.sum(residual, -1, keepdims=True)
    rejected = (n < lengths)[:, None]
    # p == q up to rounding leaves no residual mass; then any rejection had probability ~0.
    bonus_dist = jnp.where(rejected & (mass > 0), residual / jnp.where(mass > 0, mass, 1.0), p_n)
    return n, sample(k_bonus, bonus_dist)


def draft_phase(key, target: Qwen3Params, draft: DraftParams, s: SpecState, scfg: SpecConfig
                ) -> tuple[draft_model.DraftBlock, object]:
    """Draft a block ``[B, K]`` from each anchor and the drafter's state (returned with the
    block: ``drafters`` families may carry what the proposal computed)."""
    sampling = row_sampling(s, scfg.sampling)
    family = family_of(scfg.draft)
    return family.propose(key, draft, scfg.draft, target, s.draft_cache, s.anchor, sampling, scfg.num_drafts)


def schedule_phase(s: SpecState, block, scfg: SpecConfig):
    """Drafts to verify per sequence ``[B]`` (capped so the round fits the cache), the
    survival probabilities ``[B, K]`` and the scheduler state for the next round."""
    temperatures = confidence_temperatures(s.schedule.temperatures, row_sampling(s, scfg.sampling))
    calibrated = block.confidence_logits.astype(jnp.float32) / temperatures
    survival = schedule_lib.survival(calibrated)  # [B, K]
    lengths, sched = schedule_lengths(scfg.scheduler, calibrated, survival, ~s.done, s.schedule)
    if scfg.may_skip_drafting:
        lengths = jnp.where(too_low_to_pay(s), 0, lengths)
    # the round writes target entries at L .. L + l_b: keep them inside the cache
    lengths = jnp.clip(jnp.minimum(lengths, s.target_cache.max_len - 1 - s.target_cache.lengths), 0, scfg.num_drafts)
    return lengths, survival, sched


def verify_phase(target: Qwen3Params, s: SpecState, block, lengths, scfg: SpecConfig):
    """Run the target over ``[anchor, d_1..d_K]``: logits ``[B, K+1, V]``, features ``[B, K+1, F]``,
    what the cache receives (packed: the new keys/values for ``packed_write``; else the
    cache with them written; lengths not yet advanced) and the tokens computed."""
    verify_tokens = jnp.concatenate([s.anchor[:, None], block.tokens], axis=1)
    feature_layers = scfg.draft.target_layer_ids
    if scfg.packed:
        return packed_read(target, scfg.target, s.target_cache, verify_tokens, lengths, ~s.done, feature_layers,
                           scfg.mesh)
    out, cache = run_target(target, scfg.target, verify_tokens, s.target_cache, feature_layers=feature_layers,
                            mesh=scfg.mesh)
    B, T = verify_tokens.shape
    return out.logits, out.features, cache, jnp.int32(B * T)


def accept_phase(key, s: SpecState, block, logits, lengths, scfg: SpecConfig):
    """Accepted drafts ``n [B]`` and the bonus ``[B]`` by the lossless rule."""
    sampling = row_sampling(s, scfg.sampling)
    return accept_drafts(key, block.tokens, block.probs, distribution(logits, sampling), logits, lengths, sampling)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Verified:
    """What a round computed before anything is written: the drafted path, the schedule, the
    target's verdict, and what the caches receive (``commit_phase`` writes it)."""

    drafts: jax.Array  # [B, K] (zeros when the round skipped drafting)
    confidence_logits: jax.Array  # [B, K] along the drafted path (-inf when skipped)
    draft_state: object  # the drafter family's state after proposing
    lengths: jax.Array  # [B] drafts verified
    survival: jax.Array  # [B, K]
    schedule: ScheduleState
    n: jax.Array  # [B] accepted drafts
    bonus: jax.Array  # [B]
    features: jax.Array  # [B, K+1, F] target features of the verified positions
    target_kv: object  # packed: the new (keys, values) for packed_write; else the written cache
    compute: jax.Array  # [] tokens the target ran


def drafted_round(target, draft, s: SpecState, k_draft, k_accept, scfg: SpecConfig) -> Verified:
    """Draft -> schedule -> verify -> accept."""
    block, draft_state = draft_phase(k_draft, target, draft, s, scfg)
    lengths, survival, sched = schedule_phase(s, block, scfg)
    logits, features, target_kv, compute = verify_phase(target, s, block, lengths, scfg)
    n, bonus = accept_phase(k_accept, s, block, logits, lengths, scfg)
    if scfg.may_skip_drafting:
        sched = dataclasses.replace(sched, skipped=jnp.zeros_like(sched.skipped))
    return Verified(block.tokens, block.confidence_logits, draft_state, lengths, survival, sched, n, bonus, features,
                    target_kv, compute)


def anchor_round(target, s: SpecState, k_accept, scfg: SpecConfig) -> Verified:
    """A round that skips drafting: the target over the anchors alone (one AR step, the
    smallest packed bucket) and the bonus drawn from it, as ``accept_drafts`` draws it when
    nothing is offered (same key, same distribution p_0). Nothing is written here."""
    B, K = s.anchor.shape[0], scfg.num_drafts
    zeros = jnp.zeros((B,), jnp.int32)
    logits, features, target_kv, compute = packed_read(target, scfg.target, s.target_cache, s.anchor[:, None], zeros,
                                                       ~s.done, scfg.draft.target_layer_ids, scfg.mesh, buckets=(B,),
                                                       pad_to=packed_buckets(B, K)[-1])
    _, k_bonus = split(k_accept)
    bonus = sample_logits(k_bonus, logits[:, 0], row_sampling(s, scfg.sampling))
    features = jnp.pad(features, ((0, 0), (0, K), (0, 0)))  # the drafted round's shape; only position 0 is committed
    sched = dataclasses.replace(s.schedule, skipped=s.schedule.skipped + 1)  # the confidence history stays
    return Verified(jnp.zeros((B, K), jnp.int32), jnp.full((B, K), -jnp.inf, jnp.float32), s.draft_cache, zeros,
                    jnp.zeros((B, K), jnp.float32), sched, zeros, bonus.astype(jnp.int32), features, target_kv, compute)


def commit_phase(target: Qwen3Params, draft: DraftParams, s: SpecState, v: Verified, scfg: SpecConfig,
                 **fields) -> SpecState:
    """Write the verified positions' keys/values, commit ``drafts[:, :n]`` then the bonus by the
    decode core's rule; advance the target cache by n + 1 (anchor + accepted: rejected entries
    are never read) and append those positions' target features to the drafter's context.
    The bonus is the new anchor. Every cache write of a round happens here, once."""
    live = ~s.done
    K = v.drafts.shape[1]
    target_cache = packed_write(s.target_cache, v.target_kv, v.lengths, live, K + 1) if scfg.packed else v.target_kv
    slots = jnp.arange(K + 1)[None, :]
    candidates = jnp.where(slots < v.n[:, None], jnp.pad(v.drafts, ((0, 0), (0, 1))), v.bonus[:, None])
    advance = jnp.where(live, v.n + 1, 0)
    target_cache = target_cache.advance(advance)
    output, num_generated, done, _ = commit(s, candidates, v.n + 1, target_cache, scfg.eos_ids)
    draft_cache = family_of(scfg.draft).commit(draft, scfg.draft, target, v.draft_state, v.features, candidates,
                                               advance)
    return dataclasses.replace(s, output=output, num_generated=num_generated, done=done,
                               anchor=jnp.where(live, v.bonus, s.anchor), target_cache=target_cache,
                               draft_cache=draft_cache, schedule=v.schedule, **fields)


def record_phase(s: SpecState, new: SpecState, v: Verified, verified, skipped=False) -> SpecState:
    """Add the round to the statistics (and the trace); ``s`` is the state before the round."""
    live = ~s.done
    drafts, lengths, n, bonus, survival = v.drafts, v.lengths, v.n, v.bonus, v.survival
    K = drafts.shape[1]
    k_idx = jnp.arange(K)[None, :]
    reached = live[:, None] & (k_idx < lengths[:, None]) & (k_idx <= n[:, None])
    stats = s.stats
    stats = SpecStats(
        rounds=stats.rounds + live,
        accepted=stats.accepted + jnp.where(live, n, 0),
        proposed=stats.proposed + jnp.where(live, lengths, 0),
        verified=stats.verified + jnp.where(live, verified, 0),
        reached=stats.reached + reached,
        accepted_at=stats.accepted_at + (reached & (k_idx < n[:, None])),
        expected_accepted=stats.expected_accepted
        + jnp.where(live, jnp.sum(jnp.where(k_idx < lengths[:, None], survival, 0.0), -1), 0.0),
        compute_tokens=stats.compute_tokens + v.compute,
        skipped=stats.skipped + (live & skipped),
    )
    trace = s.trace
    if trace is not None:
        trace = trace_round(trace, live, s.stats.rounds, jnp.where(k_idx < lengths[:, None], drafts, -1), n, bonus,
                            v.confidence_logits)
    return dataclasses.replace(new, stats=stats, trace=trace)


def trace_round(trace: SpecTrace, live, row, proposed, accepted, bonus, confidence_logits) -> SpecTrace:
    """Write one round of every live row into the trace at its round index ``row [B]``."""
    B, R = trace.accepted.shape
    row = jnp.where(live, row, R)
    b = jnp.arange(B)
    return SpecTrace(
        proposed=trace.proposed.at[b, row].set(proposed, mode="drop"),
        accepted=trace.accepted.at[b, row].set(accepted, mode="drop"),
        bonus=trace.bonus.at[b, row].set(bonus, mode="drop"),
        confidence_logits=trace.confidence_logits.at[b, row].set(confidence_logits, mode="drop"),
    )


def trace_skipped(trace: SpecTrace, live, row, token) -> SpecTrace:
    """A round that skipped drafting, as ``record_phase`` traces it: nothing proposed or
    accepted, the committed token as the bonus, confidences -inf."""
    B, K = trace.proposed.shape[0], trace.proposed.shape[2]
    return trace_round(trace, live, row, jnp.full((B, K), -1, jnp.int32), jnp.zeros((B,), jnp.int32), token,
                       jnp.full((B, K), -jnp.inf, jnp.float32))


FIRST_REFRESH = 7  # skipped rounds in a row before one drafted round refreshes the confidences
LAST_REFRESH = 63  # the longest such run: each refresh that still finds nothing to pay doubles it up to here


SURVIVAL_DECAY = 0.5  # weight of a row's earlier drafted rounds in its mean survival (the newest: the rest)
RECORD_PRIOR = 2.0  # pseudo-drafts of a row's record: about one round's worth before it moves the factor much


def record_factor(stats: SpecStats) -> jax.Array:
    """``[B]``: how each row's verified drafts fared against their calibrated survival so far,
    (accepted + prior) / (expected + prior) with ``RECORD_PRIOR`` pseudo-drafts on each side
    (1 for a new request). Calibration holds on average over requests, but a request's own
    rounds say more about its next ones: the head pulls toward the mean (embedded pair, greedy,
    greedy-fitted: one held-out prompt accepted 3.8 drafts a round where its confidences
    predicted 2.4, another 1.1 where they predicted 1.9)."""
    return (stats.accepted + RECORD_PRIOR) / (stats.expected_accepted + RECORD_PRIOR)


def expected_survival(s: SpecState) -> jax.Array:
    """``[B, K]``: what the skip decisions expect of each row's next drafted rounds, the mean
    survival of its drafted rounds (``ScheduleState.mean_survival``: the newest weighs half, the
    ones before the rest) scaled by its record (``record_factor``), at most 1. A decision holds
    for a run of rounds (up to the next refresh), so it reads the row's mean: one round's
    survival swings widely (a held-out prompt whose rounds predicted 0.6, 3.4, 3.6, 3.7, 4.2,
    0.9 drafts in turn), and a run of skips begun on one low round cost a good prompt its next
    7 or more rounds. Past rounds only: deciding from it stays lossless."""
    return jnp.minimum(s.schedule.mean_survival * record_factor(s.stats)[:, None], 1.0)


def too_low_to_pay(s: SpecState, expected: jax.Array | None = None) -> jax.Array:
    """Rows ``[B]`` whose expected acceptance (the sum of ``expected``, default
    ``expected_survival``) is below ``min_expected``: they verify no drafts this round."""
    expected = expected_survival(s) if expected is None else expected
    return jnp.sum(expected, -1) < s.schedule.min_expected


def nothing_pays_now(s: SpecState, scfg: SpecConfig) -> jax.Array:
    """Whether, judged from the rows' ``expected_survival`` (past rounds), no drafted round
    beats AR steps for the live rows, or every live row is too low to pay."""
    sched, live = s.schedule, ~s.done
    expected = expected_survival(s)
    pays = schedule_lib.drafting_pays(expected, live, sched.sps_table, sched.draft_seconds)
    return ~pays | jnp.all(too_low_to_pay(s, expected) | ~live)


def skips_ahead(s: SpecState, scfg: SpecConfig) -> jax.Array:
    """Rounds from now that skip drafting whatever they commit (``skip_drafting`` decides each
    from the same stale confidences until the run of skips reaches ``refresh_after``): ``[]``,
    0 when the next round may draft or the scheduler never skips."""
    if not scfg.may_skip_drafting:
        return jnp.int32(0)
    sched = s.schedule
    return jnp.where(nothing_pays_now(s, scfg), jnp.maximum(sched.refresh_after - sched.skipped, 0), 0).astype(jnp.int32)


ANCHOR_CHUNK = 8  # AR steps of a run of skips whose features enter the drafter's context in one append


def anchor_steps(target: Qwen3Params, draft: DraftParams, s: SpecState, steps, *, scfg: SpecConfig,
                 chunk: int = ANCHOR_CHUNK) -> SpecState:
    """``steps`` rounds known to skip drafting (``skips_ahead``), run as plain AR steps of the
    decode core (``decoding.ar_step_with_features``) inside ``lax.while_loop``s: the same
    tokens and bookkeeping as that many skipped rounds (the committed token drawn from the
    target's distribution at the anchor; statistics; trace; the run of skips), without a
    round's decision, packing and per-round drafter update: the steps run in chunks of at
    most ``chunk`` (static), and each chunk's target features enter the drafter's context in
    one append after it (none when no step runs). ``steps`` may be traced."""
    B = s.anchor.shape[0]
    layers = scfg.draft.target_layer_ids
    F = target.embed.shape[-1] * len(layers)
    step = functools.partial(ar_step_with_features, target, cfg=scfg.target, sampling=scfg.sampling,
                             eos_ids=scfg.eos_ids, mesh=scfg.mesh, feature_layers=layers)

    def one_step(carry):
        s, i, features, tokens, counts, rounds = carry
        live = ~s.done
        new, f = step(s)
        features = jax.lax.dynamic_update_slice_in_dim(features, f[:, None].astype(features.dtype), i, 1)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new.anchor[:, None], i, 1)
        if new.trace is not None:  # the row a skipped round writes: nothing proposed, the token as its bonus
            new = dataclasses.replace(new, trace=trace_skipped(new.trace, live, rounds + counts, new.anchor))
        return new, i + 1, features, tokens, counts + live, rounds

    def one_chunk(carry):
        s, ran = carry
        todo = jnp.minimum(steps - ran, chunk)
        inner = (s, jnp.int32(0), jnp.zeros((B, chunk, F), target.embed.dtype), jnp.zeros((B, chunk), jnp.int32),
                 jnp.zeros((B,), jnp.int32), s.stats.rounds)
        new, n, features, tokens, counts, _ = jax.lax.while_loop(lambda c: (c[1] < todo) & ~jnp.all(c[0].done),
                                                                 one_step, inner)
        draft_cache = family_of(scfg.draft).commit(draft, scfg.draft, target, s.draft_cache, features, tokens, counts)
        stats = s.stats
        stats = dataclasses.replace(stats, rounds=stats.rounds + counts, verified=stats.verified + counts,
                                    skipped=stats.skipped + counts, compute_tokens=stats.compute_tokens + B * n)
        schedule = dataclasses.replace(s.schedule, skipped=s.schedule.skipped + n)
        return dataclasses.replace(new, draft_cache=draft_cache, stats=stats, schedule=schedule), ran + n

    s, _ = jax.lax.while_loop(lambda c: (c[1] < steps) & ~jnp.all(c[0].done), one_chunk, (s, jnp.int32(0)))
    return s


def skip_drafting(s: SpecState, scfg: SpecConfig) -> tuple[jax.Array, ScheduleState]:
    """Whether the coming round skips drafting (one AR step instead of draft + verify), and the
    schedule with the refresh interval updated. Skip when, judged from the last drafted
    round's confidences, no drafted round beats AR steps (``schedule.drafting_pays``: with no
    drafting cost known, the budget is zero), or every live row is too low to pay. After
    ``refresh_after`` skips in a row one round drafts to refresh the confidences; a refresh
    that still finds nothing to pay doubles that interval (up to ``LAST_REFRESH``: drafting
    costs several AR steps, so refreshing often would cost more than it finds), a round where
    drafting pays resets it. Read from the state before drafting, never from this round's
    drafts, so it cannot bias what is committed (lossless)."""
    sched = s.schedule
    nothing_pays = nothing_pays_now(s, scfg)
    skip = nothing_pays & (sched.skipped < sched.refresh_after)
    refresh = jnp.where(nothing_pays, jnp.where(skip, sched.refresh_after,
                                                jnp.minimum(2 * sched.refresh_after + 1, LAST_REFRESH)),
                        FIRST_REFRESH)
    return skip, dataclasses.replace(sched, refresh_after=refresh.astype(jnp.int32))


def speculative_round(target: Qwen3Params, draft: DraftParams, s: SpecState, *, scfg: SpecConfig,
                      drafts: bool = False) -> SpecState:
    """One draft -> schedule -> verify -> accept -> commit -> record round for every live
    sequence. The budget schedulers may skip the drafting (``skip_drafting``): a ``lax.cond``
    then computes only the anchors' AR step (``anchor_round``) instead of ``drafted_round``;
    both only read the caches, and ``commit_phase`` writes either outcome the same way after
    the cond, so no branch returns (and copies) a cache. ``drafts``: the caller knows the
    round drafts (``skips_ahead(s) == 0``, as in ``decode_rounds``): no cond, only the refresh
    interval's update (inside a decoding loop on a 2-core CPU the cond made a drafted round
    ~15% slower)."""
    key, k_draft, k_accept = split(s.key, 3)
    skip = False
    if scfg.may_skip_drafting:
        skip, sched = skip_drafting(s, scfg)
        s_next = dataclasses.replace(s, schedule=sched)
        drafted = lambda: drafted_round(target, draft, s_next, k_draft, k_accept, scfg)
        if drafts:
            skip, v = False, drafted()
        else:
            v = jax.lax.cond(skip, lambda: anchor_round(target, s_next, k_accept, scfg), drafted)
    else:
        v = drafted_round(target, draft, s, k_draft, k_accept, scfg)
    new = commit_phase(target, draft, s, v, scfg, key=key)
    verified = v.lengths + 1 if scfg.packed else scfg.num_drafts + 1
    return record_phase(s, new, v, verified, skip)


def decode_rounds(target: Qwen3Params, draft: DraftParams, s: SpecState, max_rounds=0, *,
                  scfg: SpecConfig) -> SpecState:
    """Rounds inside one ``lax.while_loop`` until every sequence is done, or at most
    ``max_rounds`` of them (0: no limit; may be traced; rounds that skip drafting count).
    Schedulers that never skip run ``speculative_round`` in ``loop_until_done``.

    The budget schedulers run without a branch: the run of rounds known to skip drafting
    (``skips_ahead``: nothing pays until the next refresh) goes first as plain AR steps
    (``anchor_steps``), then each iteration is one drafted round (``speculative_round`` with
    ``drafts``) followed by the run of skips it leaves. The same tokens (greedy; sampled: the
    same distribution, drawn from the AR steps' own keys), statistics, trace and drafter
    context as rounds that each decide (tests/test_speculative.py, tests/test_engine.py)."""
    if not scfg.may_skip_drafting:
        return loop_until_done(functools.partial(speculative_round, target, draft, scfg=scfg), s, max_rounds)
    static = isinstance(max_rounds, int)
    limit = jnp.asarray(jnp.iinfo(jnp.int32).max if static and not max_rounds else max_rounds, jnp.int32)
    chunk = min(max_rounds, ANCHOR_CHUNK) if static and max_rounds else ANCHOR_CHUNK

    def skip_run(s, left):
        run = jnp.minimum(skips_ahead(s, scfg), left)
        return anchor_steps(target, draft, s, run, scfg=scfg, chunk=chunk), run

    def body(carry):
        s, i = carry
        s = speculative_round(target, draft, s, scfg=scfg, drafts=True)
        s, run = skip_run(s, limit - i - 1)
        return s, i + 1 + run

    s, i = skip_run(s, limit)
    s, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done) & (c[1] < limit), body, (s, i))
    return s


@functools.partial(jax.jit, static_argnames=("scfg", "buffer_len", "cache_len"))
def speculative_prefill(
    target: Qwen3Params,
    draft: DraftParams,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    active: jax.Array,
    key: jax.Array,
    max_new_tokens: jax.Array,
    schedule: ScheduleState,
    sampling: RowSampling | None = None,
    stop_ids: jax.Array | None = None,
    *,
    scfg: SpecConfig,
    buffer_len: int,
    cache_len: int,
) -> SpecState:
    """Prefill the target (sampling the first token from it), then the draft context cache.

    prompt_tokens ``[B, P]`` right-padded, prompt_lengths ``[B]``, active ``[B]`` (False rows
    are batch padding and start finished); ``key`` one key or per-row keys ``[B]``;
    ``max_new_tokens`` [] or [B]. Per-request ``sampling`` (traced rows; None: ``scfg.sampling``)
    and ``stop_ids [B, M]`` (-1 pads) are carried in the state."""
    B = prompt_tokens.shape[0]
    dtype = target.embed.dtype
    cache = constrain_cache(target_model.init_cache(scfg.target, B, cache_len, dtype), scfg.mesh)
    # every prefill chunk's target features go straight into the drafter's context cache
    family = family_of(scfg.draft)
    draft_cache = family.init_state(draft, scfg.draft, B, cache_len, dtype)
    logits, cache, draft_cache = prefill(
        target, scfg.target, prompt_tokens, prompt_lengths, cache, chunk_size=scfg.prefill_chunk,
        feature_layers=scfg.draft.target_layer_ids, mesh=scfg.mesh,
        on_chunk=family.prefill_chunk_fn(draft, scfg.draft, target, prompt_tokens, prompt_lengths), carry=draft_cache,
    )
    key, sub = split(key)
    first = sample_logits(sub, logits, scfg.sampling if sampling is None else sampling)
    draft_cache = family.start(draft, scfg.draft, target, draft_cache, first)
    K, R = scfg.num_drafts, scfg.trace_rounds
    trace = None
    if R:
        trace = SpecTrace(
            jnp.full((B, R, K), -1, jnp.int32),
            jnp.full((B, R), -1, jnp.int32),
            jnp.full((B, R), -1, jnp.int32),
            jnp.zeros((B, R, K), jnp.float32),
        )
    return start_state(first, active, cache, key, max_new_tokens, buffer_len, scfg.eos_ids, draft_cache=draft_cache,
                       schedule=schedule, stats=init_stats(B, K), trace=trace, sampling=sampling, stop_ids=stop_ids)


@functools.partial(jax.jit, static_argnames=("scfg", "max_rounds"), donate_argnames=("state",))
def speculative_decode(target: Qwen3Params, draft: DraftParams, state: SpecState, *, scfg: SpecConfig,
                       max_rounds: int = 0) -> SpecState:
    """Run rounds inside one ``lax.while_loop`` until every sequence is done, or at most
    ``max_rounds`` of them (a streaming chunk; call again with the returned state). The state
    is donated."""
    return decode_rounds(target, draft, state, max_rounds, scfg=scfg)


MAX_STOP_IDS = 8  # per-request stop ids (besides the model's EOS ids)


@dataclasses.dataclass(frozen=True)
class PerRequest:
    """Per-prompt settings, validated on the host (None: one setting for the whole batch)."""

    max_new_tokens: np.ndarray  # [rows] int32
    ragged: bool  # max_new_tokens given per prompt
    sampling: list | None  # [rows] Sampling
    stop_ids: np.ndarray | None  # [rows, MAX_STOP_IDS] int32, -1 pads

    @staticmethod
    def padded(values, batch: int):
        """``values`` (one per prompt) padded to the batch bucket with copies of the first."""
        extra = batch - len(values)
        if isinstance(values, np.ndarray):
            return np.concatenate([values, np.repeat(values[:1], extra, 0)])
        return list(values) + [values[0]] * extra


def per_request(prompts, max_new_tokens, sampling, stop) -> PerRequest:
    """Check per-prompt settings: each list has one entry per prompt."""
    n = len(prompts)

    def one_each(values, what):
        values = list(values)
        if len(values) != n:
            raise ValueError(f"{len(values)} {what} for {n} prompts; give one per prompt (or one for all)")
        return values

    ragged = not isinstance(max_new_tokens, (int, np.integer))
    limits = np.asarray(one_each(max_new_tokens, "max_new_tokens") if ragged else [max_new_tokens] * max(n, 1), np.int32)
    if limits.size and limits.min() < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {int(limits.min())}")
    settings = None if isinstance(sampling, Sampling) else one_each(sampling, "sampling settings")
    stop_ids = None
    if stop is not None:
        stop = [tuple(int(t) for t in s) for s in one_each(stop, "stop id lists")]
        longest = max((len(s) for s in stop), default=0)
        if longest > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids per prompt, got {longest}")
        stop_ids = np.full((n, MAX_STOP_IDS), -1, np.int32)
        for i, s in enumerate(stop):
            stop_ids[i, : len(s)] = s
    return PerRequest(limits, ragged, settings, stop_ids)


@dataclasses.dataclass
class SpecResult:
    samples: list[list[int]]
    stats: dict
    trace: list[list[dict]] | None


def summarize_stats(stats: SpecStats, rows: int) -> dict:
    """Run totals: rounds, tau, per-position conditional acceptance, token counts."""
    compute_tokens = int(np.asarray(stats.compute_tokens))
    st = jax.tree.map(lambda a: np.asarray(a)[:rows] if np.ndim(a) else np.asarray(a), stats)
    rounds = int(st.rounds.sum())
    reached = st.reached.sum(0)
    return {
        "rounds": rounds,
        "tau": float((st.accepted.sum() + rounds) / max(rounds, 1)),
        "accept_rate_by_position": [
            float(a / r) if r else None for a, r in zip(st.accepted_at.sum(0), reached)
        ],
        "reached_by_position": reached.tolist(),
        "accepted_by_position": st.accepted_at.sum(0).tolist(),
        "proposed_tokens": int(st.proposed.sum()),
        "verified_tokens": int(st.verified.sum()),
        "accepted_tokens": int(st.accepted.sum()),
        "expected_accepted_tokens": float(st.expected_accepted.sum()),
        "verification_budget_per_request": float(st.verified.sum() / max(rounds, 1)),
        "target_compute_tokens": compute_tokens,
        "skipped_rounds": int(st.skipped.sum()),
        "rounds_per_sample": st.rounds.tolist(),
    }


def trace_to_list(trace: SpecTrace, stats: SpecStats, rows: int) -> list[list[dict]]:
    proposed, accepted, bonus, conf = (
        np.asarray(a) for a in (trace.proposed, trace.accepted, trace.bonus, trace.confidence_logits)
    )
    rounds = np.asarray(stats.rounds)
    out = []
    for b in range(rows):
        r = min(int(rounds[b]), accepted.shape[1])
        out.append([
            {
                "proposed": [int(t) for t in proposed[b, i] if t >= 0],
                "accepted": int(accepted[b, i]),
                "bonus": int(bonus[b, i]),
                "confidence_logits": [float(c) for c in conf[b, i]],
            }
            for i in range(r)
        ])
    return out


@dataclasses.dataclass(frozen=True)
class SpecRun:
    """A validated, prefilled speculative request: ``speculative_decode`` continues ``state``."""

    target: Qwen3Params  # sharded over the mesh when there is one
    draft: DraftParams
    state: SpecState
    scfg: SpecConfig
    rows: int  # real prompts (the batch is padded to a bucket)

    def result(self, state: SpecState, trace: bool = False) -> "SpecResult":
        """Samples, run statistics and (with ``trace``) the rounds of a finished state."""
        output, counts = np.asarray(state.output), np.asarray(state.num_generated)
        samples = [output[i, : counts[i]].tolist() for i in range(self.rows)]
        trace_list = trace_to_list(state.trace, state.stats, self.rows) if trace else None
        return SpecResult(samples, summarize_stats(state.stats, self.rows), trace_list)


def speculative_generate(target, tcfg, draft, dcfg, prompts, *, trace: bool = False, **kw) -> SpecResult:
    """Speculative decoding of ragged prompts; the output distribution is the target's.

    The keywords are ``speculative_start``'s; ``trace`` records every round."""
    run = speculative_start(target, tcfg, draft, dcfg, prompts, trace=trace, **kw)
    state = speculative_decode(run.target, run.draft, run.state, scfg=run.scfg)
    return run.result(state, trace)


def speculative_start(
    target: Qwen3Params,
    tcfg: Qwen3Config,
    draft: DraftParams,
    dcfg: DraftConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: "int | Sequence[int]",
    sampling: "Sampling | Sequence[Sampling]" = Sampling(),
    stop: Sequence[Sequence[int]] | None = None,
    block_size: int | None = None,
    confidence_threshold: float = 0.0,
    seed: int = 0,
    cache_len: int | None = None,
    trace: bool = False,
    mesh: Mesh | None = None,
    scheduler: str | None = None,
    sps_profile=None,
    calibration=None,
    min_expected_accept: float = 0.0,
    prefill_chunk: int = PREFILL_CHUNK,
    allow_long_context: bool = False,
) -> SpecRun:
    """Validate, bucket and prefill a speculative request (``speculative_generate`` decodes it,
    ``streaming.stream_generate`` decodes it chunk by chunk).

    ``scheduler``: 'fixed' (verify all K drafts), 'threshold' (the prefix whose confidences pass
    ``confidence_threshold``), 'algorithm1' (the paper's hardware-aware prefix scheduler with
    early stop) or 'async' (budget from two rounds ago, fresh top-K); default 'threshold' when a
    threshold is given, else 'fixed'. Every scheduler but 'fixed' verifies a packed token axis
    bucketed to what was scheduled. ``sps_profile`` (schedule.SPSProfile) feeds Algorithm 1 and
    async (default: a synthetic linear-cost curve); ``calibration`` (schedule.Calibration) holds
    the STS temperatures (default: the drafter's, none = 1). With 'algorithm1' / 'async' a round
    runs one AR step instead of drafting when nothing would pay its verification
    (``skip_drafting``); a request whose last expected acceptance (sum of survival
    probabilities) is below ``min_expected_accept`` verifies no drafts.

    Validates on the host (prompt vs the model's context and the cache, vocab, block size,
    threshold, scheduler) before any compile; pads prompts and batch to buckets so similar
    calls reuse one compilation. Prompts are prefilled ``prefill_chunk`` tokens at a time, the
    drafter's context cache chunk by chunk alongside.

    Per request: ``max_new_tokens`` and ``sampling`` may be one per prompt, ``stop`` lists each
    prompt's own stop ids; they are traced rows (no recompile per setting), and with per-prompt
    sampling every row draws from its own PRNG stream (``seed`` split per row).
    """
    family_of(dcfg).check_compatible(dcfg, tcfg)
    rows = per_request(prompts, max_new_tokens, sampling, stop)
    max_new_tokens = int(rows.max_new_tokens.max()) if rows.max_new_tokens.size else 0
    K = block_size or dcfg.block_size
    if not 1 <= K <= dcfg.block_size:
        raise ValueError(f"block_size must be in 1..{dcfg.block_size} (the drafter's block size), got {K}")
    scheduler = check_scheduler_applies(draft, dcfg, scheduler, confidence_threshold)
    if scheduler != "fixed" and mesh is not None and mesh.shape["data"] != 1:
        raise ValueError(f"scheduler {scheduler!r} verifies a packed token axis: use a mesh with data=1 (tensor parallel only)")
    b = prepare_batch(target, tcfg, prompts, max_new_tokens=max_new_tokens, cache_len=cache_len, extra_cache=K + 1,
                      mesh=mesh, prefill_chunk=prefill_chunk, allow_long_context=allow_long_context,
                      extra_state_bytes=functools.partial(drafter_state_bytes, draft, dcfg))
    target, tcfg, tokens, buffer_len = b.params, b.cfg, b.tokens, b.buffer_len
    scfg = SpecConfig(
        target=tcfg,
        draft=dcfg,
        sampling=sampling if rows.sampling is None else Sampling(),
        block_size=K if K != dcfg.block_size else 0,
        eos_ids=tcfg.eos_token_ids,
        trace_rounds=buffer_len if trace else 0,
        mesh=mesh,
        scheduler=scheduler,
        prefill_chunk=prefill_chunk,
    )
    B = tokens.shape[0]
    table = None if sps_profile is None else sps_profile.budget_table(B * (K + 1))
    sched = init_schedule_state(B, K, confidence_threshold, table, calibration, min_expected_accept,
                                0.0 if sps_profile is None else sps_profile.draft_seconds)
    key = jax.random.key(seed)
    row_sampling = None
    if rows.sampling is not None:
        row_sampling = RowSampling.of(rows.padded(rows.sampling, B))
        key = jax.random.split(key, B)
    state = speculative_prefill(
        target,
        draft,
        jnp.asarray(tokens),
        jnp.asarray(b.lengths),
        jnp.asarray(b.active),
        key,
        jnp.asarray(rows.padded(rows.max_new_tokens, B), jnp.int32) if rows.ragged else jnp.int32(max_new_tokens),
        sched,
        row_sampling,
        None if rows.stop_ids is None else jnp.asarray(rows.padded(rows.stop_ids, B)),
        scfg=scfg,
        buffer_len=buffer_len,
        cache_len=b.cache_len,
    )
    return SpecRun(target, draft, state, scfg, len(prompts))


def profile_verification(target, tcfg, batch: int, num_drafts: int, context: int = 128, repeats: int = 5,
                         draft=None, dcfg=None):
    """Measure the target's packed verification at every bucket this batch compiles and return
    a ``schedule.SPSProfile`` (steps/s by token budget, monotone-fitted). With a drafter, the
    time of drafting a block (paid every round whatever the budget) is added to every bucket,
    so SPS is the whole engine step rate, as the paper's profile is."""
    from .schedule import profile_from_bucket_times

    seconds, draft_seconds = verification_seconds(target, tcfg, batch, num_drafts, context, repeats, draft, dcfg)
    seconds = {size: t + draft_seconds for size, t in seconds.items()}
    return profile_from_bucket_times(seconds, batch * (num_drafts + 1), draft_seconds)


def verification_seconds(target, tcfg, batch: int, num_drafts: int, context: int = 128, repeats: int = 5,
                         draft=None, dcfg=None) -> tuple[dict[int, float], float]:
    """Median seconds of one packed verification call at every bucket size this batch compiles
    (``{size: seconds}``, each a separately jitted call at ``context`` committed positions) and
    of drafting one block (0 without a drafter)."""
    from .timing import median_seconds

    cache = target_model.init_cache(tcfg, batch, context + num_drafts + 2, target.embed.dtype).advance(context)
    tokens = jnp.zeros((batch, num_drafts + 1), jnp.int32)
    live = jnp.ones((batch,), bool)

    draft_seconds = 0.0
    if draft is not None:
        family = family_of(dcfg)
        ctx = family.init_state(draft, dcfg, batch, context + num_drafts + 2, target.embed.dtype)
        ctx = jax.tree.map(lambda x: x.advance(context) if isinstance(x, KVCache) else x, ctx,
                           is_leaf=lambda x: isinstance(x, KVCache))  # as if `context` positions were committed
        fn = jax.jit(lambda c, a: family.propose(jax.random.key(0), draft, dcfg, target, c, a, Sampling(),
                                                 num_drafts)[0].tokens)
        draft_seconds = median_seconds(fn, ctx, jnp.zeros((batch,), jnp.int32), repeats=repeats)
    seconds = {}
    for size in packed_buckets(batch, num_drafts):
        # lengths that fill exactly this bucket (anchors first, then drafts round-robin)
        extra = size - batch
        lengths = jnp.asarray([extra // batch + (b < extra % batch) for b in range(batch)], jnp.int32)
        fn = jax.jit(lambda c, l: packed_verify(target, tcfg, c, tokens, l, live, ())[0])
        seconds[size] = median_seconds(fn, cache, lengths, repeats=repeats)
    return seconds, draft_seconds
