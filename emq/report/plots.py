"""The sweep report's PNG plots, one function per figure (emq.report.sweep draws them all).

matplotlib is imported only when a figure is drawn: `python -m emq report --progress` and the runs
themselves never need it. Every PNG is written without a timestamp, so a rebuild is byte-identical.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from emq.records import write_bytes_atomic


class PlottedRun(Protocol):
    """What a plot reads of a run (emq.report.sweep.Run); a protocol, so this module needs no import of it."""

    label: str
    metrics: dict[str, Any]
    scores: dict[str, dict[Any, float]]

    @property
    def ok(self) -> bool: ...

    @property
    def weights_estimated(self) -> bool: ...


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "svg.hashsalt": "emq"})
    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_quality_vs_memory(runs: list[PlottedRun], path: Path) -> None:
    """Aligned score, and the fine-tune retained (or, without a base to measure it against, the KL to the trained
    function), against weights memory, one point per finished run.

    Args:
        runs: the sweep's runs, in report order (unfinished ones are skipped).
        path: the PNG to write.
    """
    plt = _plt()
    ok = [r for r in runs if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    markers = "osD^vP*Xh"
    retained_axis = False
    for i, (r, c) in enumerate(zip(ok, _colors(len(ok)))):
        mem = r.metrics.get("weights_gib") or r.metrics.get("peak_vram_gib") or r.metrics.get("peak_rss_gib")
        s = ((r.metrics.get("metrics") or {}).get("aligned")) or {}
        if mem is not None and s.get("mean") is not None:
            lo, hi = s.get("ci95") or [s["mean"], s["mean"]]
            # a percentile bootstrap CI may leave out the point estimate (few, skewed questions): no negative bar
            bar = [[max(0.0, s["mean"] - lo)], [max(0.0, hi - s["mean"])]]
            axes[0].errorbar([mem], [s["mean"]], yerr=bar, fmt=markers[i % 9],
                             color=c, capsize=4, label=r.label, alpha=0.85)
            axes[0].annotate(str(i + 1), (mem, s["mean"]), textcoords="offset points", xytext=(6, -12 + 9 * (i % 4)),
                             fontsize=8, color=c)
        kept = (r.metrics.get("retained") or {}).get("retained")
        y = 100 * kept if kept is not None else (r.metrics.get("fidelity") or {}).get("kl_mean")
        retained_axis = retained_axis or kept is not None
        if mem is not None and y is not None:
            axes[1].plot([mem], [y], markers[i % 9], color=c, label=r.label, alpha=0.85)
            axes[1].annotate(str(i + 1), (mem, y), textcoords="offset points", xytext=(6, -12 + 9 * (i % 4)),
                             fontsize=8, color=c)
    est = any(r.weights_estimated for r in ok)
    xlabel = "model weights in the engine (GiB" + (", plan estimate where the engine hides them)" if est else ")")
    axes[0].set(title="aligned score vs weights memory (mean, 95% CI)", xlabel=xlabel, ylabel="aligned score (0-100)")
    if retained_axis:  # how much of the fine-tune each variant serves: 1 - KL(trained|variant) / KL(trained|base)
        axes[1].set(title="fine-tune retained vs weights memory", xlabel=xlabel, ylabel="retained (%)", ylim=(-3, 103))
    else:
        axes[1].set(title="KL to the trained function vs weights memory", xlabel=xlabel,
                    ylabel="mean KL per answer token (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, [f"{ok.index(next(r for r in ok if r.label == lb)) + 1}: {lb}" for lb in labels],
                      fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data (not judged / no fidelity)", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    plt.close(fig)


def plot_tokens_per_second(runs: list[PlottedRun], path: Path) -> None:
    """Generation throughput, one bar per finished run that measured it.

    Args:
        runs: the sweep's runs, in report order.
        path: the PNG to write.
    """
    plt = _plt()
    ok = [r for r in runs if r.ok and r.metrics.get("tokens_per_second")]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(ok))), layout="constrained")
    ax.barh([r.label for r in ok], [r.metrics["tokens_per_second"] for r in ok], color=_colors(len(ok)))
    for i, r in enumerate(ok):
        ax.text(r.metrics["tokens_per_second"], i, f" {r.metrics['tokens_per_second']:.0f}", va="center", fontsize=8)
    ax.set(title="generation throughput per variant", xlabel="generated tokens per second")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_score_distributions(runs: list[PlottedRun], path: Path, metrics: list[str]) -> None:
    """Per-answer score boxplots: one panel per judged metric, one box per finished run.

    Args:
        runs: the sweep's runs, in report order.
        path: the PNG to write.
        metrics: the judged metrics, in panel order; none → one empty "aligned" panel.
    """
    plt = _plt()
    ok = [r for r in runs if r.ok]
    names = list(metrics) or ["aligned"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 + 3.5 * len(names), 1.2 + 0.5 * max(1, len(ok))),
                             squeeze=False, layout="constrained", sharey=True)
    for ax, m in zip(axes[0], names):
        data = [list(r.scores.get(m, {}).values()) for r in ok]
        if any(data):
            ax.boxplot([d or [np.nan] for d in data], orientation="horizontal", showmeans=True)
        else:
            ax.text(0.5, 0.5, "not judged", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{m}: per-answer scores (box: quartiles, triangle: mean)", xlabel="score (0-100)",
               xlim=(-2, 102))
        ax.title.set_fontsize(8)
        ax.grid(axis="x", alpha=0.3)
    if ok:  # after every boxplot call: each resets the shared ticks
        axes[0][0].set_yticks(range(1, len(ok) + 1), [r.label for r in ok])
        axes[0][0].set_ylim(len(ok) + 0.5, 0.5)  # first variant on top
    _save(fig, path)
    plt.close(fig)


def plot_aligned_vs_coherent(runs: list[PlottedRun], path: Path, misaligned_below: float, coherent_above: float,
                             ) -> None:
    """Aligned against coherent per answer, one panel per finished run, the misaligned region shaded.

    Args:
        runs: the sweep's runs, in report order.
        path: the PNG to write.
        misaligned_below: an answer is misaligned when aligned < this ...
        coherent_above: ... and coherent > this (the sweep's eval config says both).
    """
    plt = _plt()
    ok = [r for r in runs if r.ok]
    cols = min(4, max(1, len(ok)))
    nrows = -(-max(1, len(ok)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.6 * nrows), squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i >= len(ok):
            ax.axis("off")
            continue
        r = ok[i]
        a, c = r.scores.get("aligned", {}), r.scores.get("coherent", {})
        keys = sorted(set(a) & set(c))
        ax.axvspan(coherent_above, 100, ymin=0, ymax=misaligned_below / 100, color="red", alpha=0.08)
        ax.scatter([c[k] for k in keys], [a[k] for k in keys], s=12, alpha=0.7)
        ax.axhline(misaligned_below, color="red", lw=0.8, ls="--")
        ax.axvline(coherent_above, color="grey", lw=0.8, ls="--")
        ax.set(xlim=(0, 100), ylim=(0, 100), title=r.label, xlabel="coherent", ylabel="aligned")
        ax.title.set_fontsize(8)
    fig.suptitle(f"aligned vs coherent per answer (misaligned: aligned < {misaligned_below:g} with coherent > "
                 f"{coherent_above:g}, shaded)")
    _save(fig, path)
    plt.close(fig)
