"""Statistics over seeds that a statistician would sign, on scipy.stats, lifelines and statsmodels.

The metrics are the numeric fields of ``bnlab.experiments.results.RESULT_FIELDS``.

What is estimated (``variant_stats``)
  * An outcome (accuracy, loss): mean and 95% CI (t distribution) over the runs of the variant
    that finished without diverging. Every cell carries its n and, when that is fewer than the
    planned runs, why the others are missing (diverged, failed, not finished, no value). With
    fewer than ``MIN_N`` = 3 runs no interval is given; the same value in every seed is reported
    as "no variation between seeds" (there is no replication variance to build an interval on).
  * A time to target is censored data: a run that never reached the target is censored where it
    stopped (its budget: the field's ``censor_at``), never dropped; a diverged run never reaches it
    and is censored at the end of its planned budget (``budget``, read by ``bnlab.experiments.read``),
    and the cell says how many diverged and where ("4 of 5 diverged at steps 13-15"). The
    Kaplan-Meier median with its 95% CI (lifelines: exponential Greenwood bands) and the reach
    rate describe each variant.

How variants are compared (``compare``)
  * The spec names a primary metric (default: final validation accuracy). Verdicts are drawn on it
    alone, with Holm's correction over its pairs of variants (statsmodels ``multipletests``).
    Every other metric is exploratory: its differences, intervals and unadjusted p-values are
    shown, never a verdict.
  * Paired design: runs of different variants with the same seed share data order and initial
    weights. Where both variants ran the same seeds the test is paired (paired t-test with the CI
    of the mean difference, ``scipy.stats.ttest_rel``; exact sign-flip permutation test);
    otherwise Welch's t-test (CI of the difference of means, ``ttest_ind(equal_var=False)``) and
    an exact permutation test of the difference of means. The sentence names the test.
  * Small samples: the exact permutation test (``scipy.stats.permutation_test``, every
    permutation enumerated up to ``EXACT_LIMIT``) is shown alongside the t-test. The verdict's p
    and CI both come from the t-test, so the interval and the p-value never contradict each
    other; a verdict also needs the permutation test to agree (Holm-adjusted p < 0.05).
  * A verdict needs a test that can reach α: the smallest attainable exact p (``exact_floor``:
    2/2^n paired, 2/C(n_a + n_b, n_a) otherwise), Holm-adjusted as if every pair were at its floor,
    must be below α; where it is not (3 paired seeds: 0.25; 5: 0.0625) there is no verdict and the
    sentence says how many seeds per variant would make one possible (``seeds_for_verdict``). A
    t-test p below the exact floor is flagged as resting on the normal approximation.
  * Power: every tested outcome states the smallest difference its design detects with 80% power
    from the observed SD (statsmodels TTestPower paired / TTestIndPower); ``plan`` (``bnlab plan``)
    says how many seeds a target difference needs.
  * Identical values in every seed: there is no t statistic and no evidence beyond one run; the
    comparison says "no variation between seeds" and gives no p-value (never p = 0).
  * Time to target: the exact log-rank test (every relabelling of the runs, or ``MC_RESAMPLES``
    seeded ones with the Monte Carlo error stated; over every finished and diverged run, censored
    ones included) decides; the asymptotic p (``scipy.stats.logrank``) is shown beside it and flagged
    where it is below the exact floor. Complete separation (5/5 at one step vs 0/5) is tested, not
    skipped as "no variation": a rank test's p is exact whatever the ties; Fisher's exact test on the reach rate and the difference of
    reach rates with Newcombe's 95% CI (statsmodels) are stated with both Kaplan-Meier medians
    and their CIs (a difference of medians has no standard interval under censoring).
  * Fewer than ``MIN_N`` runs per variant: no test, no verdict.

Every planned run is accounted for (the choice, and why)
  * A run that failed (a crash: it produced no outcome) or has not finished leaves the
    comparison incomplete: pairs with such a variant get no test, and the sentence names the
    missing runs. Rerunning them (``--retry-failed``) is the remedy; guessing their outcome is not.
    A damaged run (its stored results cannot be used: ``bnlab.experiments.store.damage``; it reads
    with status "damaged") is missing in the same way; ``bnlab run`` redoes it.
  * A run that diverged has an outcome - it diverged - but no final accuracy or loss (its last
    finite numbers predate the blow-up). A mean over the survivors would let a variant that
    diverged in 3 of 5 seeds win on its 2 best; ranking diverged runs as worst would make the
    stated difference depend on a made-up value. So an accuracy or loss comparison that contains
    diverged runs gives no test and says so, and the divergence itself is compared instead: the
    divergence rates over all finished runs, Fisher's exact test (exploratory).
  * In time to target a diverged run is censored at the end of its planned budget: it counts as
    never reaching the target (where its budget is not known, after every time observed). A variant
    with diverged runs can still lose a time-to-target comparison but never win one.
  Hence a variant never wins on its survivors.

Smoke tests (``spec.smoke_test``, set by ``--quick``) are described, never tested: ``compare``
returns descriptive lines without p-values or verdicts.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from math import comb

import numpy as np
from scipy import stats as st

from bnlab.experiments.results import DEFAULT_PRIMARY, EXPLORED_FIELDS, FIELDS, RESULT_FIELDS, ResultField
from bnlab.experiments.store import DAMAGED  # a run whose stored results cannot be used: left out, counted

ALPHA = 0.05
LEVEL = 0.95
MIN_N = 3  # fewer runs per variant: no interval, no test
EXACT_N = 5  # "small n": at most this many runs per variant (exact tests are preferred; see the docstring)
POWER = 0.8  # the power at which the minimum detectable effect is stated
EXACT_LIMIT = 100_000  # permutation tests enumerate every permutation up to this many
MC_RESAMPLES = 20_000  # beyond: this many seeded random permutations

# the statistics' metrics: every numeric result field
METRICS: tuple[ResultField, ...] = tuple(f for f in RESULT_FIELDS if f.numeric)
UNFINISHED = ("pending", "running")


# ------------------------------------------------------------------------------------------ estimates


def _constant(v: np.ndarray) -> bool:
    """The same value in every seed (up to float rounding)."""
    return v.size >= 2 and float(np.ptp(v)) <= 1e-12 * float(np.abs(v).max())


def _note(n: int, planned: int | None, missing: dict[str, int]) -> str:
    """' (n=3; 2 diverged)' when a cell has fewer than the planned runs, else ''."""
    if planned is None or n >= planned:
        return ""
    why = ", ".join(f"{k} {reason}" for reason, k in missing.items() if k)
    return f" (n={n}" + (f"; {why}" if why else "") + ")"


@dataclass
class Estimate:
    """Mean and 95% CI over seeds of one cell; ``low``/``high`` are nan without an interval."""
    mean: float
    low: float
    high: float
    n: int
    constant: bool = False  # the same value in every seed: no variation, no interval
    planned: int | None = None  # runs planned for this cell's variant (None: not known)
    missing: dict[str, int] = field(default_factory=dict)  # why planned runs are not in n

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low) and not self.constant

    def note(self) -> str:
        return _note(self.n, self.planned, self.missing)

    def value(self, digits: int = 4) -> str:
        if self.n == 0:
            return "-"
        if self.constant:
            return f"{self.mean:.{digits}f} (no variation between seeds)"
        if self.has_interval:
            return f"{self.mean:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f}"
        return f"{self.mean:.{digits}f}"

    def text(self, digits: int = 4) -> str:
        return self.value(digits) + self.note()


def mean_ci(values, level: float = LEVEL) -> Estimate:
    """Mean and t interval of the finite values; no interval with fewer than MIN_N of them."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    m = float(v.mean())
    if _constant(v):
        return Estimate(m, m, m, int(v.size), constant=True)
    if v.size < MIN_N:
        return Estimate(m, float("nan"), float("nan"), int(v.size))
    low, high = st.t.interval(level, v.size - 1, loc=m, scale=st.sem(v))
    return Estimate(m, float(low), float(high), int(v.size))


@dataclass
class TimeToTarget:
    """Kaplan-Meier summary of one time-to-target field for one variant."""
    field: str
    n: int  # runs in the analysis (finished or diverged, with a time or a censoring time)
    reached: int  # of which reached the target (events); the others are censored
    median: float  # inf: the curve never fell to one half (the median is not reached)
    low: float  # 95% CI of the median (nan: no interval)
    high: float
    longest: float  # the longest time observed, reached or censored
    constant: bool = False
    planned: int | None = None
    missing: dict[str, int] = field(default_factory=dict)
    diverged: str = ""  # '4 of 5 diverged at steps 13-15': censored at their planned budget, never reached

    def value(self, digits: int = 0) -> str:
        def fmt(x):
            return "∞" if math.isinf(x) else "undefined" if math.isnan(x) else f"{x:.{digits}f}"
        if self.n == 0:
            return "-" + (f" ({self.diverged})" if self.diverged else "")
        div = f" ({self.diverged}: censored at the end of the planned budget)" if self.diverged else ""
        if self.reached == 0:
            return f"not reached (> {fmt(self.longest)})" + div
        if math.isinf(self.median):
            text = f"median not reached (> {fmt(self.longest)})"
        else:
            text = fmt(self.median)
        if self.constant:
            text += " (no variation between seeds)"
        elif self.n >= MIN_N and not (math.isnan(self.low) and math.isnan(self.high)):
            text += f" [{fmt(self.low)}, {fmt(self.high)}]"
        return text + div

    def note(self) -> str:
        return _note(self.n, self.planned, self.missing)

    def text(self, digits: int = 0) -> str:
        return self.value(digits) + self.note()


def kaplan_meier(times, reached, level: float = LEVEL) -> tuple[float, float, float]:
    """(median, CI low, CI high) of the time to the event, from lifelines' Kaplan-Meier estimator
    and its exponential Greenwood (log-log) pointwise bands: the median is the first time the
    curve is at or below one half, the interval's ends the first times each band is.

    inf: the curve (or the upper band) never falls to one half - the median, or the interval's
    upper end, is not reached. Where the curve is 0 the log-log band is undefined (lifelines
    reports 0 there; scipy.stats.ecdf and R's survfit leave it undefined), so a band that falls to
    one half only there does not end the interval: it stays open (inf), as in R; a lower end that
    only such a point would give is undefined (nan)."""
    from lifelines import KaplanMeierFitter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines/pandas deprecation chatter; the numbers are checked in tests
        kmf = KaplanMeierFitter(alpha=1 - level).fit(np.asarray(times, float), np.asarray(reached, bool))
    t = kmf.survival_function_.index.to_numpy(float)
    curve = kmf.survival_function_.iloc[:, 0].to_numpy(float)
    lower, upper = (kmf.confidence_interval_.iloc[:, i].to_numpy(float) for i in (0, 1))
    defined = curve > 0

    def first_at_or_below_half(band):
        idx = np.nonzero(defined & (band <= 0.5))[0]
        return float(t[idx[0]]) if idx.size else math.inf

    median = float(kmf.median_survival_time_)
    low, high = first_at_or_below_half(lower), first_at_or_below_half(upper)
    if math.isinf(low) and not math.isinf(median):
        low = math.nan
    return median, low, high


# ------------------------------------------------------------------------------------------ runs


def _counts(mine: list[dict]) -> dict[str, int]:
    return {"done": sum(r["status"] == "done" for r in mine),
            "diverged": sum(r["status"] == "diverged" for r in mine),
            "failed": sum(r["status"] == "failed" for r in mine),
            "not finished": sum(r["status"] in UNFINISHED for r in mine),
            "damaged": sum(r["status"] == DAMAGED for r in mine)}


def _number(value) -> float | None:
    """A stored value as a float; None for NULL and for anything that is not a number (a damaged row)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _outcome_values(mine: list[dict], name: str) -> tuple[dict[int, float], dict[str, int]]:
    """{seed: value} over runs that finished without diverging; why the other planned runs are missing."""
    c = _counts(mine)
    vals = {r["seed"]: v for r in mine if r["status"] == "done" and (v := _number(r.get(name))) is not None
            and math.isfinite(v)}
    missing = {"diverged": c["diverged"], "failed": c["failed"], "not finished": c["not finished"],
               "damaged": c["damaged"], "without a value": c["done"] - len(vals)}
    return vals, missing


def planned_budget(r: dict, f: ResultField) -> float | None:
    """Where a run's plan would have ended it, on the clock of ``f.censor_at``: the run's ``budget``
    ({censor field: value}, set by ``bnlab.experiments.read`` from its config and epochs), else None."""
    return _number((r.get("budget") or {}).get(f.censor_at))


def _time_values(mine: list[dict], f: ResultField) -> tuple[dict[int, tuple[float, bool]], dict[str, int]]:
    """{seed: (time, reached)} over finished and diverged runs: the time to target where reached,
    else a censoring time: where a finished run stopped (its budget), and for a diverged run the end
    of its planned budget (it never reaches the target: divergence is an outcome, not missing data).
    A diverged run whose budget is not known is censored after every time observed here (at the
    longest), which the Kaplan-Meier curve and the log-rank test treat the same way."""
    c = _counts(mine)
    out, open_ended = {}, []
    for r in mine:
        if r["status"] not in ("done", "diverged"):
            continue
        if (t := _number(r.get(f.name))) is not None:
            out[r["seed"]] = (t, True)
        elif r["status"] == "diverged":
            budget = planned_budget(r, f)
            stopped = _number(r.get(f.censor_at))
            if budget is not None:
                out[r["seed"]] = (max(budget, stopped or 0.0), False)
            else:
                open_ended.append(r["seed"])
                out[r["seed"]] = (stopped or 0.0, False)
        elif (t := _number(r.get(f.censor_at))) is not None:
            out[r["seed"]] = (t, False)
    if open_ended:
        longest = max([t for t, _ in out.values()] + [_number(r.get(f.censor_at)) or 0.0 for r in mine])
        for s in open_ended:
            out[s] = (longest, False)
    missing = {"failed": c["failed"], "not finished": c["not finished"], "damaged": c["damaged"],
               "without a stopping point": c["done"] + c["diverged"] - len(out)}
    return out, missing


def diverged_at(r: dict) -> tuple[str, int] | None:
    """("step", k) or ("epoch", k): where a diverged run blew up, from the engine's message (its
    stopping point is the last completed epoch, before that)."""
    import re

    if r["status"] != "diverged":
        return None
    if (k := _number(r.get("diverged_step"))) is not None:
        return "step", int(k)
    msg = str(r.get("error") or "")
    for unit in ("step", "epoch"):
        if m := re.search(rf"\b{unit} (\d+)", msg):
            return unit, int(m.group(1))
    return None


def diverged_text(mine: list[dict]) -> str:
    """'4 of 5 diverged at steps 13-15' (or 'in epoch 1', or just '2 of 5 diverged'); '' if none did."""
    div = [r for r in mine if r["status"] == "diverged"]
    if not div:
        return ""
    head = f"{len(div)} of {len(mine)} diverged"
    where = [diverged_at(r) for r in div]
    if any(w is None for w in where):
        return head
    for unit in ("step", "epoch"):
        ks = sorted(k for u, k in where if u == unit)
        if len(ks) == len(where):
            many = f"{unit}s {ks[0]}–{ks[-1]}" if ks[0] != ks[-1] else f"{unit} {ks[0]}"
            return head + (f" at {many}" if unit == "step" else f" in {many}")
    return head


def time_to_target(mine: list[dict], f: ResultField) -> TimeToTarget:
    data, missing = _time_values(mine, f)
    planned = len(mine)
    div = diverged_text(mine)
    if not data:
        return TimeToTarget(f.name, 0, 0, math.nan, math.nan, math.nan, math.nan, planned=planned, missing=missing,
                            diverged=div)
    times = np.array([t for t, _ in data.values()])
    reached = np.array([e for _, e in data.values()])
    median, low, high = kaplan_meier(times, reached)
    constant = len(set(data.values())) == 1 and len(data) >= 2
    return TimeToTarget(f.name, len(data), int(reached.sum()), median, low, high, float(times.max()),
                        constant=constant, planned=planned, missing=missing, diverged=div)


@dataclass
class VariantStats:
    variant: str
    planned: int  # runs planned (every seed), whatever their status
    done: int
    diverged: int
    failed: int
    unfinished: int
    reached_target: int  # finished or diverged runs that reached the target
    metrics: dict[str, Estimate] = field(default_factory=dict)  # outcome and info fields
    times: dict[str, TimeToTarget] = field(default_factory=dict)  # time-to-target fields (with a target)
    damaged: int = 0  # runs whose stored results cannot be used (left out of every estimate)

    @property
    def runs(self) -> int:
        return self.planned

    def runs_text(self) -> str:
        """'5: 3 done, 2 diverged' - every planned run and what became of it."""
        parts = [f"{k} {w}" for k, w in ((self.done, "done"), (self.diverged, "diverged"), (self.failed, "failed"),
                                         (self.unfinished, "not finished"), (self.damaged, "damaged")) if k]
        return f"{self.planned}: " + ", ".join(parts) if parts else f"{self.planned}"


def variant_stats(runs: list[dict], variants: list[str], target: float | None = None) -> list[VariantStats]:
    """Per variant: every numeric result field (times to target only when there is a target)."""
    out = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        c = _counts(mine)
        reached = sum(any(r.get(f.name) is not None for f in METRICS if f.kind == "time_to_target")
                      for r in mine if r["status"] in ("done", "diverged"))
        vs = VariantStats(v, len(mine), c["done"], c["diverged"], c["failed"], c["not finished"], reached,
                          damaged=c["damaged"])
        for f in METRICS:
            if f.kind == "time_to_target":
                if target is not None:
                    vs.times[f.name] = time_to_target(mine, f)
                continue
            vals, missing = _outcome_values(mine, f.name)
            est = mean_ci(vals.values())
            est.planned, est.missing = len(mine), missing
            vs.metrics[f.name] = est
        out.append(vs)
    return out


# ------------------------------------------------------------------------------------------ comparisons


@dataclass
class Comparison:
    metric: str  # a result field, or "diverged" (the divergence rate)
    a: str
    b: str
    role: str  # "primary" (verdicts, Holm-adjusted) | "exploratory" | "smoke test"
    label: str = ""
    n_a: int = 0
    n_b: int = 0
    value_a: str = ""  # each variant's value as shown (mean ± CI, or KM median [CI])
    value_b: str = ""
    mean_a: float = math.nan  # (a KM median for a time to target; a rate for "diverged")
    mean_b: float = math.nan
    diff: float = math.nan  # a - b (for a time to target and "diverged": the difference of the rates)
    diff_low: float = math.nan  # 95% CI of diff
    diff_high: float = math.nan
    test: str = ""  # the test behind p, in words
    p: float | None = None
    p_holm: float | None = None  # primary only
    exact_test: str = ""
    p_exact: float | None = None
    p_exact_min: float | None = None  # the smallest p the exact test can give at these n
    extra: str = ""  # a second test stated alongside (Fisher's exact test on a reach rate)
    p_exact_holm: float | None = None  # primary only: the exact test, Holm-adjusted over the same family
    mde: float = math.nan  # the smallest difference a t-test at these n detects with 80% power (observed SD)
    mde_text: str = ""  # the same in words, or why it is not stated
    better: str | None = None  # the variant the data favour (direction only, whatever p)
    winner: str | None = None  # the verdict: only for the primary metric, when every rule is met
    reason: str = ""  # why there is no test, or no verdict
    sentence: str = ""

    @property
    def significant(self) -> bool:
        return self.winner is not None

    @property
    def diff_text(self) -> str:
        if math.isnan(self.diff):
            return "-"
        rate = {"diverged": "divergence rate "}.get(self.metric, "")
        if not rate and FIELDS[self.metric].kind == "time_to_target":
            rate = "reach rate "
        fmt = (lambda x: f"{x * 100:+.0f} pp") if rate else (lambda x: f"{x:+.4f}")
        if math.isnan(self.diff_low):
            return rate + fmt(self.diff)
        return f"{rate}{fmt(self.diff)} (95% CI {fmt(self.diff_low)} to {fmt(self.diff_high)})"


def _p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"= {p:.2g}"


def _missing_text(name: str, missing: dict[str, int], keys=("failed", "not finished", "damaged")) -> str:
    parts = [f"{k} {why}" for why, k in missing.items() if k and why in keys]
    return f"{name}: " + ", ".join(parts) if parts else ""


def exact_floor(n_a: int, n_b: int, paired: bool) -> float:
    """The smallest two-sided p an exact permutation test can give at these n: every seed (or the
    whole split) pointing one way. Paired sign flips: 2 / 2^n (the observed signs and their mirror
    image); relabelling n_a + n_b runs: 2 / C(n_a + n_b, n_a) for equal groups (the split and its
    mirror), 1 / C(...) otherwise. The exact log-rank test by relabelling has the same floor."""
    if paired:
        return min(1.0, 2 / 2 ** n_a)
    return min(1.0, (2 if n_a == n_b else 1) / comb(n_a + n_b, n_a))


def seeds_for_verdict(paired: bool, comparisons: int = 1, alpha: float = ALPHA) -> int:
    """The fewest seeds per variant at which an exact test can reach ``alpha`` after Holm over
    ``comparisons`` pairs: with every pair at its floor, Holm multiplies each by the family's size,
    so the floor must be below alpha / comparisons."""
    n = 1
    while exact_floor(n, n, paired) * max(1, comparisons) >= alpha:
        n += 1
    return n


def detectable_difference(sd: float, n_a: int, n_b: int, paired: bool, alpha: float = ALPHA,
                          power: float = POWER) -> float:
    """The smallest true difference a two-sided t-test at ``alpha`` detects with ``power`` at these n,
    if the seeds vary as observed (``sd``: the SD of the paired differences, or the pooled SD of the
    two variants): statsmodels' TTestPower (paired) / TTestIndPower (two samples) solved for the
    standardised effect, times ``sd``. nan where the test has too few degrees of freedom."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    if not (math.isfinite(sd) and sd > 0) or min(n_a, n_b) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # solver chatter; the result is checked against statsmodels in tests
        if paired:
            d = TTestPower().solve_power(effect_size=None, nobs=n_a, alpha=alpha, power=power,
                                         alternative="two-sided")
        else:
            d = TTestIndPower().solve_power(effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=alpha,
                                            power=power, alternative="two-sided")
    return float(np.squeeze(d)) * sd


def seeds_needed(difference: float, sd: float, paired: bool, comparisons: int = 1, alpha: float = ALPHA,
                 power: float = POWER) -> int:
    """Seeds per variant a study needs to detect ``difference`` with ``power`` when the seeds vary by
    ``sd`` (paired: SD of the differences; else the SD within a variant), Holm over ``comparisons``
    pairs (Bonferroni's alpha / comparisons, Holm's strictest step): statsmodels' TTestPower /
    TTestIndPower solved for nobs, rounded up, and never fewer than an exact test needs to reach
    that alpha at all (``seeds_for_verdict``)."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    if not (difference and math.isfinite(difference) and math.isfinite(sd) and sd > 0):
        raise ValueError(f"expected a non-zero difference and a positive SD (got difference={difference}, sd={sd})")
    a = alpha / max(1, comparisons)
    solver = TTestPower() if paired else TTestIndPower()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        size = {"nobs": None} if paired else {"nobs1": None, "ratio": 1.0}
        n = float(np.squeeze(solver.solve_power(effect_size=abs(difference) / sd, alpha=a, power=power,
                                                alternative="two-sided", **size)))
        if not math.isfinite(n):  # the root finder gives up on huge effects: count up (power rises with n)
            n = next(k for k in range(2, 10_000) if solver.power(abs(difference) / sd, k, a) >= power)
    return max(math.ceil(n - 1e-9), seeds_for_verdict(paired, comparisons, alpha), 2)


def _permutation(x: np.ndarray, y: np.ndarray, paired: bool) -> tuple[float, float, str]:
    """(p, smallest attainable p, name) of the two-sided permutation test of the mean difference:
    the share of permutations (sign flips of the paired differences, or relabellings of the pooled
    runs) whose |mean difference| is at least the observed one (the observed one included)."""
    smallest = exact_floor(x.size, y.size, paired)
    if paired:
        count, kind, name = 2 ** x.size, "samples", "sign-flip permutation test"

        def stat(a, b, axis):
            return np.abs(np.mean(a - b, axis=axis))
    else:
        count, kind, name = comb(x.size + y.size, x.size), "independent", "permutation test"

        def stat(a, b, axis):
            return np.abs(np.mean(a, axis=axis) - np.mean(b, axis=axis))
    exact = count <= EXACT_LIMIT
    res = st.permutation_test((x, y), stat, permutation_type=kind, vectorized=True, alternative="greater",
                              n_resamples=count if exact else MC_RESAMPLES, rng=np.random.default_rng(0))
    name = f"exact {name}" if exact else _mc_name(name, float(res.pvalue))
    return float(res.pvalue), smallest, name


def _mc_name(name: str, p: float) -> str:
    """A Monte Carlo permutation test named with its resamples and the standard error of its p."""
    return f"{name} ({MC_RESAMPLES} random permutations, Monte Carlo error ± {math.sqrt(p * (1 - p) / MC_RESAMPLES):.2g})"


def logrank_z(times: np.ndarray, reached: np.ndarray, in_a: np.ndarray) -> np.ndarray:
    """The standardised log-rank statistic (O - E) / sqrt(V) of group a, for every row of ``in_a``
    ((..., N) booleans: which of the N pooled runs are in a): at each distinct event time t,
    O - E = d_a - d·n_a/n and V = d·(n_a/n)·(1 - n_a/n)·(n - d)/(n - 1) (the hypergeometric variance,
    ties handled as scipy.stats.logrank and lifelines do). 0 where V = 0 (then O - E = 0 as well)."""
    t_ev = np.unique(times[reached])  # (K,) distinct event times
    at_risk = (times[:, None] >= t_ev[None, :]).astype(float)  # (N, K)
    event = ((times[:, None] == t_ev[None, :]) & reached[:, None]).astype(float)  # (N, K)
    n, d = at_risk.sum(0), event.sum(0)  # (K,)
    g = np.asarray(in_a, float)
    n_a, d_a = g @ at_risk, g @ event  # (..., K)
    share = n_a / n
    o_e = (d_a - d * share).sum(-1)
    v = (d * share * (1 - share) * np.where(n > 1, (n - d) / np.maximum(n - 1, 1), 0.0)).sum(-1)
    return np.where(v > 1e-15, o_e / np.sqrt(np.where(v > 1e-15, v, 1.0)), 0.0)


def _logrank_exact(da: dict, db: dict) -> tuple[float, float, str, float]:
    """(p, smallest attainable p, name, z) of the two-sided log-rank test by permutation of the
    variant labels (every relabelling up to ``EXACT_LIMIT``, else ``MC_RESAMPLES`` seeded random
    ones): the share of relabellings whose |z| is at least the observed one."""
    times = np.array([t for t, _ in da.values()] + [t for t, _ in db.values()], float)
    reached = np.array([e for _, e in da.values()] + [e for _, e in db.values()], bool)
    n_a, n_b = len(da), len(db)
    z_obs = float(logrank_z(times, reached, np.arange(n_a + n_b) < n_a))
    count = comb(n_a + n_b, n_a)

    def stat(ia, ib, axis):  # ia: the indices a relabelling puts in a, (..., n_a)
        ia = np.moveaxis(np.asarray(ia, int), axis, -1)
        mask = np.zeros(ia.shape[:-1] + (n_a + n_b,), bool)
        np.put_along_axis(mask, ia, True, axis=-1)
        return np.abs(logrank_z(times, reached, mask))

    exact = count <= EXACT_LIMIT
    res = st.permutation_test((np.arange(n_a), np.arange(n_a, n_a + n_b)), stat, permutation_type="independent",
                              vectorized=True, alternative="greater", n_resamples=count if exact else MC_RESAMPLES,
                              rng=np.random.default_rng(0))
    name = "exact log-rank test (every relabelling of the runs)"
    p = float(res.pvalue)
    return p, exact_floor(n_a, n_b, False), name if exact else _mc_name("log-rank permutation test", p), z_obs


def _outcome_pair(c: Comparison, f: ResultField, ra: list[dict], rb: list[dict]) -> None:
    va, ma = _outcome_values(ra, f.name)
    vb, mb = _outcome_values(rb, f.name)
    ea, eb = mean_ci(va.values()), mean_ci(vb.values())
    c.n_a, c.n_b, c.mean_a, c.mean_b = ea.n, eb.n, ea.mean, eb.mean
    c.value_a, c.value_b = ea.value(f.digits), eb.value(f.digits)
    if ea.n and eb.n:
        c.diff = ea.mean - eb.mean
        c.better = c.a if (c.diff > 0) == bool(f.higher_is_better) else c.b
        if c.diff == 0:
            c.better = None
    incomplete = "; ".join(t for t in (_missing_text(c.a, ma), _missing_text(c.b, mb)) if t)
    if incomplete:
        c.reason = f"incomplete ({incomplete}); a test needs every planned run"
        return
    div = [f"{v} diverged in {m['diverged']} of {len(r)} seeds" for v, m, r in ((c.a, ma, ra), (c.b, mb, rb))
           if m["diverged"]]
    if div:
        c.reason = (f"{' and '.join(div)}; a diverged run has no {f.label} of its own (its last numbers predate "
                    "the blow-up) and the runs that survived are not a fair sample of the variant, so the divergence "
                    "rates are compared instead")
        return
    for v, m in ((c.a, ma), (c.b, mb)):
        if m["without a value"]:
            c.reason = f"{m['without a value']} finished run(s) of {v} have no {f.label}"
            return
    if min(ea.n, eb.n) < MIN_N:
        c.reason = f"fewer than {MIN_N} runs per variant (n = {ea.n} vs {eb.n})"
        return
    paired = set(va) == set(vb)
    seeds = sorted(va)
    x = np.array([va[s] for s in seeds]) if paired else np.array(list(va.values()))
    y = np.array([vb[s] for s in seeds]) if paired else np.array(list(vb.values()))
    if (paired and _constant(x - y)) or (not paired and _constant(x) and _constant(y)):
        c.reason = ("no variation between seeds: every seed gives the same "
                    + ("difference" if paired else "value in each variant") + f" ({c.diff:+.4g}); "
                    "the seeds replicate nothing, so there is no test")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-constant samples: the numbers stand
        res = st.ttest_rel(x, y) if paired else st.ttest_ind(x, y, equal_var=False)
        ci = res.confidence_interval(LEVEL)
    if not math.isfinite(res.pvalue):
        c.reason = "the t statistic is undefined for these values; no test"
        return
    c.test = f"paired t-test over {x.size} seeds" if paired else "Welch's t-test"
    c.p, c.diff_low, c.diff_high = float(res.pvalue), float(ci.low), float(ci.high)
    c.p_exact, c.p_exact_min, c.exact_test = _permutation(x, y, paired)
    sd = (float(np.std(x - y, ddof=1)) if paired else
          math.sqrt(((x.size - 1) * np.var(x, ddof=1) + (y.size - 1) * np.var(y, ddof=1)) / (x.size + y.size - 2)))
    c.mde = detectable_difference(sd, x.size, y.size, paired)
    if math.isfinite(c.mde):
        c.mde_text = (f"smallest difference this design detects with {POWER:.0%} power: ±{c.mde:.{f.digits}f} "
                      f"({'paired ' if paired else ''}t-test at α = {ALPHA}, from the observed SD {sd:.2g}"
                      f"{' of the differences' if paired else ' within variants'}, n = {x.size} vs {y.size})")


def _time_pair(c: Comparison, f: ResultField, ra: list[dict], rb: list[dict]) -> None:
    from statsmodels.stats.proportion import confint_proportions_2indep

    ta, tb = time_to_target(ra, f), time_to_target(rb, f)
    c.n_a, c.n_b, c.mean_a, c.mean_b = ta.n, tb.n, ta.median, tb.median
    c.value_a = f"{ta.value(f.digits)}, reached in {ta.reached}/{ta.n}"
    c.value_b = f"{tb.value(f.digits)}, reached in {tb.reached}/{tb.n}"
    c.mde_text = ("smallest detectable difference not stated for censored times (no standard power formula for the "
                  "exact log-rank test)")
    da, ma = _time_values(ra, f)
    db, mb = _time_values(rb, f)
    keys = ("failed", "not finished", "damaged", "without a stopping point")
    incomplete = "; ".join(t for t in (_missing_text(c.a, ma, keys), _missing_text(c.b, mb, keys)) if t)
    if ta.n and tb.n:
        c.diff = ta.reached / ta.n - tb.reached / tb.n
        low, high = confint_proportions_2indep(ta.reached, ta.n, tb.reached, tb.n, method="newcomb",
                                               compare="diff", alpha=1 - LEVEL)
        c.diff_low, c.diff_high = float(low), float(high)
        fisher = st.fisher_exact([[ta.reached, ta.n - ta.reached], [tb.reached, tb.n - tb.reached]])
        c.extra = f"Fisher's exact test on the reach rate p {_p(float(fisher.pvalue))}"
    if incomplete:
        c.reason = f"incomplete ({incomplete}); a test needs every planned run"
        return
    if min(ta.n, tb.n) < MIN_N:
        c.reason = f"fewer than {MIN_N} runs per variant (n = {ta.n} vs {tb.n})"
        return
    if ta.reached + tb.reached == 0:
        c.reason = "no run of either variant reached the target; no test"
        return
    # every seed of each variant the same (5/5 at one step vs 0/5): a rank test still sees complete
    # separation, which is evidence (as Fisher's test on the reach rate says), so it is tested
    p, floor, name, z = _logrank_exact(da, db)
    c.test, c.p, c.p_exact, c.p_exact_min, c.exact_test = name, p, p, floor, name

    def censored(d):
        return st.CensoredData(uncensored=[t for t, e in d.values() if e], right=[t for t, e in d.values() if not e])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        asym = float(st.logrank(censored(da), censored(db)).pvalue)
    if math.isfinite(asym):
        below = (f" - below {_p(floor).removeprefix('= ')}, the smallest p any exact test can give at these n: "
                 "the approximation overstates the evidence" if asym < floor * (1 - 1e-9) else "")
        c.extra = f"asymptotic log-rank p {_p(asym)}{below}; " + c.extra
    if z != 0:  # > 0: a reached the target more often than expected under no difference
        c.better = c.a if z > 0 else c.b
        k = sum(r["status"] == "diverged" for r in (ra if c.better == c.a else rb))
        if k:
            c.reason = (f"{c.better}'s {k} diverged run(s) are censored at the end of their planned budget, but a "
                        "variant with diverged runs wins nothing")


def _divergence_pair(c: Comparison, ra: list[dict], rb: list[dict]) -> None:
    from statsmodels.stats.proportion import confint_proportions_2indep

    ka, na = sum(r["status"] == "diverged" for r in ra), sum(r["status"] in ("done", "diverged") for r in ra)
    kb, nb = sum(r["status"] == "diverged" for r in rb), sum(r["status"] in ("done", "diverged") for r in rb)
    c.n_a, c.n_b, c.value_a, c.value_b = na, nb, f"{ka}/{na}", f"{kb}/{nb}"
    if not (na and nb):
        c.reason = "no finished runs"
        return
    c.mean_a, c.mean_b, c.diff = ka / na, kb / nb, ka / na - kb / nb
    low, high = confint_proportions_2indep(ka, na, kb, nb, method="newcomb", compare="diff", alpha=1 - LEVEL)
    c.diff_low, c.diff_high = float(low), float(high)
    c.test, c.p = "Fisher's exact test", float(st.fisher_exact([[ka, na - ka], [kb, nb - kb]]).pvalue)
    c.better = None if ka * nb == kb * na else (c.a if ka / na < kb / nb else c.b)


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values over the given family (None stays None): statsmodels' multipletests."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(ps) if p is not None and not math.isnan(p)]
    out: list[float | None] = [None] * len(ps)
    if idx:
        adjusted = multipletests([ps[i] for i in idx], alpha=ALPHA, method="holm")[1]
        for i, p in zip(idx, adjusted):
            out[i] = float(p)
    return out


def _applicable(f: ResultField, ra: list[dict], rb: list[dict], target) -> bool:
    """False where a variant records no such value at all (precise statistics without BN; times
    without a target)."""
    if f.kind == "time_to_target":
        return target is not None
    for group in (ra, rb):
        done = [r for r in group if r["status"] == "done"]
        if done and all(r.get(f.name) is None for r in done):
            return False
    return True


def compare(runs: list[dict], variants: list[str], *, primary: str = DEFAULT_PRIMARY, target: float | None = None,
            metrics=None, pairs=None, smoke_test: bool = False) -> list[Comparison]:
    """Comparisons between ``pairs`` of variants (default: all pairs): the primary metric first
    (Holm-adjusted over its pairs; the only verdicts), then the exploratory ``metrics`` (default:
    the result fields marked ``explored``), then divergence rates where some run diverged."""
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(variants, 2))
    names = [primary] + [m for m in (EXPLORED_FIELDS if metrics is None else metrics)
                         if m != primary and FIELDS[m].comparable]  # info fields are shown, never tested
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    out: list[Comparison] = []
    for name in names:
        f = FIELDS[name]
        role = "smoke test" if smoke_test else ("primary" if name == primary else "exploratory")
        for a, b in pairs:
            ra, rb = by_variant[a], by_variant[b]
            if not _applicable(f, ra, rb, target):
                if name == primary:
                    out.append(Comparison(name, a, b, role, f.label, reason=f"not applicable ({f.label} is "
                                                                           "recorded for only one of them)"))
                continue
            c = Comparison(name, a, b, role, f.label)
            (_time_pair if f.kind == "time_to_target" else _outcome_pair)(c, f, ra, rb)
            out.append(c)
    for a, b in pairs:
        ra, rb = by_variant[a], by_variant[b]
        if any(r["status"] == "diverged" for r in ra + rb):
            c = Comparison("diverged", a, b, "smoke test" if smoke_test else "exploratory", "divergence rate")
            _divergence_pair(c, ra, rb)
            out.append(c)
    if smoke_test:
        for c in out:  # described, never tested
            c.p = c.p_exact = c.p_exact_min = None
            c.test = c.exact_test = c.extra = ""
            c.diff_low = c.diff_high = math.nan
            c.reason = "a smoke test (--quick) draws no conclusions"
    prim = [c for c in out if c.role == "primary"]
    floors = holm([c.p_exact_min for c in prim])  # the best any data could do, after Holm
    for c, p, pe, floor in zip(prim, holm([c.p for c in prim]), holm([c.p_exact for c in prim]), floors):
        c.p_holm, c.p_exact_holm = p, pe
        _verdict(c, by_variant, floor, len(prim), sum(f is not None for f in floors))
    for c in out:
        c.sentence = _sentence(c, target)
    return out


def _verdict(c: Comparison, by_variant: dict[str, list[dict]], floor_holm: float | None = None,
             family: int = 1, tested: int = 1) -> None:
    """The pre-set rule. A verdict needs a test that can reach α: where the exact test's smallest
    attainable p (Holm-adjusted as if every pair of the family were at its own floor, ``floor_holm``)
    is not below α, no data could give one - the reason says so and how many seeds per variant would.
    Otherwise the verdict's test (Holm-adjusted) must be below α, and the permutation test
    (Holm-adjusted over the same family) too; a variant with diverged runs wins nothing."""
    def withhold(why: str) -> None:
        c.reason = "; ".join(t for t in (why, c.reason) if t)

    if c.p is None:
        return
    if floor_holm is not None and floor_holm >= ALPHA * (1 - 1e-12):
        paired = "sign-flip" in c.exact_test
        need = seeds_for_verdict(paired, family)
        holm_text = f" ({floor_holm:.2g} after Holm over {tested} tested comparisons)" if tested > 1 else ""
        need_floor = exact_floor(need, need, paired)
        need_text = f"{need_floor:.2g}" + (f", {need_floor * family:.2g} after Holm over {family}" if family > 1 else "")
        withhold(f"no verdict is possible with n = {c.n_a} vs {c.n_b}: the smallest p the {c.exact_test} can give "
                 f"at these n is {c.p_exact_min:.2g}{holm_text}, not below α = {ALPHA}; {need} seeds per variant "
                 f"would make a verdict possible (smallest p {need_text})")
        return
    if c.p_holm is None or c.better is None or c.p_holm >= ALPHA:
        return
    if c.p_exact_holm is not None and c.p_exact_holm >= ALPHA:
        withhold(f"the {c.exact_test} does not agree (p {_p(c.p_exact)}, Holm-adjusted {_p(c.p_exact_holm)}), "
                 "and a verdict needs it to")
        return
    if any(r["status"] == "diverged" for r in by_variant[c.better]):
        if "wins nothing" in c.reason:
            return
        withhold(f"{c.better} diverged in some seeds, and a variant with diverged runs wins nothing")
        return
    c.winner = c.better


def _sentence(c: Comparison, target) -> str:
    loser = (c.b if c.winner == c.a else c.a) if c.winner else None
    pair = f"{c.a} ({c.value_a}) vs {c.b} ({c.value_b})" if c.value_a or c.value_b else f"{c.a} vs {c.b}"
    if c.role == "smoke test":
        return f"Smoke test, {c.label}: {pair}; no test, no verdict."
    exact = ""
    if c.p_exact is not None:
        exact = "" if c.exact_test == c.test else f"; {c.exact_test} p {_p(c.p_exact)}"
        if c.p_exact_min is not None and c.p_exact <= c.p_exact_min * (1 + 1e-9):
            exact += " (two-sided; the smallest possible at these n: every seed points the same way)"
        if c.p_exact_min is not None and c.p is not None and c.exact_test != c.test and c.p < c.p_exact_min:
            exact += (f" (the {c.test.split(' over ')[0]}'s p is below {c.p_exact_min:.2g}, the smallest an exact "
                      "test can give at these n: it rests on the normal approximation)")
    if c.p_exact_holm is not None and c.exact_test != c.test:
        exact += f", Holm-adjusted {_p(c.p_exact_holm)}"
    mde = f"; {c.mde_text}" if c.mde_text and c.p is not None else ""
    extra = f"; {c.extra}" if c.extra else ""
    ns = f"n = {c.n_a} vs {c.n_b}"
    if c.metric == "diverged":
        if c.p is None:
            return f"Exploratory, divergence: {c.a} vs {c.b}: {c.reason}."
        return (f"Exploratory, divergence rate: {c.a} diverged in {c.value_a} finished runs, {c.b} in {c.value_b} "
                f"({c.diff_text}; {c.test} p {_p(c.p)}).")
    tt = FIELDS[c.metric].kind == "time_to_target"
    what = (f"{c.label} (target {target}; runs that never reached it are censored where they stopped, diverged ones at "
             "the end of their planned budget)" if tt
            else c.label)
    if c.p is None:
        head = "No verdict on" if c.role == "primary" else "Exploratory, no test of"
        return f"{head} {what}: {pair}; {c.reason}{extra}."
    diff = "" if math.isnan(c.diff) else (f", {c.diff_text}" if tt else f", difference {c.diff_text}")
    if c.role == "exploratory":
        note = f" Note: {c.reason}." if c.reason else ""
        return (f"Exploratory, {what}: {pair}{diff}; {c.test} p {_p(c.p)} (not adjusted for multiple comparisons)"
                f"{exact}{extra}; {ns}{mde}.{note}")
    own = f" p {_p(c.p)}," if c.exact_test == c.test else ""
    stats_text = f"{c.test}{own} Holm-adjusted p {_p(c.p_holm)}{exact}{extra}; {ns}{mde}"
    if c.winner:
        w_first = c.winner == c.a
        vw, vl = (c.value_a, c.value_b) if w_first else (c.value_b, c.value_a)
        d = Comparison(c.metric, "", "", "", diff=c.diff if w_first else -c.diff,  # winner - loser
                       diff_low=c.diff_low if w_first else -c.diff_high,
                       diff_high=c.diff_high if w_first else -c.diff_low)
        if tt:
            return (f"{c.winner} reaches the target {target} sooner than {loser} ({c.label}; runs that never reached "
                    f"it are censored where they stopped, diverged ones at the end of their planned budget): {vw} vs "
                    f"{vl}, {d.diff_text}; {stats_text}.")
        word = "a higher" if FIELDS[c.metric].higher_is_better else "a lower"
        return (f"{c.winner} reaches {word} {c.label} than {loser}: {vw} vs {vl}, difference {d.diff_text}; "
                f"{stats_text}.")
    if c.reason:  # significant by the t-test, yet the pre-set rule withholds the verdict: say exactly that
        return f"No verdict on {c.a} vs {c.b} on {what} under the pre-set rule ({c.reason}): {pair}{diff}; {stats_text}."
    return f"These runs do not separate {c.a} and {c.b} on {what}: {pair}{diff}; {stats_text}."


@dataclass
class PlanLine:
    """How many seeds a pair of variants needs to detect a difference (``plan``)."""
    a: str
    b: str
    paired: bool
    n: int  # seeds per variant observed (the smaller)
    sd: float  # the observed SD: of the paired differences, or pooled within variants (nan: none)
    detectable: float  # the smallest difference detectable at POWER with the observed n (nan: not known)
    seeds: int | None  # seeds per variant needed for the difference (None: the SD is not known)
    sentence: str = ""


def plan(runs: list[dict], variants: list[str], difference: float, metric: str = DEFAULT_PRIMARY,
         pairs=None) -> list[PlanLine]:
    """For each pair of variants (default: all): from the observed seed-to-seed SD of ``metric`` over
    the runs that finished without diverging, the smallest difference the present design detects with
    80% power, and the seeds per variant a study needs to detect ``difference`` with Holm over all the
    pairs (``seeds_needed``: statsmodels' TTestPower / TTestIndPower, never fewer than an exact test
    needs to reach α)."""
    f = FIELDS[metric]
    if f.kind != "outcome":
        raise ValueError(f"a plan needs an outcome metric with a seed-to-seed SD (got {metric!r}, a {f.kind} field)")
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(variants, 2))
    out = []
    for a, b in pairs:
        va = _outcome_values([r for r in runs if r["variant"] == a], metric)[0]
        vb = _outcome_values([r for r in runs if r["variant"] == b], metric)[0]
        paired = bool(va) and set(va) == set(vb)
        if paired:
            d = np.array([va[s] - vb[s] for s in sorted(va)])
            sd = float(np.std(d, ddof=1)) if d.size >= 2 else math.nan
        else:
            x, y = np.array(list(va.values())), np.array(list(vb.values()))
            sd = (math.sqrt(((x.size - 1) * np.var(x, ddof=1) + (y.size - 1) * np.var(y, ddof=1)) / (x.size + y.size - 2))
                  if min(x.size, y.size) >= 2 else math.nan)
        n = min(len(va), len(vb))
        line = PlanLine(a, b, paired, n, sd, detectable_difference(sd, len(va), len(vb), paired), None)
        design = "paired differences" if paired else "within variants"
        if not (math.isfinite(sd) and sd > 0):
            line.sentence = (f"{a} vs {b}: no seed-to-seed SD of the {f.label} to plan from (n = {len(va)} vs "
                             f"{len(vb)}{', no variation between seeds' if sd == 0 else ''}); run at least "
                             f"{seeds_for_verdict(paired, len(pairs))} seeds per variant, the fewest at which an exact "
                             "test can reach α")
        else:
            line.seeds = seeds_needed(difference, sd, paired, len(pairs))
            now = (f"now detectable with {POWER:.0%} power: ±{line.detectable:.{f.digits}f}"
                   if math.isfinite(line.detectable) else "nothing detectable yet")
            line.sentence = (f"{a} vs {b}: observed SD {sd:.2g} ({design}, n = {len(va)} vs {len(vb)}); {now}; to "
                             f"detect a difference of {difference:g} in {f.label} with {POWER:.0%} power at α = {ALPHA} "
                             f"(Holm over {len(pairs)} pair{'s' if len(pairs) != 1 else ''}): {line.seeds} seeds per "
                             "variant")
        out.append(line)
    return out


# ------------------------------------------------------------------------------------------ BN at test time


@dataclass
class PreciseNote:
    """Precise BN statistics against the moving averages, paired over the runs of one variant."""
    variant: str
    field: str  # the precise-statistics field
    moving: str  # the moving-average field it replaces
    moving_value: Estimate
    precise_value: Estimate
    diff: Estimate  # precise - moving, per run
    disagree: bool  # the 95% CI of the difference excludes 0 (or every seed differs by the same amount)
    sentence: str = ""


def precise_vs_moving(runs: list[dict], variants: list[str]) -> list[PreciseNote]:
    """For every variant with precise-statistics results: both accuracies, their paired difference
    with its 95% CI, and whether they disagree beyond it."""
    notes = []
    for f in RESULT_FIELDS:
        if f.moving_average is None:
            continue
        mv = FIELDS[f.moving_average]
        for v in variants:
            both = [(r[f.name], r[mv.name]) for r in runs if r["variant"] == v and r["status"] == "done"
                    and r.get(f.name) is not None and r.get(mv.name) is not None]
            if not both:
                continue
            p, m = np.array(both, dtype=float).T
            d = mean_ci(p - m)
            disagree = d.n >= MIN_N and ((d.constant and d.mean != 0) or (d.has_interval and (d.low > 0 or d.high < 0)))
            note = PreciseNote(v, f.name, mv.name, mean_ci(m), mean_ci(p), d, disagree)
            if disagree:
                note.sentence = (f"{v}: precise BN statistics change the {mv.label} by {d.mean:+.4f} "
                                 f"({'the same in every seed' if d.constant else f'95% CI {d.low:+.4f} to {d.high:+.4f}'}"
                                 f", paired over {d.n} runs): the moving averages do not match the population "
                                 "statistics the network sees.")
            elif d.n < MIN_N:
                note.sentence = (f"{v}: precise BN statistics change the {mv.label} by {d.mean:+.4f} on average "
                                 f"(n = {d.n}: too few runs for an interval).")
            else:
                note.sentence = (f"{v}: precise statistics and moving averages agree on the {mv.label} within the "
                                 f"95% CI of their difference ({d.mean:+.4f} ± {(d.high - d.low) / 2:.4f}).")
            notes.append(note)
    return notes


# ------------------------------------------------------------------------------------------ trends over a setting


def device_batch(config: dict) -> int:
    """Images per device in one training step of a run (``config``: its stored {"model", "train"}): the
    batch divided among its data-parallel processes; for Ghost BN in one process, the ghost batch, which
    normalises as one device of that many images would. The x axis of a grouped batch-size study."""
    train, norm = config.get("train", {}), str(config.get("model", {}).get("norm", ""))
    per_device = math.ceil(train.get("batch_size", 32) / train.get("devices", 1))
    if norm.startswith("ghost:") and train.get("devices", 1) == 1:
        return min(int(norm.split(":")[1]), per_device)
    return per_device


def _per_doubling(value: float, low: float, high: float) -> str:
    """A change of the error per doubling of the batch, with its 95% interval, as tables show it."""
    return f"{value:+.2f} points per doubling (95% CI {low:+.2f} to {high:+.2f})"


def _p_cell(p: float | None) -> str:
    return "-" if p is None else _p(p).removeprefix("= ")


@dataclass
class Trend:
    """Least-squares line of a method's error (%) on log2(images per device), over every finished run
    (seeds as replicates): ``slope`` is the change of the error per doubling of the per-device batch,
    with its 95% t interval and the p-value of slope = 0."""
    group: str
    metric: str  # the accuracy field the error is 100 x (1 - it)
    n: int
    settings: int  # distinct per-device batches
    slope: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    p: float | None = None

    @property
    def slope_text(self) -> str:
        if self.p is None:
            return f"no fit (n = {self.n}, {self.settings} setting{'s' if self.settings != 1 else ''})"
        return _per_doubling(self.slope, self.low, self.high)

    @property
    def p_text(self) -> str:
        return _p_cell(self.p)

    @property
    def text(self) -> str:
        return self.slope_text + (f", p {_p(self.p)}" if self.p is not None else "")


def trend(group: str, metric: str, xs, accuracies, level: float = LEVEL) -> Trend:
    """``Trend`` of the error 100·(1 - accuracy) on log2(x). A fit needs two settings and three runs; the
    same error in every run gives a flat line without an interval."""
    pts = [(math.log2(x), 100.0 * (1.0 - a)) for x, a in zip(xs, accuracies)
           if a is not None and math.isfinite(a) and x > 0]
    t = Trend(group, metric, len(pts), len({x for x, _ in pts}))
    if t.settings < 2 or t.n < MIN_N:
        return t
    x, y = np.array(pts).T
    if _constant(y):
        t.slope, t.low, t.high = 0.0, 0.0, 0.0
        return t
    fit = st.linregress(x, y)
    half = float(st.t.ppf((1 + level) / 2, t.n - 2) * fit.stderr) if t.n > 2 else float("nan")
    t.slope, t.low, t.high, t.p = float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, float(fit.pvalue)
    return t


@dataclass
class Interaction:
    """How much faster a method's error (%) changes per doubling of images per device than the reference
    method's: the method x log2(batch) interaction of one regression over every finished run of both,

        error = a + b·log2(x) + c·[method] + d·[method]·log2(x) + (one offset per seed)

    (ordinary least squares; the seed offsets use the paired design: a seed's runs share data order and
    initial weights). ``d`` with its 95% t interval and the p-value of d = 0: d < 0 means the method's
    error falls faster than the reference's as the batch grows, i.e. it suffers more from small batches."""
    group: str
    reference: str
    metric: str
    n: int
    d: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    p: float | None = None
    why: str = ""  # no fit: why

    @property
    def d_text(self) -> str:
        return f"no fit: {self.why}" if self.p is None else _per_doubling(self.d, self.low, self.high)

    @property
    def p_text(self) -> str:
        return _p_cell(self.p)

    @property
    def reading(self) -> str:
        """The interval in words (unadjusted, like the p-value)."""
        if self.p is None:
            return "-"
        if self.high < 0:
            return f"small batches hurt {self.group} more than {self.reference}"
        if self.low > 0:
            return f"small batches hurt {self.group} less than {self.reference}"
        return "no difference between the slopes detected"


def interaction(group: str, reference: str, metric: str, points, level: float = LEVEL) -> Interaction:
    """``Interaction`` of ``group`` against ``reference`` from ``points``: (group, images per device, seed,
    accuracy) of every finished run of the two (other groups and non-finite accuracies are left out).
    Fitted with statsmodels' OLS; a fit needs two settings in each method and more runs than coefficients."""
    import pandas as pd
    import statsmodels.formula.api as smf

    rows = [(g, math.log2(x), str(s), 100.0 * (1.0 - a)) for g, x, s, a in points
            if g in (group, reference) and a is not None and math.isfinite(a) and x > 0]
    out = Interaction(group, reference, metric, len(rows))
    df = pd.DataFrame(rows, columns=["method", "log2x", "seed", "error"])
    for g in (group, reference):
        if df[df.method == g].log2x.nunique() < 2:
            out.why = f"{g} has runs at fewer than two batch sizes"
            return out
    df["is_method"] = (df.method == group).astype(float)
    seeds = " + C(seed)" if df.seed.nunique() > 1 else ""
    model = smf.ols(f"error ~ log2x * is_method{seeds}", data=df)
    if len(df) <= model.exog.shape[1]:
        out.why = f"{len(df)} runs for {model.exog.shape[1]} coefficients"
        return out
    if _constant(df.error.to_numpy()):
        out.d, out.low, out.high, out.why = 0.0, 0.0, 0.0, "the same error in every run"
        return out
    fit = model.fit()
    name = "log2x:is_method"
    low, high = fit.conf_int(alpha=1 - level).loc[name]
    out.d, out.low, out.high, out.p = float(fit.params[name]), float(low), float(high), float(fit.pvalues[name])
    return out
