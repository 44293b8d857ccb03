"""Experiments can grow: more seeds or added variants run only the new runs; a changed setting is
refused, naming it; fewer seeds run nothing and shrink nothing. Through the CLI, as a user would."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import parse_experiment
from bnlab.experiments.grow import SpecChanged, grow

BASE = {
    "name": "grow", "seeds": 2,
    "data": {"dataset": "synthetic", "validation": 0.25,
             "options": {"n_train": 160, "n_test": 40, "features": 6, "classes": 2}},
    "model": {"kind": "mlp", "input_shape": [6], "num_classes": 2, "hidden": [8]},
    "train": {"lr": 0.05, "epochs": 2, "batch_size": 16},
    "variants": {"no-bn": {"model": {"bn": "none"}}, "bn": {"model": {"bn": "before"}}},
}


def _with(**changes) -> dict:
    return {**BASE, **changes}


def _write(folder: Path, spec: dict, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(tomli_w.dumps(spec))
    return path


def _run(spec_file: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["run", str(spec_file), "--out", str(out), "--workers", "1", *extra])


def _state(out: Path) -> dict[str, tuple]:
    """run id -> (status, finished time, history.json's mtime): what a redone run would change."""
    con = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT run_id, status, finished FROM runs").fetchall()
    finally:
        con.close()
    return {rid: (status, finished, (out / "runs" / rid / "history.json").stat().st_mtime_ns)
            for rid, status, finished in rows}


def _stored_spec(out: Path) -> dict:
    con = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True)
    try:
        return json.loads(con.execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()[0])
    finally:
        con.close()


def _text(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished experiment folder: 2 variants x 2 seeds."""
    root = tmp_path_factory.mktemp("grow")
    r = _run(_write(root, BASE), root / "e")
    assert r.exit_code == 0, r.output
    return root / "e"


@pytest.fixture
def folder(finished, tmp_path) -> Path:
    """A copy of the finished folder for one test to grow."""
    return Path(shutil.copytree(finished, tmp_path / "e"))


def test_more_seeds_run_only_the_new_runs(folder, tmp_path):
    before = _state(folder)
    r = _run(_write(tmp_path, BASE), folder, "--seeds", "3")
    assert r.exit_code == 0, r.output
    after = _state(folder)
    assert sorted(after) == sorted([*before, "no-bn/seed-2", "bn/seed-2"])
    assert all(after[rid] == before[rid] for rid in before)  # untouched: same finished time, same files
    assert all(status == "done" for status, _, _ in after.values())
    text = _text(r)
    assert "adding seed(s) 2 to the experiment" in text and "2 runs to do (4 already finished)" in text
    assert _stored_spec(folder)["seeds"] == 3
    table = (folder / "report.md").read_text().split("## Statistics")[1].split("\n## ")[0]
    assert "| bn | 3: 3 done |" in table and "| no-bn | 3: 3 done |" in table  # the report covers every run


def test_an_added_variant_runs_only_its_runs(folder, tmp_path):
    before = _state(folder)
    spec = _with(variants={**BASE["variants"], "bn-after": {"model": {"bn": "after"}}})
    r = _run(_write(tmp_path, spec), folder)
    assert r.exit_code == 0, r.output
    after = _state(folder)
    assert sorted(after) == sorted([*before, "bn-after/seed-0", "bn-after/seed-1"])
    assert all(after[rid] == before[rid] for rid in before)
    assert "adding variant(s) bn-after to the experiment" in _text(r)
    assert list(_stored_spec(folder)["variants"]) == ["no-bn", "bn", "bn-after"]  # the stored order, then the new


def test_seeds_and_a_variant_added_at_once(folder, tmp_path):
    before = _state(folder)
    spec = _with(seeds=3, variants={"bn-after": {"model": {"bn": "after"}}, **BASE["variants"]})
    r = _run(_write(tmp_path, spec), folder)
    assert r.exit_code == 0, r.output
    after = _state(folder)
    new = {"no-bn/seed-2", "bn/seed-2", "bn-after/seed-0", "bn-after/seed-1", "bn-after/seed-2"}
    assert set(after) == set(before) | new and all(after[rid] == before[rid] for rid in before)
    stored = _stored_spec(folder)
    assert stored["seeds"] == 3 and list(stored["variants"]) == ["no-bn", "bn", "bn-after"]


@pytest.mark.parametrize("change,named", [
    ({"variants": {"no-bn": {"model": {"bn": "none"}}, "bn": {"model": {"bn": "before"}, "train": {"lr": 0.01}}}},
     "variants.bn.train.lr unset -> 0.01"),
    ({"train": {**BASE["train"], "lr": 0.01}}, "train.lr 0.05 -> 0.01"),
    ({"data": {**BASE["data"], "options": {**BASE["data"]["options"], "n_train": 200}}},
     "data.options.n_train 160 -> 200"),
    ({"target_accuracy": 0.9}, "target_accuracy null -> 0.9"),
], ids=["variant-lr", "lr", "dataset-option", "target"])
def test_a_changed_setting_is_refused_naming_it(folder, tmp_path, change, named):
    before, stored = _state(folder), _stored_spec(folder)
    r = _run(_write(tmp_path, _with(seeds=3, **change)), folder)
    assert r.exit_code == 2, r.output
    text = _text(r)
    assert "error:" in text and named in text and "use another --out folder" in text
    assert "Traceback" not in r.output
    assert _state(folder) == before and _stored_spec(folder) == stored  # nothing run, nothing stored


def test_quick_on_a_full_folder_is_refused(folder, tmp_path):
    spec = _with(quick={"train": {"epochs": 1}})
    before = _state(folder)
    r = _run(_write(tmp_path, spec), folder, "--quick")
    assert r.exit_code == 2 and "smoke_test false -> true" in _text(r), r.output
    assert _state(folder) == before


def test_fewer_seeds_run_nothing_and_shrink_nothing(folder, tmp_path):
    before, stored = _state(folder), _stored_spec(folder)
    r = _run(_write(tmp_path, BASE), folder, "--seeds", "1")
    assert r.exit_code == 0, r.output
    text = _text(r)
    assert "also has seed(s) 1, which this command does not ask for" in text and "not run now" in text
    assert "nothing to do" in text
    assert _state(folder) == before and _stored_spec(folder) == stored


def test_growth_rule_on_seed_lists():
    base = parse_experiment(BASE)
    g = grow(base.model_dump(mode="json"), parse_experiment(_with(seeds=[0, 5])))
    assert g.union.seeds == [0, 1, 5] and g.added_seeds == [5] and g.left_out_seeds == [1] and g.grew
    g = grow(parse_experiment(_with(seeds=[0, 1, 2])), parse_experiment(_with(seeds=4)))
    assert g.union.seeds == 4 and g.added_seeds == [3]  # 0..3: stored as a count
    g = grow(base, base)
    assert not g.grew and not g.notes() and g.union.seeds == 2
    with pytest.raises(SpecChanged) as e:
        grow(base, parse_experiment(_with(name="other", description="x")))
    assert e.value.differences == ['description "" -> "x"', 'name "grow" -> "other"']
