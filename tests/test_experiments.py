"""Experiments: spec validation, expansion, the resumable runner, the store, statistics, CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import (RunStore, SpecError, StoreError, apply_quick, expand, load_experiment, load_results,
                               parse_experiment, plan_workers, preset_names, run_experiment)
from bnlab.experiments.stats import compare, mean_ci
from bnlab.report import build_report
from crashing_net import MESSAGE as CRASH_MESSAGE, crashing_variant
from tiny_specs import TWO_VARIANTS

TINY = TWO_VARIANTS


def test_every_preset_validates_and_has_a_quick_scale():
    names = preset_names()
    assert {"demo", "paper-mnist", "seed-000-mnist", "seed-001-fashion", "seed-002-cifar100", "seed-003-fashion",
            "seed-004-synthetic"} <= set(names)
    for n in names:
        spec = load_experiment(n)
        quick = apply_quick(spec)
        assert len(expand(quick)) <= len(expand(spec))
        offline = {"mnist-5k", "digits", "synthetic"}
        # offline: an embedded dataset, or a [data] fallback to one when the files are not here
        fallback = quick.data.fallback.dataset if quick.data.fallback else None
        assert quick.data.dataset in offline or fallback in offline, f"{n} --quick must run offline"


def test_demo_preset_is_as_promised():
    spec = load_experiment("demo")
    assert spec.data.dataset == "mnist-5k" and len(spec.seed_list()) >= 3
    assert set(spec.variants) == {"no-bn", "bn-before", "bn-after"}
    assert {p.model["activation"] for p in expand(spec)} == {"sigmoid"}


def test_expansion_is_variants_times_seeds_with_same_data_and_budget():
    plans = expand(parse_experiment(TINY))
    assert [p.run_id for p in plans] == ["no-bn/seed-0", "no-bn/seed-1", "bn/seed-0", "bn/seed-1"]
    assert len({json.dumps({k: v for k, v in p.train.items() if k != "seed"}, sort_keys=True) for p in plans}) == 1
    assert {p.model["bn"] for p in plans} == {"none", "before"}
    assert all(p.train["target_accuracy"] == 0.5 for p in plans)


@pytest.mark.parametrize("change,match", [
    ({"seeds": 0}, "seeds must be a count 1..1000"),
    ({"variants": {}}, "variants"),
    ({"train": {"lr": -1}}, r"variants\.no-bn\.train\.lr"),
    ({"train": {"seed": 3}}, "belong in \\[data\\] or seeds"),
    ({"variants": {"x": {"model": {"activation": "swish"}}}}, r"variants\.x\.model\.activation.*swish"),
    ({"colour": "blue"}, "colour"),
    ({"model": {"preset": "no-such"}}, "neither a model preset"),
], ids=["seeds", "no-variants", "lr", "seed-in-train", "bad-activation", "unknown-key", "bad-preset"])
def test_spec_errors_name_key_value_and_allowed(change, match):
    with pytest.raises(SpecError, match=match):
        parse_experiment({**TINY, **change})


def test_bad_toml_file(tmp_path):
    (tmp_path / "e.toml").write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_experiment(tmp_path / "e.toml")


def test_plan_workers_never_oversubscribes():
    assert plan_workers(10, cores=2) == (2, 1)
    assert plan_workers(1, cores=8) == (1, 8)
    assert plan_workers(3, cores=8) == (3, 2)
    assert plan_workers(10, cores=8, processes_per_run=4) == (2, 4)  # data-parallel runs: 2 x 4 processes
    assert plan_workers(10, workers=8, cores=2, processes_per_run=2) == (1, 2)
    assert plan_workers(10, cores=2, processes_per_run=4) == (1, 2)
    for n, c in [(5, 4), (2, 16), (100, 3)]:
        w, t = plan_workers(n, cores=c)
        assert w * t <= c


def test_run_store_report_and_resume(tmp_path):
    spec = parse_experiment(TINY)
    prog = run_experiment(spec, tmp_path / "e", workers=1)
    assert (prog.done, prog.failed) == (4, 0)
    spec2, runs, epochs = load_results(tmp_path / "e")
    assert list(spec2.variants) == ["no-bn", "bn"]
    assert all(r["status"] == "done" for r in runs) and len(epochs) == 4 * 2
    env = json.loads(runs[0]["environment"])
    assert env["torch"].startswith("2.") and "python" in env
    assert (tmp_path / "e" / "runs" / "bn" / "seed-0" / "checkpoint" / "model.safetensors").is_file()
    # a second run of the same command does nothing and duplicates nothing
    again = run_experiment(spec, tmp_path / "e", workers=1)
    assert again.skipped == 4 and again.done == 0
    assert len(load_results(tmp_path / "e")[2]) == 8


def test_folder_with_another_experiment_is_refused(tmp_path):
    run_experiment(parse_experiment(TINY), tmp_path / "e", workers=1)
    other = parse_experiment({**TINY, "train": {**TINY["train"], "lr": 0.01}})  # more seeds would be growth
    with pytest.raises(StoreError, match=r"other settings(.|\n)*train\.lr 0\.05 -> 0\.01"):
        run_experiment(other, tmp_path / "e", workers=1)


def test_a_spec_stored_before_new_fields_existed_still_resumes(tmp_path):
    spec = parse_experiment(TINY)
    run_experiment(spec, tmp_path / "e", workers=1)
    store = RunStore(tmp_path / "e" / "runs.sqlite")
    old = json.loads(store.get_meta("spec"))
    del old["primary_metric"], old["smoke_test"]  # as an earlier bnlab stored it
    store.set_meta(spec=json.dumps(old))
    store.close()
    assert run_experiment(spec, tmp_path / "e", workers=1).skipped == 4


def test_a_folder_of_an_earlier_results_version_is_not_resumed(tmp_path):
    spec = parse_experiment(TINY)
    run_experiment(spec, tmp_path / "e", workers=1)
    store = RunStore(tmp_path / "e" / "runs.sqlite")
    store.db.execute("DELETE FROM meta WHERE key = 'results_version'")
    store.close()
    with pytest.raises(StoreError, match="not comparable"):
        run_experiment(spec, tmp_path / "e", workers=1)
    assert build_report(tmp_path / "e").markdown.is_file()  # still readable


def test_a_crashing_run_is_recorded_and_the_others_go_on(tmp_path):
    # valid, and passes every check before anything is stored; fails only when run: its backward pass raises
    # (settings this machine cannot run, such as a CUDA device it lacks, are refused up front instead)
    variants = {k: {"model": {**TINY["model"], **v["model"]}} for k, v in TINY["variants"].items()}
    bad = {**TINY, "model": {}, "variants": {**variants, "broken": crashing_variant(TINY["model"]["input_shape"], 2)}}
    spec = parse_experiment({**bad, "seeds": 1})
    prog = run_experiment(spec, tmp_path / "e", workers=2, trust_factory=True)
    assert prog.failed == 1 and prog.done == 2
    runs = {r["run_id"]: r for r in load_results(tmp_path / "e")[1]}
    assert runs["broken/seed-0"]["status"] == "failed" and CRASH_MESSAGE in runs["broken/seed-0"]["error"]


def test_diverged_runs_are_recorded_not_failed(tmp_path):
    spec = parse_experiment({**TINY, "seeds": 1, "train": {"lr": 1e12, "epochs": 3, "batch_size": 16}})
    run_experiment(spec, tmp_path / "e", workers=1)
    runs = load_results(tmp_path / "e")[1]
    assert {r["status"] for r in runs} <= {"diverged", "done"} and any(r["status"] == "diverged" for r in runs)
    # a diverged run is an outcome: counted in the table, never a winner on what survived
    assert not any(c.significant for c in compare(runs, list(spec.variants), target=spec.target_accuracy))
    md = build_report(tmp_path / "e").markdown.read_text()
    assert "diverged" in md.split("## Statistics")[1].split("## Comparisons")[0]


def test_corrupt_store_is_detected(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "runs.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x13" * 5000)
    with pytest.raises(StoreError, match="run store"):
        load_results(tmp_path / "e")
    with pytest.raises(StoreError, match="no experiment here"):
        load_results(tmp_path / "nothing")


def test_concurrent_writers_do_not_corrupt(tmp_path):
    """Two processes writing results to one store at the same time: every row lands intact."""
    from bnlab.experiments.spec import RunPlan
    db = tmp_path / "runs.sqlite"
    store = RunStore(db)
    plans = [RunPlan(f"v/seed-{i}", "v", i, {}, {}) for i in range(40)]
    store.add_runs(plans)
    store.close()
    code = ("import sys; from bnlab.experiments import RunStore; s = RunStore(sys.argv[1]); "
            "[s.record(f'v/seed-{i}', {'status': 'done', 'final_val_accuracy': i / 100, "
            "'history': {'epochs': [{'epoch': 1, 'train_loss': 1, 'train_accuracy': 0, 'val_loss': 1, "
            "'val_accuracy': i / 100, 'seconds': 0.1, 'steps': 1}]}}) for i in range(int(sys.argv[2]), 40, 2)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(k)]) for k in (0, 1)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    store = RunStore(db)
    runs = store.runs()
    assert len(runs) == 40 and all(r["status"] == "done" for r in runs)
    assert sorted(r["final_val_accuracy"] for r in runs) == [i / 100 for i in range(40)]
    assert len(store.epochs()) == 40
    store.close()


# ---------------------------------------------------------------- statistics


def test_mean_ci_matches_the_t_interval():
    x = [0.91, 0.93, 0.90, 0.94, 0.92]
    e = mean_ci(x)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert math.isclose(e.low, lo) and math.isclose(e.high, hi) and e.n == 5
    assert math.isnan(mean_ci([0.5]).low) and mean_ci([]).n == 0
    assert math.isnan(mean_ci([0.5, 0.6]).low)  # fewer than 3 runs: no interval (more in test_stats.py)


def _runs(values: dict[str, list[float]]):
    return [{"run_id": f"{v}/seed-{i}", "variant": v, "seed": i, "status": "done", "final_val_accuracy": x,
             "final_val_loss": 1 - x, "epochs_to_target": None} for v, xs in values.items() for i, x in enumerate(xs)]


def test_verdict_only_when_significant():
    # 7 paired seeds: over 3 primary comparisons Holm's smallest attainable exact p is 3 x 2/2^7 < 0.05
    runs = _runs({"bn": [0.95, 0.96, 0.94, 0.95, 0.952, 0.948, 0.957],
                  "no-bn": [0.60, 0.62, 0.58, 0.61, 0.605, 0.59, 0.615],
                  "bn2": [0.95, 0.94, 0.96, 0.955, 0.951, 0.947, 0.953]})
    comps = {(c.metric, c.a, c.b): c for c in compare(runs, ["bn", "no-bn", "bn2"])}
    sig = comps[("final_val_accuracy", "bn", "no-bn")]
    assert sig.significant and sig.sentence.startswith("bn reaches a higher final validation accuracy than no-bn")
    assert "difference +0.3" in sig.sentence and "95% CI" in sig.sentence and "paired t-test over 7 seeds" in sig.sentence
    same = comps[("final_val_accuracy", "bn", "bn2")]
    assert not same.significant and same.sentence.startswith("These runs do not separate bn and bn2")
    assert not comps[("final_val_loss", "bn", "no-bn")].significant  # exploratory: never a verdict


def test_one_run_each_gives_no_verdict():
    """The seeds' mistake: a conclusion from one run each. bnlab refuses to draw one."""
    comps = compare(_runs({"a": [0.9], "b": [0.8]}), ["a", "b"])
    assert all(not c.significant and "fewer than 3 runs per variant" in c.sentence for c in comps)


def test_primary_metric_is_validated():
    assert parse_experiment(TINY).primary_metric == "final_val_accuracy"
    assert parse_experiment({**TINY, "primary_metric": "steps_to_target"}).primary_metric == "steps_to_target"
    with pytest.raises(SpecError, match="primary_metric.*one of final_val_accuracy"):
        parse_experiment({**TINY, "primary_metric": "accuracy"})
    with pytest.raises(SpecError, match="info field"):
        parse_experiment({**TINY, "primary_metric": "mean_epoch_seconds"})
    with pytest.raises(SpecError, match="needs target_accuracy"):
        parse_experiment({**TINY, "target_accuracy": None, "primary_metric": "steps_to_target"})


def test_quick_marks_a_smoke_test():
    spec = parse_experiment(TINY)
    assert not spec.smoke_test and apply_quick(spec).smoke_test


# ---------------------------------------------------------------- CLI and report


def test_cli_run_quick_report_compare_list(tmp_path):
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(_toml(TINY))
    r = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "e"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and (tmp_path / "e" / "report.html").is_file()
    table = (tmp_path / "e" / "report.md").read_text().split("## Statistics")[1].split("\n## ")[0]
    assert table.count("| bn | 2: 2 done |") == 1 and table.count("| no-bn | 2: 2 done |") == 1
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "e")])
    assert r.exit_code == 0 and "final validation accuracy" in r.output.replace("\n", " ")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "e")])
    assert r.exit_code == 0 and "report.html" in r.output
    r = CliRunner().invoke(app, ["list"])
    assert r.exit_code == 0 and "demo" in r.output and "seed-002-cifar100" in r.output
    assert "bn-across-devices" in r.output and "presets/NAME.toml" in r.output.replace("\n", "")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no experiment here" in r.output
    r = CliRunner().invoke(app, ["run", "no-such-preset"])
    assert r.exit_code == 2 and "neither an experiment preset" in r.output


def _toml(d: dict) -> str:
    import tomli_w
    return tomli_w.dumps(d)


def test_demo_quick_as_a_user(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnlab", "run", "demo", "--quick", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no-bn" in out.stdout and "report:" in out.stdout
    text = " ".join(out.stdout.split())
    assert "Smoke test (--quick): demo" in text and "3 variants × 3 seeds (0, 1, 2) = 9 runs" in text
    assert "reaches a" not in text and "p =" not in text and "a smoke test report: no verdicts" in text
    _, runs, _ = load_results(tmp_path / "demo")
    assert len(runs) == 9 and all(r["status"] == "done" for r in runs)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"), reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    """The page opens offline in a real browser, logs no console errors, and every figure renders."""
    from playwright.sync_api import sync_playwright

    run_experiment(parse_experiment(TINY), tmp_path / "e", workers=1)
    from bnlab.report import build_report
    report = build_report(tmp_path / "e")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: errors.append(f"network request: {r.url}")
                if not r.url.startswith(("file:", "data:")) else None)
        page.goto(report.html.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        shot = page.screenshot(full_page=True)
        browser.close()
    assert errors == []
    assert len(images) == 3 and all(ok and w > 100 and h > 100 for ok, w, h in images)
    assert len(shot) > 10_000


def test_the_preset_list_shows_whole_first_sentences_and_counts_long_variant_lists():
    from bnlab.cli.catalog import _variants_cell, first_sentence
    assert first_sentence("Does it\nwork? More text.\nAnd more.") == "Does it work?"
    assert first_sentence("no stop at all\nhere") == "no stop at all here"
    assert first_sentence("BN (e.g. x) works. Then") == "BN (e.g. x) works."
    assert _variants_cell(["a", "b"]) == "a, b"
    assert _variants_cell([f"v{i}" for i in range(32)]) == "32: v0, v1, v2, v3, …"
