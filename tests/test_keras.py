"""Keras files read without TensorFlow, against real Keras: Keras 2 files written by tf.keras (committed,
with tf.keras's own predictions and counts: tests/data/keras2/make.py) and Keras 3 files written here by
Keras 3 (torch backend) in both of its formats. Oracles: Keras's predict and count_params."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab.checkpoint import CheckpointError, load_checkpoint
from bnlab.cli import app
from bnlab.deploy import fold
from bnlab.deploy.summary import summary_of
from bnlab.models import summarize
from bnlab.keras import KerasFileError, import_keras, load_keras
from bnlab.nn import BatchNorm

os.environ.setdefault("KERAS_BACKEND", "torch")
KERAS2 = Path(__file__).parent / "data" / "keras2"
# Keras 3's torch backend calls np.array(copy=False)-style APIs that numpy 2 deprecates: not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
runner = CliRunner()


def _probabilities(ck, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(ck.model(torch.from_numpy(x)), dim=1).numpy()


def _cli_predict(path: Path, x_path: Path) -> np.ndarray:
    res = runner.invoke(app, ["predict", str(path), str(x_path), "--json"])
    assert res.exit_code == 0, res.output
    return np.array([r["probabilities"] for r in json.loads(res.stdout)])


# ---- Keras 2 (tf.keras) files

@pytest.mark.parametrize("name", ["mlp", "cnn", "zoo"])
def test_keras2_h5_predicts_keras_probabilities(name, tmp_path):
    file, x_path = KERAS2 / f"{name}.h5", KERAS2 / f"x_{name}.npy"
    expected = np.load(KERAS2 / f"p_{name}.npy")
    assert np.abs(_probabilities(load_checkpoint(file), np.load(x_path)) - expected).max() <= 1e-5
    assert np.abs(_cli_predict(file, x_path) - expected).max() <= 1e-5  # the CLI prints 6 decimals


@pytest.mark.parametrize("name", ["mlp", "cnn", "zoo"])
def test_keras2_summary_has_keras_counts(name):
    counts = json.loads((KERAS2 / "counts.json").read_text())[name]
    s = summary_of(KERAS2 / f"{name}.h5")
    assert (s.total, s.trainable, s.non_trainable) == (counts["total"], counts["trainable"], counts["non_trainable"])
    res = runner.invoke(app, ["summary", str(KERAS2 / f"{name}.h5")])
    assert res.exit_code == 0 and f"Total params: {counts['total']:,}" in res.stdout


def test_keras_bn_settings_are_kept_and_convertible():
    ck = load_checkpoint(KERAS2 / "mlp.h5")
    bns = [m for m in ck.model.modules() if isinstance(m, BatchNorm)]
    assert [(b.convention, b.eps, b.momentum) for b in bns] == [("keras", 1e-3, 0.99)] * 2 + [("keras", 1e-2, 0.9)]
    torch_ck = load_keras(KERAS2 / "mlp.h5", convention="torch")
    tb = [m for m in torch_ck.model.modules() if isinstance(m, BatchNorm)]
    assert [(b.convention, b.eps) for b in tb] == [("torch", 1e-3)] * 2 + [("torch", 1e-2)]
    assert [b.momentum for b in tb] == pytest.approx([0.01, 0.01, 0.1])
    x = np.load(KERAS2 / "x_mlp.npy")
    assert np.abs(_probabilities(torch_ck, x) - _probabilities(ck, x)).max() <= 1e-6


def test_import_fold_and_serve_a_keras_file(tmp_path):
    x = np.load(KERAS2 / "x_cnn.npy")
    expected = np.load(KERAS2 / "p_cnn.npy")
    res = runner.invoke(app, ["import-keras", str(KERAS2 / "cnn.h5"), "--out", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    assert f"{json.loads((KERAS2 / 'counts.json').read_text())['cnn']['total']:,} parameters" in res.output
    assert np.abs(_probabilities(load_checkpoint(tmp_path / "ck"), x) - expected).max() <= 1e-5
    res = runner.invoke(app, ["fold", str(KERAS2 / "cnn.h5"), "--out", str(tmp_path / "folded")])
    assert res.exit_code == 0, res.output
    folded = load_checkpoint(tmp_path / "folded")
    assert not any(isinstance(m, BatchNorm) for m in folded.model.modules())
    assert np.abs(_probabilities(folded, x) - expected).max() <= 1e-5
    from fastapi.testclient import TestClient

    from bnlab.deploy.serve import create_app

    with TestClient(create_app(KERAS2 / "cnn.h5")) as client:
        r = client.post("/predict", json={"inputs": x[:2].tolist()})
        assert r.status_code == 200, r.text
        got = np.array([p["probabilities"] for p in r.json()["predictions"]])
    assert np.abs(got - expected[:2]).max() <= 1e-5


# ---- Keras 3 files, written here by real Keras 3

@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory):
    keras = pytest.importorskip("keras", reason="writing Keras 3 files needs keras (a test dependency)")
    from keras_files import models, seed_mlp

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("keras3")
    made = {}
    zoo = {**models(keras), "functional-mlp": (seed_mlp(keras, functional=True), None)}
    zoo["functional-mlp"] = (zoo["functional-mlp"][0], zoo["mlp"][1])
    for name, (model, x) in zoo.items():
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        for suffix in (".keras", ".h5"):
            path = folder / f"{name}{suffix}"
            model.save(path)
            made[path.name] = (path, x, np.asarray(model.predict(x, verbose=0)),
                               (model.count_params(), trainable, model.count_params() - trainable))
    return made


@pytest.mark.parametrize("name", ["mlp", "cnn", "zoo", "functional-mlp"])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_files_predict_and_count_as_keras(keras3_files, name, suffix):
    path, x, expected, counts = keras3_files[name + suffix]
    ck = load_checkpoint(path)
    assert ck.meta["source"]["format"] == ("keras3-zip" if suffix == ".keras" else "keras3-h5")
    assert np.abs(_probabilities(ck, x) - expected).max() <= 1e-5
    s = summary_of(path)
    assert (s.total, s.trainable, s.non_trainable) == counts
    own = summarize(ck.model, tuple(ck.model.spec.input_shape))  # the converted model's own tensors
    assert (own.total, own.trainable, own.non_trainable) == counts


def test_keras3_cli_predict_on_the_array_keras_was_given(keras3_files, tmp_path):
    path, x, expected, _ = keras3_files["cnn.keras"]
    np.save(tmp_path / "x.npy", x)
    assert np.abs(_cli_predict(path, tmp_path / "x.npy") - expected).max() <= 1e-5


def test_folded_keras3_model_matches(keras3_files):
    path, x, expected, _ = keras3_files["zoo.keras"]
    folded, rep = fold(load_checkpoint(path).model)
    assert rep.folded >= 1
    with torch.no_grad():
        got = torch.softmax(folded(torch.from_numpy(x)), 1).numpy()
    assert np.abs(got - expected).max() <= 1e-5


# ---- what is refused, and how

def test_unsupported_layers_are_listed_in_one_error(tmp_path):
    keras = pytest.importorskip("keras")
    L = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3, dilation_rate=2), L.UpSampling2D(),
                              L.Flatten(), L.Dense(3, activation="gelu"), L.Dense(2, activation="softmax")])
    model.save(tmp_path / "m.keras")
    with pytest.raises(KerasFileError) as e:
        load_keras(tmp_path / "m.keras")
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'm.keras'}: 3 unsupported layer(s)")  # the file named first
    for part in ("dilation", "UpSampling2D", "activation 'gelu'"):
        assert part in text


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    trunc = tmp_path / "t.h5"
    trunc.write_bytes((KERAS2 / "mlp.h5").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not an HDF5 file|cannot|truncated"):
        load_checkpoint(trunc)
    z = tmp_path / "z.keras"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("metadata.json", "{}")
    with pytest.raises(CheckpointError, match="needs config.json and model.weights.h5"):
        load_checkpoint(z)
    text = tmp_path / "x.h5"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a .keras archive"):
        load_checkpoint(text)
    import h5py

    with h5py.File(tmp_path / "w.h5", "w") as f:  # a weights-only file
        f.create_group("model_weights")
    with pytest.raises(CheckpointError, match="weights-only file"):
        load_checkpoint(tmp_path / "w.h5")
    shutil.copy(KERAS2 / "mlp.h5", tmp_path / "m.h5")
    res = runner.invoke(app, ["predict", str(tmp_path / "m.h5"), str(KERAS2 / "x_mlp.npy"), "--model", "best"])
    assert res.exit_code == 2 and "holds one model" in res.output
    res = runner.invoke(app, ["import-keras", str(trunc), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and not (tmp_path / "o").exists()


def test_a_frozen_layer_counts_as_keras_counts_it(tmp_path):
    keras = pytest.importorskip("keras")
    L = keras.layers
    frozen = L.Dense(6)
    model = keras.Sequential([keras.Input((5,)), frozen, L.BatchNormalization(), L.Dense(3, activation="softmax")])
    frozen.trainable = False
    model.save(tmp_path / "f.keras")
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    s = summary_of(tmp_path / "f.keras")
    assert (s.total, s.trainable, s.non_trainable) == (model.count_params(), trainable,
                                                       model.count_params() - trainable)
    assert s.trainable == 3 * 6 + 3 + 2 * 6  # the last Dense and BN's gamma, beta


def _save(keras, layers, path, shape=(6, 6, 1)):
    model = keras.Sequential([keras.Input(shape)] + layers)
    model.save(path)
    return model


def test_outputs_keras_would_not_give_are_refused(tmp_path):
    keras = pytest.importorskip("keras")
    L = keras.layers
    _save(keras, [L.Flatten(), L.Dense(3, activation="sigmoid")], tmp_path / "sig.keras")
    with pytest.raises(KerasFileError, match="output activation is 'sigmoid'"):
        load_keras(tmp_path / "sig.keras")
    _save(keras, [L.Flatten(), L.Dense(3, activation="softmax"), L.Activation("softmax")], tmp_path / "two.keras")
    with pytest.raises(KerasFileError, match="applied twice"):
        load_keras(tmp_path / "two.keras")


def test_refused_layers_before_others_give_one_error_not_a_crash(tmp_path):
    keras = pytest.importorskip("keras")
    L = keras.layers
    _save(keras, [L.Conv2D(2, 3, padding="same"), L.MaxPooling2D(2, padding="same"), L.Flatten(),
                  L.Dense(4, activation="gelu"), L.Dense(3, activation="softmax")], tmp_path / "p.keras")
    with pytest.raises(KerasFileError) as e:
        load_keras(tmp_path / "p.keras")
    assert ": 2 unsupported layer(s)" in e.value.args[0]  # the pool and, read on from its shape, gelu
    assert "padding 'same'" in str(e.value) and "gelu" in str(e.value)
    res = runner.invoke(app, ["summary", str(tmp_path / "p.keras")])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_damaged_weights_are_refused_naming_the_file(tmp_path):
    import h5py

    broken = tmp_path / "missing.h5"
    shutil.copy(KERAS2 / "mlp.h5", broken)
    with h5py.File(broken, "r+") as f:
        group = f["model_weights"]["dense"]
        del group[[n for n in group.attrs["weight_names"] if "kernel" in str(n)][0]]
    with pytest.raises(CheckpointError, match="lists the weight .*kernel.* which the file does not hold"):
        load_checkpoint(broken)
    nan = tmp_path / "nan.h5"
    shutil.copy(KERAS2 / "mlp.h5", nan)
    with h5py.File(nan, "r+") as f:
        group = f["model_weights"]["batch_normalization"]
        name = [n for n in group.attrs["weight_names"] if "moving_variance" in str(n)][0]
        group[name][0] = np.nan
    res = runner.invoke(app, ["summary", str(nan)])
    assert res.exit_code == 2 and "non-finite" in res.output
