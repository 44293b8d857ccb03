"""Matplotlib figures of an experiment (Agg backend, no display needed)."""

from __future__ import annotations

import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _curves(runs: list[dict], epochs: list[dict], column: str) -> dict[str, list[np.ndarray]]:
    """variant -> one array per finished run of ``column`` over epochs."""
    by_run = defaultdict(list)
    for e in epochs:
        by_run[e["run_id"]].append(e)
    out = defaultdict(list)
    for r in runs:
        if r["status"] in ("done", "diverged") and by_run.get(r["run_id"]):
            rows = sorted(by_run[r["run_id"]], key=lambda e: e["epoch"])
            out[r["variant"]].append(np.array([np.nan if e[column] is None else e[column] for e in rows], float))
    return out


def _band(ax, curves: list[np.ndarray], color: str, label: str, style: str = "-") -> None:
    n = max(len(c) for c in curves)
    m = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        m[i, : len(c)] = c
    x = np.arange(1, n + 1)
    with np.errstate(all="ignore"):
        mean = np.nanmean(m, axis=0)
        lo, hi = np.nanmin(m, axis=0), np.nanmax(m, axis=0)
    ax.plot(x, mean, style, color=color, label=label, lw=1.8)
    if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)


def learning_curves(runs, epochs, variants: list[str], title: str):
    """Train (dashed) and validation (solid) accuracy and loss per variant: mean over seeds,
    band from the lowest to the highest seed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, ax in zip(("accuracy", "loss"), axes):
        train, val = _curves(runs, epochs, f"train_{metric}"), _curves(runs, epochs, f"val_{metric}")
        for i, v in enumerate(variants):
            color = PALETTE[i % len(PALETTE)]
            if val.get(v):
                _band(ax, val[v], color, f"{v} (val)")
            if train.get(v):
                _band(ax, train[v], color, f"{v} (train)", "--")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean over seeds, band = min..max")
        ax.grid(alpha=0.3)
        if metric == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def epoch_time(runs, variants: list[str]):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    vals = [[r["mean_epoch_seconds"] for r in runs if r["variant"] == v and r.get("mean_epoch_seconds")]
            for v in variants]
    means = [np.mean(x) if x else 0 for x in vals]
    ax.bar(variants, means, color=[PALETTE[i % len(PALETTE)] for i in range(len(variants))])
    for i, x in enumerate(vals):
        ax.scatter([i] * len(x), x, color="black", s=10, zorder=3)
    ax.set_ylabel("seconds per epoch")
    ax.set_title("time per epoch (bars: mean, dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def final_accuracy(runs, variants: list[str]):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, v in enumerate(variants):
        x = [r["final_val_accuracy"] for r in runs if r["variant"] == v and r.get("final_val_accuracy") is not None]
        ax.scatter([i] * len(x), x, color=PALETTE[i % len(PALETTE)], s=25)
        if x:
            ax.hlines(np.mean(x), i - 0.25, i + 0.25, color="black")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("final validation accuracy")
    ax.set_title("final validation accuracy per seed (line: mean)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
