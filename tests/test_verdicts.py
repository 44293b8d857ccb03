"""Verdicts need a test that can reach α (issue 28): exact floors at small n with Holm, exact log-rank
for times to target, divergence as an outcome (censored at the planned budget), complete separation
tested, and the minimum detectable effect / seeds needed against statsmodels. Every p is recomputed
here with scipy (or statsmodels), never with bnlab's own functions."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.power import TTestIndPower, TTestPower
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import RunStore, expand, load_results, parse_experiment
from bnlab.experiments.results import RESULT_COLUMNS
from bnlab.experiments.stats import ALPHA, compare, plan, seeds_needed, variant_stats


def run(variant, seed, status="done", **values):
    return {"run_id": f"{variant}/seed-{seed}", "variant": variant, "seed": seed, "status": status,
            "error": None, **values}


def outcome_runs(values: dict[str, list[float]]):
    return [run(v, i, final_val_accuracy=x) for v, xs in values.items() for i, x in enumerate(xs)]


def time_runs(variant, events, budget):
    """steps_to_target per seed (None: never reached, censored at ``budget`` steps)."""
    return [run(variant, i, steps_to_target=t, steps_run=budget, epochs_run=3, train_seconds=3.0)
            for i, t in enumerate(events)]


def primary(comps, a, b):
    (c,) = [c for c in comps if c.role == "primary" and {c.a, c.b} == {a, b}]
    return c


def sign_flip_p(x, y):
    return st.permutation_test((np.asarray(x), np.asarray(y)), lambda a, b, axis: np.abs(np.mean(a - b, axis=axis)),
                               permutation_type="samples", alternative="greater", n_resamples=np.inf).pvalue


def exact_logrank_scipy(a, b):
    """Two-sided exact log-rank p: |z| of scipy.stats.logrank over every relabelling of the pooled runs."""
    pooled = a + b

    def z(x, y):
        cd = [st.CensoredData(uncensored=[t for t, e in g if e], right=[t for t, e in g if not e]) for g in (x, y)]
        s = st.logrank(*cd).statistic
        return 0.0 if not math.isfinite(s) else abs(s)
    obs, hits, total = z(a, b), 0, 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += z(x, y) >= obs * (1 - 1e-9)
        total += 1
    return hits / total


# ------------------------------------------------------------------------------------------ floors


def test_three_seeds_with_a_clear_difference_get_no_verdict_and_the_seeds_that_would():
    a, b = [0.95, 0.96, 0.955], [0.60, 0.62, 0.61]
    c = primary(compare(outcome_runs({"a": a, "b": b}), ["a", "b"]), "a", "b")
    assert st.ttest_rel(a, b).pvalue < 0.001 and c.p == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert c.p_exact == pytest.approx(sign_flip_p(a, b)) == pytest.approx(0.25)  # every seed the same way
    assert c.winner is None and c.sentence.startswith("No verdict on a vs b")
    need = next(n for n in itertools.count(3) if 2 / 2 ** n < ALPHA)  # 2/2^6 = 0.031
    assert need == 6 and f"{need} seeds per variant would make a verdict possible" in c.sentence
    assert "smallest p the exact sign-flip permutation test can give at these n is 0.25" in c.sentence
    # below the exact floor, the t-test's p is flagged as resting on the normal approximation
    assert "below 0.25, the smallest an exact test can give" in c.sentence


def test_five_paired_seeds_cannot_reach_alpha_but_six_can_and_holm_asks_for_more():
    rng = np.random.default_rng(1)
    five = {"a": list(0.9 + rng.normal(0, 0.002, 5)), "b": list(0.8 + rng.normal(0, 0.002, 5))}
    c = primary(compare(outcome_runs(five), ["a", "b"]), "a", "b")
    assert sign_flip_p(five["a"], five["b"]) == pytest.approx(2 / 32) and c.winner is None
    assert "6 seeds per variant" in c.sentence
    six = {v: list(0.9 - 0.1 * (v != "a") + rng.normal(0, 0.002, 6)) for v in ("a", "b", "c")}
    six["c"] = list(np.array(six["b"]) + 0.05 + rng.normal(0, 0.002, 6))
    comps = compare(outcome_runs(six), ["a", "b", "c"])
    assert sign_flip_p(six["a"], six["b"]) == pytest.approx(2 / 64)
    # Holm over 3 pairs: 3 x 2/64 = 0.094 is the best any data could do; 7 seeds: 3 x 2/128 = 0.047
    need = next(n for n in itertools.count(3) if 3 * 2 / 2 ** n < ALPHA)
    assert all(c.winner is None and f"{need} seeds per variant" in c.sentence for c in comps if c.role == "primary")
    two = primary(compare(outcome_runs({"a": six["a"], "b": six["b"]}), ["a", "b"]), "a", "b")
    assert two.winner == "a"  # the same pair alone: 2/64 < 0.05, a verdict


def test_time_to_target_three_reached_against_three_censored_gets_no_verdict_from_the_log_rank_alone():
    runs = time_runs("fast", [100, 120, 140], 1000) + time_runs("slow", [None] * 3, 1000)
    c = primary(compare(runs, ["fast", "slow"], target=0.9, primary="steps_to_target"), "fast", "slow")
    a, b = [(100, True), (120, True), (140, True)], [(1000, False)] * 3
    asym = st.logrank(st.CensoredData(uncensored=[100, 120, 140]), st.CensoredData(right=[1000] * 3)).pvalue
    assert asym < 0.05  # the case (p = 0.022 there): below 0.05 and below the exact floor 0.1
    assert c.p == pytest.approx(exact_logrank_scipy(a, b)) == pytest.approx(2 / math.comb(6, 3))
    assert c.winner is None and "4 seeds per variant would make a verdict possible" in c.sentence
    assert f"asymptotic log-rank p = {asym:.2g} - below 0.1, the smallest p any exact test can give" in c.sentence


# ------------------------------------------------------------------------------------------ divergence, separation


SPEC = {"name": "div", "seeds": 5, "target_accuracy": 0.9,
        "data": {"dataset": "synthetic", "validation": 0.25,
                 "options": {"n_train": 120, "n_test": 40, "features": 6, "classes": 2}},
        "model": {"kind": "mlp", "input_shape": [6], "num_classes": 2, "hidden": [8]},
        "train": {"lr": 0.05, "epochs": 3, "batch_size": 16},
        "variants": {"wild": {"train": {"lr": 5.0}}, "calm": {}}, "primary_metric": "steps_to_target"}


def _result(status, reached_at=None, diverged_step=None, spe=8):
    epochs = [] if status == "diverged" else [
        {"epoch": e, "train_loss": 1.0, "train_accuracy": 0.9, "val_loss": 0.3, "val_accuracy": 0.9, "seconds": 0.5,
         "steps": spe * e} for e in (1, 2, 3)]
    out = {k: None for k in RESULT_COLUMNS}
    out.update(status=status, seconds=1.0, history={"epochs": epochs}, environment={}, stopped=status,
               steps_to_target=reached_at, epochs_to_target=None if reached_at is None else -(-reached_at // spe),
               seconds_to_target=None if reached_at is None else 0.1, epochs_run=len(epochs),
               steps_run=spe * len(epochs), train_seconds=0.5 * len(epochs),
               final_val_accuracy=None if status == "diverged" else 0.9)
    if status == "diverged":
        out["error"] = f"loss became nan at epoch 1, step {diverged_step}: the run diverged (lower the learning rate?)"
    return out


def test_runs_diverged_in_epoch_one_are_censored_at_the_planned_budget_and_counted(tmp_path):
    spec = parse_experiment(SPEC)
    store = RunStore(tmp_path / "runs.sqlite")
    store.set_meta(spec=json.dumps(spec.model_dump(mode="json")), name=spec.name)
    plans = expand(spec)
    store.add_runs(plans)
    steps = {1: 13, 2: 14, 3: 15, 4: 13}
    for p in plans:
        if p.variant == "wild":
            res = _result("done", 20) if p.seed == 0 else _result("diverged", diverged_step=steps[p.seed])
        else:
            res = _result("done", 10 + p.seed)
        store.record(p.run_id, res)
    store.close()
    _, runs, _ = load_results(tmp_path)
    wild = [r for r in runs if r["variant"] == "wild" and r["status"] == "diverged"]
    assert all(r["steps_run"] == 0 for r in wild)  # where they stopped: before their first epoch ended
    assert all(r["budget"]["steps_run"] == 24 and r["budget"]["epochs_run"] == 3 for r in wild)  # 3 epochs x 8
    t = variant_stats(runs, ["wild", "calm"], 0.9)[0].times["steps_to_target"]
    assert (t.n, t.reached, t.longest) == (5, 1, 24)  # every diverged run counts: reach 1/5
    assert math.isinf(t.median)  # 4 of 5 never reach it: the KM curve stays at 0.8
    assert "4 of 5 diverged at steps 13–15" in t.text() and "median not reached (> 24)" in t.text()
    c = primary(compare(runs, ["wild", "calm"], target=0.9, primary="steps_to_target"), "wild", "calm")
    a = [(20, True)] + [(24, False)] * 4
    b = [(10 + s, True) for s in range(5)]
    assert c.p == pytest.approx(exact_logrank_scipy(a, b))
    assert c.p < 0.05 and c.better == "calm" and c.winner == "calm"
    assert "reached in 1/5" in c.sentence and "4 of 5 diverged at steps 13–15" in c.sentence


def test_complete_separation_is_tested_by_the_exact_log_rank_and_fisher():
    runs = time_runs("bn", [100] * 5, 1000) + time_runs("no-bn", [None] * 5, 1000)
    c = primary(compare(runs, ["bn", "no-bn"], target=0.9, primary="steps_to_target"), "bn", "no-bn")
    fisher = st.fisher_exact([[5, 0], [0, 5]]).pvalue
    assert fisher == pytest.approx(0.0079, abs=1e-4)
    assert c.p == pytest.approx(fisher) == pytest.approx(exact_logrank_scipy([(100, True)] * 5, [(1000, False)] * 5))
    assert f"Fisher's exact test on the reach rate p = {fisher:.2g}" in c.sentence
    assert c.winner == "bn" and c.sentence.startswith("bn reaches the target 0.9 sooner than no-bn")
    assert "no test" not in c.sentence


# ------------------------------------------------------------------------------------------ power


def test_minimum_detectable_effect_matches_statsmodels():
    a = [0.95, 0.96, 0.94, 0.955, 0.945, 0.95]
    b = [0.90, 0.93, 0.91, 0.915, 0.92, 0.925]
    c = primary(compare(outcome_runs({"a": a, "b": b}), ["a", "b"]), "a", "b")
    sd = np.std(np.subtract(a, b), ddof=1)
    d = TTestPower().solve_power(effect_size=None, nobs=6, alpha=0.05, power=0.8, alternative="two-sided")
    assert c.mde == pytest.approx(d * sd, rel=1e-6) and f"±{d * sd:.4f}" in c.sentence and "80% power" in c.sentence
    # unpaired (different seeds): TTestIndPower with the pooled SD
    runs = outcome_runs({"a": a, "b": b})
    for r in runs:
        r["seed"] += 10 * (r["variant"] == "b")
    c = primary(compare(runs, ["a", "b"]), "a", "b")
    pooled = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    d = TTestIndPower().solve_power(effect_size=None, nobs1=6, ratio=1.0, alpha=0.05, power=0.8)
    assert c.mde == pytest.approx(d * pooled, rel=1e-6)
    # seeds for a target difference: statsmodels' nobs rounded up, never fewer than an exact test needs
    n = TTestPower().solve_power(effect_size=0.004 / 0.005, nobs=None, alpha=0.05, power=0.8)
    assert seeds_needed(0.004, 0.005, paired=True) == max(math.ceil(n), 6)
    n3 = TTestIndPower().solve_power(effect_size=0.01 / 0.02, nobs1=None, alpha=0.05 / 3, power=0.8)
    assert seeds_needed(0.01, 0.02, paired=False, comparisons=3) == math.ceil(n3)
    assert seeds_needed(1.0, 0.001, paired=True) == 6  # a huge effect still needs 6 seeds: 2/2^5 > 0.05


def test_plan_command_says_how_many_seeds_a_difference_needs(tmp_path):
    spec = parse_experiment({**SPEC, "primary_metric": "final_val_accuracy"})
    store = RunStore(tmp_path / "runs.sqlite")
    store.set_meta(spec=json.dumps(spec.model_dump(mode="json")), name=spec.name)
    plans = expand(spec)
    store.add_runs(plans)
    acc = {("wild", s): 0.90 + 0.01 * s for s in range(5)} | {("calm", s): 0.90 + 0.012 * s for s in range(5)}
    for p in plans:
        res = _result("done", 20)
        res["final_val_accuracy"] = acc[p.variant, p.seed]
        store.record(p.run_id, res)
    store.close()
    _, runs, _ = load_results(tmp_path)
    (line,) = plan(runs, ["wild", "calm"], 0.003)
    sd = np.std([acc["wild", s] - acc["calm", s] for s in range(5)], ddof=1)
    n = TTestPower().solve_power(effect_size=0.003 / sd, nobs=None, alpha=0.05, power=0.8)
    assert line.paired and line.sd == pytest.approx(sd) and line.seeds == max(math.ceil(n), 6)
    r = CliRunner().invoke(app, ["plan", str(tmp_path), "--difference", "0.003"])
    assert r.exit_code == 0, r.output
    assert f"{line.seeds} seeds per variant" in " ".join(r.output.split())
