"""Inference that fits the ecosystem: ONNX with the preprocessing (and softmax) inside, Keras-shaped
arrays, the already-scaled warning, TF Serving's format, /docs offline, summary of a checkpoint.
Oracles: bnlab predict on the same raw inputs, onnxruntime, numpy transposes, the OpenAPI schema."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab.checkpoint import load_checkpoint, save_checkpoint
from bnlab.cli import app
from bnlab.deploy import as_batch, predict
from bnlab.deploy.predict import LooksPrescaled
from bnlab.models import build_model, summarize

runner = CliRunner()
RGB = {"kind": "cnn", "input_shape": [3, 6, 5], "blocks": [4], "final_block": 4, "bn": "before", "num_classes": 3}


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    """A small CNN on (3, 6, 5) images with per-channel standardisation and non-trivial BN statistics."""
    model = build_model(RGB, seed=0).train()
    with torch.no_grad():
        model(torch.randn(32, 3, 6, 5) * 2 + 1)
    folder = tmp_path_factory.mktemp("rgb") / "ck"
    pre = {"scaling": "standardize", "divide": 255.0, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    save_checkpoint(folder, model.eval(), preprocessing=pre, meta={"kind": "final", "classes": ["a", "b", "c"]})
    return folder


def _raw(shape, n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(np.float32)


# ---- ONNX

@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "softmax"])
def test_onnx_takes_raw_inputs_and_matches_predict(rgb_checkpoint, tmp_path, softmax):
    pytest.importorskip("onnxruntime")
    from bnlab.deploy.export import onnx_metadata, onnx_predict

    args = ["export", str(rgb_checkpoint), "--onnx", str(tmp_path / "m.onnx")] + (["--softmax"] if softmax else [])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(rgb_checkpoint)
    x = _raw((3, 6, 5))
    expected = np.array([p.probabilities for p in predict(ck.model, x, ck.preprocessing)])
    out = onnx_predict(tmp_path / "m.onnx", x)
    got = out if softmax else torch.softmax(torch.from_numpy(out), 1).numpy()
    assert np.abs(got - expected).max() <= 1e-5
    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["bnlab.outputs"] == ("probabilities" if softmax else "logits")
    assert json.loads(meta["bnlab.classes"]) == ["a", "b", "c"] and meta["bnlab.input_layout"] == "NCHW"
    assert json.loads(meta["bnlab.preprocessing"]) == ck.preprocessing
    assert re.fullmatch(r"[0-9a-f]{64}", meta["bnlab.spec_sha256"]) and meta["bnlab.version"]


def test_onnx_of_a_keras_model_is_channels_last_without_preprocessing(tmp_path):
    pytest.importorskip("onnxruntime")
    from pathlib import Path

    from bnlab.deploy.export import onnx_metadata, onnx_predict

    keras2 = Path(__file__).parent / "data" / "keras2"
    res = runner.invoke(app, ["export", str(keras2 / "cnn.h5"), "--onnx", str(tmp_path / "k.onnx"), "--softmax"])
    assert res.exit_code == 0, res.output
    meta = onnx_metadata(tmp_path / "k.onnx")
    assert meta["bnlab.input_layout"] == "NHWC" and json.loads(meta["bnlab.preprocessing"]) == {}
    got = onnx_predict(tmp_path / "k.onnx", np.load(keras2 / "x_cnn.npy"))
    assert np.abs(got - np.load(keras2 / "p_cnn.npy")).max() <= 1e-5  # tf.keras's own predict


# ---- Keras-shaped arrays

def test_keras_shaped_batches_are_accepted_and_transposed():
    grey = _raw((28, 28), n=4)
    np.testing.assert_array_equal(as_batch(grey, (1, 28, 28)), grey[:, None])
    rgb = _raw((6, 5, 3), n=3)  # (N, H, W, C)
    np.testing.assert_array_equal(as_batch(rgb, (3, 6, 5)), rgb.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(as_batch(rgb[0], (3, 6, 5)), rgb[:1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(as_batch(rgb.transpose(0, 3, 1, 2), (3, 6, 5)), rgb.transpose(0, 3, 1, 2))
    from bnlab.payload import InputError

    with pytest.raises(InputError, match=r"or \(6, 5, 3\) / \(N, 6, 5, 3\)"):
        as_batch(np.zeros((2, 5, 6, 3)), (3, 6, 5))


def test_channels_last_models_take_both_orders_and_nothing_else():
    """A model imported from Keras takes (H, W, C); channels-first and grey arrays are moved to it."""
    from bnlab.payload import InputError

    nhwc = _raw((6, 5, 3), n=2)
    np.testing.assert_array_equal(as_batch(nhwc, (6, 5, 3), channels_last=True), nhwc)
    np.testing.assert_array_equal(as_batch(nhwc.transpose(0, 3, 1, 2), (6, 5, 3), channels_last=True), nhwc)
    grey = _raw((28, 28), n=3)
    np.testing.assert_array_equal(as_batch(grey, (28, 28, 1), channels_last=True), grey[..., None])
    np.testing.assert_array_equal(as_batch(grey[:, None], (28, 28, 1), channels_last=True), grey[..., None])
    with pytest.raises(InputError, match=r"expected shape \(28, 28, 1\)"):  # no nonsense layout slips through
        as_batch(grey[:, :, None, :], (28, 28, 1), channels_last=True)


def test_a_png_goes_to_a_keras_cnn_in_its_layout(tmp_path):
    from pathlib import Path

    from PIL import Image

    from bnlab.deploy.predict import read_input

    keras2 = Path(__file__).parent / "data" / "keras2"
    x = np.load(keras2 / "x_cnn.npy")[0]  # (32, 32, 3) in [0, 1]
    Image.fromarray((x * 255).round().astype(np.uint8)).save(tmp_path / "c.png")
    arr = read_input(tmp_path / "c.png", (32, 32, 3), channels_last=True)
    np.testing.assert_array_equal(arr[0], (x * 255).round())
    res = runner.invoke(app, ["predict", str(keras2 / "cnn.h5"), str(tmp_path / "c.png"), "--json"])
    assert res.exit_code == 0, res.output


def test_predict_cli_on_keras_shaped_arrays(rgb_checkpoint, tmp_path):
    x = _raw((6, 5, 3), n=3)
    np.save(tmp_path / "nhwc.npy", x)
    np.save(tmp_path / "nchw.npy", x.transpose(0, 3, 1, 2))
    outs = []
    for name in ("nhwc", "nchw"):
        res = runner.invoke(app, ["predict", str(rgb_checkpoint), str(tmp_path / f"{name}.npy"), "--json"])
        assert res.exit_code == 0, res.output
        outs.append([r["probabilities"] for r in json.loads(res.stdout)])
    assert outs[0] == outs[1]


# ---- inputs that look already scaled

def test_already_scaled_inputs_warn_unless_prescaled(digits_checkpoint, tmp_path):
    x = np.random.default_rng(1).uniform(0, 1, (3, 8, 8)).astype(np.float32)  # looks like pixels / 16
    np.save(tmp_path / "scaled.npy", x)
    res = runner.invoke(app, ["predict", str(digits_checkpoint), str(tmp_path / "scaled.npy"), "--json"])
    assert res.exit_code == 0 and "warning: the inputs lie in [" in res.stderr and "--prescaled" in res.stderr
    json.loads(res.stdout)  # stdout stays pure JSON
    res = runner.invoke(app, ["predict", str(digits_checkpoint), str(tmp_path / "scaled.npy"), "--prescaled"])
    assert res.exit_code == 0 and "warning" not in res.stderr
    ck = load_checkpoint(digits_checkpoint)
    with pytest.warns(LooksPrescaled):
        predict(ck.model, x, ck.preprocessing)
    raw = x * 16  # real raw pixels: no warning
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", LooksPrescaled)
        predict(ck.model, raw, ck.preprocessing)


# ---- the server: TF Serving's format, warnings, /docs offline

@pytest.fixture(scope="module")
def client(digits_checkpoint):
    from fastapi.testclient import TestClient

    from bnlab.deploy.serve import create_app

    with TestClient(create_app(digits_checkpoint, decoders=1)) as c:
        yield c


def test_tf_serving_instances_get_tf_serving_predictions(client, digits_checkpoint):
    x = _raw((8, 8), n=3) / 16
    x = np.round(x * 16)  # raw digits pixels 0..16
    r = client.post("/predict", json={"instances": x.tolist(), "signature_name": "serving_default"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions"} and len(body["predictions"]) == 3
    ck = load_checkpoint(digits_checkpoint)
    expected = [p.probabilities for p in predict(ck.model, x[:, None], ck.preprocessing)]
    assert np.abs(np.array(body["predictions"]) - np.array(expected)).max() <= 1e-6
    own = client.post("/predict", json={"inputs": x.tolist()}).json()
    assert [p["probabilities"] for p in own["predictions"]] == body["predictions"]
    schema = client.get("/openapi.json").json()
    forms = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    assert {tuple(f["required"]) for f in forms} == {("inputs",), ("instances",)}


def test_server_warns_about_already_scaled_inputs(client):
    x = np.random.default_rng(2).uniform(0, 1, (8, 8))
    body = client.post("/predict", json={"inputs": x.tolist()}).json()
    assert "prescaled" in body["warnings"][0]
    assert "warnings" not in client.post("/predict", json={"inputs": x.tolist(), "prescaled": True}).json()
    tf = client.post("/predict", json={"instances": [x.tolist()]}).json()  # TF Serving's format warns too
    assert "prescaled" in tf["warnings"][0] and len(tf["predictions"]) == 1
    r = client.post("/predict", json={"instances": [x.tolist()], "signature_name": "other"})
    assert r.status_code == 422 and "serving_default" in r.json()["detail"]


def test_recalibrate_a_keras_image_model_on_a_channels_first_dataset(tmp_path):
    """The dataset comes (N, 1, 8, 8); a Keras model takes (N, 8, 8, 1): the data are moved to it."""
    keras = pytest.importorskip("keras")
    L = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(3, 3), L.BatchNormalization(), L.Activation("relu"),
                              L.Flatten(), L.Dense(10, activation="softmax")])
    model.save(tmp_path / "k.keras")
    res = runner.invoke(app, ["recalibrate", str(tmp_path / "k.keras"), "--dataset", "digits",
                              "--out", str(tmp_path / "r"), "--mode", "inference"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "r").model.spec.input_layout == "channels_last"


def test_docs_page_works_offline(client):
    html = client.get("/docs").text
    assert "swagger-ui" in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']https?://""", html)  # nothing from a CDN
    assets = re.findall(r"""(?:src|href)\s*=\s*["'](/[^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for a in assets:
        assert client.get(a).status_code == 200, a


# ---- summary of a checkpoint

def test_summary_of_a_checkpoint_folder(digits_checkpoint):
    res = runner.invoke(app, ["summary", str(digits_checkpoint)])
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(digits_checkpoint)
    s = summarize(ck.model, (1, 8, 8))
    assert f"Total params: {s.total:,}" in res.stdout and f"Non-trainable params: {s.non_trainable:,}" in res.stdout
    res = runner.invoke(app, ["summary", str(digits_checkpoint.parent / "nothing-here")])
    assert res.exit_code == 2
