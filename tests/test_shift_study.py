"""The bn-shift study end to end: its run setting, the grid after training (in the run's scaling), the
store, the report, and what older runs and stores keep."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import numpy as np
import pytest
import scipy.stats
import torch
from pydantic import ValidationError

from bnlab.data import load_dataset
from bnlab.data.corrupt import CORRUPTIONS, corrupt
from bnlab.deploy.shift import pixels, scaled, shift_grid
from bnlab.deploy.testtime import evaluate_bn
from bnlab.experiments.read import load_shift
from bnlab.experiments.runner import run_experiment
from bnlab.experiments.spec import expand, parse_experiment
from bnlab.experiments.store import RunStore
from bnlab.models import build_model, parse_model_spec
from bnlab.report.build import build_report
from bnlab.train.config import ShiftConfig, TrainConfig
from bnlab.train.engine import fit
from bnlab.train.single import run_settings
from tiny_specs import TINY


@pytest.mark.parametrize("bad, match", [
    ({"corruptions": ["fog"]}, "unknown corruption.*'fog'.*" + ", ".join(CORRUPTIONS)),
    ({"corruptions": []}, "at least 1 item"),
    ({"severities": [0, 4]}, "severity 0, 4 unknown: expected values from 1, 2, 3"),
    ({"severities": [1, 1]}, "must not repeat"),
    ({"test_batch_sizes": [0]}, "greater than or equal to 1"),
    ({"test_images": 0}, "greater than or equal to 1"),
    ({"seed": -1}, "greater than or equal to 0"),
    ({"images": 10}, "Extra inputs are not permitted"),
])
def test_shift_config_refuses_bad_values_clearly(bad, match):
    with pytest.raises(ValidationError, match=match):
        ShiftConfig(**bad)
    with pytest.raises(ValidationError, match=match):  # the same through the run's config
        TrainConfig(shift=bad)


def test_shift_config_defaults_are_the_whole_grid():
    from bnlab.deploy.shift import TEST_BATCH_SIZES

    c = TrainConfig(shift={}).shift
    assert (c.corruptions, c.severities, c.test_batch_sizes, c.test_images, c.seed) == (
        list(CORRUPTIONS), [1, 2, 3], list(TEST_BATCH_SIZES), None, 0)


def test_runs_without_shift_keep_their_fingerprints():
    """The run key and settings of a run without shift, as bnlab computed them before shift existed (from
    the commit before it: git archive HEAD, the same code run on TINY)."""
    plan = expand(parse_experiment(TINY))[0]
    assert "shift" not in plan.train and plan.config_hash == "6161875d6e2292f9"
    settings = run_settings(parse_model_spec(plan.model), TrainConfig(**plan.train))
    assert hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16] == "7d7f945655504547"
    with_shift = expand(parse_experiment({**TINY, "train": {**TINY["train"], "shift": {}}}))[0]
    assert with_shift.train["shift"]["corruptions"] == list(CORRUPTIONS)
    assert with_shift.config_hash != plan.config_hash


# ---------------------------------------------------------------- the run's scaling

@pytest.fixture(scope="module")
def standardized():
    """digits scaled with per-channel standardisation, a trained CNN with BN on them, and the unit-scaled
    (pixels / 16) test images of the same split."""
    data = load_dataset("digits", scaling="standardize")
    unit = load_dataset("digits", scaling="unit")
    model = build_model({"kind": "cnn", "blocks": [8], "final_block": None, "convs_per_block": 1, "head": "gap",
                         "input_shape": [1, 8, 8], "num_classes": 10, "bn": "before", "norm": "batch"}, seed=0)
    fit(model, data, epochs=2, batch_size=32, lr=0.1, momentum=0.9, progress=False)
    return data, unit, model.eval()


def test_scaled_inputs_are_corrupted_in_pixel_space(standardized):
    data, unit, model = standardized
    pre = data.preprocessing
    x, y = data.x_test[:120], data.y_test[:120]
    u = unit.x_test[:120]
    assert torch.allclose(pixels(x, pre), u, atol=1e-5)  # the inverse scaling gives the raw pixels back
    assert torch.allclose(scaled(pixels(x, pre), pre), x, atol=1e-5)  # and redoing it the model's inputs
    rows = shift_grid(model, x, y, corruptions=("contrast", "rotation"), severities=(2,), batch_sizes=(8,),
                      preprocessing=pre)
    by = {(r.corruption, r.bn_stats, r.test_batch): r for r in rows}
    assert by[("none", "running", None)].accuracy == pytest.approx(evaluate_bn(model, x, y)[1])
    mean, std = pre["mean"][0], pre["std"][0]  # by hand: corrupt the pixels, standardise them (numpy formula)
    for kind in ("contrast", "rotation"):
        by_hand = (corrupt(u, kind, 2).numpy().astype(np.float64) - mean) / std
        xs = torch.from_numpy(by_hand.astype(np.float32))
        assert by[(kind, "running", None)].accuracy == pytest.approx(evaluate_bn(model, xs, y)[1])
        assert by[(kind, "batch", 8)].accuracy == pytest.approx(evaluate_bn(model, xs, y, stats="batch", batch_size=8)[1])
        # corrupting the standardised values themselves would be another input (and is refused: not in [0, 1])
        assert not torch.allclose(xs, x, atol=1e-3)


def test_raw_pixels_without_scaling_are_refused_with_the_fix(standardized):
    _, _, model = standardized
    raw = load_dataset("digits", scaling="none")
    with pytest.raises(ValueError, match="use scaling unit, center or standardize"):
        shift_grid(model, raw.x_test[:20], raw.y_test[:20], corruptions=("contrast",), severities=(1,),
                   preprocessing=raw.preprocessing)


# ---------------------------------------------------------------- a tiny study: run, store, report

SHIFT = {"corruptions": ["contrast", "rotation"], "severities": [1, 3], "test_batch_sizes": [1, 8],
         "test_images": 60}
STUDY = {"name": "tiny-shift", "seeds": 3,
         "data": {"dataset": "digits", "scaling": "center"},
         "model": {"kind": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16]},
         "train": {"lr": 0.1, "momentum": 0.9, "epochs": 1, "batch_size": 32, "shift": SHIFT},
         "variants": {"bn": {"model": {"bn": "before"}}, "ln": {"model": {"bn": "before", "norm": "layer"}}}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("shift") / "e"
    run_experiment(parse_experiment(STUDY), out, workers=1)
    return out


def test_a_run_with_shift_records_its_rows_in_history_and_store(study):
    rows = load_shift(study)
    bn = [r for r in rows if r["run_id"] == "bn/seed-0"]
    # clean + 2 corruptions x 2 severities, each: running, precise, batch 1, batch 8, recalibrated
    assert len(bn) == 5 * 5
    assert len([r for r in rows if r["run_id"] == "ln/seed-0"]) == 5  # no BN: running only
    history = json.loads((study / "runs" / "bn" / "seed-0" / "history.json").read_text())
    assert [{k: v for k, v in r.items() if k != "run_id"} for r in bn] == history["shift"]
    one = next(r for r in bn if r["bn_stats"] == "batch" and r["test_batch"] == 1 and r["severity"] == 0)
    assert one["accuracy"] is None and "cannot normalise a batch of 1" in one["note"]  # dense BN, 1 sample
    clean = next(r for r in bn if r["bn_stats"] == "running" and r["severity"] == 0)
    assert 0 <= clean["accuracy"] <= 1 and clean["note"] == ""
    # the clean running row is the run's own test accuracy on the same 60 images (its final model, center scaling)
    from bnlab.checkpoint import load_checkpoint
    from bnlab.train.engine import evaluate
    data = load_dataset("digits", scaling="center")
    model = load_checkpoint(study / "runs" / "bn" / "seed-0", which="final").model
    assert clean["accuracy"] == pytest.approx(evaluate(model, data.x_test[:60], data.y_test[:60])[1])


def test_the_report_shows_the_figure_the_table_and_the_errors(study):
    rep = build_report(study)
    assert (study / "figures" / "bn_shift.png").is_file()
    md = (study / "report.md").read_text()
    assert "## BN under distribution shift" in md and "figures/bn_shift.png" in md
    lines = [line for line in md.splitlines() if line.startswith("| bn: test-batch statistics, batch 1 |")]
    assert len(lines) == 1 and "error: no prediction" in lines[0] and "cannot normalise a batch of 1" in lines[0]
    assert "Under shift (every corruption and severity), the most accurate option is" in md
    assert "At test batch 1, test-batch statistics cannot predict" in md
    assert "BN under distribution shift" in rep.html.read_text()


def _cell(text: str) -> tuple[float, float]:
    mean, half = text.split(" ± ")
    return float(mean), float(half)


def test_a_table_cell_is_the_mean_and_t_interval_over_seeds(study):
    """Oracle: scipy's t interval of the per-seed means over the corruptions, from the stored rows."""
    build_report(study)
    md = (study / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| option | runs | clean |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| bn: moving averages |"))
    cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
    rows = [r for r in load_shift(study) if r["run_id"].startswith("bn/") and r["bn_stats"] == "running"]
    per_seed = [np.mean([r["accuracy"] for r in rows if r["run_id"] == f"bn/seed-{s}" and r["severity"] == 3])
                for s in range(3)]
    m = np.mean(per_seed)
    half = scipy.stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3)
    got_m, got_half = _cell(cells["severity 3"])
    assert got_m == pytest.approx(m, abs=5e-5) and got_half == pytest.approx(half, abs=5e-5)
    # the paired difference of LayerNorm from BN's moving averages under shift, seed by seed
    ln = [r for r in load_shift(study) if r["run_id"].startswith("ln/")]
    d = [np.mean([r["accuracy"] for r in ln if r["run_id"] == f"ln/seed-{s}" and r["severity"] > 0])
         - np.mean([r["accuracy"] for r in rows if r["run_id"] == f"bn/seed-{s}" and r["severity"] > 0])
         for s in range(3)]
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=np.mean(d), scale=scipy.stats.sem(d))
    ln_row = next(line for line in md.splitlines() if line.startswith("| ln (no BN) |"))
    ln_cells = dict(zip(cols, [c.strip() for c in ln_row.strip("|").split("|")]))
    assert ln_cells[cols[-2]].startswith(f"{np.mean(d):+.4f} [{lo:+.4f}, {hi:+.4f}]")


def test_an_older_store_without_the_shift_table_opens(study, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(study, old)
    con = sqlite3.connect(old / "runs.sqlite")
    con.execute("DROP TABLE shift")
    con.commit()
    con.close()
    assert load_shift(old) == []  # read-only: nothing created
    tables = {r[0] for r in sqlite3.connect(old / "runs.sqlite").execute("SELECT name FROM sqlite_master")}
    assert "shift" not in tables
    build_report(old)
    assert "BN under distribution shift" not in (old / "report.md").read_text()
    RunStore(old / "runs.sqlite").close()  # a writer adds the table
    assert RunStore(old / "runs.sqlite", readonly=True).shift_rows() == []


def test_the_sentence_names_the_options_as_good_as_the_best():
    """The maximum alone would read as a winner: options whose mean lies in the best one's 95% interval are
    named with it, the others are not."""
    from bnlab.experiments.spec import parse_experiment as parse
    from bnlab.report import shift as report_shift
    spec = parse({"name": "s", "seeds": 3, "variants": {"bn": {}}})
    runs = [{"run_id": f"bn/seed-{s}", "variant": "bn", "seed": s, "status": "done", "config": "{}"} for s in range(3)]
    rows = []
    for s in range(3):
        for stats, test_batch, shifted in (("running", None, 0.50), ("recalibrated", None, 0.90),
                                           ("batch", 64, 0.89), ("batch", 8, 0.70)):
            for corruption, severity, acc in (("none", 0, 0.97), ("contrast", 1, shifted + 0.01 * s)):
                rows.append({"run_id": f"bn/seed-{s}", "corruption": corruption, "severity": severity,
                             "bn_stats": stats, "test_batch": test_batch, "accuracy": acc, "note": ""})
    text = report_shift.sentence(report_shift.study(spec, runs, rows))
    assert "the most accurate option is bn: recalibrated on the shifted inputs: 0.9100" in text
    assert "Within the 95% interval of its mean: bn: test-batch statistics, batch 64 (0.9000)." in text
    assert "batch 8 (" not in text.split("Within")[1].split(".")[0]


def test_a_smoke_shift_section_lists_accuracies_and_tests_nothing(study):
    """A smoke test (--quick) draws no conclusion in the bn-shift section either: no paired difference, no
    interval reading, no 'most accurate option' sentence (report_mode's reason instead)."""
    from bnlab.experiments.read import load_results
    from bnlab.report import shift as shift_report
    from bnlab.report.build import report_mode

    spec, runs, _ = load_results(study)
    smoke = spec.model_copy(update={"smoke_test": True})
    reason = report_mode(smoke, runs)
    sec, _ = shift_report.section(smoke, runs, load_shift(study), reason)
    text = " ".join([*sec.header, *(c for row in sec.rows for c in row), sec.note, sec.sentence])
    assert "difference from" not in text and "CI" not in text and "most accurate" not in text
    assert reason in sec.sentence and "severity 1" in sec.header
    full, _ = shift_report.section(spec, runs, load_shift(study), report_mode(spec, runs))
    assert any(h.startswith("difference from") for h in full.header) and "most accurate" in full.sentence
