"""Inference tools: folding, precise statistics, checkpoints, ONNX, predict, the REST server."""

import io
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab.checkpoint import load_checkpoint, save_checkpoint
from bnlab.cli import app
from bnlab.data import load_dataset
from bnlab.deploy import InputError, as_batch, describe, fold, predict
from bnlab.models import build_model, load_model_spec
from bnlab.nn import BatchNorm
from bnlab.train import fit


def _warm(model, n=4, scale=2.0):
    """Give every BN non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.momentum = 0.5 if m.convention == "torch" else 0.5
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.5, 0.5, generator=g)
        for _ in range(n):
            model(torch.randn(16, *model.spec.input_shape, generator=g) * scale + 1)
    return model.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


MLP_CASES = {f"{bn}-{ib}-{bias}-{act}": {"hidden": [20, 12], "bn": bn, "input_bn": ib, "bias": bias,
                                          "activation": act, "dropout": 0.1, "input_shape": [1, 6, 6]}
             for bn in ("before", "after") for ib in (True, False) for bias in ("auto", "on", "off")
             for act in ("relu", "sigmoid")}


@pytest.mark.parametrize("spec", MLP_CASES.values(), ids=MLP_CASES.keys())
def test_fold_every_mlp_placement(spec):
    model = _warm(build_model(spec, seed=0))
    folded, rep = fold(model)
    assert rep.folded == len(rep.entries) and not any(isinstance(m, BatchNorm) for m in folded.modules())
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5


@pytest.mark.parametrize("name", ["cifar100-cnn-bn", "fashion-mlp-bn-after", "mnist-mlp-bn-elu"])
def test_fold_seed_networks(name):
    model = _warm(build_model(load_model_spec(name), seed=0))
    folded, rep = fold(model)
    assert rep.folded == len(rep.entries)
    x = torch.randn(8, *model.spec.input_shape)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5


def test_fold_on_real_digits_after_training():
    data = load_dataset("mnist-5k")
    model = build_model(load_model_spec("fashion-mlp-bn-before"), seed=0)
    fit(model, data, epochs=1, lr=0.05, progress=False)
    model.eval()
    folded, _ = fold(model)
    with torch.no_grad():
        assert _rel(folded(data.x_test), model(data.x_test)) <= 1e-5
        assert torch.equal(folded(data.x_test).argmax(1), model(data.x_test).argmax(1))


def test_cnn_bn_after_activation_stays_with_a_reason():
    model = _warm(build_model({"kind": "cnn", "input_shape": [3, 8, 8], "blocks": [4], "final_block": 4,
                               "bn": "after", "num_classes": 3}, seed=0))
    folded, rep = fold(model)
    kept = [e for e in rep.entries if e.folded_into is None]
    assert kept and any("padded convolution" in e.how and "zeros padding" in e.how for e in kept)
    assert any("no Linear/Conv" in e.how for e in kept)  # the last BN sits between ReLU and max-pool
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5


def test_bn_before_unpadded_conv_folds_exactly():
    spec = {"kind": "layers", "input_shape": [2, 7, 7], "num_classes": 3, "layers": [
        {"type": "conv2d", "filters": 3, "padding": "valid", "activation": "relu"}, {"type": "batchnorm"},
        {"type": "conv2d", "filters": 4, "padding": "valid"}, {"type": "flatten"}, {"type": "dense", "units": 3}]}
    model = _warm(build_model(spec, seed=0))
    folded, rep = fold(model)
    assert rep.entries[0].how == "input side of an unpadded conv"
    x = torch.randn(5, 2, 7, 7)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5


def test_fold_refuses_training_mode_and_never_mutates():
    model = _warm(build_model(load_model_spec("fashion-mlp-bn-before"), seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with pytest.raises(ValueError, match=r"eval mode: call model.eval\(\)"):
        fold(model)
    model.eval()
    folded, _ = fold(model.double())
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    for k, v in model.float().state_dict().items():
        assert torch.equal(v, before[k])


def test_folded_model_round_trips_as_a_checkpoint(tmp_path):
    model = _warm(build_model(load_model_spec("cifar100-cnn-bn"), seed=0))
    folded, _ = fold(model)
    spec = describe(folded, input_shape=(3, 32, 32), num_classes=100)
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(folded.state_dict())
    save_checkpoint(tmp_path / "f", rebuilt.eval())
    ck = load_checkpoint(tmp_path / "f")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(ck.model(x), model(x)) <= 1e-5


# precise statistics (recalibrate): tests/test_precise.py


# ---------------------------------------------------------------- predict, export, CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = CliRunner().invoke(app, ["train", "fashion-mlp-bn-after", "--dataset", "mnist-5k", "--epochs", "2",
                                 "--lr", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / "checkpoint"


def test_predict_single_sample_in_eval_and_refuses_training(trained):
    ck = load_checkpoint(trained)
    from bnlab.data.sources import load_mnist_5k
    raw = load_mnist_5k()
    preds = predict(ck.model, as_batch(raw.x_test[:1, 0], (1, 28, 28)), ck.preprocessing, ck.meta["classes"])
    assert len(preds) == 1 and abs(sum(preds[0].probabilities) - 1) < 1e-5
    many = predict(ck.model, as_batch(raw.x_test[:200], (1, 28, 28)), ck.preprocessing)
    assert np.mean([p.label for p in many] == raw.y_test[:200]) > 0.8
    ck.model.train()
    with pytest.raises(ValueError, match="eval mode"):
        predict(ck.model, as_batch(raw.x_test[:1, 0], (1, 28, 28)), ck.preprocessing)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ck.model(torch.rand(1, 1, 28, 28))


@pytest.mark.parametrize("arr,match", [
    (np.zeros((3, 3)), r"expected shape \(1, 28, 28\)"),
    (np.array(["a"]), "expected numbers"),
    (np.full((28, 28), np.nan), "NaN"),
], ids=["shape", "dtype", "nan"])
def test_input_validation(arr, match):
    with pytest.raises(InputError, match=match):
        as_batch(arr, (1, 28, 28))


def test_cli_recalibrate_fold_predict_export(trained, tmp_path):
    from PIL import Image
    from bnlab.data.sources import load_mnist_5k
    raw = load_mnist_5k()
    Image.fromarray(raw.x_test[0, 0]).save(tmp_path / "d.png")
    np.save(tmp_path / "d.npy", raw.x_test[:3, 0][:, None])
    r = CliRunner().invoke(app, ["recalibrate", str(trained), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "moving averages" in r.output and "precise" in r.output
    r = CliRunner().invoke(app, ["fold", str(trained), "--out", str(tmp_path / "f")])
    assert r.exit_code == 0 and "3 of 3 normalization layers folded" in r.output
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "f"), str(tmp_path / "d.png"), str(tmp_path / "d.npy"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out) == 4 and out[0]["class"] == int(raw.y_test[0])
    r = CliRunner().invoke(app, ["predict", str(trained), str(tmp_path / "nope.txt")])
    assert r.exit_code == 2 and "no such file" in r.output
    r = CliRunner().invoke(app, ["export", str(trained), "--onnx", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output


def test_onnx_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from bnlab.deploy.export import export_onnx, onnx_predict
    model = _warm(build_model(load_model_spec("cifar100-cnn-bn"), seed=0))
    folded, _ = fold(model)
    export_onnx(folded, (3, 32, 32), tmp_path / "m.onnx")
    for n in (1, 7):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            ref = model(x).numpy()
        got = onnx_predict(tmp_path / "m.onnx", x.numpy())
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_predict_and_export_say_which_model(trained, tmp_path):
    """A run folder gives the best-validation model by default, --model final the final one; each
    command says which it used; a checkpoint folder with the other --model is refused."""
    from bnlab.data.sources import load_mnist_test_embedded
    run = trained.parent
    raw_x, _ = load_mnist_test_embedded()
    np.save(tmp_path / "d.npy", raw_x[:2])
    best, final = load_checkpoint(run), load_checkpoint(run, which="final")
    assert (best.kind, final.kind, best.path.name, final.path.name) == ("best", "final", "checkpoint",
                                                                          "checkpoint-final")
    r = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "d.npy")])
    assert r.exit_code == 0, r.output
    assert f"model: best-validation model (epoch {best.meta['epoch']}" in " ".join(r.output.split())
    for which, ck in (("best", best), ("final", final)):
        r = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "d.npy"), "--model", which, "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert [(o["model"], o["epoch"]) for o in out] == [(which, ck.meta["epoch"])] * 2
        probs = [o["probabilities"] for o in out]
        expect = [p.probabilities for p in predict(ck.model, raw_x[:2].astype(np.float32), ck.preprocessing)]
        np.testing.assert_allclose(probs, expect, atol=1e-6)
    r = CliRunner().invoke(app, ["predict", str(trained), str(tmp_path / "d.npy"), "--model", "final"])
    assert r.exit_code == 2 and "is the best-validation model, not the final model" in " ".join(r.output.split())
    # a lone checkpoint folder (copied out of its run): no hint at a sibling that does not exist
    import shutil
    lone = shutil.copytree(trained, tmp_path / "lone" / "checkpoint")
    r = CliRunner().invoke(app, ["predict", str(lone), str(tmp_path / "d.npy"), "--model", "final"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "holds only that model" in text and "checkpoint-final" not in text, r.output
    r = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "d.npy"), "--model", "last"])
    assert r.exit_code == 2 and "unknown model choice 'last'" in r.output
    pytest.importorskip("onnxruntime")
    from bnlab.deploy.export import onnx_metadata
    r = CliRunner().invoke(app, ["export", str(run), "--model", "final", "--onnx", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert "exported the final model" in " ".join(r.output.split())
    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["bnlab.model"] == "final" and meta["bnlab.epoch"] == str(final.meta["epoch"])
    r = CliRunner().invoke(app, ["export", str(run), "--onnx", str(tmp_path / "b.onnx")])
    assert r.exit_code == 0 and onnx_metadata(tmp_path / "b.onnx")["bnlab.model"] == "best"


def test_serve_refuses_a_wrong_model_choice_before_starting(trained):
    pytest.importorskip("uvicorn")
    r = CliRunner().invoke(app, ["serve", str(trained), "--model", "final"])
    assert r.exit_code == 2 and "not the final model" in " ".join(r.output.split())


# ---------------------------------------------------------------- REST server on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", "serve", str(trained.parent), "--port", str(port),
                             "--max-body-bytes", "200000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def test_server_health_model_openapi(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    info = httpx.get(server + "/model").json()
    assert info["input_shape"] == [1, 28, 28] and "Total params" in info["summary"]
    assert info["model"]["kind"] == "best" and info["model"]["path"].endswith("checkpoint")  # a run folder: best
    assert info["model"]["description"].startswith(f"best-validation model (epoch {info['model']['epoch']}")
    assert "/predict" in httpx.get(server + "/openapi.json").json()["paths"]


def test_server_predicts_json_and_image(server):
    from PIL import Image
    from bnlab.data.sources import load_mnist_5k
    raw = load_mnist_5k()
    r = httpx.post(server + "/predict", json={"inputs": raw.x_test[0, 0].tolist()})
    assert r.status_code == 200 and r.json()["predictions"][0]["class"] == int(raw.y_test[0])
    assert r.json()["model"]["kind"] == "best"
    r = httpx.post(server + "/predict", json={"inputs": raw.x_test[:5].tolist()})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5
    buf = io.BytesIO()
    Image.fromarray(raw.x_test[1, 0]).save(buf, format="PNG")
    r = httpx.post(server + "/predict", files={"file": ("d.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["class"] == int(raw.y_test[1])


# bad, hostile and oversized input, keep-alive, limits, the fuzz, stopping: tests/test_serve.py
