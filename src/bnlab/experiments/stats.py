"""Statistics over seeds: mean and 95% CI per variant, Welch t-tests between variants.

A verdict sentence is written only where a difference is significant after Holm's correction
over all pairs of variants for that metric; otherwise the sentence says these runs do not
separate the variants. Runs that failed are left out; runs that never reached the target are
counted, not averaged into time-to-target.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st

# (column, label, higher is better)
METRICS = [
    ("final_val_accuracy", "final validation accuracy", True),
    ("best_val_accuracy", "best validation accuracy", True),
    ("final_val_loss", "final validation loss", False),
    ("best_val_loss", "best validation loss", False),
    ("test_accuracy", "test accuracy", True),
    ("epochs_to_target", "epochs to target", False),
    ("steps_to_target", "steps to target", False),
    ("seconds_to_target", "seconds to target", False),
    ("mean_epoch_seconds", "seconds per epoch", False),
]
TESTED = ("final_val_accuracy", "final_val_loss", "epochs_to_target")
ALPHA = 0.05


@dataclass
class Estimate:
    mean: float
    low: float  # 95% CI (t distribution); nan with fewer than 2 values
    high: float
    n: int

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return "-"
        if math.isnan(self.low):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f}"


@dataclass
class VariantStats:
    variant: str
    runs: int
    failed: int
    diverged: int
    reached_target: int
    metrics: dict[str, Estimate] = field(default_factory=dict)


@dataclass
class Comparison:
    metric: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int
    p: float
    p_holm: float = float("nan")
    sentence: str = ""

    @property
    def significant(self) -> bool:
        return not math.isnan(self.p_holm) and self.p_holm < ALPHA


def mean_ci(values, level: float = 0.95) -> Estimate:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    m = float(v.mean())
    if v.size < 2:
        return Estimate(m, float("nan"), float("nan"), 1)
    half = float(st.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Estimate(m, m - half, m + half, int(v.size))


def welch_p(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        return float("nan")
    scale = max(abs(a.mean()), abs(b.mean()), 1e-300)
    if a.std(ddof=1) + b.std(ddof=1) <= 1e-12 * scale:  # (nearly) constant over seeds: no t statistic
        return 1.0 if abs(a.mean() - b.mean()) <= 1e-12 * scale else 0.0
    with warnings.catch_warnings():  # near-constant samples: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(st.ttest_ind(a, b, equal_var=False).pvalue)


def holm(ps: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan)."""
    idx = [i for i, p in enumerate(ps) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: ps[i])
    out = [float("nan")] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        out[i] = running
    return out


def _values(runs: list[dict], variant: str, col: str) -> list[float]:
    return [r[col] for r in runs if r["variant"] == variant and r["status"] in ("done", "diverged")
            and r.get(col) is not None]


def variant_stats(runs: list[dict], variants: list[str]) -> list[VariantStats]:
    out = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        vs = VariantStats(v, len(mine), sum(r["status"] == "failed" for r in mine),
                          sum(r["status"] == "diverged" for r in mine),
                          sum(r.get("epochs_to_target") is not None for r in mine))
        for col, _, _ in METRICS:
            vs.metrics[col] = mean_ci(_values(runs, v, col))
        out.append(vs)
    return out


def compare(runs: list[dict], variants: list[str], metrics=TESTED, pairs=None) -> list[Comparison]:
    """Welch tests between ``pairs`` of variants (default: all pairs), Holm-adjusted per metric."""
    labels = {c: (label, higher) for c, label, higher in METRICS}
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(variants, 2))
    result = []
    for col in metrics:
        label, higher = labels[col]
        comps = []
        for a, b in pairs:
            va, vb = _values(runs, a, col), _values(runs, b, col)
            comps.append(Comparison(col, a, b, float(np.mean(va)) if va else float("nan"),
                                    float(np.mean(vb)) if vb else float("nan"), len(va), len(vb), welch_p(va, vb)))
        for c, p in zip(comps, holm([c.p for c in comps])):
            c.p_holm = p
            c.sentence = _sentence(c, label, higher)
        result += comps
    return result


def _sentence(c: Comparison, label: str, higher_is_better: bool) -> str:
    fmt = (lambda x: f"{x:.4f}") if "accuracy" in label or "loss" in label else (lambda x: f"{x:.1f}")
    if math.isnan(c.p_holm):
        return (f"Not enough runs to compare {c.a} and {c.b} on {label} "
                f"(n = {c.n_a} vs {c.n_b}; at least 2 each are needed).")
    if not c.significant:
        return (f"These runs do not separate {c.a} and {c.b} on {label} "
                f"({fmt(c.mean_a)} vs {fmt(c.mean_b)}, Holm-adjusted p = {c.p_holm:.3g}, n = {c.n_a} vs {c.n_b}).")
    a_better = (c.mean_a > c.mean_b) == higher_is_better
    winner, loser = (c.a, c.b) if a_better else (c.b, c.a)
    mw, ml = (c.mean_a, c.mean_b) if a_better else (c.mean_b, c.mean_a)
    word = {"final validation accuracy": "a higher", "final validation loss": "a lower",
            "epochs to target": "fewer"}.get(label, "a better")
    return (f"{winner} reaches {word} {label} than {loser}: {fmt(mw)} vs {fmt(ml)} "
            f"(Welch t-test, Holm-adjusted p = {c.p_holm:.2g}, n = {c.n_a} vs {c.n_b}).")
