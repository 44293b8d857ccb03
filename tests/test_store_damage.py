"""Stores that check themselves (issue 27, hostile inputs): a finished run whose stored results cannot
be used (a missing or non-finite primary result, text in a number column) or whose run folder or
checkpoint is gone is reported by bnlab run / compare / report and redone by bnlab run, the other runs'
rows kept as they were; compare and report never raise on a damaged row. The rule is one function,
``bnlab.experiments.store.damage``; the store is damaged here with sqlite3 and rm, as an attacker would."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import RunStore, load_experiment, run_experiment
from bnlab.experiments.read import DAMAGED, STORE, load_results
from bnlab.experiments.stats import variant_stats
from bnlab.experiments.store import damage

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

# two variants x three seeds (six runs, about two seconds): five to damage, one left intact
SPEC_TOML = """name = "tiny"
seeds = 3
target_accuracy = 0.5
[data]
dataset = "synthetic"
validation = 0.25
options = { n_train = 120, n_test = 40, features = 6, classes = 2 }
[model]
kind = "mlp"
input_shape = [6]
num_classes = 2
hidden = [8]
[train]
lr = 0.05
epochs = 2
batch_size = 16
[variants.no-bn]
model = { bn = "none" }
[variants.bn]
model = { bn = "before" }
"""
INTACT = "bn/seed-2"
FVA = "final_val_accuracy"


def _sql(statement: str, *args):
    def mutate(folder: Path):
        con = sqlite3.connect(folder / STORE)
        con.execute(statement, args)
        con.commit()
        con.close()
    return mutate


def _rm(sub: str):
    return lambda folder: shutil.rmtree(folder / sub)


# run id -> (how it is damaged, the reason the tools must give)
DAMAGES = {
    "no-bn/seed-0": (_sql(f"UPDATE runs SET {FVA} = NULL WHERE run_id = 'no-bn/seed-0'"),
                     r"its primary result \(final_val_accuracy\) is missing"),
    "no-bn/seed-1": (_sql(f"UPDATE runs SET {FVA} = 9e999 WHERE run_id = 'no-bn/seed-1'"),  # +inf
                     r"its primary result \(final_val_accuracy\) is inf, not a finite number"),
    "no-bn/seed-2": (_sql(f"UPDATE runs SET {FVA} = 'abc' WHERE run_id = 'no-bn/seed-2'"),
                     r"final_val_accuracy holds 'abc', not a number"),
    "bn/seed-0": (_rm("runs/bn/seed-0"), r"its run folder runs/bn/seed-0 is gone"),
    "bn/seed-1": (_rm("runs/bn/seed-1/checkpoint"), r"its checkpoint folder runs/bn/seed-1/checkpoint is gone"),
}
RESULT_DAMAGED = ("no-bn/seed-0", "no-bn/seed-1", "no-bn/seed-2")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    spec_file = tmp_path_factory.mktemp("spec") / "tiny.toml"
    spec_file.write_text(SPEC_TOML)
    folder = tmp_path_factory.mktemp("exp") / "e"
    assert run_experiment(load_experiment(spec_file), folder, workers=1).done == 6
    return folder


@pytest.fixture
def damaged(finished, tmp_path) -> Path:
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    for mutate, _ in DAMAGES.values():
        mutate(folder)
    return folder


def _rows(folder: Path) -> dict[str, dict]:
    """run id -> its runs row (with its rowid), epochs, probes and shift rows, read with sqlite3 directly."""
    con = sqlite3.connect(f"file:{folder / STORE}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        rows = {r["run_id"]: {**dict(r)} for r in con.execute("SELECT rowid AS row_id, * FROM runs")}
        for table in ("epochs", "probes", "shift"):
            for r in rows.values():
                r[table] = [tuple(e) for e in con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY rowid",
                                                          (r["run_id"],))]
    finally:
        con.close()
    return rows


def _invoke(*args) -> tuple[int, str, object]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split()), r.exception  # rich wraps long lines


# ================================================================ the rule


def _row(finished: Path, run_id: str = INTACT) -> dict:
    store = RunStore(finished / STORE, readonly=True)
    try:
        return next(r for r in store.runs() if r["run_id"] == run_id)
    finally:
        store.close()


def _without(*parts):
    def mutate(row, run_dir):
        shutil.rmtree(run_dir.joinpath(*parts)) if run_dir.joinpath(*parts).is_dir() else \
            run_dir.joinpath(*parts).unlink()
    return mutate


def _set(**values):
    return lambda row, run_dir: row.update(values)


RULE_CASES = {  # name -> (mutation of a done row / its run folder, primary, expected reason; None: not damaged)
    "intact": (_set(), FVA, None),
    "primary-null": (_set(final_val_accuracy=None), FVA, r"primary result \(final_val_accuracy\) is missing"),
    "primary-inf": (_set(final_val_accuracy=math.inf), FVA, r"is inf, not a finite number"),
    "primary-minus-inf": (_set(final_val_accuracy=-math.inf), FVA, r"is -inf, not a finite number"),
    "primary-nan": (_set(final_val_accuracy=math.nan), FVA, r"is nan, not a finite number"),
    "primary-text": (_set(final_val_accuracy="abc"), FVA, r"final_val_accuracy holds 'abc', not a number"),
    "primary-text-inf": (_set(final_val_accuracy="inf"), FVA, r"final_val_accuracy holds 'inf', not a number"),
    "other-column-blob": (_set(test_loss=b"\x00\x01"), FVA, r"test_loss holds b'\\x00\\x01', not a number"),
    "loss-primary-null": (_set(final_val_loss=None), "final_val_loss", r"\(final_val_loss\) is missing"),
    "run-folder-gone": (_without(), FVA, r"its run folder runs/bn/seed-2 is gone"),
    "checkpoint-gone": (_without("checkpoint"), FVA, r"checkpoint folder runs/bn/seed-2/checkpoint is gone"),
    "final-checkpoint-gone": (_without("checkpoint-final"), FVA, r"runs/bn/seed-2/checkpoint-final is gone"),
    "checkpoint-config-gone": (_without("checkpoint", "config.json"), FVA,
                               r"checkpoint runs/bn/seed-2/checkpoint has no config.json"),
    "checkpoint-weights-gone": (_without("checkpoint-final", "model.safetensors"), FVA,
                                r"runs/bn/seed-2/checkpoint-final has no model.safetensors"),
    "artefacts-not-json": (_set(artefacts="{oops"), FVA, r"stored artefacts \('\{oops'\) are not a JSON object"),
    "artefacts-a-number": (_set(artefacts="5"), FVA, r"stored artefacts \('5'\) are not a JSON object"),
    "results-and-files": (lambda row, run_dir: (row.update(final_val_accuracy=None), shutil.rmtree(run_dir)), FVA,
                          r"is missing; its run folder runs/bn/seed-2 is gone"),
    # not damage: what a run records by design
    "diverged-without-final-results": (
        lambda row, run_dir: (row.update(status="diverged", final_val_accuracy=None, test_accuracy=None,
                                         artefacts=json.dumps({**json.loads(row["artefacts"]),
                                                               "checkpoint_final": None})),
                              shutil.rmtree(run_dir / "checkpoint-final")), FVA, None),
    "diverged-before-a-best-model": (
        lambda row, run_dir: (row.update(status="diverged", final_val_accuracy=None,
                                         artefacts=json.dumps({"folder": "runs/bn/seed-2", "checkpoint": None})),
                              shutil.rmtree(run_dir / "checkpoint"), shutil.rmtree(run_dir / "checkpoint-final")),
        FVA, None),
    "failed-run": (lambda row, run_dir: (row.update(status="failed", final_val_accuracy=None, artefacts="{}"),
                                         shutil.rmtree(run_dir)), FVA, None),
    "pending-run": (_set(status="pending", final_val_accuracy="abc"), FVA, None),
    "precise-primary-absent-without-bn": (_set(precise_val_accuracy=None), "precise_val_accuracy", None),
    "censored-time-to-target": (_set(steps_to_target=None), "steps_to_target", None),
    "older-store-without-artefacts": (
        lambda row, run_dir: (row.pop("artefacts"), shutil.rmtree(run_dir / "checkpoint")), FVA, None),
}


@pytest.mark.parametrize("case", RULE_CASES)
def test_the_damage_rule(finished, tmp_path, case):
    mutate, primary, expected = RULE_CASES[case]
    run_dir = Path(shutil.copytree(finished / "runs" / INTACT, tmp_path / "runs" / INTACT))
    row = _row(finished)
    mutate(row, run_dir)
    found = damage(row, run_dir, primary)
    if expected is None:
        assert found is None, str(found)
    else:
        assert found is not None and re.search(expected, str(found)), str(found)


def test_an_older_store_without_the_primary_column_is_not_damaged(finished, tmp_path):
    run_dir = Path(shutil.copytree(finished / "runs" / INTACT, tmp_path / "runs" / INTACT))
    row = {**_row(finished), FVA: None}
    assert damage(row, run_dir, FVA, recorded=False) is None
    assert "is missing" in str(damage(row, run_dir, FVA))  # in a store that has the column, it is damage


def test_there_are_enough_rule_cases():
    assert sum(e is not None for *_, e in RULE_CASES.values()) >= 15
    assert sum(e is None for *_, e in RULE_CASES.values()) >= 7


# ================================================================ readers: report, never raise


def test_compare_and_report_name_the_damaged_runs_and_never_raise(damaged):
    before = (damaged / STORE).read_bytes()
    for command in ("compare", "report"):
        code, out, exc = _invoke(command, damaged)
        assert code == 0 and (exc is None or isinstance(exc, SystemExit)) and "Traceback" not in out, out
        if command == "compare":
            for rid, (_, why) in DAMAGES.items():
                assert re.search(re.escape(rid) + r": damaged: [^:]*" + why, out), (rid, out)
            assert not re.search(r"(?<![\w-])" + re.escape(INTACT) + ": damaged", out), out
    md = (damaged / "report.md").read_text()
    html = (damaged / "report.html").read_text()
    for rid, (_, why) in DAMAGES.items():
        line = next(x for x in md.splitlines() if x.startswith(f"- {rid}: damaged: "))
        assert re.search(why, line), line
        assert rid in html
    assert "3 damaged (left out); 2 lost their run folder or a checkpoint (counted)" in md
    assert (damaged / STORE).read_bytes() == before  # readers change nothing


def test_damaged_results_are_left_out_of_the_statistics_and_counted(damaged):
    spec, runs, _ = load_results(damaged)
    by_id = {r["run_id"]: r for r in runs}
    assert {rid for rid, r in by_id.items() if r["status"] == DAMAGED} == set(RESULT_DAMAGED)
    assert all(by_id[rid]["stored_status"] == "done" for rid in RESULT_DAMAGED)
    assert by_id["no-bn/seed-2"][FVA] is None  # 'abc' is never handed on
    assert {rid for rid, r in by_id.items() if r["damage"]} == set(DAMAGES)
    no_bn, bn = variant_stats(runs, list(spec.variants), spec.target_accuracy)
    assert (no_bn.damaged, no_bn.done, no_bn.metrics[FVA].n) == (3, 0, 0)
    assert no_bn.metrics[FVA].missing["damaged"] == 3 and "3 damaged" in no_bn.runs_text()
    assert no_bn.times["steps_to_target"].n == 0 and no_bn.times["steps_to_target"].missing["damaged"] == 3
    # runs whose files are gone keep their stored values: the numbers were committed with the run
    assert (bn.damaged, bn.done, bn.metrics[FVA].n) == (0, 3, 3)


def test_text_in_any_number_column_of_a_run_or_its_epochs_is_reported_not_raised(finished, tmp_path):
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    _sql("UPDATE runs SET steps_run = 'x', mean_epoch_seconds = X'00', test_accuracy = 'abc' "
         "WHERE run_id = 'bn/seed-1'")(folder)
    _sql("UPDATE epochs SET val_accuracy = 'abc', seconds = 'slow' WHERE run_id = 'bn/seed-0'")(folder)
    _sql("UPDATE epochs SET epoch = 'two' WHERE run_id = 'bn/seed-0' AND epoch = 2")(folder)
    for command in ("compare", "report"):
        code, out, exc = _invoke(command, folder)
        assert code == 0 and (exc is None or isinstance(exc, SystemExit)) and "Traceback" not in out, (out, exc)
    md = (folder / "report.md").read_text()
    assert re.search(r"- bn/seed-1: damaged: test_accuracy holds 'abc', not a number; steps_run holds 'x', not a "
                     r"number; mean_epoch_seconds holds b'\\x00', not a number; left out of the statistics", md), md
    assert re.search(r"- bn/seed-0: damaged: its epoch rows hold text in number column\(s\) epoch, val_accuracy, "
                     r"seconds; left out", md), md
    assert "- no-bn/seed-0: damaged" not in md


# ================================================================ bnlab run: report and redo exactly those


def test_run_redoes_exactly_the_damaged_runs_and_keeps_the_others(finished, damaged, tmp_path):
    original = _rows(finished)
    before = _rows(damaged)
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(SPEC_TOML)
    code, out, exc = _invoke("run", spec_file, "--out", damaged, "--workers", "1")
    assert code == 0 and "Traceback" not in out, out
    assert "5 stored run(s) damaged, redoing them" in out and "5 runs to do (1 already finished)" in out
    note = out[out.index("5 stored run(s) damaged"):]
    for rid, (_, why) in DAMAGES.items():
        assert re.search(re.escape(rid) + ": " + why, note), (rid, note)
    after = _rows(damaged)
    assert after[INTACT] == before[INTACT]  # the intact run's row (its rowid too) and its dependent rows
    assert set(after) == set(before) and len({r["row_id"] for r in after.values()}) == 6
    for rid in DAMAGES:
        row = after[rid]
        assert row["status"] == "done" and row["row_id"] == before[rid]["row_id"]  # replaced in place
        assert isinstance(row[FVA], float) and math.isfinite(row[FVA])
        # the redone run is the same run: the same numbers, the same epochs (timings aside)
        for column in ("final_val_accuracy", "test_accuracy", "best_test_accuracy", "final_val_loss", "steps_run"):
            assert row[column] == original[rid][column], (rid, column)
        assert [e[:6] for e in row["epochs"]] == [e[:6] for e in original[rid]["epochs"]]
        run_dir = damaged / "runs" / rid
        assert (run_dir / "checkpoint" / "config.json").is_file()
        assert (run_dir / "checkpoint-final" / "model.safetensors").is_file()
    store = RunStore(damaged / STORE, readonly=True)
    try:
        assert store.audit() == {}
    finally:
        store.close()
    code, out, _ = _invoke("run", spec_file, "--out", damaged, "--workers", "1")
    assert code == 0 and "nothing to do: every run is finished" in out and "damaged" not in out, out
    code, out, _ = _invoke("compare", damaged)
    assert code == 0 and "damaged" not in out, out


def test_a_damaged_run_goes_back_to_pending_with_nothing_of_it_left(finished, tmp_path):
    """The reset is one transaction: the damaged run's results, artefacts and dependent rows go; other runs
    keep theirs (a runner killed right after it leaves a pending run, never a half-damaged done one)."""
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    before = _rows(folder)
    store = RunStore(folder / STORE)
    try:
        assert store.reset_damaged(["no-bn/seed-0"]) == 1
    finally:
        store.close()
    after = _rows(folder)
    row = after.pop("no-bn/seed-0")
    assert row["status"] == "pending" and row[FVA] is None and row["artefacts"] is None
    assert row["epochs"] == row["probes"] == row["shift"] == [] and before["no-bn/seed-0"]["epochs"]
    assert row["config"] == before["no-bn/seed-0"]["config"]
    assert after == {k: v for k, v in before.items() if k != "no-bn/seed-0"}


# ================================================================ hostile rows: identity, config, ranges, orphans

HOSTILE = {  # name -> (SQL on the finished store, the reason the readers and bnlab run must name)
    "seed-text": ("UPDATE runs SET seed = 'abc' WHERE run_id = 'no-bn/seed-1'", r"its seed is 'abc', not a whole number"),
    "config-not-json": ("UPDATE runs SET config = '{not json' WHERE run_id = 'no-bn/seed-1'",
                        r"its config \('\{not json'\) is not JSON"),
    "config-a-list": ("UPDATE runs SET config = '[1,2]' WHERE run_id = 'no-bn/seed-1'",
                      r"its config \('\[1,2\]'\) is not a JSON object"),
    "config-nested-deep": (f"UPDATE runs SET config = '{'[' * 100_000}{']' * 100_000}' WHERE run_id = 'no-bn/seed-1'",
                           r"its config nests deeper than 64 levels"),
    "accuracy-above-one": (f"UPDATE runs SET {FVA} = 5.0 WHERE run_id = 'no-bn/seed-1'",
                           r"final_val_accuracy is 5\.0: above 1"),
    "accuracy-negative": (f"UPDATE runs SET {FVA} = -1 WHERE run_id = 'no-bn/seed-1'",
                          r"final_val_accuracy is -1\.0: below 0"),
    "best-epoch-huge": ("UPDATE runs SET best_epoch = 1e300 WHERE run_id = 'no-bn/seed-1'",
                        r"best_epoch is 1e\+300: beyond its planned epochs \(2\)"),
    "steps-fractional": ("UPDATE runs SET steps_run = 2.5 WHERE run_id = 'no-bn/seed-1'",
                         r"steps_run is 2\.5: not a whole number"),
    "seconds-negative": ("UPDATE runs SET train_seconds = -3 WHERE run_id = 'no-bn/seed-1'",
                         r"train_seconds is -3\.0: below 0"),
    "orphan-variant": ("UPDATE runs SET variant = 'zzz' WHERE run_id = 'no-bn/seed-1'",
                       r"its variant 'zzz' and seed 1 are not those of its run id 'no-bn/seed-1'"),
    "orphan-path-variant": ("UPDATE runs SET variant = '../../x' WHERE run_id = 'no-bn/seed-1'",
                            r"its variant '\.\./\.\./x' and seed 1 are not those of its run id"),
    "seed-of-another-run": ("UPDATE runs SET seed = 7 WHERE run_id = 'no-bn/seed-1'",
                            r"its variant 'no-bn' and seed 7 are not those of its run id 'no-bn/seed-1'"),
}


# the whole cycle (report, run) for three kinds of damage by default, every kind with -m slow: the redo is one
# rule (audit -> reset_damaged) whatever the damage, and each cycle takes ~8 s
FULL_CYCLE = ("seed-text", "config-nested-deep", "orphan-path-variant")


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_row_is_named_and_left_out(finished, tmp_path, case):
    statement, why = HOSTILE[case]
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    _sql(statement)(folder)
    code, out, exc = _invoke("compare", folder)
    assert code == 0 and (exc is None or isinstance(exc, SystemExit)) and "Traceback" not in out, (out, exc)
    assert re.search(r"no-bn/seed-1: damaged: .*" + why, out), out
    spec, runs, _ = load_results(folder)
    no_bn = variant_stats(runs, list(spec.variants), spec.target_accuracy)[0]
    assert (no_bn.damaged, no_bn.done, no_bn.metrics[FVA].n) == (1, 2, 2)


@pytest.mark.parametrize("case", [c if c in FULL_CYCLE else pytest.param(c, marks=pytest.mark.slow) for c in HOSTILE])
def test_a_hostile_row_is_reported_and_redone(finished, tmp_path, case):
    statement, why = HOSTILE[case]
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    _sql(statement)(folder)
    code, out, exc = _invoke("report", folder)
    assert code == 0 and (exc is None or isinstance(exc, SystemExit)) and "Traceback" not in out, (out, exc)
    assert re.search(r"warning: no-bn/seed-1: damaged: .*" + why, out), out  # the terminal does not look clean
    md = (folder / "report.md").read_text()
    assert re.search(r"- no-bn/seed-1: damaged: .*" + why + r".*; left out of the statistics", md), md
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(SPEC_TOML)
    code, out, exc = _invoke("run", spec_file, "--out", folder, "--workers", "1")
    assert code == 0 and "Traceback" not in out, (out, exc)
    assert re.search(r"1 stored run\(s\) damaged, redoing them .*no-bn/seed-1: .*" + why, out), out
    row = _rows(folder)["no-bn/seed-1"]
    original = _rows(finished)["no-bn/seed-1"]
    for column in ("variant", "seed", "config", "config_hash", "status", FVA, "best_epoch", "steps_run"):
        assert row[column] == original[column], column
    code, out, _ = _invoke("compare", folder)
    assert code == 0 and "damaged" not in out, out


def test_an_empty_store_is_named_not_raised(finished, tmp_path):
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    _sql("DELETE FROM runs")(folder)
    for command in ("compare", "report"):
        code, out, exc = _invoke(command, folder)
        assert code == 2 and "Traceback" not in out and "the store holds no runs" in out, (command, code, out, exc)


@pytest.mark.parametrize("version", ["999", "abc", "0"])
def test_a_results_version_this_bnlab_does_not_know_is_refused_by_every_command(finished, tmp_path, version):
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    _sql("UPDATE meta SET value = ? WHERE key = 'results_version'", version)(folder)
    for command in ("compare", "report"):
        code, out, exc = _invoke(command, folder)
        assert code == 2 and "Traceback" not in out and f"its results version is '{version}'" in out, (out, exc)
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(SPEC_TOML)
    code, out, _ = _invoke("run", spec_file, "--out", folder, "--workers", "1")
    assert code != 0 and "Traceback" not in out and "results version" in out, out


def test_an_earlier_results_version_is_still_read(finished, tmp_path):
    folder = Path(shutil.copytree(finished, tmp_path / "e"))
    _sql("UPDATE meta SET value = '1' WHERE key = 'results_version'")(folder)
    code, out, _ = _invoke("compare", folder)
    assert code == 0 and "Traceback" not in out, out
