"""Evaluation like the paper: tau and per-position acceptance per domain and drafter (Table 1),
per-position conditional acceptance curves (Figure 2), confidence reliability with ECE and AUROC
per position (Figure 6).

Every number comes from real speculative decoding with fixed-length verification (all K drafts
offered each round), read off the per-round trace.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from .schedule import auroc, expected_calibration_error


@dataclasses.dataclass
class DomainResult:
    drafter: str
    domain: str
    rounds: int
    tau: float
    accept_rate_by_position: list  # conditional: accepted at k given all before k accepted
    reached: list
    confidences: list  # per position: calibrated confidence of rounds that reached k
    outcomes: list  # per position: whether draft k was accepted in those rounds
    rounds_per_prompt: list = dataclasses.field(default_factory=list)  # for intervals: prompts resampled
    accepted_per_prompt: list = dataclasses.field(default_factory=list)

    def reliability(self, bins: int = 10) -> list[dict]:
        out = []
        for c, y in zip(self.confidences, self.outcomes):
            c, y = np.asarray(c), np.asarray(y)
            out.append({
                "n": int(len(c)),
                "ece": expected_calibration_error(c, y, bins) if len(c) else None,
                "auroc": auroc(c, y) if len(c) else None,
            })
        return out

    def to_json(self) -> dict:
        return {
            "drafter": self.drafter, "domain": self.domain, "rounds": self.rounds, "tau": self.tau,
            "prompts": len(self.rounds_per_prompt), "tau_ci95": tau_interval(self),
            "accept_rate_by_position": self.accept_rate_by_position, "reliability": self.reliability(),
        }


def _bootstrap_taus(result: DomainResult, draws: np.ndarray) -> np.ndarray:
    rounds = np.asarray(result.rounds_per_prompt, np.float64)[draws].sum(-1)
    accepted = np.asarray(result.accepted_per_prompt, np.float64)[draws].sum(-1)
    return (accepted + rounds) / np.maximum(rounds, 1)


def _resampled_prompts(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def tau_interval(result: DomainResult, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list | None:
    """Percentile bootstrap interval of tau, resampling prompts (rounds of one prompt are not
    independent, so prompts are the unit); None without per-prompt counts."""
    n = len(result.rounds_per_prompt)
    if n < 2:
        return None
    taus = _bootstrap_taus(result, _resampled_prompts(n, resamples, seed))
    return [float(x) for x in np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])]


def ratio_interval(result: DomainResult, baseline: DomainResult, level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> list | None:
    """Paired bootstrap interval of tau(result) / tau(baseline): both drafters ran the same
    prompts, so each resample draws the same prompts for both."""
    n = len(result.rounds_per_prompt)
    if n < 2 or len(baseline.rounds_per_prompt) != n:
        return None
    draws = _resampled_prompts(n, resamples, seed)
    ratios = _bootstrap_taus(result, draws) / _bootstrap_taus(baseline, draws)
    return [float(x) for x in np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])]


def tau_ratios(results: Sequence[DomainResult]) -> list[dict]:
    """Every drafter's tau over the last drafter's (the baseline) per domain, with a paired
    95% bootstrap interval."""
    drafters = list(dict.fromkeys(r.drafter for r in results))
    if len(drafters) < 2:
        return []
    by_key = {(r.drafter, r.domain): r for r in results}
    base, out = drafters[-1], []
    for dr in drafters[:-1]:
        for domain in dict.fromkeys(r.domain for r in results):
            a, b = by_key.get((dr, domain)), by_key.get((base, domain))
            if a is None or b is None:
                continue
            out.append({"drafter": dr, "baseline": base, "domain": domain, "ratio": a.tau / b.tau,
                        "ci95": ratio_interval(a, b)})
    return out


def summarize_trace(trace: Sequence[Sequence[dict]], block: int, temperatures=None) -> tuple[int, int, np.ndarray, np.ndarray, list, list]:
    """Counts from per-sample round traces: rounds, accepted drafts, reached[k], accepted_at[k],
    and per position the (calibrated) confidence and outcome of every round that reached k."""
    temps = np.ones(block) if temperatures is None else np.asarray(temperatures)[:block]
    rounds = accepted = 0
    reached, accepted_at = np.zeros(block, int), np.zeros(block, int)
    confidences, outcomes = [[] for _ in range(block)], [[] for _ in range(block)]
    for sample in trace:
        for r in sample:
            rounds += 1
            n, offered = r["accepted"], len(r["proposed"])
            accepted += n
            logits = np.asarray(r.get("confidence_logits", [0.0] * block), np.float64)
            for k in range(min(offered, n + 1)):
                reached[k] += 1
                accepted_at[k] += k < n
                confidences[k].append(float(1 / (1 + np.exp(-logits[k] / temps[k]))))
                outcomes[k].append(bool(k < n))
    return rounds, accepted, reached, accepted_at, confidences, outcomes


def evaluate_drafter(target, tcfg, draft, dcfg, prompts, *, name, domain, sampling, block_size=None,
                     max_new_tokens=128, batch_size=16, seed=0, calibration=None, progress=True) -> DomainResult:
    from tqdm.auto import tqdm

    from .speculative import speculative_generate

    K = block_size or dcfg.block_size
    traces = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"eval {name}/{domain}", disable=not progress):
        res = speculative_generate(target, tcfg, draft, dcfg, prompts[i : i + batch_size], max_new_tokens=max_new_tokens,
                                   sampling=sampling, block_size=K, seed=seed + i, trace=True, scheduler="fixed")
        traces.extend(res.trace)
    temps = None if calibration is None else calibration.for_sampling(sampling.temperature)  # the eval's regime
    rounds, accepted, reached, accepted_at, conf, out = summarize_trace(traces, K, temps)
    rates = [float(a / r) if r else None for a, r in zip(accepted_at, reached)]
    if draft.confidence is None:
        conf, out = [[] for _ in range(K)], [[] for _ in range(K)]
    return DomainResult(name, domain, rounds, float((accepted + rounds) / max(rounds, 1)), rates,
                        reached.tolist(), conf, out, rounds_per_prompt=[len(t) for t in traces],
                        accepted_per_prompt=[sum(r["accepted"] for r in t) for t in traces])


def format_table(results: Sequence[DomainResult]) -> str:
    """Table 1 style: tau per domain and drafter, then per-position acceptance."""
    domains = list(dict.fromkeys(r.domain for r in results))
    drafters = list(dict.fromkeys(r.drafter for r in results))
    w = max(16, 2 + max(len(f"{d}/{drafters[-1]}") for d in drafters))  # label column: fits drafter/baseline
    lines = ["tau (accepted drafts + 1 per round)", f"{'drafter':<{w}}" + "".join(f"{d:>16}" for d in domains) + f"{'mean':>10}"]
    for dr in drafters:
        taus = [next((r.tau for r in results if r.drafter == dr and r.domain == d), float("nan")) for d in domains]
        lines.append(f"{dr:<{w}}" + "".join(f"{t:16.3f}" for t in taus) + f"{np.nanmean(taus):10.3f}")
    ratios = tau_ratios(results)
    for dr in drafters[:-1]:
        row = {x["domain"]: x["ratio"] for x in ratios if x["drafter"] == dr}
        lines.append(f"{dr + '/' + drafters[-1]:<{w}}" + "".join(f"{row.get(d, np.nan):15.3f}x" for d in domains))
    intervals = {(r.drafter, r.domain): tau_interval(r) for r in results}
    intervals.update({(x["drafter"] + "/" + x["baseline"], x["domain"]): x["ci95"] for x in ratios})
    if any(v is not None for v in intervals.values()):
        lines.append("")
        lines.append("95% intervals (bootstrap over prompts; ratios paired on the same prompts)")
        labels = list(dict.fromkeys(label for label, _ in intervals))
        for label in labels:
            cells = [intervals.get((label, d)) for d in domains]
            lines.append(f"{label:<{w}}" + "".join(
                f"{'-':>16}" if c is None else f"{f'{c[0]:.3f}-{c[1]:.3f}':>16}" for c in cells))
    lines.append("")
    lines.append("per-position conditional acceptance (accepted at k given all before accepted)")
    for r in results:
        rates = " ".join("  -  " if x is None else f"{x:.3f}" for x in r.accept_rate_by_position)
        lines.append(f"{r.drafter:<{w}}{r.domain:<16}{rates}")
    rel = [r for r in results if any(len(c) for c in r.confidences)]
    if rel:
        lines.append("")
        lines.append("confidence reliability per position: ECE / AUROC")
        for r in rel:
            cells = " ".join(
                "   -   " if x["ece"] is None else f"{x['ece']:.3f}/{x['auroc']:.2f}" for x in r.reliability()
            )
            lines.append(f"{r.drafter:<{w}}{r.domain:<16}{cells}")
    return "\n".join(lines)


def plot_acceptance(results: Sequence[DomainResult], path: str):
    """Figure 2: per-position conditional acceptance, one line per drafter and domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ks = [k + 1 for k, x in enumerate(r.accept_rate_by_position) if x is not None]
        xs = [x for x in r.accept_rate_by_position if x is not None]
        ax.plot(ks, xs, marker="o", label=f"{r.drafter} / {r.domain} (tau {r.tau:.2f})")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(accept k | all before accepted)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reliability(results: Sequence[DomainResult], path: str, bins: int = 10):
    """Figure 6: reliability diagram per position (mean confidence vs observed acceptance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = [r for r in results if any(len(c) for c in r.confidences)]
    K = max((len(r.confidences) for r in rel), default=1)
    fig, axes = plt.subplots(1, K, figsize=(2.6 * K, 2.8), squeeze=False)
    for k in range(K):
        ax = axes[0, k]
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        for r in rel:
            c, y = np.asarray(r.confidences[k]), np.asarray(r.outcomes[k], float)
            if not len(c):
                continue
            idx = np.minimum((c * bins).astype(int), bins - 1)
            xs = [c[idx == b].mean() for b in range(bins) if (idx == b).any()]
            ys = [y[idx == b].mean() for b in range(bins) if (idx == b).any()]
            info = r.reliability(bins)[k]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r.drafter}/{r.domain} ECE {info['ece']:.3f} AUROC {info['auroc']:.2f}")
        ax.set_title(f"position {k + 1}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        if k == 0:
            ax.set_ylabel("observed acceptance")
        if ax.get_legend_handles_labels()[1]:  # a position no round reached has no curves
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_prompt_set(spec: str, encode, prompt_tokens: int, limit: int, chat=None) -> tuple[str, list[list[int]]]:
    """``held-out-code`` / ``held-out-prose`` (stdlib documents never trained on) or a JSONL file
    in DeepSpec's format (domain = file name). The few held-out prose documents are cut into
    overlapping prompts until there are ``limit`` of them (code has plenty at the usual stride).
    ``chat`` (``text -> ids``, e.g. ``chat.first_turn_encoder``) encodes a JSONL prompt whole, as
    DeepSpec does; without it the raw text's last ``prompt_tokens`` ids are the prompt."""
    from .data import prompts_for_count, pydoc_prose, read_prompts, stdlib_code

    if spec == "held-out-code":
        prompts = prompts_for_count(stdlib_code("held-out"), prompt_tokens, encode, limit)
    elif spec == "held-out-prose":
        prompts = prompts_for_count(pydoc_prose("held-out"), prompt_tokens, encode, limit)
    else:
        prompts = [chat(p) if chat else encode(p)[-prompt_tokens:] for p in read_prompts(spec)]
        spec = os.path.splitext(os.path.basename(spec))[0]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt set {spec!r} is empty")
    rng = np.random.default_rng(0)
    return spec, [prompts[i] for i in rng.permutation(len(prompts))[:limit]]
