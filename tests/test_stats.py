"""Statistics over seeds: every p-value and interval against an independent computation on the
same numbers (hand formulas, scipy, lifelines), censored times to target, every planned run
counted, small samples, smoke tests, and the result schema the store and the report derive from."""

import itertools
import json
import math
import sqlite3
import warnings

import numpy as np
import pytest
from scipy import stats as st
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import RunStore, apply_quick, expand, load_results, parse_experiment
from bnlab.experiments.results import FIELDS, RESULT_COLUMNS, RESULT_FIELDS
from bnlab.experiments.stats import (ALPHA, MIN_N, compare, holm, kaplan_meier, mean_ci, precise_vs_moving,
                                     variant_stats)
from bnlab.report.build import build_report, stats_rows

Z = st.norm.ppf(0.975)


# ------------------------------------------------------------------------------------------ helpers


def run(variant, seed, status="done", **values):
    return {"run_id": f"{variant}/seed-{seed}", "variant": variant, "seed": seed, "status": status,
            "error": "loss became non-finite during epoch 2: the run diverged" if status == "diverged" else
            ("RuntimeError: boom" if status == "failed" else None), **values}


def outcome_runs(values: dict[str, list], field="final_val_accuracy", seeds=None):
    """One done run per value; None in the list = a diverged run; 'failed' = a failed run."""
    out = []
    for v, xs in values.items():
        for i, x in enumerate(xs):
            s = seeds[v][i] if seeds else i
            if x is None:
                out.append(run(v, s, "diverged"))
            elif x == "failed":
                out.append(run(v, s, "failed"))
            else:
                out.append(run(v, s, **{field: x}))
    return out


def time_runs(variant, events: list, budget: int, status=None):
    """steps_to_target per seed (None: never reached, censored at ``budget`` = steps_run)."""
    status = status or ["done"] * len(events)
    return [run(variant, i, s, steps_to_target=t, steps_run=budget if s == "done" else budget // 10, epochs_run=30,
                train_seconds=30.0) for i, (t, s) in enumerate(zip(events, status))]


def by(comps, metric, a=None, b=None):
    found = [c for c in comps if c.metric == metric and (a is None or {c.a, c.b} == {a, b})]
    assert len(found) == 1, [(c.metric, c.a, c.b) for c in comps]
    return found[0]


def welch_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    d = a.mean() - b.mean()
    q = st.t.ppf(0.975, df)
    return d, 2 * st.t.sf(abs(d / se), df), d - q * se, d + q * se


def paired_hand(a, b):
    d = np.asarray(a, float) - np.asarray(b, float)
    se = d.std(ddof=1) / math.sqrt(d.size)
    q = st.t.ppf(0.975, d.size - 1)
    return d.mean(), 2 * st.t.sf(abs(d.mean() / se), d.size - 1), d.mean() - q * se, d.mean() + q * se


def logrank_hand(a, b):
    """(chi-square, p) of the log-rank test; a, b: lists of (time, reached)."""
    o_minus_e = var = 0.0
    for t in sorted({t for t, e in a + b if e}):
        na, nb = sum(x >= t for x, _ in a), sum(x >= t for x, _ in b)
        da, d = sum(x == t and e for x, e in a), sum(x == t and e for x, e in a + b)
        n = na + nb
        o_minus_e += da - d * na / n
        var += d * (na / n) * (nb / n) * (n - d) / (n - 1) if n > 1 else 0
    chi2 = o_minus_e ** 2 / var if var > 1e-15 else 0.0
    return chi2, st.chi2.sf(chi2, 1)


def exact_logrank_hand(a, b):
    """Two-sided p of the log-rank test by enumerating every relabelling of the pooled runs."""
    pooled, k = a + b, len(a)
    obs = logrank_hand(a, b)[0]
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), k):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += logrank_hand(x, y)[0] >= obs * (1 - 1e-9)
        total += 1
    return hits / total


def fisher_hand(k1, n1, k2, n2):
    """Two-sided Fisher exact p: the hypergeometric tables as or less likely than the observed one."""
    k, n = k1 + k2, n1 + n2

    def prob(x):
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(n, k)
    obs = prob(k1)
    return sum(prob(x) for x in range(max(0, k - n2), min(k, n1) + 1) if prob(x) <= obs * (1 + 1e-7))


def wilson(k, n):
    p = k / n
    centre = (p + Z ** 2 / (2 * n)) / (1 + Z ** 2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z ** 2 / (4 * n ** 2)) / (1 + Z ** 2 / n)
    return centre - half, centre + half


def newcombe_hand(k1, n1, k2, n2):
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1), wilson(k2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def censored(pairs):
    return st.CensoredData(uncensored=[t for t, e in pairs if e], right=[t for t, e in pairs if not e])


# ------------------------------------------------------------------------------------------ estimates


def test_mean_ci_is_the_t_interval_and_hides_small_n():
    x = [0.91, 0.93, 0.90, 0.94, 0.92]
    e = mean_ci(x)
    half = st.t.ppf(0.975, 4) * np.std(x, ddof=1) / math.sqrt(5)
    assert e.n == 5 and math.isclose(e.low, np.mean(x) - half) and math.isclose(e.high, np.mean(x) + half)
    assert e.text() == f"{np.mean(x):.4f} ± {half:.4f}"
    two = mean_ci([0.39, 0.40])  # the "0.3930 ± 2.0203": never an interval at n < 3
    assert two.n == 2 and math.isnan(two.low) and "±" not in two.text()
    assert mean_ci([]).text() == "-" and mean_ci([0.5]).text() == "0.5000"
    same = mean_ci([0.8, 0.8, 0.8])
    assert same.constant and "no variation between seeds" in same.text() and "±" not in same.text()


@pytest.mark.parametrize("times,reached", [
    ([100, 200, 300, 400, 500], [1, 1, 1, 1, 1]),
    ([100, 120, 1500, 1500, 1500], [1, 1, 0, 0, 0]),
    ([3, 5, 5, 7, 9, 9, 12, 15], [1, 1, 0, 1, 1, 1, 0, 1]),
    ([2, 4, 6, 8, 10, 12], [1, 0, 1, 0, 1, 1]),
    (list(range(1, 31)), [1] * 30),
    ([1500] * 5, [0] * 5),
], ids=["all-reach", "two-of-five", "ties-and-censored", "alternating", "thirty", "none-reach"])
def test_kaplan_meier_median_and_ci_match_scipy_ecdf(times, reached):
    """lifelines' estimate (in bnlab) against scipy.stats.ecdf on CensoredData, log-log bands."""
    sf = st.ecdf(censored(list(zip(times, reached)))).sf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "undefined at some observations": where the curve is 0
        ci = sf.confidence_interval(0.95, method="log-log")

    def first_half(q, p):
        idx = np.nonzero(p <= 0.5)[0]  # nan (undefined band) never counts
        return float(q[idx[0]]) if idx.size else math.inf
    expected = (first_half(sf.quantiles, sf.probabilities), first_half(ci.low.quantiles, ci.low.probabilities),
                first_half(ci.high.quantiles, ci.high.probabilities))
    assert kaplan_meier(times, reached) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ tests vs hand formulas


def test_paired_t_difference_ci_and_p_match_the_hand_formula():
    a = [0.95, 0.96, 0.94, 0.955, 0.945, 0.95]
    b = [0.90, 0.93, 0.91, 0.915, 0.92, 0.925]  # 6 seeds: the sign-flip test can reach 2/64 < 0.05
    c = by(compare(outcome_runs({"a": a, "b": b}), ["a", "b"]), "final_val_accuracy")
    d, p, lo, hi = paired_hand(a, b)
    assert c.test == "paired t-test over 6 seeds"
    assert (c.diff, c.p, c.diff_low, c.diff_high) == pytest.approx((d, p, lo, hi), rel=1e-10)
    assert c.p_holm == pytest.approx(p)  # one pair: Holm changes nothing
    assert c.winner == "a" and f"difference {d:+.4f} (95% CI {lo:+.4f} to {hi:+.4f})" in c.sentence


def test_welch_difference_ci_and_p_match_the_hand_formula_when_seeds_differ():
    a, b = [0.90, 0.91, 0.92, 0.95], [0.50, 0.55, 0.45, 0.60, 0.52]
    runs = outcome_runs({"a": a, "b": b}, seeds={"a": [0, 1, 2, 3], "b": [10, 11, 12, 13, 14]})
    c = by(compare(runs, ["a", "b"]), "final_val_accuracy")
    d, p, lo, hi = welch_hand(a, b)
    assert c.test == "Welch's t-test" and "Welch's t-test" in c.sentence
    assert (c.diff, c.p, c.diff_low, c.diff_high) == pytest.approx((d, p, lo, hi), rel=1e-10)
    assert c.p == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue)


def test_exact_permutation_p_values_match_full_enumeration():
    a, b = [0.95, 0.91, 0.97, 0.92, 0.94], [0.90, 0.93, 0.89, 0.91, 0.92]
    paired = by(compare(outcome_runs({"a": a, "b": b}), ["a", "b"]), "final_val_accuracy")
    d = np.subtract(a, b)
    flips = [abs(np.mean(d * s)) for s in itertools.product((1, -1), repeat=5)]
    assert paired.exact_test == "exact sign-flip permutation test"
    assert paired.p_exact == pytest.approx(np.mean(np.array(flips) >= abs(d.mean()) - 1e-12))
    runs = outcome_runs({"a": a, "b": b[:4]}, seeds={"a": list(range(5)), "b": [5, 6, 7, 8]})
    indep = by(compare(runs, ["a", "b"]), "final_val_accuracy")
    pooled = np.array(a + b[:4])
    obs = abs(np.mean(a) - np.mean(b[:4]))
    stats_ = [abs(pooled[list(i)].mean() - np.delete(pooled, list(i)).mean())
              for i in itertools.combinations(range(9), 5)]
    assert indep.exact_test == "exact permutation test"
    assert indep.p_exact == pytest.approx(np.mean(np.array(stats_) >= obs - 1e-12))


def test_holm_matches_the_hand_formula():
    ps = [0.01, 0.04, 0.03, None, 0.2]
    m = 4
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    expected, running = {}, 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        expected[i] = running
    out = holm(ps)
    assert out[3] is None
    assert [out[i] for i in sorted(expected)] == pytest.approx([expected[i] for i in sorted(expected)])


def test_holm_runs_over_the_primary_metric_pairs_only():
    runs = outcome_runs({"a": [0.95, 0.96, 0.94, 0.955], "b": [0.60, 0.62, 0.58, 0.61], "c": [0.7, 0.72, 0.69, 0.71]})
    for r in runs:
        r["final_val_loss"] = 1 - r["final_val_accuracy"]
    comps = compare(runs, ["a", "b", "c"])
    prim = [c for c in comps if c.role == "primary"]
    assert len(prim) == 3 and all(c.metric == "final_val_accuracy" for c in prim)
    assert [c.p_holm for c in prim] == pytest.approx(holm([c.p for c in prim]))
    explo = [c for c in comps if c.metric == "final_val_loss"]
    assert explo and all(c.role == "exploratory" and c.p_holm is None and c.winner is None for c in explo)
    assert all(c.sentence.startswith("Exploratory") and "not adjusted" in c.sentence for c in explo)
    # the spec names its primary metric; it is validated against the result fields
    prim_loss = compare(runs, ["a", "b", "c"], primary="final_val_loss")
    assert {c.metric for c in prim_loss if c.role == "primary"} == {"final_val_loss"}


@pytest.mark.filterwarnings("ignore:Starting with pandas")  # lifelines' own pandas calls
def test_logrank_fisher_and_newcombe_match_lifelines_and_hand_formulas():
    from lifelines.statistics import logrank_test
    from statsmodels.stats.proportion import proportion_confint

    a = [(100, True), (250, True), (400, False), (300, True), (400, False)]
    b = [(300, True), (500, True), (800, False), (800, False), (800, False)]
    runs = (time_runs("a", [t if e else None for t, e in a], 400) +
            time_runs("b", [t if e else None for t, e in b], 800))
    c = by(compare(runs, ["a", "b"], target=0.9), "steps_to_target")
    ll = logrank_test([t for t, _ in a], [t for t, _ in b], [e for _, e in a], [e for _, e in b])
    assert c.test.startswith("exact log-rank test") and c.p == pytest.approx(exact_logrank_hand(a, b), rel=1e-9)
    assert f"asymptotic log-rank p = {ll.p_value:.2g}" in c.extra  # stated alongside, never the verdict's p
    assert ll.p_value == pytest.approx(logrank_hand(a, b)[1], rel=1e-9)
    assert c.better == "a"
    assert f"p = {fisher_hand(3, 5, 2, 5):.2g}" in c.extra
    assert (c.diff_low, c.diff_high) == pytest.approx(newcombe_hand(3, 5, 2, 5), rel=1e-9)
    assert wilson(3, 5) == pytest.approx(proportion_confint(3, 5, method="wilson"))  # the hand Wilson itself


# ------------------------------------------------------------------------------------------ censored times to target


def demo_like():
    """The demo's shape: no BN never reaches 0.9 in 1,500 steps, BN reaches it in every seed."""
    return time_runs("no-bn", [None] * 5, 1500) + time_runs("bn", [300, 420, 360, 480, 540], 1500)


def test_zero_of_five_against_five_of_five_is_a_censored_test_not_missing_data():
    comps = compare(demo_like(), ["no-bn", "bn"], target=0.9)
    c = by(comps, "steps_to_target")
    chi2, p = logrank_hand([(1500, False)] * 5, [(t, True) for t in (300, 420, 360, 480, 540)])
    assert p == pytest.approx(0.0018, abs=2e-4)  # the asymptotic p: below what any exact test can give
    assert c.p == pytest.approx(2 / math.comb(10, 5))  # the exact log-rank test: at its floor
    assert "Fisher's exact test on the reach rate p = 0.0079" in c.extra  # 2 / C(10, 5)
    assert "asymptotic log-rank p = 0.0018 - below 0.0079, the smallest p any exact test can give" in c.sentence
    assert "not enough" not in c.sentence.lower()
    assert "reached in 0/5" in c.sentence and "reached in 5/5" in c.sentence
    # as the primary metric it is a verdict, with both medians and the reach-rate difference's CI
    c = by(compare(demo_like(), ["no-bn", "bn"], target=0.9, primary="steps_to_target"), "steps_to_target")
    assert c.winner == "bn" and c.sentence.startswith("bn reaches the target 0.9 sooner than no-bn")
    assert "reach rate +100 pp (95% CI" in c.sentence
    # the table: Kaplan-Meier medians, every run counted
    vs = {v.variant: v for v in variant_stats(demo_like(), ["no-bn", "bn"], 0.9)}
    assert vs["no-bn"].times["steps_to_target"].text() == "not reached (> 1500)"
    km = kaplan_meier([300, 420, 360, 480, 540], [1] * 5)
    assert vs["bn"].times["steps_to_target"].text() == f"{km[0]:.0f} [{km[1]:.0f}, ∞]"


def test_two_quick_of_five_do_not_beat_five_of_five_slower():
    """The issue's case: reaching the target fast in 2 of 5 seeds is not better than in 5 of 5."""
    quick = time_runs("quick", [100, 120, None, None, None], 1500)
    steady = time_runs("steady", [400, 450, 500, 550, 600], 1500)
    c = by(compare(quick + steady, ["quick", "steady"], target=0.9, primary="steps_to_target"), "steps_to_target")
    a = [(100, True), (120, True)] + [(1500, False)] * 3
    b = [(t, True) for t in (400, 450, 500, 550, 600)]
    assert c.p == pytest.approx(exact_logrank_hand(a, b)) and c.p > 0.2
    assert c.winner is None and c.sentence.startswith("These runs do not separate")
    # what dropping the censored runs (the old statistics) would have said: a "significant" win
    assert st.ttest_ind([100, 120], [400, 450, 500, 550, 600], equal_var=False).pvalue < 0.05


def test_diverged_runs_are_censored_at_the_end_of_their_budget():
    runs = time_runs("a", [None, 200, None], 1500, ["diverged", "done", "done"])
    t = variant_stats(runs, ["a"], 0.9)[0].times["steps_to_target"]
    # the diverged run is in, never reaching the target: censored after every time observed (its budget
    # is not known here), not where it stopped (150)
    assert (t.n, t.reached, t.longest) == (3, 1, 1500)
    km = kaplan_meier([1500, 200, 1500], [0, 1, 0])
    assert (t.median, t.low, t.high) == pytest.approx(km, nan_ok=True)
    runs[0]["budget"] = {"steps_run": 2000}  # its planned budget, as load_results reads it
    t = variant_stats(runs, ["a"], 0.9)[0].times["steps_to_target"]
    assert t.longest == 2000 and "1 of 3 diverged in epoch 2" in t.text()


# ------------------------------------------------------------------------------------------ every planned run counts


def test_a_diverging_variant_wins_nothing():
    # 'wild' diverged in 2 of 5 seeds; its 3 survivors are the best runs of all
    runs = outcome_runs({"wild": [0.99, None, 0.985, None, 0.99], "calm": [0.90, 0.91, 0.92, 0.905, 0.915]})
    for r in runs:  # it also reaches the target first where it survives
        r.update(steps_to_target=50 if r["variant"] == "wild" and r["status"] == "done" else
                 (300 + 10 * r["seed"] if r["variant"] == "calm" else None),
                 steps_run=1500 if r["status"] == "done" else 40, epochs_run=30, train_seconds=3.0)
    for primary in ("final_val_accuracy", "steps_to_target"):
        comps = compare(runs, ["wild", "calm"], primary=primary, target=0.9)
        assert all(c.winner != "wild" for c in comps)
    c = by(compare(runs, ["wild", "calm"], target=0.9), "final_val_accuracy")
    assert c.p is None and c.sentence.startswith("No verdict on final validation accuracy")
    assert "wild diverged in 2 of 5 seeds" in c.sentence
    t = by(compare(runs, ["wild", "calm"], target=0.9, primary="steps_to_target"), "steps_to_target")
    assert t.winner is None and (t.better != "wild" or "wins nothing" in t.sentence)
    div = by(compare(runs, ["wild", "calm"], target=0.9), "diverged")
    assert div.role == "exploratory" and div.p == pytest.approx(fisher_hand(2, 5, 0, 5))
    # diverged and failed runs are outcomes in every cell: n per cell, and why the others are missing
    vs = variant_stats(runs, ["wild", "calm"], 0.9)[0]
    assert vs.runs_text() == "5: 3 done, 2 diverged"
    assert vs.metrics["final_val_accuracy"].text().endswith("(n=3; 2 diverged)")


def test_a_variant_that_always_diverges_loses_on_divergence_not_on_survivors():
    runs = outcome_runs({"a": [None] * 5, "b": [0.9, 0.91, 0.92, 0.93, 0.94]})
    comps = compare(runs, ["a", "b"])
    assert by(comps, "final_val_accuracy").p is None
    div = by(comps, "diverged")
    assert div.p == pytest.approx(2 / math.comb(10, 5)) and div.better == "b"
    header, rows = stats_rows(runs, ["a", "b"], None, ("final_val_accuracy",))
    assert rows[0][:3] == ["a", "5: 5 diverged", "- (n=0; 5 diverged)"]


def test_a_failed_or_unfinished_run_blocks_the_test_and_is_named():
    runs = outcome_runs({"a": [0.95, 0.96, "failed", 0.955], "b": [0.60, 0.62, 0.58, 0.61]})
    c = by(compare(runs, ["a", "b"]), "final_val_accuracy")
    assert c.p is None and c.winner is None and "a: 1 failed" in c.reason
    runs[0]["status"] = "pending"
    c = by(compare(runs, ["a", "b"]), "final_val_accuracy")
    assert "1 not finished" in c.reason
    vs = variant_stats(runs, ["a"])[0]
    assert vs.runs_text() == "4: 2 done, 1 failed, 1 not finished"
    assert vs.metrics["final_val_accuracy"].text().endswith("(n=2; 1 failed, 1 not finished)")


# ------------------------------------------------------------------------------------------ small samples


@pytest.mark.parametrize("seeds", [None, {"a": [0, 1, 2], "b": [3, 4, 5]}], ids=["paired", "unpaired"])
def test_identical_values_across_seeds_are_no_variation_never_p0(seeds):
    runs = outcome_runs({"a": [0.9, 0.9, 0.9], "b": [0.8, 0.8, 0.8]}, seeds=seeds)
    c = by(compare(runs, ["a", "b"]), "final_val_accuracy")
    assert c.p is None and c.p_holm is None and c.winner is None
    assert "no variation between seeds" in c.sentence and "p =" not in c.sentence
    two = by(compare(outcome_runs({"a": [0.9, 0.9], "b": [0.8, 0.8]}), ["a", "b"]), "final_val_accuracy")
    assert two.p is None and two.winner is None


def test_two_runs_per_variant_show_no_interval_and_no_test():
    runs = outcome_runs({"a": [0.39, 0.40], "b": [0.80, 0.82]})
    _, rows = stats_rows(runs, ["a", "b"], None, ("final_val_accuracy",))
    assert all("±" not in cell for row in rows for cell in row)
    c = by(compare(runs, ["a", "b"]), "final_val_accuracy")
    assert c.p is None and f"fewer than {MIN_N} runs per variant" in c.sentence and "±" not in c.sentence


def test_at_small_n_the_exact_test_must_agree():
    a = np.array([1.0, 1.1, 0.9, 1.05, 0.0, 1.02])
    b = np.array([0.0, 0.0, 0.0, 0.0, 0.01, 0.0])  # five pairs far apart, one the other way
    c = by(compare(outcome_runs({"a": list(a), "b": list(b)}), ["a", "b"]), "final_val_accuracy")
    assert c.p < ALPHA and c.p == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert c.p_exact == pytest.approx(4 / 64) and c.winner is None
    assert "does not agree" in c.sentence and c.sentence.startswith("No verdict on a vs b")
    assert "do not separate" not in c.sentence  # significant by the t-test: withheld, not "not separated"
    # every pair the same way: the exact test is at its most extreme (2/64 < 0.05), the verdict stands
    c = by(compare(outcome_runs({"a": [1.0, 1.1, 0.9, 1.05, 0.8, 1.0], "b": list(b)}), ["a", "b"]),
           "final_val_accuracy")
    assert c.p_exact == pytest.approx(2 / 64) and c.winner == "a" and "smallest possible" in c.sentence


def test_smoke_test_comparisons_are_descriptions_without_tests():
    runs = outcome_runs({"a": [0.95, 0.96, 0.94], "b": [0.60, 0.62, 0.58]})
    comps = compare(runs, ["a", "b"], smoke_test=True)
    assert comps and all(c.p is None and c.winner is None and c.role == "smoke test" for c in comps)
    assert all("no test, no verdict" in c.sentence for c in comps)


def test_precise_statistics_disagreeing_with_moving_averages_is_said():
    runs = outcome_runs({"bn": [0.46, 0.50, 0.48, 0.47]})
    for r, p in zip(runs, [0.91, 0.90, 0.92, 0.905]):
        r["precise_val_accuracy"] = p
    (note,) = precise_vs_moving(runs, ["bn"])
    d = np.subtract([0.91, 0.90, 0.92, 0.905], [0.46, 0.50, 0.48, 0.47])
    lo, hi = st.t.interval(0.95, 3, loc=d.mean(), scale=st.sem(d))
    assert note.disagree and (note.diff.low, note.diff.high) == pytest.approx((lo, hi))
    assert f"by {d.mean():+.4f}" in note.sentence and "do not match" in note.sentence


# ------------------------------------------------------------------------------------------ schema and store


def test_result_fields_are_consistent():
    names = [f.name for f in RESULT_FIELDS]
    assert len(set(names)) == len(names)
    for f in RESULT_FIELDS:
        assert (f.kind == "time_to_target") == (f.censor_at is not None), f.name
        assert f.censor_at is None or FIELDS[f.censor_at].kind == "info"
        assert f.moving_average is None or FIELDS[f.moving_average].kind == "outcome"
        assert f.sql in ("REAL", "INTEGER", "TEXT")


def test_store_columns_derive_from_the_result_fields(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    cols = {row[1]: row[2] for row in store.db.execute("PRAGMA table_info(runs)")}
    store.close()
    assert all(cols[f.name] == f.sql for f in RESULT_FIELDS)


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, variant TEXT NOT NULL, seed INTEGER NOT NULL, config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    started REAL, finished REAL, seconds REAL, error TEXT, environment TEXT, engine TEXT,
    final_val_accuracy REAL, best_val_accuracy REAL, final_val_loss REAL, best_val_loss REAL,
    test_accuracy REAL, test_loss REAL, epochs_to_target INTEGER, steps_to_target INTEGER, seconds_to_target REAL,
    mean_epoch_seconds REAL, step_loss TEXT, artefacts TEXT);
CREATE TABLE probes (run_id TEXT NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, layer TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL NOT NULL);
CREATE TABLE epochs (run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL,
    train_loss REAL, train_accuracy REAL, val_loss REAL, val_accuracy REAL, seconds REAL, steps INTEGER,
    PRIMARY KEY (run_id, epoch));
"""


def test_a_store_written_before_the_new_columns_opens_and_reports(tmp_path):
    """A store from before this schema (no precise / best-model / stopping-point columns) still opens."""
    spec = parse_experiment(TINY)
    con = sqlite3.connect(tmp_path / "runs.sqlite")
    con.executescript(OLD_SCHEMA)
    con.execute("INSERT INTO meta VALUES ('spec', ?)", (json.dumps({k: v for k, v in
                                                                   spec.model_dump(mode="json").items()
                                                                   if k not in ("primary_metric", "smoke_test")}),))
    for p in expand(spec):
        con.execute("INSERT INTO runs (run_id, variant, seed, config_hash, config, status, final_val_accuracy, "
                    "epochs_to_target) VALUES (?, ?, ?, ?, ?, 'done', ?, NULL)",
                    (p.run_id, p.variant, p.seed, p.config_hash, json.dumps({"model": p.model, "train": p.train}),
                     0.5 + 0.01 * p.seed))
        con.executemany("INSERT INTO epochs VALUES (?, ?, 1.0, 0.5, 1.0, 0.5, 0.1, ?)",
                        [(p.run_id, e, 8 * e) for e in (1, 2)])
    con.commit()
    con.close()
    loaded, runs, _ = load_results(tmp_path)
    assert loaded.primary_metric == "final_val_accuracy" and not loaded.smoke_test
    assert all(r["precise_val_accuracy"] is None and r["best_test_accuracy"] is None for r in runs)
    assert all(r["steps_run"] == 16 and r["epochs_run"] == 2 for r in runs)  # from the epochs: still censored data
    t = variant_stats(runs, list(loaded.variants), 0.5)[0].times["steps_to_target"]
    assert (t.n, t.reached, t.longest) == (5, 0, 16)
    report = build_report(tmp_path)
    assert "precise" not in report.markdown.read_text().split("## Comparisons")[0].split("## Statistics")[1]


# ------------------------------------------------------------------------------------------ reports from a store

TINY = {
    "name": "tiny", "seeds": 5, "target_accuracy": 0.9, "description": "The full study: 5 seeds, 3 epochs.",
    "data": {"dataset": "synthetic", "validation": 0.25,
             "options": {"n_train": 120, "n_test": 40, "features": 6, "classes": 2}},
    "model": {"kind": "mlp", "input_shape": [6], "num_classes": 2, "hidden": [8]},
    "train": {"lr": 0.05, "epochs": 3, "batch_size": 16},
    "variants": {"no-bn": {"model": {"bn": "none"}}, "bn": {"model": {"bn": "before"}}},
    "quick": {"seeds": 2, "train": {"epochs": 1}},
}


def fake_result(variant, seed, n_epochs, steps_per_epoch=8):
    """A run result as the runner records it (every RESULT_FIELDS key), without training: BN
    reaches the target in every seed (at distinct steps), no BN in none."""
    bn = variant == "bn"
    acc = (0.95 + 0.004 * seed) if bn else (0.80 + 0.01 * seed)
    epochs = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": acc - 0.05 / e, "val_loss": 1.0 / e,
               "val_accuracy": acc - 0.1 / e, "seconds": 0.5, "steps": steps_per_epoch * e}
              for e in range(1, n_epochs + 1)]
    out = {k: None for k in RESULT_COLUMNS}
    out.update(status="done", seconds=2.0, history={"epochs": epochs, "engine": "fake"}, environment={"torch": "2"},
               final_val_accuracy=acc, best_val_accuracy=acc, final_val_loss=1 - acc, best_val_loss=1 - acc,
               test_accuracy=acc - 0.01, test_loss=1.01 - acc, best_epoch=n_epochs, best_test_accuracy=acc - 0.005,
               best_test_loss=1 - acc, epochs_to_target=1 if bn else None, steps_to_target=2 + seed if bn else None,
               seconds_to_target=0.1 + 0.01 * seed if bn else None, epochs_run=n_epochs,
               steps_run=n_epochs * steps_per_epoch, train_seconds=0.5 * n_epochs, mean_epoch_seconds=0.5,
               stopped="completed")
    if bn:
        out.update(precise_val_accuracy=acc + 0.002, precise_test_accuracy=acc - 0.008)
    return out


def fake_experiment(folder, spec):
    folder.mkdir()
    store = RunStore(folder / "runs.sqlite")
    store.set_meta(spec=json.dumps(spec.model_dump(mode="json")), name=spec.name)
    plans = expand(spec)
    store.add_runs(plans)
    for p in plans:
        store.record(p.run_id, fake_result(p.variant, p.seed, p.train["epochs"]))
    store.close()
    return folder


def test_report_shows_the_new_columns_tests_and_censored_time_to_target(tmp_path):
    # 6 seeds: with 5 the paired exact test could never go below 2/32 > 0.05 (no verdict possible)
    folder = fake_experiment(tmp_path / "e", parse_experiment({**TINY, "seeds": 6}))
    md = build_report(folder).markdown.read_text()
    for label in ("test accuracy (final model)", "test accuracy (best model)",
                  "validation accuracy, precise BN statistics", "steps to target (KM median [95% CI])", "6: 6 done"):
        assert label in md
    assert TINY["description"] in md and "Primary metric: final validation accuracy" in md
    assert "Exploratory comparisons" in md
    assert "- bn reaches a higher final validation accuracy than no-bn" in md
    assert "paired t-test over 6 seeds" in md and "difference" in md and "95% CI" in md
    assert "log-rank test" in md and "## BN statistics at test time" in md
    r = CliRunner().invoke(app, ["compare", str(folder)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    asym = st.logrank(censored([(24, False)] * 6), censored([(2 + s, True) for s in range(6)])).pvalue
    fisher = st.fisher_exact([[0, 6], [6, 0]]).pvalue  # 2 / C(12, 6)
    assert f"asymptotic log-rank p = {asym:.2g} - below {fisher:.2g}" in out
    assert f"Fisher's exact test on the reach rate p = {fisher:.2g}" in out
    assert "bn reaches a higher final validation accuracy than no-bn" in out


def test_a_quick_report_is_a_smoke_test_without_verdicts(tmp_path):
    spec = apply_quick(parse_experiment(TINY))
    assert spec.smoke_test and spec.seed_list() == [0, 1]
    folder = fake_experiment(tmp_path / "q", spec)
    report = build_report(folder)
    md, page = report.markdown.read_text(), report.html.read_text()
    assert report.smoke_test and md.startswith("# Smoke test (--quick): tiny")
    assert "<h1>Smoke test (--quick): tiny</h1>" in page
    assert "2 variants × 2 seeds (0, 1) = 4 runs, 1 epoch each, 8 optimizer steps per run (batch 16)" in md
    assert spec.description not in md  # the full preset's description would misstate what ran
    for text in (md, page):
        assert "±" not in text.split("Environment")[0].replace("mean ± half-width", "")  # n = 2: no intervals
        assert "reaches a" not in text and "These runs do not separate" not in text and "p =" not in text
    assert "a smoke test (--quick) draws no conclusions" in md
    r = CliRunner().invoke(app, ["compare", str(folder)])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and out.startswith("Smoke test (--quick): tiny") and "p =" not in out
    assert "4 runs" in out and "8 optimizer steps per run" in out


# ---------------------------------------------------------------- trends over the images per device

def test_trend_matches_an_ols_fit_by_statsmodels():
    import statsmodels.api as sm

    from bnlab.experiments.stats import trend
    rng = np.random.default_rng(7)
    xs = [2, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
    acc = [0.6 + 0.05 * np.log2(x) + rng.normal(0, 0.02) for x in xs]
    t = trend("bn", "test_accuracy", xs, acc)
    fit = sm.OLS(100 * (1 - np.array(acc)), sm.add_constant(np.log2(xs))).fit()
    low, high = fit.conf_int(0.05)[1]
    assert t.n == 12 and t.settings == 4
    assert t.slope == pytest.approx(fit.params[1], rel=1e-10)
    assert (t.low, t.high) == pytest.approx((low, high), rel=1e-9)
    assert t.p == pytest.approx(fit.pvalues[1], rel=1e-6)
    assert t.slope < 0 and "points per doubling" in t.text


def test_trend_needs_two_settings_and_three_runs_and_says_so():
    from bnlab.experiments.stats import trend
    assert trend("g", "m", [4, 4, 4], [0.5, 0.6, 0.7]).p is None  # one setting: no slope
    assert "no fit (n = 2, 2 settings)" in trend("g", "m", [2, 4], [0.5, 0.6]).text
    flat = trend("g", "m", [2, 4, 8], [0.9, 0.9, 0.9])
    assert flat.slope == 0 and flat.p is None  # no variation: a flat line, no p-value


@pytest.mark.parametrize("config, expected", [
    ({"train": {"batch_size": 32}, "model": {"norm": "batch"}}, 32),
    ({"train": {"batch_size": 32, "devices": 4}, "model": {"norm": "syncbatch"}}, 8),
    ({"train": {"batch_size": 10, "devices": 4}, "model": {"norm": "batch"}}, 3),  # shares 3, 3, 2, 2
    ({"train": {"batch_size": 16}, "model": {"norm": "ghost:4"}}, 4),
    ({"train": {"batch_size": 2}, "model": {"norm": "ghost:4"}}, 2),
], ids=["one-process", "four-processes", "uneven", "ghost", "ghost-larger-than-batch"])
def test_device_batch_is_the_images_one_device_normalises(config, expected):
    from bnlab.experiments.stats import device_batch
    assert device_batch(config) == expected


def test_trend_rows_refuse_an_incomplete_method_and_count_diverged_runs():
    from bnlab.experiments.spec import parse_experiment
    from bnlab.report.build import trend_rows
    spec = parse_experiment({"name": "g", "seeds": 3, "variants": {
        f"{m}-b{b}": {"group": m, "train": {"batch_size": b}} for m in ("bn", "gn") for b in (2, 4)}})
    runs = []
    for v in spec.variants:
        for s in range(3):
            status = "pending" if v == "gn-b4" and s == 2 else "diverged" if v == "bn-b2" and s == 0 else "done"
            acc = None if status != "done" else 0.9 - 0.01 * s + (0.02 if v.endswith("b4") else 0)
            runs.append({"run_id": f"{v}/seed-{s}", "variant": v, "status": status, "final_val_accuracy": acc,
                         "test_accuracy": acc, "config": json.dumps({"model": {}, "train": spec.variants[v].train})})
    rows = {r[0]: r for r in trend_rows(spec, runs)}
    assert rows["gn"][4] == "no fit: incomplete (5 of 6 runs finished)"
    assert rows["bn"][2] == "5 (1 diverged, left out)" and "points per doubling" in rows["bn"][4]
    # least squares over the 5 runs: errors 11, 12 at batch 2 (seed 0 diverged), 8, 9, 10 at batch 4
    assert rows["bn"][4].startswith("-2.50 points per doubling")


def _interaction_oracle(points, group, reference):
    """The interaction by hand: the design matrix, least squares, the classical standard error."""
    rows = [(g, np.log2(x), s, 100 * (1 - a)) for g, x, s, a in points if g in (group, reference)]
    seeds = sorted({s for _, _, s, _ in rows})
    X = np.array([[1.0, lx, g == group, lx * (g == group)] + [s == k for k in seeds[1:]] for g, lx, s, _ in rows],
                 dtype=float)
    y = np.array([e for *_, e in rows])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    s2 = float(((y - X @ beta) ** 2).sum()) / dof
    se = np.sqrt(s2 * np.linalg.inv(X.T @ X)[3, 3])
    half = st.t.ppf(0.975, dof) * se
    return beta[3], beta[3] - half, beta[3] + half, 2 * st.t.sf(abs(beta[3] / se), dof)


def test_interaction_matches_least_squares_by_hand():
    from bnlab.experiments.stats import interaction
    rng = np.random.default_rng(3)
    points = []
    for s in range(5):
        offset = rng.normal(0, 0.01)  # a seed's runs share an offset: the paired design
        for x in (2, 4, 8, 16, 32):
            points.append(("bn", x, s, 1 - (0.12 - 0.02 * np.log2(x) + offset + rng.normal(0, 0.004))))
            points.append(("gn", x, s, 1 - (0.05 + 0.002 * np.log2(x) + offset + rng.normal(0, 0.004))))
            points.append(("other", x, s, 0.5))  # not in the fit
    it = interaction("bn", "gn", "test_accuracy", points)
    d, low, high, p = _interaction_oracle(points, "bn", "gn")
    assert it.n == 50
    assert (it.d, it.low, it.high, it.p) == pytest.approx((d, low, high, p), rel=1e-9)
    assert it.low < -2.2 < it.high  # the planted difference of slopes, in points per doubling
    assert it.d_text.startswith(f"{d:+.2f} points per doubling")


def test_interaction_needs_two_settings_per_method():
    from bnlab.experiments.stats import interaction
    points = [("bn", 8, s, 0.9 + 0.01 * s) for s in range(3)] + [("gn", x, s, 0.9) for x in (2, 4) for s in range(3)]
    it = interaction("bn", "gn", "test_accuracy", points)
    assert it.p is None and it.d_text == "no fit: bn has runs at fewer than two batch sizes"


def test_interaction_rows_use_the_reference_group_and_refuse_incomplete_methods():
    from bnlab.experiments.spec import SpecError, parse_experiment
    from bnlab.report.build import interaction_rows
    variants = {f"{m}-b{b}": {"group": m, "train": {"batch_size": b}} for m in ("bn", "gn", "ln") for b in (2, 4, 8)}
    with pytest.raises(SpecError, match="reference_group must be one of the variants' groups"):
        parse_experiment({"name": "g", "seeds": 3, "reference_group": "GN", "variants": variants})
    spec = parse_experiment({"name": "g", "seeds": 3, "reference_group": "gn", "variants": variants})
    runs, points = [], []
    for v in spec.variants:
        m, b = v.split("-b")[0], int(v.split("-b")[1])
        for s in range(3):
            status = "running" if v == "ln-b8" and s == 1 else "done"
            acc = 0.9 + (0.01 * np.log2(b) if m == "bn" else 0) + 0.003 * s + 0.001 * ((b + s) % 3)
            runs.append({"run_id": f"{v}/seed-{s}", "variant": v, "seed": s, "status": status,
                         "final_val_accuracy": acc, "test_accuracy": acc,
                         "config": json.dumps({"model": {}, "train": spec.variants[v].train})})
            points.append((m, b, s, acc))
    rows = {r[0]: r for r in interaction_rows(spec, runs)}
    assert set(rows) == {"bn", "ln"} and rows["ln"][4] == "no fit: runs not finished"
    d, low, high, _ = _interaction_oracle(points, "bn", "gn")
    assert rows["bn"][1] == "gn" and rows["bn"][3] == "18"
    assert rows["bn"][4] == f"{d:+.2f} points per doubling (95% CI {low:+.2f} to {high:+.2f})"


def test_curves_by_method_draw_one_panel_per_method_and_one_line_per_batch():
    from bnlab.experiments.spec import parse_experiment
    from bnlab.report.plots import curves_by_method
    spec = parse_experiment({"name": "g", "seeds": 2, "variants": {
        f"{m}-b{b}": {"group": m, "train": {"batch_size": b}} for m in ("bn", "gn", "ln") for b in (2, 4, 8)}})
    runs, epochs = [], []
    for v in spec.variants:
        for s in range(2):
            rid = f"{v}/seed-{s}"
            runs.append({"run_id": rid, "variant": v, "seed": s, "status": "done",
                         "config": json.dumps({"model": {}, "train": spec.variants[v].train})})
            epochs += [{"run_id": rid, "epoch": e, "val_accuracy": 0.5 + 0.1 * e} for e in (1, 2, 3)]
    fig, caption = curves_by_method(runs, epochs, spec)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["bn", "gn", "ln"]
    assert all(len(ax.get_lines()) == 3 for ax in panels)  # batches 2, 4, 8
    errors = panels[0].get_lines()[0].get_ydata()
    assert errors == pytest.approx([40, 30, 20])  # 100 x (1 - accuracy), mean over the seeds
    assert "2 seeds per variant" in caption
    one_epoch = [e for e in epochs if e["epoch"] == 1]
    assert curves_by_method(runs, one_epoch, spec) is None


def test_a_method_without_batch_statistics_is_its_own_precise_model():
    from bnlab.report.plots import accuracy_of, has_batch_statistics
    gn = {"model": {"kind": "cnn", "bn": "before", "norm": "group:4"}}
    bn = {"model": {"kind": "cnn", "bn": "before", "norm": "batch"}}
    assert not has_batch_statistics(gn) and has_batch_statistics(bn)
    assert has_batch_statistics({"model": {"kind": "cnn", "bn": "before", "norm": "ghost:4"}})
    assert not has_batch_statistics({"model": {"kind": "mlp", "bn": "none"}})

    def run(config, status="done", precise=None):
        return {"status": status, "config": json.dumps(config), "test_accuracy": 0.9,
                "precise_test_accuracy": precise, "final_val_accuracy": 0.8, "precise_val_accuracy": precise}
    assert accuracy_of(run(gn), "precise_test_accuracy") == 0.9
    assert accuracy_of(run(gn), "precise_val_accuracy") == 0.8
    assert accuracy_of(run(bn), "precise_test_accuracy") is None  # BN without precise statistics: missing
    assert accuracy_of(run(bn, precise=0.95), "precise_test_accuracy") == 0.95
    assert accuracy_of(run(gn, status="diverged"), "precise_test_accuracy") is None


def test_the_interaction_reads_in_words():
    from bnlab.experiments.stats import Interaction
    assert Interaction("bn", "gn", "m", 20, -2.0, -3.0, -1.0, 0.001).reading == "small batches hurt bn more than gn"
    assert Interaction("bn", "gn", "m", 20, 2.0, 1.0, 3.0, 0.001).reading == "small batches hurt bn less than gn"
    assert Interaction("bn", "gn", "m", 20, 0.5, -1.0, 2.0, 0.4).reading == "no difference between the slopes detected"
    assert Interaction("bn", "gn", "m", 3).reading == "-"


def test_the_report_says_when_the_data_were_cut():
    from bnlab.experiments.spec import apply_quick, load_experiment
    from bnlab.report.build import limits_text
    assert limits_text(apply_quick(load_experiment("small-batch"))) == (
        "Data cut to the first 1,500 training examples (before the validation split) and the first 1,000 test "
        "examples (data options train_limit / test_limit).")
    assert limits_text(load_experiment("small-batch")) == ""
