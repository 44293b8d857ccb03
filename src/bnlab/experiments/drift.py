"""How far a probed quantity moves over training: the drift statistic of Ioffe & Szegedy's Fig. 1(b, c).

For one run and one probe series (e.g. the 15th percentile of one tracked unit's input, at the sampled
steps s_1 < ... < s_n), with span = s_n - s_1:

    drift = | mean{v_i : s_i >= s_n - span/10} - mean{v_i : s_i <= s_1 + span/10} |

the absolute change between the mean over the first tenth of training and the mean over the last
tenth (sampled steps in those tenths; step 1, the initial weights, is in the first). Absolute because a
tracked unit is a different neuron in every seed (the same index, its own weights), whose drift has an
arbitrary sign; the magnitude is what "the distribution changes during training" is about. Per variant:
the mean over seeds with its 95% t interval (``stats.mean_ci``); between two variants: the mean of the
per-seed differences over the seeds both have (seeds are paired: they share the data order), with its
t interval.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from bnlab.experiments.stats import Estimate, mean_ci

FRACTION = 0.1  # the first and last tenth of training
PERCENTILE_METRICS = ("p15", "p50", "p85")


def drift(steps, values, fraction: float = FRACTION) -> float:
    """|mean over the last ``fraction`` of the sampled steps' span - mean over the first| (module docstring).
    Needs at least two sampled steps."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"steps and values must be 1-d of one length (got shapes {s.shape} and {v.shape})")
    if s.size < 2 or s.max() == s.min():
        raise ValueError(f"a drift needs at least two distinct sampled steps (got {s.size})")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5] (got {fraction})")
    width = fraction * (s.max() - s.min())
    first = v[s <= s.min() + width]
    last = v[s >= s.max() - width]
    return float(abs(last.mean() - first.mean()))


@dataclass
class DriftRow:
    quantity: str  # e.g. "all units, p15" or "unit 12, p85"
    metric: str  # the probe metric ("p15", "unit12.p15")
    per_variant: dict[str, Estimate]  # variant -> mean drift over seeds [CI]
    per_seed: dict[str, dict[int, float]]  # variant -> seed -> drift
    differences: dict[str, Estimate]  # variant -> (variant - the first variant), paired over seeds


def drift_rows(probes: list[dict], runs: list[dict], variants: list[str], layer: str,
               fraction: float = FRACTION) -> list[DriftRow]:
    """The drift of each percentile of ``layer``'s input (over all its units, then each tracked unit) per
    run of the finished runs, summarised per variant and against the first variant."""
    seed_of = {r["run_id"]: (r["variant"], r["seed"]) for r in runs if r["status"] in ("done", "diverged")}
    series: dict[str, dict[tuple[str, int], list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for p in probes:
        if p["layer"] == layer and p["run_id"] in seed_of and p["metric"].rsplit(".", 1)[-1] in PERCENTILE_METRICS:
            series[p["metric"]][seed_of[p["run_id"]]].append((p["step"], p["value"]))
    units = sorted({m.split(".")[0] for m in series if "." in m}, key=lambda u: int(u[4:]))
    order = [m for m in PERCENTILE_METRICS if m in series] + [f"{u}.{q}" for u in units for q in PERCENTILE_METRICS
                                                              if f"{u}.{q}" in series]
    rows = []
    for metric in order:
        per_seed: dict[str, dict[int, float]] = {v: {} for v in variants}
        for (variant, seed), pairs in series[metric].items():
            if variant in per_seed and len({s for s, _ in pairs}) >= 2:
                steps, values = zip(*sorted(pairs))
                per_seed[variant][seed] = drift(steps, values, fraction)
        base = per_seed[variants[0]]
        diffs = {v: mean_ci([per_seed[v][s] - base[s] for s in sorted(set(per_seed[v]) & set(base))])
                 for v in variants[1:]}
        unit, _, q = metric.rpartition(".")
        rows.append(DriftRow(f"{'all units' if not unit else f'unit {unit[4:]}'}, {q}", metric,
                             {v: mean_ci(per_seed[v].values()) for v in variants}, per_seed, diffs))
    return rows


__all__ = ["FRACTION", "DriftRow", "drift", "drift_rows"]
