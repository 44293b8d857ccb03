"""The training engine: fused step == autograd step, determinism, divergence, checkpoints, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from bnlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bnlab.cli import app
from bnlab.data import load_dataset
from bnlab.data.dataset import Dataset
from bnlab.models import build_model, load_model_spec
from bnlab.nn import BatchNorm
from bnlab.train import FusedMLPStep, evaluate, fit, make_optimizer, unsupported_layers
from bnlab.train.engine import AutogradStep, make_step
from bnlab.train.native import NativeMLPStep


def _toy(n=64, f=12, c=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=dtype) * 2 + 0.5
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


SPECS = {
    "bn-before-relu": {"hidden": [10, 7], "bn": "before", "input_bn": True},
    "bn-after-sigmoid": {"hidden": [9], "bn": "after", "activation": "sigmoid"},
    "none-tanh": {"hidden": [8, 8], "activation": "tanh"},
    "leaky-bias-on": {"hidden": [6], "bn": "before", "bias": "on", "activation": "leaky_relu"},
    "elu-keras-bn": {"hidden": [6], "bn": "after", "activation": "elu", "norm_options": {"convention": "keras"}},
    "selu-cumulative-bn": {"hidden": [6], "bn": "before", "activation": "selu", "norm_options": {"momentum": None}},
    "linear": {"hidden": [5], "activation": "linear", "input_bn": True},
}


STEPS = {"fused": FusedMLPStep, "native": NativeMLPStep}


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adam", "rmsprop"])
@pytest.mark.parametrize("name", SPECS, ids=SPECS.keys())
@pytest.mark.parametrize("kind", STEPS)
def test_fused_step_matches_autograd(kind, name, optimizer):
    """Same weights, running statistics and losses after several steps (float64, tolerance 1e-10),
    for the Python fused step and the C++ native step."""
    spec = {**SPECS[name], "input_shape": [12], "num_classes": 3}
    a = build_model(spec, seed=0).double()
    b = build_model(spec, seed=0).double()
    opt_name, mom = ("sgd", 0.9) if optimizer == "sgd-momentum" else (optimizer, 0.0)
    lr = 0.05
    plain = opt_name == "sgd" and mom == 0
    fused = STEPS[kind](a, sgd_lr=lr if plain else None)
    opt_a = None if plain else make_optimizer(opt_name, list(a.parameters()), lr=lr, momentum=mom)
    ref = AutogradStep(b)
    opt_b = make_optimizer(opt_name, list(b.parameters()), lr=lr, momentum=mom)
    for step in range(4):
        x, y = _toy(seed=step, dtype=torch.float64)
        la, ca = fused(x, y)
        if opt_a:
            opt_a.step()
            opt_a.zero_grad()  # sets .grad to None: the next step must still deliver its gradients
        lb, cb = ref(x, y)
        opt_b.step()
        assert abs(float(la) - float(lb)) <= 1e-10 * max(1.0, abs(float(lb)))
        assert int(ca) == int(cb)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if va.is_floating_point():
            # atol: a parameter whose true gradient is exactly 0 (the input BN's beta when another BN
            # follows) gets rounding noise that Adam rescales to ~1e-12
            assert torch.allclose(va, vb, rtol=1e-10, atol=1e-10), k
        else:
            assert torch.equal(va, vb), k


@pytest.mark.parametrize("kind", STEPS)
def test_fused_step_float32_tolerance(kind):
    spec = load_model_spec("fashion-mlp-bn-before")
    a, b = build_model(spec, seed=0), build_model(spec, seed=0)
    fused, ref = STEPS[kind](a, sgd_lr=1e-2), AutogradStep(b)
    opt = make_optimizer("sgd", list(b.parameters()), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        fused(x, y)
        ref(x, y)
        opt.step()
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        if va.is_floating_point():
            assert (va - vb).abs().max() <= 1e-5 * max(1.0, float(vb.abs().max()))


def test_unsupported_models_use_autograd():
    renorm = build_model({"hidden": [4], "input_shape": [6], "num_classes": 2, "bn": "before", "norm": "renorm"})
    assert unsupported_layers(renorm)
    with pytest.raises(ValueError, match="does not support"):
        FusedMLPStep(renorm)
    assert make_step(renorm, "auto", None)[1] == "autograd"


def _data(n=256, seed=0):
    x, y = _toy(n, seed=seed)
    return Dataset("toy", x[: n - 64], y[: n - 64], x[n - 64:], y[n - 64:], x[:0], y[:0], 3)


def test_fit_is_deterministic_and_records_history():
    spec = {"hidden": [16], "bn": "before", "input_shape": [12], "num_classes": 3, "dropout": 0.2}
    h1 = fit(build_model(spec, seed=1), _data(), epochs=3, lr=0.1, seed=5, progress=False, target_accuracy=0.01)
    h2 = fit(build_model(spec, seed=1), _data(), epochs=3, lr=0.1, seed=5, progress=False, target_accuracy=0.01)
    assert h1.step_loss == h2.step_loss and len(h1.step_loss) == 3 * 6
    assert [e.val_accuracy for e in h1.epochs] == [e.val_accuracy for e in h2.epochs]
    assert h1.epochs_to_target == 1 and h1.steps_to_target == 6 and h1.seconds_to_target > 0
    assert all(e.seconds > 0 for e in h1.epochs) and h1.engine == "fused"


def test_native_engine_is_the_default_for_mlps_and_gives_the_fused_history():
    spec = {"hidden": [16, 8], "bn": "before", "input_bn": True, "input_shape": [12], "num_classes": 3}
    hn = fit(build_model(spec, seed=1), _data(), epochs=3, lr=0.1, seed=2, progress=False)
    hf = fit(build_model(spec, seed=1), _data(), epochs=3, lr=0.1, seed=2, progress=False, engine="fused")
    again = fit(build_model(spec, seed=1), _data(), epochs=3, lr=0.1, seed=2, progress=False)
    assert hn.engine == "native" and hf.engine == "fused"
    assert torch.allclose(torch.tensor(hn.step_loss), torch.tensor(hf.step_loss), rtol=1e-5)
    assert hn.step_loss == again.step_loss  # deterministic


def test_native_falls_back_to_fused_where_it_does_not_apply():
    dropout = {"hidden": [16], "bn": "before", "input_shape": [12], "num_classes": 3, "dropout": 0.2}
    assert fit(build_model(dropout, seed=1), _data(), epochs=1, progress=False).engine == "fused"
    with pytest.raises(ValueError, match=r"engine='native' cannot run this model: .*Dropout"):
        fit(build_model(dropout, seed=1), _data(), epochs=1, progress=False, engine="native")
    plain = {"hidden": [16], "bn": "before", "input_shape": [12], "num_classes": 3}
    frozen = build_model(plain, seed=1)
    frozen[-1].bias.requires_grad_(False)
    assert fit(frozen, _data(), epochs=1, progress=False).engine == "fused"


def test_native_unavailable_falls_back_with_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = ("from bnlab.train import native, fit; from bnlab.models import build_model; import torch;"
            "from bnlab.data.dataset import Dataset;"
            "x = torch.randn(40, 4); y = torch.randint(0, 2, (40,));"
            "d = Dataset('t', x, y, x, y, x[:0], y[:0], 2);"
            "h = fit(build_model({'hidden': [4], 'input_shape': [4], 'num_classes': 2}), d, epochs=1, progress=False);"
            "print(h.engine, '|', native.unavailable_reason())")
    for env in ({"BNLAB_NATIVE": "0"}, {"BNLAB_NATIVE_DIR": str(blocker)}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        engine, reason = out.stdout.strip().split(" | ")
        assert engine == "fused" and reason != "None", out.stdout


def test_native_build_lock_clears_a_lock_left_by_a_killed_build(tmp_path):
    from bnlab.train.native import _build_lock
    (tmp_path / "lock").write_text("")  # torch's lock file, as a kill -9 during a build leaves it
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        (tmp_path / "lock").write_text("")  # a build in progress, inside the lock
    assert (tmp_path / "lock").exists()


@pytest.mark.slow
def test_native_build_after_a_killed_build_does_not_hang(tmp_path):
    """A fresh build folder holding a stale lock: the build completes instead of waiting forever."""
    from bnlab.train.native import build_dir
    env = {**os.environ, "BNLAB_NATIVE_DIR": str(tmp_path)}
    folder = subprocess.run([sys.executable, "-c", "from bnlab.train.native import build_dir; print(build_dir())"],
                            capture_output=True, text=True, env=env, check=True).stdout.strip()
    os.makedirs(folder)
    open(os.path.join(folder, "lock"), "w").close()
    out = subprocess.run([sys.executable, "-c", "from bnlab.train import native; native.load(); "
                          "print(native.unavailable_reason())"], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "None", out.stderr
    assert "left by an interrupted build" in out.stderr
    assert build_dir() != folder


def test_native_step_rejects_bad_batches_and_leaves_the_model_unchanged():
    spec = {"hidden": [6], "bn": "before", "input_bn": True, "input_shape": [12], "num_classes": 3}
    m = build_model(spec, seed=0)
    step = NativeMLPStep(m, sgd_lr=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = _toy()
    bad = [((x, torch.full_like(y, 3)), "target 3 is out of bounds for 3 classes"),
           ((x[:, :10], y), "takes 12 input features"),
           ((x.double(), y), "inputs are Double but the model is Float"),
           ((x, y.int()), "targets must be int64"),
           ((x[:1], y[:1]), "more than one value per channel")]
    for args, match in bad:
        with pytest.raises((RuntimeError, ValueError), match=match):
            step(*args)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    loss, correct = step(x, y)
    assert loss.isfinite() and 0 <= int(correct) <= len(y)
    assert not torch.equal(m.state_dict()["dense.weight"], before["dense.weight"])


def _hand_built(kind):
    nn = torch.nn
    if kind == "no-affine":
        layers = [nn.Linear(12, 5, bias=False), BatchNorm(5, affine=False), nn.Tanh(), nn.Linear(5, 3)]
    else:  # Keras's scale-only / center-only BN, one without running statistics
        layers = [BatchNorm(12, center=False), nn.Linear(12, 4), BatchNorm(4, scale=False, track_running_stats=False),
                  nn.LeakyReLU(0.2), nn.Linear(4, 3)]
    torch.manual_seed(0)
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["no-affine", "scale-or-center-only"])
def test_native_step_matches_autograd_on_hand_built_models(kind, optimizer):
    a, b = _hand_built(kind), _hand_built(kind)
    b.load_state_dict(a.state_dict())
    plain = optimizer == "sgd"
    step = NativeMLPStep(a, sgd_lr=0.05 if plain else None)
    opt_a = None if plain else make_optimizer(optimizer, list(a.parameters()), lr=0.05)
    ref, opt_b = AutogradStep(b), make_optimizer(optimizer, list(b.parameters()), lr=0.05)
    for i in range(3):
        x, y = _toy(seed=i, dtype=torch.float64)
        la, _ = step(x, y)
        if opt_a:
            opt_a.step()
        lb, _ = ref(x, y)
        opt_b.step()
        assert abs(float(la) - float(lb)) <= 1e-10 * max(1.0, abs(float(lb)))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        # atol: the Linear bias before a centring BN has a true gradient of exactly 0 (as above)
        assert torch.allclose(va, vb, rtol=1e-10, atol=1e-10) if va.is_floating_point() else torch.equal(va, vb), k


def test_native_step_checks_the_layer_widths():
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), BatchNorm(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with pytest.raises(ValueError, match="normalises 6 features but receives 5"):
        NativeMLPStep(m)


def test_autograd_engine_gives_the_same_history():
    spec = {"hidden": [16], "bn": "after", "input_shape": [12], "num_classes": 3}
    hf = fit(build_model(spec, seed=1), _data(), epochs=2, lr=0.1, progress=False, engine="fused")
    ha = fit(build_model(spec, seed=1), _data(), epochs=2, lr=0.1, progress=False, engine="autograd")
    assert ha.engine == "autograd"
    assert torch.allclose(torch.tensor(hf.step_loss), torch.tensor(ha.step_loss), rtol=1e-5)


def test_divergence_stops_and_keeps_history():
    spec = {"hidden": [32], "input_shape": [12], "num_classes": 3, "activation": "relu"}
    h = fit(build_model(spec, seed=0), _data(), epochs=5, lr=1e12, progress=False)
    assert h.stopped == "diverged" and "diverged" in h.message
    assert len(h.step_loss) >= 0 and len(h.epochs) < 5


def test_early_stopping():
    spec = {"hidden": [8], "input_shape": [12], "num_classes": 3}
    h = fit(build_model(spec, seed=0), _data(), epochs=50, lr=1e-6, patience=2, progress=False)
    assert h.stopped == "early_stopping" and len(h.epochs) < 50


def test_budgets_end_the_run():
    spec = {"hidden": [8], "input_shape": [12], "num_classes": 3}
    h = fit(build_model(spec, seed=0), _data(), epochs=10, max_steps=8, progress=False)
    assert h.stopped == "budget" and len(h.step_loss) == 8 and len(h.epochs) == 2
    h = fit(build_model(spec, seed=0), _data(), epochs=10_000, max_seconds=0.3, progress=False)
    assert h.stopped == "budget" and "time budget" in h.message and len(h.epochs) < 10_000


def test_last_batch_of_one_is_dropped_with_bn():
    spec = {"hidden": [8], "bn": "before", "input_shape": [12], "num_classes": 3}
    data = _data(n=64 + 33)  # 33 training examples: batches of 32 + 1
    h = fit(build_model(spec, seed=0), data, epochs=1, batch_size=32, progress=False)
    assert h.stopped == "completed" and len(h.step_loss) == 1


def test_input_shape_mismatch_is_explained():
    m = build_model({"input_shape": [1, 28, 28]})
    with pytest.raises(ValueError, match=r"expects inputs of shape \(1, 28, 28\).*has \(12,\)"):
        fit(m, _data(), epochs=1, progress=False)


def test_trains_on_real_mnist_5k():
    data = load_dataset("mnist-5k")
    m = build_model(load_model_spec("fashion-mlp-bn-after"), seed=0)
    h = fit(m, data, epochs=3, lr=0.05, progress=False)
    assert h.final.val_accuracy > 0.85  # real digits: a BN MLP learns them in seconds
    loss, acc = evaluate(m, data.x_test, data.y_test)
    assert acc > 0.85


def test_checkpoint_round_trip_and_corruption(tmp_path):
    m = build_model(load_model_spec("fashion-mlp-bn-after"), seed=0)
    fit(m, _mnist_like(), epochs=1, progress=False)
    save_checkpoint(tmp_path / "ck", m, preprocessing={"scaling": "unit", "divide": 255.0}, meta={"a": 1})
    assert not list((tmp_path / "ck").glob("*.pkl")) and (tmp_path / "ck" / "model.safetensors").is_file()
    ck = load_checkpoint(tmp_path / "ck")
    m.eval()
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(ck.model(x), m(x))
    assert ck.preprocessing["divide"] == 255.0 and ck.meta == {"a": 1}
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no such folder"):
        load_checkpoint(tmp_path / "nothing")


def _mnist_like(n=200):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Dataset("fake", x[:150], y[:150], x[150:], y[150:], x[:0], y[:0], 10)


def test_fit_writes_best_checkpoint(tmp_path):
    m = build_model(load_model_spec("fashion-mlp-bn-before"), seed=0)
    h = fit(m, _mnist_like(), epochs=3, progress=False, checkpoint_dir=tmp_path / "best")
    ck = load_checkpoint(tmp_path / "best")
    assert ck.meta["epoch"] == h.best_epoch


def test_cnn_trains_with_augmentation():
    from bnlab.data import RandomAffine
    spec = {"kind": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "blocks": [4], "final_block": 4,
            "bn": "before"}
    data = load_dataset("digits")
    h = fit(build_model(spec, seed=0), data, epochs=2, lr=1e-2, optimizer="adam", progress=False,
            augment=RandomAffine(shear_range=5, zoom_range=0.1))
    assert h.engine == "fused" and h.final.val_accuracy > 0.3


def test_plain_log_lines_when_not_a_terminal(capsys):
    fit(build_model({"hidden": [4], "input_shape": [12], "num_classes": 3}), _data(), epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/2: loss" in err and "val_acc" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_training_matches_cpu():
    spec = {"hidden": [16], "bn": "before", "input_shape": [12], "num_classes": 3}
    hc = fit(build_model(spec, seed=1), _data(), epochs=2, lr=0.1, progress=False, device="cpu")
    hg = fit(build_model(spec, seed=1), _data(), epochs=2, lr=0.1, progress=False, device="cuda")
    assert torch.allclose(torch.tensor(hc.step_loss), torch.tensor(hg.step_loss), rtol=1e-4)


def test_cuda_request_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="cuda"):
        fit(build_model({"input_shape": [12], "num_classes": 3}), _data(), device="cuda", progress=False)


# ---------------------------------------------------------------- CLI


def test_train_cli_as_a_user(tmp_path):
    env = {**os.environ, "COLUMNS": "160"}
    out = subprocess.run([sys.executable, "-m", "bnlab", "train", "fashion-mlp-bn-before", "--dataset", "mnist-5k",
                          "--epochs", "2", "--lr", "0.05", "--out", str(tmp_path / "run"), "--target", "0.5"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test accuracy" in out.stdout and "native engine" in out.stdout and "reached at epoch" in out.stdout
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train"]["dataset"] == "mnist-5k" and run["model"]["bn"] == "before"
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and hist["test_accuracy"] > 0.5
    assert load_checkpoint(tmp_path / "run" / "checkpoint").spec["hidden"] == [300, 100]


@pytest.mark.parametrize("args,match", [
    (["fashion-mlp-bn-before", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["fashion-mlp-bn-before", "--dataset", "mnist-5k", "--optimizer", "lbfgs"], "optimizer"),
    (["fashion-mlp-bn-before", "--dataset", "mnist-5k", "--lr", "-1"], "lr"),
    (["fashion-mlp-bn-before"], "not available offline"),
], ids=["dataset", "optimizer", "lr", "offline"])
def test_train_cli_errors(args, match):
    r = CliRunner().invoke(app, ["train", *args, "--epochs", "1"])
    assert r.exit_code == 2 and match in r.output.replace("\n", "")


def test_train_cli_adapts_the_model_to_the_dataset():
    r = CliRunner().invoke(app, ["train", "fashion-mlp-baseline", "--dataset", "digits", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "input shape (1, 28, 28) -> (1, 8, 8)" in r.output
