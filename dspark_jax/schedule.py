"""Confidence-scheduled verification: STS calibration, the SPS profile, Algorithm 1 and its
asynchronous variant (paper sections 3.2, 5.2 and Appendix A).

Survival probabilities ``a[r, j] = prod_{i <= j} c[r, i]`` come from the confidence head along
the drafted path; ``c[r, j]`` depends only on the tokens before draft j, so a decision of
"verify draft j" that looks at ``a[r, <= j]`` alone stays lossless. Algorithm 1 visits every
``(r, j)`` in descending ``a`` (ties: smaller j first, so a request's prefix is visited in
order), admits while the expected throughput ``tau * SPS(B)`` improves, and stops at the first
non-improvement. That early stop is what keeps it lossless: a global arg-max would let
``a[r, j+1]`` (which depends on the token x_j) decide whether x_j itself is verified.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .plugins import PluginError, Registry
from .validate import DataError, finite_list, read_json_file, write_json_atomic

SCHEDULERS = ("fixed", "threshold", "algorithm1", "async")


def _check_scheduler_fn(obj, spec):
    if not callable(obj):
        raise PluginError(f"scheduler {spec!r} is not a function (got {obj!r})")


# Plug-in schedulers: ``fn(survival [B, K], live [B], schedule_state) -> lengths [B]`` (int, drafts
# verified per request, 0..K), or ``(lengths, new schedule_state)``; pure and traceable, since
# they run inside the decoding loop. LOSSLESS ONLY IF the decision "verify draft j of request r"
# reads survival[r, <= j] alone (and other requests' survival): survival[r, j + 1] depends on the
# drafted token x_j, so letting it decide whether x_j is verified biases the output
# distribution (the retrospective search of Appendix A is the counterexample).
SCHEDULER_PLUGINS = Registry("scheduler", {name: None for name in SCHEDULERS}, check=_check_scheduler_fn)


def check_scheduler(spec: str | None):
    """A built-in scheduler name or an importable plug-in (None: the default)."""
    if spec is not None:
        SCHEDULER_PLUGINS.resolve(spec)


def plugin_lengths(spec: str, survival: jax.Array, live: jax.Array, sched):
    """The lengths ``[B]`` (clipped to 0..K) and schedule state a plug-in scheduler returns."""
    out = SCHEDULER_PLUGINS.resolve(spec)(survival, live, sched)
    lengths, sched = out if isinstance(out, tuple) else (out, sched)
    lengths = jnp.asarray(lengths)
    if lengths.shape != live.shape or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise PluginError(f"scheduler {spec!r} returned lengths of shape {lengths.shape} and dtype {lengths.dtype}; "
                          f"expected integers of shape {live.shape} (drafts verified per request)")
    return jnp.clip(lengths.astype(jnp.int32), 0, survival.shape[-1]), sched


# ---------------------------------------------------------------------------- survival


def survival(confidence_logits: jax.Array, temperatures: jax.Array | None = None) -> jax.Array:
    """``a [..., K]``: cumulative products of (temperature-scaled) per-position confidences."""
    logits = confidence_logits.astype(jnp.float32)
    if temperatures is not None:
        logits = logits / temperatures
    return jnp.cumprod(jax.nn.sigmoid(logits), axis=-1)


# ---------------------------------------------------------------------------- Algorithm 1


def _sorted_candidates(a: jax.Array):
    """Flattened candidates sorted by descending a, ties by position j then request r."""
    R, K = a.shape
    flat = a.reshape(-1)
    j = jnp.tile(jnp.arange(K), R)
    r = jnp.repeat(jnp.arange(R), K)
    order = jnp.lexsort((r, j, -flat))
    return flat[order], r[order], j[order]


def _sps_at(sps_table: jax.Array, tokens: jax.Array) -> jax.Array:
    return sps_table[jnp.clip(tokens, 0, sps_table.shape[0] - 1)]


def throughput_path(a: jax.Array, live: jax.Array, sps_table: jax.Array):
    """Expected throughput after admitting the first i sorted candidates, i = 0..R*K.

    Returns ``(theta [R*K + 1], a_sorted, r_sorted, j_sorted)``; candidates of finished requests
    and with a == 0 are placed last and never improve theta."""
    a = jnp.where(live[:, None], a, 0.0)
    a_sorted, r_sorted, j_sorted = _sorted_candidates(a)
    R = jnp.sum(live).astype(jnp.int32)
    n = a_sorted.shape[0]
    batch_tokens = R + jnp.arange(n + 1)
    tau = R + jnp.concatenate([jnp.zeros(1), jnp.cumsum(a_sorted)])
    theta = tau * _sps_at(sps_table, batch_tokens)
    valid = jnp.concatenate([jnp.ones(1, bool), a_sorted > 0])
    return jnp.where(valid, theta, -jnp.inf), a_sorted, r_sorted, j_sorted


def lengths_from_admitted(count: jax.Array, r_sorted, j_sorted, num_requests: int) -> jax.Array:
    """Per-request verification lengths when the first ``count`` sorted candidates are admitted."""
    admitted = jnp.arange(r_sorted.shape[0]) < count
    return jnp.zeros((num_requests,), jnp.int32).at[r_sorted].max(jnp.where(admitted, j_sorted + 1, 0))


def algorithm1(a: jax.Array, live: jax.Array, sps_table: jax.Array, early_stop: bool = True) -> jax.Array:
    """Algorithm 1: per-request lengths ``[R]`` from survival probabilities ``a [R, K]``.

    ``early_stop=False`` is the retrospective global search of Appendix A (NOT lossless; kept
    for the counterexample test and for the asynchronous variant's stale budget)."""
    theta, _, r_sorted, j_sorted = throughput_path(a, live, sps_table)
    if early_stop:
        improving = theta[1:] > theta[:-1]
        count = jnp.sum(jnp.cumprod(improving)).astype(jnp.int32)
    else:
        count = jnp.argmax(theta).astype(jnp.int32)
    return lengths_from_admitted(count, r_sorted, j_sorted, a.shape[0])


def drafting_pays(a: jax.Array, live: jax.Array, sps_table: jax.Array, draft_seconds) -> jax.Array:
    """Whether drafting beats plain AR steps this round, judged from survival ``a [R, K]`` of an
    earlier round: the best expected throughput of a drafted round (``tau * SPS(B)``, SPS
    including the drafting) against R tokens per AR step (one step of R tokens without the
    drafting's ``draft_seconds``). With ``draft_seconds`` 0: whether the budget is above zero."""
    theta, *_ = throughput_path(a, live, sps_table)
    R = jnp.sum(live)
    ar_seconds = jnp.maximum(1.0 / _sps_at(sps_table, R) - draft_seconds, 1e-12)
    return jnp.max(theta) > R / ar_seconds


def budget_from_stale(a_stale: jax.Array, live: jax.Array, sps_table: jax.Array) -> jax.Array:
    """Asynchronous variant, step 1: the token budget K (drafts to verify in total) from the
    confidences of two rounds earlier, by an unconstrained global search (no early stop)."""
    theta, *_ = throughput_path(a_stale, live, sps_table)
    return jnp.argmax(theta).astype(jnp.int32)


def top_k_lengths(a: jax.Array, live: jax.Array, budget: jax.Array) -> jax.Array:
    """Asynchronous variant, step 2: admit the ``budget`` most probable fresh candidates."""
    a = jnp.where(live[:, None], a, 0.0)
    a_sorted, r_sorted, j_sorted = _sorted_candidates(a)
    count = jnp.minimum(budget, jnp.sum(a_sorted > 0))
    return lengths_from_admitted(count, r_sorted, j_sorted, a.shape[0])


def threshold_lengths(a_or_c: jax.Array, threshold) -> jax.Array:
    """Static threshold: the longest prefix whose every confidence is >= threshold."""
    return jnp.sum(jnp.cumprod(a_or_c >= threshold, axis=-1), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------- SPS profile


def monotone_decreasing_fit(values: Sequence[float]) -> np.ndarray:
    """Least-squares non-increasing fit (pool adjacent violators) of measured steps/s.

    The measured SPS(B) curve is jagged (timer noise, kernel shape effects); Algorithm 1's early
    stop is only optimal on a unimodal objective, so the table it reads is the closest
    non-increasing curve."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


@dataclasses.dataclass
class SPSProfile:
    """Verification steps per second by token budget B (index B; entry 0 unused)."""

    table: np.ndarray  # [B_max + 1] fitted, non-increasing from B = 1
    measured: np.ndarray  # [B_max + 1] raw
    buckets: tuple[int, ...] = ()
    draft_seconds: float = 0.0  # of every step, the drafting (a round that skips it saves this)

    def __call__(self, tokens: int) -> float:
        return float(self.table[min(max(tokens, 1), len(self.table) - 1)])

    def budget_table(self, max_tokens: int) -> np.ndarray:
        """float32 steps/s for budgets ``0..max_tokens``: the table cut there, or extended flat
        (a budget past the profile costs its last entry)."""
        table = np.asarray(self.table, np.float32)[: max_tokens + 1]
        return np.concatenate([table, np.full(max_tokens + 1 - len(table), table[-1], np.float32)])

    def to_json(self) -> dict:
        return {"table": self.table.tolist(), "measured": self.measured.tolist(), "buckets": list(self.buckets),
                "draft_seconds": self.draft_seconds}

    @classmethod
    def from_json(cls, d: dict, where: str = "SPS profile") -> "SPSProfile":
        """A profile from its JSON; a table that is missing, too short, or not finite and > 0
        (Algorithm 1 would compare NaN throughputs and verify nothing) is a DataError."""
        if not isinstance(d, dict) or "table" not in d:
            raise DataError(f"{where}: no 'table' (steps/s by token budget); write it with dspark-jax profile-sps")
        table = finite_list(d["table"], where, "table", positive=True, min_len=2)
        measured = d.get("measured", table)
        draft_seconds = d.get("draft_seconds", 0.0)
        if not isinstance(draft_seconds, (int, float)) or not 0 <= draft_seconds < 1 / max(table):
            raise DataError(f"{where}: draft_seconds {draft_seconds!r} must be >= 0 and below every step's time")
        return cls(np.asarray(table, np.float32), np.asarray(measured, np.float32), tuple(d.get("buckets", ())),
                   float(draft_seconds))

    def save(self, path):
        write_json_atomic(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path) -> "SPSProfile":
        return cls.from_json(read_json_file(path, "SPS profile"), os.fspath(path))


def profile_from_bucket_times(seconds_by_bucket: dict[int, float], max_tokens: int,
                              draft_seconds: float = 0.0) -> SPSProfile:
    """Steps/s at every B from measured seconds per verification call at each bucket size: a
    budget of B tokens costs the smallest bucket >= B. ``draft_seconds`` (included in every
    bucket's time) is what a round that skips drafting saves."""
    buckets = sorted(seconds_by_bucket)
    measured = np.zeros(max_tokens + 1, np.float32)
    for b in range(1, max_tokens + 1):
        size = next((s for s in buckets if s >= b), buckets[-1])
        measured[b] = 1.0 / seconds_by_bucket[size]
    measured[0] = measured[1]
    fitted = monotone_decreasing_fit(measured[1:])
    return SPSProfile(np.concatenate([[fitted[0]], fitted]).astype(np.float32), measured, tuple(buckets),
                      float(draft_seconds))


def linear_cost_profile(max_tokens: int, fixed: float = 1.0, per_token: float = 0.05) -> SPSProfile:
    """A synthetic profile: a call costs ``fixed + per_token * B`` time units."""
    b = np.arange(max_tokens + 1, dtype=np.float32)
    table = 1.0 / (fixed + per_token * np.maximum(b, 1))
    return SPSProfile(table.astype(np.float32), table.astype(np.float32), ())


# ---------------------------------------------------------------------------- STS calibration


def expected_calibration_error(prob: np.ndarray, outcome: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: sum_b |B_b|/n * |mean(prob_b) - mean(outcome_b)|."""
    prob, outcome = np.asarray(prob, np.float64), np.asarray(outcome, np.float64)
    if prob.size == 0:
        return float("nan")
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(prob[m].mean() - outcome[m].mean())
    return float(ece)


def auroc(score: np.ndarray, outcome: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outranks a negative; ties count half)."""
    score, outcome = np.asarray(score, np.float64), np.asarray(outcome, bool)
    pos, neg = score[outcome], score[~outcome]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allscores = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(allscores):
        j = i
        while j + 1 < len(allscores) and allscores[j + 1] == allscores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclasses.dataclass
class Calibration:
    """Per-position temperatures for the confidence logits, fitted by STS, with the drafter:
    one set for sampled decoding and, when fitted, one for greedy decoding. They are separate
    events: greedy, a draft survives when it is the target's argmax; sampled, with probability
    min(1, p/q), and the confidence head's logits mean different survival rates under each
    (the embedded DSpark drafter: calibrated at T=1, its greedy survival summed 2.14 per round
    against 2.46 observed). Decoding reads the set of each row's regime (``for_greedy``)."""

    temperatures: np.ndarray  # [K] sampled decoding (or every decoding without a greedy fit)
    report: dict = dataclasses.field(default_factory=dict)
    greedy_temperatures: np.ndarray | None = None  # [K] greedy decoding (temperature 0)
    greedy_report: dict = dataclasses.field(default_factory=dict)

    FILENAME = "sts_calibration.json"

    @classmethod
    def fitted(cls, cal: "Calibration", greedy: bool, old: "Calibration | None" = None) -> "Calibration":
        """``cal`` (a fit) stored as the ``greedy`` or sampled set, beside ``old``'s other set
        (a greedy fit without a sampled one serves sampled rows too until one is fitted)."""
        if not greedy:
            keep = (None, {}) if old is None else (old.greedy_temperatures, old.greedy_report)
            return cls(cal.temperatures, cal.report, *keep)
        if old is None:
            return cls(cal.temperatures, cal.report, cal.temperatures, cal.report)
        return cls(old.temperatures, old.report, cal.temperatures, cal.report)

    def for_greedy(self) -> np.ndarray:
        """The temperatures greedy rows read: the greedy fit, else the sampled one."""
        return self.temperatures if self.greedy_temperatures is None else self.greedy_temperatures

    def for_sampling(self, temperature: float) -> np.ndarray:
        return self.for_greedy() if temperature == 0 else self.temperatures

    def save(self, draft_dir):
        """Write ``sts_calibration.json`` into ``draft_dir`` (or to ``draft_dir`` itself when it
        names a .json file), atomically: a reader never sees half a file."""
        path = self.path(draft_dir)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        d = {"temperatures": [float(t) for t in self.temperatures], "report": self.report}
        if self.greedy_temperatures is not None:
            d.update(greedy_temperatures=[float(t) for t in self.greedy_temperatures], greedy_report=self.greedy_report)
        write_json_atomic(path, d)

    @classmethod
    def path(cls, draft_dir) -> str:
        """The file: ``draft_dir/sts_calibration.json``, or ``draft_dir`` when it names a .json file."""
        path = os.fspath(draft_dir)
        return path if path.endswith(".json") else os.path.join(path, cls.FILENAME)

    @classmethod
    def load(cls, draft_dir, block_size: int | None = None) -> "Calibration | None":
        """The drafter's calibration (None without one); with ``block_size``, its temperatures
        must be one per draft position. A malformed file is a DataError naming it."""
        path = cls.path(draft_dir)
        if not os.path.exists(path):
            return None
        d = read_json_file(path, "STS calibration")
        sets = {}
        for key in ("temperatures", "greedy_temperatures"):
            if key == "greedy_temperatures" and (not isinstance(d, dict) or key not in d):
                sets[key] = None
                continue
            temps = finite_list(d.get(key) if isinstance(d, dict) else None, path, key, positive=True)
            if block_size is not None and len(temps) != block_size:
                raise DataError(f"{path}: {len(temps)} {key} for a drafter of block_size {block_size}; "
                                "recalibrate with dspark-jax calibrate")
            sets[key] = np.asarray(temps, np.float32)
        return cls(sets["temperatures"], d.get("report", {}), sets["greedy_temperatures"], d.get("greedy_report", {}))


def fit_sts(
    confidence_logits: np.ndarray,
    accepted: np.ndarray,
    grid: Sequence[float] = tuple(np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))),
    bins: int = 10,
) -> Calibration:
    """Sequential Temperature Scaling from recorded rounds.

    confidence_logits ``[N, K]`` along the drafted path, accepted ``[N]`` = drafts accepted in
    that round (with all K offered). For k = 1..K in order, pick t_k minimising the ECE of the
    cumulative product prod_{i<=k} sigmoid(logit_i / t_i) against "the prefix of length k
    survived", t_1..t_{k-1} fixed. Rounds where position k was not offered are excluded there.
    """
    logits = np.asarray(confidence_logits, np.float64)
    accepted = np.asarray(accepted)
    N, K = logits.shape
    temps = np.ones(K)
    prefix = np.ones(N)
    report = {
        "temperatures": [],
        "ece_before": [],  # ECE of the cumulative product vs "prefix of length k survived"
        "ece_after": [],
        "auroc_before": [],  # AUROC of c_k for "draft k survived" among rounds that reached k
        "auroc_after": [],  # (temperature scaling is monotone: equal to auroc_before)
        "auroc_prefix_before": [],  # AUROC of the cumulative product for the prefix event
        "auroc_prefix_after": [],
    }
    raw_prefix = np.ones(N)
    for k in range(K):
        survived = accepted >= k + 1
        raw_prefix = raw_prefix * _sigmoid(logits[:, k])
        best_t, best_ece = 1.0, np.inf
        for t in grid:
            ece = expected_calibration_error(prefix * _sigmoid(logits[:, k] / t), survived, bins)
            if ece < best_ece - 1e-12:
                best_t, best_ece = float(t), ece
        temps[k] = best_t
        prefix = prefix * _sigmoid(logits[:, k] / best_t)
        report["temperatures"].append(best_t)
        report["ece_before"].append(expected_calibration_error(raw_prefix, survived, bins))
        report["ece_after"].append(best_ece)
        reached = accepted >= k
        report["auroc_before"].append(auroc(_sigmoid(logits[reached, k]), survived[reached]))
        report["auroc_after"].append(auroc(_sigmoid(logits[reached, k] / best_t), survived[reached]))
        report["auroc_prefix_before"].append(auroc(raw_prefix, survived))
        report["auroc_prefix_after"].append(auroc(prefix, survived))
    return Calibration(temps.astype(np.float32), report)


STS_GRID_BOUNDS = (0.05, 20.0)  # the temperatures fit_sts searches between
MIN_CALIBRATION_ROUNDS = 32


def check_sts_fit(cal: Calibration, accepted: np.ndarray, min_rounds: int = MIN_CALIBRATION_ROUNDS):
    """Refuse a fit that would not calibrate anything: too few rounds, a position whose
    "prefix survived" event never varied (every round accepted it, or none did: no temperature
    is better than another), or a temperature at the edge of the search grid (the ECE kept
    falling past it: the data asks for a degenerate, all-0 or all-1 confidence)."""
    accepted = np.asarray(accepted)
    if len(accepted) < min_rounds:
        raise DataError(f"STS needs at least {min_rounds} rounds with all drafts offered, got {len(accepted)}; "
                        "raise --num-prompts or --max-new-tokens (or lower --min-rounds)")
    for k, t in enumerate(cal.temperatures):
        survived = int((accepted >= k + 1).sum())
        if survived in (0, len(accepted)):
            raise DataError(f"STS fit is undefined at draft position {k + 1}: {survived} of {len(accepted)} rounds "
                            "accepted it; record more varied rounds (more prompts or tokens, another --temperature)")
        if not STS_GRID_BOUNDS[0] * 1.01 < t < STS_GRID_BOUNDS[1] / 1.01:
            raise DataError(f"STS fit is degenerate at draft position {k + 1}: temperature {t:.3g} at the bound of "
                            f"the search range {STS_GRID_BOUNDS}; record more rounds")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))
