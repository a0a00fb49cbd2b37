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
            "accept_rate_by_position": self.accept_rate_by_position, "reliability": self.reliability(),
        }


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
    temps = None if calibration is None else calibration.temperatures
    rounds, accepted, reached, accepted_at, conf, out = summarize_trace(traces, K, temps)
    rates = [float(a / r) if r else None for a, r in zip(accepted_at, reached)]
    if draft.confidence is None:
        conf, out = [[] for _ in range(K)], [[] for _ in range(K)]
    return DomainResult(name, domain, rounds, float((accepted + rounds) / max(rounds, 1)), rates,
                        reached.tolist(), conf, out)


def format_table(results: Sequence[DomainResult]) -> str:
    """Table 1 style: tau per domain and drafter, then per-position acceptance."""
    domains = list(dict.fromkeys(r.domain for r in results))
    drafters = list(dict.fromkeys(r.drafter for r in results))
    lines = ["tau (accepted drafts + 1 per round)", f"{'drafter':<16}" + "".join(f"{d:>16}" for d in domains) + f"{'mean':>10}"]
    for dr in drafters:
        taus = [next((r.tau for r in results if r.drafter == dr and r.domain == d), float("nan")) for d in domains]
        lines.append(f"{dr:<16}" + "".join(f"{t:16.3f}" for t in taus) + f"{np.nanmean(taus):10.3f}")
    if len(drafters) > 1:
        base = drafters[-1]
        for dr in drafters[:-1]:
            ratios = []
            for d in domains:
                a = next((r.tau for r in results if r.drafter == dr and r.domain == d), np.nan)
                b = next((r.tau for r in results if r.drafter == base and r.domain == d), np.nan)
                ratios.append(a / b)
            lines.append(f"{dr + '/' + base:<16}" + "".join(f"{x:15.3f}x" for x in ratios))
    lines.append("")
    lines.append("per-position conditional acceptance (accepted at k given all before accepted)")
    for r in results:
        rates = " ".join("  -  " if x is None else f"{x:.3f}" for x in r.accept_rate_by_position)
        lines.append(f"{r.drafter:<16}{r.domain:<16}{rates}")
    rel = [r for r in results if any(len(c) for c in r.confidences)]
    if rel:
        lines.append("")
        lines.append("confidence reliability per position: ECE / AUROC")
        for r in rel:
            cells = " ".join(
                "   -   " if x["ece"] is None else f"{x['ece']:.3f}/{x['auroc']:.2f}" for x in r.reliability()
            )
            lines.append(f"{r.drafter:<16}{r.domain:<16}{cells}")
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


def load_prompt_set(spec: str, encode, prompt_tokens: int, limit: int) -> tuple[str, list[list[int]]]:
    """``held-out-code`` / ``held-out-prose`` (stdlib documents never trained on) or a JSONL file
    in DeepSpec's format (domain = file name). The few held-out prose documents are cut into
    overlapping prompts until there are ``limit`` of them (code has plenty at the usual stride)."""
    from .data import prompts_for_count, pydoc_prose, read_prompts, stdlib_code

    if spec == "held-out-code":
        prompts = prompts_for_count(stdlib_code("held-out"), prompt_tokens, encode, limit)
    elif spec == "held-out-prose":
        prompts = prompts_for_count(pydoc_prose("held-out"), prompt_tokens, encode, limit)
    else:
        prompts = [encode(p)[-prompt_tokens:] for p in read_prompts(spec)]
        spec = os.path.splitext(os.path.basename(spec))[0]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt set {spec!r} is empty")
    rng = np.random.default_rng(0)
    return spec, [prompts[i] for i in rng.permutation(len(prompts))[:limit]]
