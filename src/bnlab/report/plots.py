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
        many = len(variants) > 6  # then validation curves only, or the figure is unreadable
        for i, v in enumerate(variants):
            color = plt.cm.tab20(i % 20) if many else PALETTE[i % len(PALETTE)]
            if val.get(v):
                _band(ax, val[v], color, f"{v} (val)")
            if train.get(v) and not many:
                _band(ax, train[v], color, f"{v} (train)", "--")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean over seeds, band = min..max")
        ax.grid(alpha=0.3)
        if metric == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8 if len(variants) <= 6 else 5, ncol=1 if len(variants) <= 6 else 2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def epoch_time(runs, variants: list[str]):
    fig, ax = plt.subplots(figsize=(6 if len(variants) <= 6 else 10, 3.6))
    vals = [[r["mean_epoch_seconds"] for r in runs if r["variant"] == v and r.get("mean_epoch_seconds")]
            for v in variants]
    means = [np.mean(x) if x else 0 for x in vals]
    ax.bar(range(len(variants)), means, color=[PALETTE[i % len(PALETTE)] for i in range(len(variants))])
    ax.set_xticks(range(len(variants)), variants, rotation=60 if len(variants) > 6 else 0,
                  fontsize=7 if len(variants) > 6 else 10)
    for i, x in enumerate(vals):
        ax.scatter([i] * len(x), x, color="black", s=10, zorder=3)
    ax.set_ylabel("seconds per epoch")
    ax.set_title("time per epoch (bars: mean, dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def final_accuracy(runs, variants: list[str]):
    fig, ax = plt.subplots(figsize=(6 if len(variants) <= 6 else 10, 3.6))
    for i, v in enumerate(variants):
        x = [r["final_val_accuracy"] for r in runs if r["variant"] == v and r.get("final_val_accuracy") is not None]
        ax.scatter([i] * len(x), x, color=PALETTE[i % len(PALETTE)], s=25)
        if x:
            ax.hlines(np.mean(x), i - 0.25, i + 0.25, color="black")
    ax.set_xticks(range(len(variants)), variants, rotation=60 if len(variants) > 6 else 0,
                  fontsize=7 if len(variants) > 6 else 10)
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


# ---------------------------------------------------------------- probes


def _probe_series(probes: list[dict], runs: list[dict], variant: str, layer: str, metric: str):
    """steps, mean over the variant's seeds of ``metric`` at each sampled step."""
    ids = {r["run_id"] for r in runs if r["variant"] == variant}
    by_step = defaultdict(list)
    for p in probes:
        if p["run_id"] in ids and p["layer"] == layer and p["metric"] == metric:
            by_step[p["step"]].append(p["value"])
    steps = sorted(by_step)
    return np.array(steps), np.array([np.mean(by_step[s]) for s in steps])


def last_hidden_activation(probes: list[dict]) -> tuple[str | None, str | None]:
    """(layer, tracked-unit prefix) of the last activation layer that has percentile probes."""
    layers = [p["layer"] for p in probes if p["metric"] == "p50"]
    if not layers:
        return None, None
    order = list(dict.fromkeys(layers))
    layer = max(order, key=lambda n: (n.rsplit("_", 1)[-1].isdigit() and int(n.rsplit("_", 1)[-1])) or 0)
    units = sorted({p["metric"].split(".")[0] for p in probes if p["layer"] == layer and p["metric"].startswith("unit")},
                   key=lambda u: int(u[4:]))
    return layer, (units[0] if units else None)


def percentile_panels(probes, runs, variants: list[str]):
    """Ioffe & Szegedy Fig. 1(b, c): the 15th / 50th / 85th percentiles of one last-hidden-layer
    unit's input over training, one panel per variant (mean over seeds)."""
    layer, unit = last_hidden_activation(probes)
    if layer is None:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.6), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants):
        for q, style in (("p15", ":"), ("p50", "-"), ("p85", "--")):
            metric = f"{unit}.{q}" if unit else q
            x, y = _probe_series(probes, runs, v, layer, metric)
            if len(x):
                ax.plot(x, y, style, color="#1f77b4", label=f"{q[1:]}th percentile")
        ax.set_title(f"{v}: percentiles of {layer} {unit or 'layer'} input", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pre-activation")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("15th / 50th / 85th percentile of a last-hidden-layer unit's input over training")
    fig.tight_layout()
    return fig


def gradient_norm_panels(probes, runs, variants: list[str]):
    layers = list(dict.fromkeys(p["layer"] for p in probes if p["metric"] == "grad_norm"))
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.6), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants):
        for i, layer in enumerate(layers):
            x, y = _probe_series(probes, runs, v, layer, "grad_norm")
            if len(x):
                ax.plot(x, y, color=PALETTE[i % len(PALETTE)], label=layer)
        ax.set_yscale("log")
        ax.set_title(f"{v}: weight gradient norm per layer", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def saturation_panel(probes, runs, variants: list[str]):
    layers = list(dict.fromkeys(p["layer"] for p in probes if p["metric"] == "saturated"))
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, v in enumerate(variants):
        for j, layer in enumerate(layers):
            x, y = _probe_series(probes, runs, v, layer, "saturated")
            if len(x):
                ax.plot(x, y, color=PALETTE[i % len(PALETTE)], ls=["-", "--", ":", "-."][j % 4],
                        label=f"{v} {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction saturated")
    ax.set_title("saturation: share of inputs where the derivative < 5% of its maximum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def landscape_panels(probes, runs, variants: list[str]):
    if not any(p["metric"] == "loss_range" for p in probes):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, v in enumerate(variants):
        for ax, metric in zip(axes, ("loss_range", "grad_change")):
            x, y = _probe_series(probes, runs, v, "model", metric)
            if len(x):
                ax.plot(x, y, "o-", ms=3, color=PALETTE[i % len(PALETTE)], label=v)
    axes[0].set_title("loss landscape: range of the loss along the step direction")
    axes[1].set_title("gradient predictiveness: max change of the gradient")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def error_vs_batch_size(runs, spec):
    """Validation error (1 - final validation accuracy) against batch size, one line per variant
    group (method), mean over seeds with 95% CI bars: the shape of Wu & He 2018, Figure 1."""
    import json

    from bnlab.experiments.stats import mean_ci

    groups = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["status"] not in ("done", "diverged") or r.get("final_val_accuracy") is None:
            continue
        v = spec.variants[r["variant"]]
        bs = json.loads(r["config"])["train"]["batch_size"]
        groups[v.group or r["variant"]][bs].append(1.0 - r["final_val_accuracy"])
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (g, by_bs) in enumerate(groups.items()):
        xs = sorted(by_bs)
        est = [mean_ci(by_bs[b]) for b in xs]
        means = np.array([e.mean * 100 for e in est])
        half = np.array([0 if np.isnan(e.low) else (e.high - e.low) / 2 * 100 for e in est])
        # an error rate lives in [0, 100]: clip the interval's drawing there
        yerr = [np.minimum(half, means), np.minimum(half, 100 - means)]
        ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, color=PALETTE[i % len(PALETTE)], label=g)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({b for by in groups.values() for b in by}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size (images per batch)")
    ax.set_ylabel("validation error (%)")
    ax.set_title("validation error vs batch size (mean over seeds, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
