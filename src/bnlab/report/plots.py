"""Matplotlib figures of an experiment (Agg backend, no display needed).

Every figure function returns ``(figure, caption)`` (or None when there is nothing to draw): the
caption is one or two sentences saying exactly what is plotted (which runs, how many seeds, what the
line and the band are). Every axes has labels with units; legends sit below the axes, outside the
data area (constrained layout, ``loc="outside lower center"``). Lines over seeds are the mean over the
runs present at each x; bands are the lowest to the highest run (min..max), not a confidence interval.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from bnlab.experiments.results import FIELDS  # noqa: E402

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
FINISHED = ("done", "diverged")
BAND = "band: min..max over seeds"
STEP = "optimizer step"


def _figure(nrows: int = 1, ncols: int = 1, *, figsize, **kw):
    return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kw)


def _legend_below(fig, handles, labels, *, ncols: int | None = None) -> None:
    """One legend for the figure, below every axes (never over the data)."""
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols or min(len(labels), 4),
                   fontsize=8, frameon=False)


def _band_key(counts: dict[str, int]) -> tuple[list, list[str]]:
    """The legend entry for the min..max bands: none when no line has more than one run (no band drawn)."""
    return ([Patch(color="#888888", alpha=0.3)], [BAND]) if max(counts.values(), default=0) > 1 else ([], [])


def _bands_text(counts: dict[str, int]) -> str:
    return "; bands: min..max over those runs" if max(counts.values(), default=0) > 1 else ""


def _seeds_text(counts: dict[str, int]) -> str:
    """'3 seeds' when every variant has as many runs, else the count per variant."""
    values = set(counts.values())
    if len(values) == 1:
        n = values.pop()
        return f"{n} seed{'s' if n != 1 else ''} per variant"
    return "seeds per variant: " + ", ".join(f"{v} {n}" for v, n in counts.items())


def _colour(i: int, many: bool = False):
    return plt.cm.tab20(i % 20) if many else PALETTE[i % len(PALETTE)]


def _curves(runs: list[dict], epochs: list[dict], column: str) -> dict[str, list[np.ndarray]]:
    """variant -> one array per finished run of ``column`` over epochs."""
    by_run = defaultdict(list)
    for e in epochs:
        by_run[e["run_id"]].append(e)
    out = defaultdict(list)
    for r in runs:
        if r["status"] in FINISHED and by_run.get(r["run_id"]):
            rows = sorted(by_run[r["run_id"]], key=lambda e: e["epoch"])
            out[r["variant"]].append(np.array([np.nan if e[column] is None else e[column] for e in rows], float))
    return out


def _band(ax, curves: list[np.ndarray], color, label: str, style: str = "-"):
    n = max(len(c) for c in curves)
    m = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        m[i, : len(c)] = c
    x = np.arange(1, n + 1)
    with np.errstate(all="ignore"):
        mean = np.nanmean(m, axis=0)
        lo, hi = np.nanmin(m, axis=0), np.nanmax(m, axis=0)
    (line,) = ax.plot(x, mean, style, color=color, label=label, lw=1.8)
    if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    return line


def learning_curves(runs, epochs, variants: list[str], title: str):
    """Train (dashed) and validation (solid) accuracy and loss per variant: mean over seeds,
    band from the lowest to the highest seed."""
    fig, axes = _figure(1, 2, figsize=(11, 4.6))
    many = len(variants) > 6  # then validation curves only, or the figure is unreadable
    counts = {}
    handles, labels = [], []
    for metric, ax in zip(("accuracy", "loss"), axes[0]):
        train, val = _curves(runs, epochs, f"train_{metric}"), _curves(runs, epochs, f"val_{metric}")
        for i, v in enumerate(variants):
            color = _colour(i, many)
            if val.get(v):
                counts[v] = len(val[v])
                line = _band(ax, val[v], color, f"{v} (validation)")
                if metric == "accuracy":
                    handles.append(line)
                    labels.append(line.get_label())
            if train.get(v) and not many:
                counts.setdefault(v, len(train[v]))
                line = _band(ax, train[v], color, f"{v} (training)", "--")
                if metric == "accuracy":
                    handles.append(line)
                    labels.append(line.get_label())
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (fraction correct)")
    axes[0][0].set_title("accuracy per epoch")
    axes[0][1].set_ylabel("cross-entropy loss (nats, log scale)")
    axes[0][1].set_yscale("log")
    axes[0][1].set_title("loss per epoch")
    _legend_below(fig, handles, labels, ncols=4 if not many else 5)
    fig.suptitle(title)
    what = "validation (solid)" if many else "validation (solid) and training (dashed, the epoch's running mean)"
    caption = (f"Accuracy and cross-entropy loss per epoch, {what}, for each variant; lines: mean over the "
               f"finished runs ({_seeds_text(counts)}){_bands_text(counts)}.")
    return fig, caption


def curves_by_method(runs, epochs, spec):
    """Validation error per epoch, one panel per method (variant group) and one line per images-per-device
    setting in it (mean over seeds, band min..max): whether every setting's training had levelled off by the
    end of its budget, the precondition for reading the batch-size figure as BN's effect."""
    from bnlab.experiments.stats import device_batch

    val = _curves(runs, epochs, "val_accuracy")
    config = {r["variant"]: json.loads(r["config"]) for r in runs}
    order = method_order(spec)
    panels = {g: [v for v, var in spec.variants.items() if (var.group or v) == g and val.get(v)] for g in order}
    panels = {g: vs for g, vs in panels.items() if vs}
    if not panels or max(len(c) for vs in panels.values() for v in vs for c in val[v]) < 2:
        return None  # no run has two epochs: nothing to see levelling off
    sizes = sorted({device_batch(config[v]) for vs in panels.values() for v in vs})
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = _figure(rows, cols, figsize=(4.2 * cols, 3.6 * rows), sharey=True)
    counts = {}
    for k, (g, vs) in enumerate(panels.items()):
        ax = axes[k // cols][k % cols]
        for v in sorted(vs, key=lambda v: device_batch(config[v])):
            counts[v] = len(val[v])
            b = device_batch(config[v])
            _band(ax, [100 * (1 - c) for c in val[v]], plt.cm.viridis(sizes.index(b) / max(len(sizes) - 1, 1)),
                  f"{b}")
        ax.set_title(g)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title="images per device", fontsize=8, title_fontsize=8)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    for r in range(rows):
        axes[r][0].set_ylabel("validation error (%, log scale)")
    caption = ("Validation error per epoch, one panel per method and one line per images-per-device setting "
               f"(mean over the finished runs, {_seeds_text(counts)}{_bands_text(counts)}). Flat ends mean "
               "the runs had converged within their budget.")
    return fig, caption


def epoch_time(runs, variants: list[str]):
    fig, axes = _figure(figsize=(6 if len(variants) <= 6 else 10, 3.8))
    ax = axes[0][0]
    vals = [[r["mean_epoch_seconds"] for r in runs if r["variant"] == v and r.get("mean_epoch_seconds")]
            for v in variants]
    means = [np.mean(x) if x else 0 for x in vals]
    ax.bar(range(len(variants)), means, color=[PALETTE[i % len(PALETTE)] for i in range(len(variants))])
    ax.set_xticks(range(len(variants)), variants, rotation=60 if len(variants) > 6 else 0,
                  fontsize=7 if len(variants) > 6 else 10)
    for i, x in enumerate(vals):
        ax.scatter([i] * len(x), x, color="black", s=10, zorder=3)
    ax.set_xlabel("variant")
    ax.set_ylabel("time per epoch (seconds)")
    ax.set_title("wall-clock time per training epoch")
    ax.grid(axis="y", alpha=0.3)
    caption = ("Wall-clock seconds per epoch (training steps plus the validation pass) on the machine named "
               f"under Environment; bars: mean over seeds, dots: each run's mean epoch time "
               f"({_seeds_text({v: len(x) for v, x in zip(variants, vals)})}).")
    return fig, caption


def final_accuracy(runs, variants: list[str]):
    fig, axes = _figure(figsize=(6 if len(variants) <= 6 else 10, 3.8))
    ax = axes[0][0]
    counts = {}
    for i, v in enumerate(variants):
        x = [r["final_val_accuracy"] for r in runs if r["variant"] == v and r.get("final_val_accuracy") is not None]
        counts[v] = len(x)
        ax.scatter([i] * len(x), x, color=PALETTE[i % len(PALETTE)], s=25)
        if x:
            ax.hlines(np.mean(x), i - 0.25, i + 0.25, color="black")
    ax.set_xticks(range(len(variants)), variants, rotation=60 if len(variants) > 6 else 0,
                  fontsize=7 if len(variants) > 6 else 10)
    ax.set_xlabel("variant")
    ax.set_ylabel("final validation accuracy (fraction)")
    ax.set_title("final validation accuracy per run")
    ax.grid(axis="y", alpha=0.3)
    caption = ("Validation accuracy after the last epoch of each run (dots, one per seed) and its mean over the "
               f"seeds (black line), per variant ({_seeds_text(counts)}).")
    return fig, caption


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- probes


@dataclass
class SeedBand:
    """One probe metric of one variant over training: at each sampled step the mean over the runs
    that have a value there, and the lowest and highest of them."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    runs: int  # runs contributing at least one value


class ProbeTable:
    """Probe rows of the finished runs, indexed by (variant, layer, metric) -> run -> [(step, value)]."""

    def __init__(self, probes: list[dict], runs: list[dict]):
        self.variant_of = {r["run_id"]: r["variant"] for r in runs if r["status"] in FINISHED}
        self.config = {r["run_id"]: _train_config(r) for r in runs if r["status"] in FINISHED}
        self.rows: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for p in probes:
            v = self.variant_of.get(p["run_id"])
            if v is not None:
                self.rows[(v, p["layer"], p["metric"])][p["run_id"]].append((p["step"], p["value"]))

    def band(self, variant: str, layer: str, metric: str) -> SeedBand | None:
        per_run = self.rows.get((variant, layer, metric))
        if not per_run:
            return None
        by_step = defaultdict(list)
        for pairs in per_run.values():
            for s, v in pairs:
                by_step[s].append(v)
        steps = np.array(sorted(by_step))
        vals = [np.asarray(by_step[s], float) for s in steps]
        return SeedBand(steps, np.array([v.mean() for v in vals]), np.array([v.min() for v in vals]),
                        np.array([v.max() for v in vals]), len(per_run))

    def value(self, layer: str, metric: str):
        """A value every run records alike (the probe batch size, a layer's width); None if absent."""
        found = {v for (var, la, m), per_run in self.rows.items() if la == layer and m == metric
                 for pairs in per_run.values() for _, v in pairs}
        return found.pop() if len(found) == 1 else None

    def probe_setting(self, key: str):
        """A ProbeConfig field as the runs' resolved configs give it (None if they differ or lack it)."""
        found = {json.dumps(c.get("probes", {}).get(key)) for c in self.config.values()}
        return json.loads(found.pop()) if len(found) == 1 else None


def _train_config(run: dict) -> dict:
    try:
        return json.loads(run.get("config") or "{}").get("train", {}) or {}
    except (TypeError, ValueError):
        return {}


def _draw(ax, band: SeedBand, color, style: str, label: str):
    (line,) = ax.plot(band.steps, band.mean, style, color=color, lw=1.5, label=label)
    if band.runs > 1:
        ax.fill_between(band.steps, band.lo, band.hi, color=color, alpha=0.18, lw=0)
    return line


def _probe_batch_text(table: ProbeTable) -> str:
    from bnlab.probes import PROBE_LAYER
    n = table.value(PROBE_LAYER, "images")
    src = table.value(PROBE_LAYER, "from_validation")
    where = {1.0: "validation", 0.0: "training"}.get(src, "held-out")
    if n is None:
        return "a fixed probe batch"
    return f"one fixed batch of {int(n)} {where} images (the same images at every sampled step and in every run)"


def last_hidden_activation(probes: list[dict]) -> tuple[str | None, list[str]]:
    """(layer, tracked-unit prefixes) of the last activation layer that has percentile probes."""
    layers = [p["layer"] for p in probes if p["metric"] == "p50"]
    if not layers:
        return None, []
    order = list(dict.fromkeys(layers))
    layer = max(order, key=lambda n: (n.rsplit("_", 1)[-1].isdigit() and int(n.rsplit("_", 1)[-1])) or 0)
    units = sorted({p["metric"].split(".")[0] for p in probes if p["layer"] == layer and p["metric"].startswith("unit")},
                   key=lambda u: int(u[4:]))
    return layer, units


PERCENTILES = (("p15", ":", "#1f77b4", "15th percentile"), ("p50", "-", "#222222", "50th percentile (median)"),
               ("p85", "--", "#d62728", "85th percentile"))


def percentile_panels(probes, runs, variants: list[str], *, max_units: int = 3):
    """Ioffe & Szegedy 2015, Fig. 1(b, c), over all seeds: the 15th / 50th / 85th percentiles of the
    input to the last hidden activation layer over training, on the fixed probe batch. Top row: over
    all units of that layer; one row per tracked unit below; one column per variant."""
    layer, units = last_hidden_activation(probes)
    if layer is None:
        return None
    table = ProbeTable(probes, runs)
    units = units[:max_units]
    rows = [None] + units
    width = table.value(layer, "width")
    fig, axes = _figure(len(rows), len(variants), figsize=(3.9 * len(variants) + 0.4, 2.5 * len(rows) + 1.3),
                        sharex=True)
    counts = {}
    for c, v in enumerate(variants):
        for r, unit in enumerate(rows):
            ax = axes[r][c]
            for q, style, color, label in PERCENTILES:
                band = table.band(v, layer, f"{unit}.{q}" if unit else q)
                if band is not None:
                    counts[v] = max(counts.get(v, 0), band.runs)
                    _draw(ax, band, color, style, label)
            which = (f"all {int(width)} units" if width else "all units") if unit is None else f"unit {unit[4:]}"
            ax.set_title(f"{v}: {which}", fontsize=9)
            ax.set_xlabel(STEP)
            ax.set_ylabel(f"input to {layer}")
            ax.grid(alpha=0.3)
    band_handle, band_label = _band_key(counts)
    handles = [plt.Line2D([], [], ls=s, color=col) for _, s, col, _ in PERCENTILES] + band_handle
    _legend_below(fig, handles, [lab for *_, lab in PERCENTILES] + band_label, ncols=4)
    fig.suptitle(f"Input to {layer} (last hidden activation layer): 15th / 50th / 85th percentiles over training")
    tracked = (f"; rows below: tracked unit{'s' if len(units) > 1 else ''} {', '.join(u[4:] for u in units)} "
               "alone (the same unit indices in every run, each seed's own neuron there)") if units else ""
    caption = (f"15th, 50th and 85th percentiles of the input to {layer}, the last hidden activation layer, measured "
               f"on {_probe_batch_text(table)} before the update of each sampled step, with BN using the probe "
               f"batch's own statistics (train mode; running statistics untouched). Top row: percentiles over all "
               f"{f'{int(width)} ' if width else ''}units and images together{tracked}. Lines: mean over the runs "
               f"({_seeds_text(counts)}){_bands_text(counts)}.")
    return fig, caption


def gradient_norm_panels(probes, runs, variants: list[str]):
    layers = list(dict.fromkeys(p["layer"] for p in probes if p["metric"] == "grad_norm"))
    if not layers:
        return None
    table = ProbeTable(probes, runs)
    fig, axes = _figure(1, len(variants), figsize=(3.9 * len(variants) + 0.4, 4.0), sharey=True)
    counts = {}
    for ax, v in zip(axes[0], variants):
        for i, layer in enumerate(layers):
            band = table.band(v, layer, "grad_norm")
            if band is not None:
                counts[v] = max(counts.get(v, 0), band.runs)
                _draw(ax, band, PALETTE[i % len(PALETTE)], "-", layer)
        ax.set_yscale("log")
        ax.set_title(f"{v}", fontsize=9)
        ax.set_xlabel(STEP)
        ax.set_ylabel("weight gradient L2 norm (log scale)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=PALETTE[i % len(PALETTE)]) for i in range(len(layers))]
    band_handle, band_label = _band_key(counts)
    _legend_below(fig, handles + band_handle, layers + band_label, ncols=min(len(layers) + 1, 6))
    caption = ("L2 norm of each weight layer's gradient of the training loss on the batch of each sampled step "
               "(with plain SGD in the fused or native step: ||W_after - W_before|| / lr), one column per variant; "
               f"lines: mean over the runs ({_seeds_text(counts)}){_bands_text(counts)}.")
    return fig, caption


def saturation_panel(probes, runs, variants: list[str]):
    layers = list(dict.fromkeys(p["layer"] for p in probes if p["metric"] == "saturated"))
    if not layers:
        return None
    table = ProbeTable(probes, runs)
    fig, axes = _figure(figsize=(7.5, 4.4))
    ax = axes[0][0]
    styles = ["-", "--", ":", "-."]
    handles, labels, counts = [], [], {}
    for i, v in enumerate(variants):
        for j, layer in enumerate(layers):
            band = table.band(v, layer, "saturated")
            if band is not None:
                counts[v] = max(counts.get(v, 0), band.runs)
                handles.append(_draw(ax, band, PALETTE[i % len(PALETTE)], styles[j % 4], f"{v} {layer}"))
                labels.append(f"{v}, {layer}")
    ax.set_xlabel(STEP)
    ax.set_ylabel("saturated inputs (fraction)")
    ax.set_title("share of activation inputs where the derivative < 5% of its maximum", fontsize=9)
    ax.grid(alpha=0.3)
    band_handle, band_label = _band_key(counts)
    _legend_below(fig, handles + band_handle, labels + band_label, ncols=3)
    caption = ("Fraction of each sigmoid / tanh layer's inputs on "
               f"{_probe_batch_text(table)} at which the activation's derivative is below 5% of its maximum "
               "(sigmoid' < 0.0125, tanh' < 0.05), before the update of each sampled step; lines: mean over the "
               f"runs ({_seeds_text(counts)}){_bands_text(counts)}.")
    return fig, caption


LANDSCAPE = (("loss_range", "loss range (nats)", "loss Lipschitzness: range of the loss along -g"),
             ("grad_change", "max ||∇L(W - ηg) - g|| (L2 norm)", "gradient predictiveness"),
             ("beta_smoothness", "max ||∇L(W - ηg) - g|| / ||ηg||", "effective β-smoothness"))


def landscape_panels(probes, runs, variants: list[str]):
    """Santurkar et al. 2018, Fig. 4, over all seeds: loss range, gradient predictiveness and
    effective β-smoothness along the gradient direction."""
    if not any(p["metric"] == "loss_range" for p in probes):
        return None
    table = ProbeTable(probes, runs)
    fig, axes = _figure(1, 3, figsize=(13, 4.2))
    handles, counts = [], {}
    for i, v in enumerate(variants):
        line = None
        for ax, (metric, _, _) in zip(axes[0], LANDSCAPE):
            band = table.band(v, "model", metric)
            if band is not None:
                counts[v] = max(counts.get(v, 0), band.runs)
                line = _draw(ax, band, PALETTE[i % len(PALETTE)], "o-", v)
                line.set_markersize(3)
        if line is not None:
            handles.append((line, v))
    for ax, (_, ylabel, title) in zip(axes[0], LANDSCAPE):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(STEP)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    band_handle, band_label = _band_key(counts)
    _legend_below(fig, [h for h, _ in handles] + band_handle, [lab for _, lab in handles] + band_label,
                  ncols=min(len(handles) + 1, 5))
    scales = table.probe_setting("landscape_scales")
    every = table.probe_setting("landscape_every")
    lrs = sorted({c.get("lr") for c in table.config.values() if c.get("lr") is not None})
    eta = (f"η = lr × {scales}" if scales else "η = lr × the configured scales") + (
        f" (lr {', '.join(f'{x:g}' for x in lrs)})" if lrs else "")
    caption = (f"Every {every or 'landscape_every'} steps, from the weights W before the update: g = ∇L(W) on that "
               f"step's training batch (the gradient, not the optimizer's update), then the loss and gradient at "
               f"W - ηg for {eta}. Left: loss range, max - min of the loss over η ∈ {{0, ...}}; middle: gradient "
               f"predictiveness, max ||∇L(W - ηg) - g||; right: effective β-smoothness, "
               f"max ||∇L(W - ηg) - g|| / ||ηg|| "
               f"(Santurkar et al. 2018). Lines: mean over the runs "
               f"({_seeds_text(counts)}){_bands_text(counts)}.")
    return fig, caption


def test_accuracy_panel(probes, runs, variants: list[str]):
    """Ioffe & Szegedy 2015, Fig. 1(a), over all seeds: test accuracy against optimizer steps, from the
    ``test_accuracy`` probe (eval mode, every sampled step)."""
    if not any(p["metric"] == "test_accuracy" for p in probes):
        return None
    table = ProbeTable(probes, runs)
    fig, axes = _figure(1, 2, figsize=(11, 4.2))
    handles, counts, bottom, top = [], {}, 1.0, 0.0
    for i, v in enumerate(variants):
        band = table.band(v, "model", "test_accuracy")
        if band is None:
            continue
        counts[v] = band.runs
        for ax in axes[0]:
            line = _draw(ax, band, PALETTE[i % len(PALETTE)], "-", v)
        handles.append((line, v))
        late = band.steps >= band.steps.min() + 0.5 * (band.steps.max() - band.steps.min())  # the zoom's range
        bottom = min(bottom, float(band.lo[late].min()) if late.any() else 0.0)
        top = max(top, float(band.hi.max()))
    bottom = max(0.0, bottom - 0.01)
    for ax, title in zip(axes[0], ("whole run", f"zoomed: accuracy axis from {bottom:.2f}")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(STEP)
        ax.set_ylabel("test accuracy (eval mode)")
        ax.grid(alpha=0.3)
    axes[0][1].set_ylim(bottom, min(1.0, top + 0.01))
    band_handle, band_label = _band_key(counts)
    _legend_below(fig, [h for h, _ in handles] + band_handle, [lab for _, lab in handles] + band_label,
                  ncols=min(len(handles) + 1, 5))
    every = table.probe_setting("every")
    caption = (f"Test accuracy against optimizer steps (Ioffe & Szegedy 2015, Fig. 1(a)): the whole test set, in eval "
               f"mode (BN with its moving averages), measured every {every or 'sampled'} steps before that step's "
               f"update (step 1: the initial weights). Left: the whole run; right: the same, the accuracy axis from "
               f"{bottom:.2f} (the lowest run in the second half of training). Lines: mean over the runs ({_seeds_text(counts)}){_bands_text(counts)}.")
    return fig, caption


def error_panels(runs) -> list[str]:
    """The accuracy fields a batch-size figure shows as error: test accuracy with BN's moving averages and
    with precise statistics where every finished run has them, else validation accuracy."""
    done = [r for r in runs if r["status"] in FINISHED and r.get("final_val_accuracy") is not None]
    if done and all(r.get("test_accuracy") is not None for r in done):
        return ["test_accuracy"] + (["precise_test_accuracy"] if any(r.get("precise_test_accuracy") is not None
                                                                      for r in done) else [])
    return ["final_val_accuracy"]


# a model without batch statistics (GroupNorm, LayerNorm, no norm) has none to make precise: its accuracy
# with precise statistics is its own accuracy
OWN_ACCURACY = {"precise_test_accuracy": "test_accuracy", "precise_val_accuracy": "final_val_accuracy"}
BATCH_STATISTICS = ("batch", "syncbatch", "renorm")


def has_batch_statistics(config: dict) -> bool:
    """Whether the stored run ``config``'s model (an mlp / cnn spec) normalises with batch statistics."""
    model = config.get("model", {})
    if model.get("kind") not in ("mlp", "cnn", None):
        return True  # a layers / factory model: not told from its spec here
    norm = str(model.get("norm", "batch"))
    return (model.get("bn", "none") != "none" or model.get("input_bn", False)) and (
        norm in BATCH_STATISTICS or norm.startswith("ghost:"))


def accuracy_of(run: dict, metric: str) -> float | None:
    """``run``'s value of ``metric``; for a precise-statistics accuracy of a finished run whose model has no
    batch statistics, its own accuracy (``OWN_ACCURACY``)."""
    value = run.get(metric)
    if value is None and metric in OWN_ACCURACY and run["status"] == "done" and not has_batch_statistics(
            json.loads(run["config"])):
        value = run.get(OWN_ACCURACY[metric])
    return value


def by_device_batch(runs, spec, metric: str) -> dict[str, dict[int, list[float]]]:
    """group (method) -> images per device (``device_batch``) -> the runs' values of ``metric``
    (``accuracy_of``)."""
    from bnlab.experiments.stats import device_batch

    groups = {g: defaultdict(list) for g in method_order(spec)}
    for r in runs:
        if r["status"] not in FINISHED or accuracy_of(r, metric) is None:
            continue
        v = spec.variants[r["variant"]]
        groups[v.group or r["variant"]][device_batch(json.loads(r["config"]))].append(accuracy_of(r, metric))
    return {g: by for g, by in groups.items() if by}


def method_order(spec) -> list[str]:
    """The methods (variant groups) in the spec's order: one colour each in every panel."""
    return list(dict.fromkeys(v.group or name for name, v in spec.variants.items()))


def error_vs_batch_size(runs, spec, fits: bool = True):
    """Error (100 x (1 - accuracy)) against the images per device, one line per variant group (method),
    mean over seeds with 95% CI bars: the shape of Wu & He 2018, Figure 1. One panel per accuracy of
    ``error_panels`` (moving averages, precise statistics). ``fits``: the report fits trends to the lines
    (False: a report that draws no conclusions, ``bnlab.report.build.report_mode``; the caption says so)."""
    from bnlab.experiments.stats import mean_ci

    metrics = error_panels(runs)
    panels = [(m, by_device_batch(runs, spec, m)) for m in metrics]
    if not panels[0][1]:
        return None
    fig, axes = _figure(1, len(panels), figsize=(6.2 * len(panels), 4.8), sharey=True)
    handles, labels = {}, {}
    order = method_order(spec)
    for k, (metric, groups) in enumerate(panels):
        ax = axes[0][k]
        for g, by_bs in groups.items():
            i = order.index(g)
            xs = sorted(by_bs)
            est = [mean_ci([1.0 - a for a in by_bs[b]]) for b in xs]
            means = np.array([e.mean * 100 for e in est])
            half = np.array([0 if np.isnan(e.low) else (e.high - e.low) / 2 * 100 for e in est])
            # an error rate lives in [0, 100]: clip the interval's drawing there
            yerr = [np.minimum(half, means), np.minimum(half, 100 - means)]
            h = ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, color=PALETTE[i % len(PALETTE)], label=g)
            handles.setdefault(i, h)
            labels.setdefault(i, g)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for by in groups.values() for b in by}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("images per device (batch size / processes; Ghost BN: its ghost batch)")
        ax.set_title(FIELDS[metric].label.replace("accuracy", "error"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("error (%)")
    _legend_below(fig, [handles[i] for i in sorted(handles)], [labels[i] for i in sorted(labels)],
                  ncols=min(len(labels), 4))
    n = sorted({len(v) for _, groups in panels for by in groups.values() for v in by.values()})
    seeds = f"{n[0]} seeds" if len(n) == 1 else f"{n[0]} to {n[-1]} seeds"
    caption = ("Error (100 × (1 - accuracy)) against the images per device, one line per method"
               + (f"; panels: {' and '.join(FIELDS[m].label for m in metrics)}" if len(metrics) > 1 else
                  f" ({FIELDS[metrics[0]].label})")
               + f"; points: mean over the runs at that setting ({seeds}), bars: 95% t-interval over those runs "
               "(none with fewer than 3 runs; drawn clipped to 0-100 %). "
               + ("The trend table fits each line's slope." if fits else "No line is fitted or read: a smoke test.")
               + (" A method without batch statistics has none to make precise: its precise panel shows its own "
                  "accuracy." if any(m in OWN_ACCURACY for m in metrics) else ""))
    return fig, caption
