"""The malformed-input table for files: checkpoints (through bnlab predict / export / fold /
recalibrate), dataset files (through bnlab train: in --data-dir and in the cache) and run stores
(through bnlab report / compare / run). Every case ends in exit 2, a message naming the problem,
no traceback, and nothing written; a user's file is never deleted. Each test writes its own
small files; nothing touches the network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bnlab.checkpoint import CONFIG, WEIGHTS, config_digest
from bnlab.cli import app
from bnlab.data import download, sources, write_idx
from bnlab.experiments import parse_experiment, run_experiment
from bnlab.experiments import read, store
from bnlab.hashing import file_digest
from tiny_specs import TINY

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile


def invoke(args: list[str]):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, " ".join(r.output.split())  # rich wraps long lines


def assert_refused(args, match: str):
    """Exit 2, the message, no traceback (an uncaught exception would be r.exception)."""
    r, text = invoke(args)
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert re.search(match, text), f"{match!r} not in: {text}"
    return text


# ================================================================ checkpoints

@pytest.fixture(scope="module")
def good_checkpoint(digits_checkpoint) -> Path:
    return digits_checkpoint


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text())


def _write_config(folder: Path, config, redigest: bool) -> None:
    """``redigest``: as a buggy tool would write it (consistent digests, bad content); else an
    edit by hand that leaves the digest as it was."""
    if redigest and isinstance(config, dict) and "config_sha256" in config:
        config["config_sha256"] = config_digest(config)
    (folder / CONFIG).write_text(json.dumps(config))


def edit(fn, redigest=True):
    def mutate(folder):
        config = _config(folder)
        fn(config)  # in place
        _write_config(folder, config, redigest)
    return mutate


def raw_config(data: bytes):
    return lambda folder: (folder / CONFIG).write_bytes(data)


def weights(fn):
    """Rewrite the tensors (``fn(state) -> state``) with digests made consistent."""
    def mutate(folder):
        state = fn(load_file(str(folder / WEIGHTS)))
        save_file(state, str(folder / WEIGHTS))
        config = _config(folder)
        config["weights_sha256"] = file_digest(folder / WEIGHTS)
        _write_config(folder, config, redigest=True)
    return mutate


def set_tensor(name, value_fn):
    def fn(state):
        state[name] = value_fn(state[name].clone())
        return state
    return weights(fn)


def _poke(t, index, value):
    t.view(-1)[index] = value
    return t


def _replace_with_dir(folder):
    (folder / CONFIG).unlink()
    (folder / CONFIG).mkdir()


def _symlink_loop(folder):
    (folder / CONFIG).unlink()
    os.symlink(folder / CONFIG, folder / CONFIG)


def _fifo(folder):
    (folder / CONFIG).unlink()
    os.mkfifo(folder / CONFIG)


def _truncate_weights(redigest):
    def mutate(folder):
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
        if redigest:
            config = _config(folder)
            config["weights_sha256"] = file_digest(folder / WEIGHTS)
            _write_config(folder, config, redigest=True)
    return mutate


def _v1(config):
    del config["config_sha256"]
    config["format"] = "bnlab-checkpoint/1"


CHECKPOINT_CASES = {
    # config.json as bytes
    "config-not-json": (raw_config(b"{not json"), r"config.json: not valid JSON"),
    "config-empty": (raw_config(b""), r"not valid JSON"),
    "config-not-utf8": (raw_config(b'{"format": "\xff\xfe"}'), r"not UTF-8 text \(byte b'\\xff' at offset 12\)"),
    "config-json-array": (raw_config(b"[1, 2]"), r"expected a JSON object .* \(got a JSON array\)"),
    "config-nan-constant": (raw_config(b'{"format": NaN}'), r"not valid JSON \(NaN is not a JSON value\)"),
    "config-nested-too-deeply": (raw_config(b"[" * 200_000), r"JSON nested too deeply"),
    "config-integer-of-5000-digits": (raw_config(b'{"format": 1' + b"0" * 5000 + b"}"), r"not valid JSON.*digits"),
    "config-lone-surrogate": (raw_config(b'{"format": "bnlab-checkpoint/2", "meta": {"classes": ["\\ud800"]}}'),
                              r"not valid JSON text .*surrogates not allowed"),
    "config-of-2-mib": (raw_config(b" " * (2 << 20) + b"{}"), r"bytes, more than a checkpoint config can be"),
    # its format and keys
    "format-of-another-tool": (raw_config(b'{"model_type": "bert", "hidden_size": 768}'),
                               r"no 'format' key; its keys: \['hidden_size', 'model_type'\]\): a config.json of "
                               r"another tool"),
    "format-version-1": (edit(_v1, redigest=False), r"earlier bnlab in format 'bnlab-checkpoint/1'.*cannot be "
                                                    r"verified; this bnlab reads only 'bnlab-checkpoint/2'"),
    "format-from-a-newer-bnlab": (edit(lambda c: c.update(format="bnlab-checkpoint/9")), r"newer bnlab .*upgrade"),
    "format-not-a-string": (edit(lambda c: c.update(format=2)), r"not a bnlab checkpoint \(format 2"),
    "missing-key-spec": (edit(lambda c: c.pop("spec")), r"missing key\(s\) spec"),
    "unknown-key": (edit(lambda c: c.update(extra=1)), r"unknown key\(s\) \['extra'\]"),
    "digest-not-hex": (edit(lambda c: c.update(weights_sha256="xyz")), r"weights_sha256 must be a SHA-256"),
    # tampering: the digest covers the whole config
    "divide-changed-by-hand": (edit(lambda c: c["preprocessing"].update(divide=1.0), redigest=False),
                               r"changed after bnlab wrote it.*divide"),
    "class-name-changed-by-hand": (edit(lambda c: c["meta"]["classes"].__setitem__(3, "eight"), redigest=False),
                                   r"changed after bnlab wrote it"),
    # wrong types and values (digests consistent: a buggy writer)
    "spec-not-an-object": (edit(lambda c: c.update(spec=[])), r"spec must be a JSON object \(got a JSON array\)"),
    "preprocessing-not-an-object": (edit(lambda c: c.update(preprocessing="unit")),
                                    r"preprocessing must be a JSON object \(got a JSON string\)"),
    "meta-not-an-object": (edit(lambda c: c.update(meta=None)), r"meta must be a JSON object \(got a JSON null\)"),
    "divide-a-string": (edit(lambda c: c["preprocessing"].update(divide="16")),
                        r"invalid preprocessing: preprocessing.divide: Input should be a valid number"),
    "divide-zero": (edit(lambda c: c["preprocessing"].update(divide=0)), r"preprocessing.divide: .*greater than 0"),
    "divide-1e400-is-infinite": (lambda f: (f / CONFIG).write_text(re.sub(r'"divide": [0-9.]+', '"divide": 1e400',
                                                                          (f / CONFIG).read_text())),
                                 r"not valid JSON \(1e400 is beyond the range of a float\)"),
    "unknown-scaling": (edit(lambda c: c["preprocessing"].update(scaling="zscore")), r"preprocessing.scaling"),
    "standardize-with-wrong-channels": (edit(lambda c: c["preprocessing"].update(scaling="standardize",
                                                                                 mean=[0.1, 0.2], std=[1.0, 1.0])),
                                        r"mean as a list of 1 numbers, one per input channel"),
    "epoch-a-string": (edit(lambda c: c["meta"].update(epoch="3")), r"invalid meta: meta.epoch"),
    "kind-unknown": (edit(lambda c: c["meta"].update(kind="latest")), r"meta.kind"),
    "classes-of-wrong-count": (edit(lambda c: c["meta"].update(classes=["a", "b", "c"])),
                               r"meta.classes names 3 classes but the model has 10 outputs"),
    "val-loss-a-string": (edit(lambda c: c["meta"].update(val_loss="low")), r"val_loss must be a finite number"),
    "train-batch-size-zero": (edit(lambda c: c["meta"]["train"].update(batch_size=0)), r"meta.train.batch_size"),
    "invalid-model-spec": (edit(lambda c: c["spec"].update(activation="swish")),
                           r"invalid model spec: spec.mlp.activation"),
    "spec-of-10-to-the-12-units": (edit(lambda c: c["spec"].update(hidden=[10 ** 12])),
                                   r"invalid model spec: spec.mlp.hidden.0: Input should be less than or equal to 65536 \(got 1000000000000\)"),
    "spec-that-cannot-be-built": (edit(lambda c: c.update(spec={"kind": "layers", "input_shape": [1, 8, 8],
                                                                "num_classes": 10,
                                                                "layers": [{"type": "dense", "units": 10}]})),
                                  r"the model spec cannot be built \(layer 0 \(dense\): dense needs a flat input"),
    # the weights
    "weights-truncated": (_truncate_weights(redigest=False), r"model.safetensors: checksum mismatch"),
    "weights-truncated-digest-rewritten": (_truncate_weights(redigest=True), r"cannot be read as safetensors"),
    "weights-missing-a-tensor": (weights(lambda s: {k: v for k, v in s.items() if k != "dense_1.bias"}),
                                 r"missing tensor\(s\) \['dense_1.bias'\]"),
    "weights-extra-tensor": (weights(lambda s: {**s, "evil": torch.zeros(3)}),
                             r"tensor\(s\) \['evil'\] that the model the spec builds does not have"),
    "weights-wrong-shape": (set_tensor("dense.weight", lambda t: t[:8]), r"tensor dense.weight has shape \(8, 64\)"),
    "weights-float64": (set_tensor("dense.weight", lambda t: t.double()),
                        r"tensor dense.weight is torch.float64, the model's is torch.float32"),
    "weights-nan": (set_tensor("dense.weight", lambda t: _poke(t, 5, float("nan"))),
                    r"tensor dense.weight has 1 non-finite value"),
    "running-mean-infinite": (set_tensor("batch_normalization.running_mean", lambda t: _poke(t, 0, float("inf"))),
                              r"batch_normalization.running_mean has 1 non-finite value"),
    "running-var-negative": (set_tensor("batch_normalization.running_var", lambda t: _poke(t, 2, -0.5)),
                             r"batch_normalization.running_var has 1 negative variance"),
    # the file system
    "config-is-a-directory": (_replace_with_dir, r"config.json: a folder, expected the checkpoint's config"),
    "config-symlink-loop": (_symlink_loop, r"config.json: cannot be opened \(Too many levels of symbolic links\)"),
    "config-is-a-fifo": (_fifo, r"config.json: not a regular file"),
    "weights-file-missing": (lambda f: (f / WEIGHTS).unlink(), r"model.safetensors: missing \(the weights file"),
    "folder-empty": (lambda f: [p.unlink() for p in f.iterdir()], r"not a bnlab checkpoint \(expected config.json"),
}

COMMANDS = {
    "predict": lambda ck, tmp: ["predict", ck, tmp / "x.npy"],
    "predict-json": lambda ck, tmp: ["predict", ck, tmp / "x.npy", "--json"],
    "export": lambda ck, tmp: ["export", ck, "--onnx", tmp / "out" / "m.onnx"],
    "fold": lambda ck, tmp: ["fold", ck, "--out", tmp / "out"],
    "recalibrate": lambda ck, tmp: ["recalibrate", ck, "--out", tmp / "out"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_malformed_checkpoint_is_refused(good_checkpoint, tmp_path, case, command):
    import shutil

    mutate, match = CHECKPOINT_CASES[case]
    ck = Path(shutil.copytree(good_checkpoint, tmp_path / "checkpoint"))
    mutate(ck)
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    assert_refused(COMMANDS[command](ck, tmp_path), match)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("command", COMMANDS)
def test_the_good_checkpoint_passes_every_command(good_checkpoint, tmp_path, command):
    """The control of the table above: the same commands on the unaltered checkpoint succeed."""
    if command == "export":
        pytest.importorskip("onnxruntime")
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    r, _ = invoke(COMMANDS[command](good_checkpoint, tmp_path))
    assert r.exit_code == 0, r.output


def test_there_are_enough_checkpoint_cases():
    assert len(CHECKPOINT_CASES) >= 25


# ================================================================ dataset files


def _mnist_arrays(n_train=30, n_test=10):
    rng = np.random.default_rng(1)
    return {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)}


def mnist_raw(**changes):
    """Unzipped IDX files in --data-dir/mnist (checked by their format), with ``changes``:
    name -> array, or name -> bytes written as they are."""
    def place(data_dir: Path, monkeypatch) -> Path:
        folder = data_dir / "mnist"
        folder.mkdir(parents=True)
        for name, a in {**_mnist_arrays(), **changes}.items():
            if isinstance(a, bytes):
                (folder / name).write_bytes(a)
            else:
                write_idx(folder / name, a)
        return folder / next(iter(changes), "train-images-idx3-ubyte")
    return place


def mnist_gz(content: bytes | None, where: str = "data_dir", published: bool = False, dataset: str = "mnist"):
    """train-images-idx3-ubyte.gz with ``content`` (valid fake files for the rest) in --data-dir or
    in the cache folder; ``published``: make its MD5 the expected one."""
    def place(data_dir: Path, monkeypatch) -> Path:
        folder = (data_dir if where == "data_dir" else download.cache_dir()) / dataset
        folder.mkdir(parents=True)
        for name, a in _mnist_arrays().items():
            write_idx(folder / (name + ".gz"), a)
        target = folder / "train-images-idx3-ubyte.gz"
        if content is not None:
            target.write_bytes(content)
        if published:
            _publish(monkeypatch, sources.IDX_FILES, dataset, folder)
        return target
    return place


def _publish(monkeypatch, registry, dataset, folder):
    entries = registry[dataset]
    fix = lambda f: download.RemoteFile(f.name, hashlib.md5((folder / f.name).read_bytes()).hexdigest(),  # noqa: E731
                                        ("file:///nonexistent/" + f.name,))
    monkeypatch.setitem(registry, dataset, [fix(f) for f in entries] if isinstance(entries, list) else fix(entries))


def _cifar_bytes(n_classes=10, per=2, drop=(), image_bytes=3072, label_offset=0, evil=False) -> bytes:
    root, trains, test, key, meta, meta_key = {
        10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", "batches.meta",
             "label_names"),
        100: ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names")}[n_classes]
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, obj):
            if name in drop:
                return
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for t in [*trains, test]:
            add(t, {"data": rng.integers(0, 256, (per, image_bytes), dtype=np.uint8),
                    key: [int(x) + label_offset for x in rng.integers(0, n_classes, per)]})
        add(meta, {meta_key: [f"c{i}" for i in range(n_classes)]} if not evil else {meta_key: _Evil()})
    return buf.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def cifar(content: bytes, published: bool = True, n_classes: int = 10):
    def place(data_dir: Path, monkeypatch) -> Path:
        dataset = f"cifar{n_classes}"
        folder = data_dir / dataset
        folder.mkdir(parents=True)
        target = folder / sources.CIFAR_FILES[dataset].name
        target.write_bytes(content)
        if published:
            _publish(monkeypatch, sources.CIFAR_FILES, dataset, folder)
        return target
    return place


_truncated_idx = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in (30, 28, 28)) + b"\x00" * 100
_good_cifar = _cifar_bytes()

DATASET_CASES = {
    # --data-dir, gzipped names: verified by MD5, never deleted
    "datadir-gz-wrong-md5": ("mnist", mnist_gz(b"\x1f\x8b garbage"),
                             r"train-images-idx3-ubyte.gz: checksum mismatch: md5 "
                             + hashlib.md5(b"\x1f\x8b garbage").hexdigest() + r" \(10 bytes\), expected "
                             r"f68b3c2dcbeaaa9fbdd348bbdeb94873. bnlab did not download this file "
                             r"\(it is in --data-dir"),
    "datadir-gz-fake-data": ("mnist", mnist_gz(None), r"checksum mismatch: md5 .* left as it is: replace it with the "
                                                      r"original train-images-idx3-ubyte.gz from https://"),
    "datadir-gz-not-gzip": ("mnist", mnist_gz(b"PK\x03\x04 a zip", published=True),
                            r"train-images-idx3-ubyte.gz: cannot be read as gzip"),
    # --data-dir, unzipped IDX: checked by their format
    "datadir-idx-truncated": ("mnist", mnist_raw(**{"train-images-idx3-ubyte": _truncated_idx}),
                              r"train-images-idx3-ubyte: IDX header declares shape \(30, 28, 28\) \(23536 bytes\) but "
                              r"the file has 116 bytes"),
    "datadir-idx-bad-magic": ("mnist", mnist_raw(**{"train-labels-idx1-ubyte": b"GIF89a not idx"}),
                              r"train-labels-idx1-ubyte: not an IDX file \(bad magic number 47494638\)"),
    "datadir-idx-empty": ("mnist", mnist_raw(**{"t10k-images-idx3-ubyte": b""}), r"bad magic number empty"),
    "datadir-idx-wrong-image-size": ("mnist", mnist_raw(**{"train-images-idx3-ubyte": np.zeros((30, 28, 27),
                                                                                              np.uint8)}),
                                     r"expected mnist images of shape \(N, 28, 28\) uint8 "
                                     r"\(got \(30, 28, 27\) uint8\)"),
    "datadir-idx-signed-images": ("mnist", mnist_raw(**{"t10k-images-idx3-ubyte": np.zeros((10, 28, 28), np.int8)}),
                                  r"\(got \(10, 28, 28\) int8\)"),
    "datadir-idx-count-mismatch": ("mnist", mnist_raw(**{"train-labels-idx1-ubyte": np.zeros(29, np.uint8)}),
                                   r"holds 30 images but .*train-labels-idx1-ubyte holds 29 labels"),
    "datadir-idx-label-out-of-range": ("mnist", mnist_raw(**{"t10k-labels-idx1-ubyte": np.full(10, 12, np.uint8)}),
                                       r"t10k-labels-idx1-ubyte: labels outside 0..9 \(max 12\)"),
    # the cache folder: a file bnlab did not download is not deleted either
    "cache-hand-placed-wrong-md5": ("mnist", mnist_gz(b"not the real file", where="cache"),
                                    r"checksum mismatch: md5 .*bnlab did not download this file \(placed in the cache "
                                    r"folder by hand\)"),
    "cache-hand-placed-fashion-fake": ("fashion-mnist", mnist_gz(None, where="cache", dataset="fashion-mnist"),
                                       r"fashion-mnist/train-images-idx3-ubyte.gz: checksum mismatch.*expected "
                                       r"8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    # CIFAR tarballs
    "cifar-wrong-md5": ("cifar10", cifar(_good_cifar, published=False),
                        r"cifar-10-python.tar.gz: checksum mismatch: .*expected c58f30108f718f92721af3b95e74349a"),
    "cifar-garbage": ("cifar10", cifar(b"\x00" * 1000), r"not a valid CIFAR-10 python archive"),
    "cifar-truncated": ("cifar10", cifar(_good_cifar[: len(_good_cifar) // 2]), r"not a valid CIFAR-10 python archive"),
    "cifar-missing-batch": ("cifar10", cifar(_cifar_bytes(drop=("data_batch_3",))),
                            r"it has no file cifar-10-batches-py/data_batch_3"),
    "cifar-wrong-image-size": ("cifar100", cifar(_cifar_bytes(100, image_bytes=1024), n_classes=100),
                               r"cifar-100-python/train holds images of shape \(2, 1024\) uint8, expected \(N, 3072\)"),
    "cifar-labels-out-of-range": ("cifar10", cifar(_cifar_bytes(label_offset=10)), r"labels outside 0..9"),
    "cifar-code-in-a-pickle": ("cifar10", cifar(_cifar_bytes(evil=True)), r"refusing to load posix.system"),
}


@pytest.mark.parametrize("case", DATASET_CASES)
def test_malformed_dataset_file_is_refused_and_kept(tmp_path, monkeypatch, case):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cache"))
    dataset, place, match = DATASET_CASES[case]
    data_dir = tmp_path / "data"
    target = place(data_dir, monkeypatch)
    before = target.read_bytes()
    n_classes = 100 if dataset == "cifar100" else 10
    shape = [3, 32, 32] if dataset.startswith("cifar") else [1, 28, 28]
    (tmp_path / "m.json").write_text(json.dumps({"kind": "mlp", "input_shape": shape, "num_classes": n_classes,
                                                 "hidden": [4]}))
    assert_refused(["train", tmp_path / "m.json", "--dataset", dataset, "--data-dir", data_dir, "--epochs", "1",
                    "--out", tmp_path / "run"], match)
    assert target.read_bytes() == before  # never deleted, never changed


def test_there_are_enough_dataset_cases():
    assert len(DATASET_CASES) >= 15


# ================================================================ run stores

TINY_TOML = """name = "tiny"
seeds = 1
[data]
dataset = "synthetic"
validation = 0.25
options = { n_train = 60, n_test = 20, features = 4, classes = 2 }
[model]
kind = "mlp"
input_shape = [4]
num_classes = 2
hidden = [4]
bn = "before"
[train]
lr = 0.05
epochs = 1
batch_size = 16
[variants.bn]
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exp") / "e"
    assert run_experiment(parse_experiment(TINY), folder, workers=1).done == 1
    return folder


def _sql(*statements):
    def mutate(db_path: Path):
        con = sqlite3.connect(db_path)
        for s in statements:
            con.execute(s)
        con.commit()
        con.close()
    return mutate


def _bytes(fn):
    def mutate(db_path: Path):
        db_path.write_bytes(fn(db_path.read_bytes()))
    return mutate


def _foreign(db_path: Path):
    db_path.unlink()
    _sql("CREATE TABLE users (name TEXT)")(db_path)


def _as_folder(db_path: Path):
    db_path.unlink()
    db_path.mkdir()


def _runs_without_status(db_path: Path):
    _sql("ALTER TABLE runs RENAME TO old", "CREATE TABLE runs (run_id TEXT, variant TEXT)", "DROP TABLE old")(db_path)


def _locked(db_path: Path):
    con = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA locking_mode = EXCLUSIVE")
    con.execute("BEGIN EXCLUSIVE")
    con.execute("INSERT INTO meta VALUES ('lock', 'held')")
    return con  # held until the test ends


ALL = ("report", "compare", "run")
READERS = ("report", "compare")
STORE_CASES = {
    "runs-table-dropped": (_sql("DROP TABLE runs"), ALL, r"run store is damaged: table\(s\) runs missing. bnlab does "
                                                         r"not recreate them"),
    "epochs-table-dropped": (_sql("DROP TABLE epochs"), ALL, r"table\(s\) epochs missing"),
    "meta-table-dropped": (_sql("DROP TABLE meta"), ALL, r"table\(s\) meta missing"),
    "garbage-bytes": (_bytes(lambda b: b"garbage!" * (len(b) // 8)), ALL,
                      r"not a readable bnlab run store \(file is not a database\)"),
    "truncated": (_bytes(lambda b: b[: len(b) // 2]), ALL, r"not a readable bnlab run store \(database disk image is "
                                                           r"malformed\)"),
    "zero-bytes": (_bytes(lambda b: b""), READERS, r"an empty database, not a bnlab run store"),
    "another-sqlite-database": (_foreign, ALL, r"not a bnlab run store \(its tables: users\)"),
    "runs-without-status-column": (_runs_without_status, ALL, r"table runs has no column\(s\) seed, config_hash, "
                                                              r"config, status"),
    "locked-by-another-process": (_locked, ALL, r"the run store is locked by another process"),
    "stored-spec-not-json": (_sql("UPDATE meta SET value = '{oops' WHERE key = 'spec'"), READERS,
                             r"the stored spec does not validate"),
    "no-spec-stored": (_sql("DELETE FROM meta WHERE key = 'spec'"), READERS, r"no experiment spec stored"),
    "store-is-a-folder": (_as_folder, READERS, r"no experiment here \(a folder runs.sqlite"),
    "store-missing": (lambda p: p.unlink(), READERS, r"no experiment here \(no file runs.sqlite"),
}
STORE_TABLE = [(case, cmd) for case, (_, cmds, _) in STORE_CASES.items() for cmd in cmds]


@pytest.mark.parametrize("case,command", STORE_TABLE, ids=[f"{c}-{m}" for c, m in STORE_TABLE])
def test_damaged_store_is_refused(experiment, tmp_path, monkeypatch, case, command):
    import shutil

    monkeypatch.setattr(read, "READ_TIMEOUT", 0.2)
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    mutate, _, match = STORE_CASES[case]
    folder = Path(shutil.copytree(experiment, tmp_path / "e"))
    db = folder / read.STORE
    held = mutate(db)
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    args = {"report": ["report", folder], "compare": ["compare", folder],
            "run": ["run", tmp_path / "tiny.toml", "--out", folder, "--workers", "1"]}[command]
    try:
        assert_refused(args, match)
    finally:
        if held is not None:
            held.close()
    if case.endswith("-dropped"):  # nobody recreated the table
        tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert case.split("-")[0] not in tables
    assert not (folder / "report.html").exists()


def test_there_are_enough_store_cases():
    assert len(STORE_CASES) >= 12
