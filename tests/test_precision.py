"""Training precision (fp32 | bf16-mixed | fp16-mixed): what runs in which type, where it is refused,
and where it is recorded. The oracle for "statistics in float32" is a float64 computation over the
very bfloat16 values the layer saw."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.data.dataset import Dataset
from bnlab.experiments import load_results, parse_experiment, run_experiment
from bnlab.report import build_report
from bnlab.models import build_model
from bnlab.nn import BatchNorm
from bnlab.train import fit
from bnlab.train.config import TrainConfig
from bnlab.train.engine import make_step
from bnlab.train.single import run_settings
from bnlab.models.spec import parse_model_spec

from tiny_specs import TINY

CNN = {"kind": "cnn", "input_shape": [3, 8, 8], "num_classes": 4, "blocks": [8], "final_block": 8,
       "bn": "before", "norm_options": {"convention": "keras"}}
MLP = {"hidden": [16], "bn": "before", "input_shape": [12], "num_classes": 3}


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return Dataset("img", x[:64], y[:64], x[64:], y[64:], x[:0], y[:0], 4)


def _vectors(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Dataset("vec", x[:96], y[:96], x[96:], y[96:], x[:0], y[:0], 3)


def test_bf16_mixed_trains_a_cnn_with_float32_weights_and_statistics_and_records_it():
    m = build_model(CNN, seed=0)
    h = fit(m, _images(), epochs=2, batch_size=16, lr=0.05, seed=1, progress=False, precision="bf16-mixed")
    assert h.precision == "bf16-mixed" and h.engine == "fused" and len(h.epochs) == 2
    assert all(t.dtype == torch.float32 for t in m.state_dict().values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in m.state_dict().values() if t.is_floating_point())
    assert h.to_dict()["precision"] == "bf16-mixed"
    # it is a different computation from fp32: the losses differ, by bfloat16's rounding only
    h32 = fit(build_model(CNN, seed=0), _images(), epochs=2, batch_size=16, lr=0.05, seed=1, progress=False)
    assert h32.precision == "fp32"
    first16, first32 = h.step_loss[0], h32.step_loss[0]
    assert first16 != first32 and abs(first16 - first32) < 0.05 * abs(first32)


def test_bf16_mixed_step_runs_convolutions_in_bfloat16_and_bn_statistics_in_float32():
    m = build_model(CNN, seed=0)
    bn = next(mod for mod in m.modules() if isinstance(mod, BatchNorm))
    seen = {}
    bn.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    before = bn.running_mean.clone()
    step, used = make_step(m, "autograd", None, precision="bf16-mixed")
    x = _images().x_train[:16]
    step(x, torch.zeros(16, dtype=torch.long))
    assert used == "autograd" and seen["x"].dtype == torch.bfloat16  # the conv ran in bfloat16
    # the running mean moved by (1 - momentum)·batch mean, the batch mean of the bfloat16 values taken in
    # float32 or wider: a float64 oracle over the same values agrees to float32 rounding
    oracle = seen["x"].double().mean((0, 2, 3))
    moved = (bn.running_mean.double() - before.double() * bn.momentum) / (1 - bn.momentum)
    assert bn.running_mean.dtype == torch.float32
    assert torch.allclose(moved, oracle, atol=1e-5, rtol=1e-4)
    # a bfloat16 accumulation would be off by ~1e-2 relative: make sure the test could see that
    lossy = seen["x"].mean((0, 2, 3)).double()
    assert not torch.allclose(lossy, oracle, atol=1e-7, rtol=1e-6)


def test_bf16_mixed_gradients_are_close_to_fp32_autocast_free_gradients():
    m32 = build_model(CNN, seed=0)
    m16 = copy.deepcopy(m32)
    x, y = _images().x_train[:32], _images().y_train[:32]
    for m, prec in ((m32, "fp32"), (m16, "bf16-mixed")):
        step, _ = make_step(m, "autograd", None, precision=prec)
        step(x, y)
    for (name, p32), p16 in zip(m32.named_parameters(), m16.parameters()):
        assert p16.grad.dtype == torch.float32, name
        # bfloat16 keeps 8 bits of mantissa; its rounding accumulates towards the input through the
        # convolutions and BN's backward (at init: ~0.1-0.2 relative at the first layers, measured)
        cos = F.cosine_similarity(p16.grad.flatten(), p32.grad.flatten(), 0)
        assert cos > 0.95, (name, float(cos))
    head16, head32 = m16.dense.weight.grad, m32.dense.weight.grad
    assert 0 < (head16 - head32).norm() / head32.norm() < 0.02  # the last layer: one rounding away


def test_bf16_takes_the_fused_step_fp16_the_autograd_step_and_native_refuses_both():
    m = build_model(MLP, seed=0)
    assert make_step(m, "auto", None)[1] in ("native", "fused")
    assert make_step(m, "auto", None, precision="bf16-mixed")[1] == "fused"
    assert make_step(build_model(CNN, seed=0), "auto", None, precision="bf16-mixed")[1] == "fused"
    assert make_step(m, "auto", None, precision="fp16-mixed")[1] == "autograd"
    with pytest.raises(ValueError, match=r"does not run precision 'bf16-mixed'"):
        make_step(m, "native", None, precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"does not run precision 'fp16-mixed'"):
        make_step(m, "fused", None, precision="fp16-mixed")


@pytest.mark.parametrize("spec", [CNN, {**CNN, "bn": "after", "activation": "elu", "dropout": 0.0},
                                  {**MLP, "input_bn": True}])
def test_the_fused_bf16_step_agrees_with_autocast_autograd(spec):
    m_f = build_model(spec, seed=0)
    m_a = copy.deepcopy(m_f)
    data = _images() if spec.get("kind") == "cnn" else _vectors()
    x, y = data.x_train[:32], data.y_train[:32]
    fused, _ = make_step(m_f, "fused", None, precision="bf16-mixed")
    auto, _ = make_step(m_a, "autograd", None, precision="bf16-mixed")
    lf, cf = fused(x, y)
    la, ca = auto(x, y)
    assert lf.dtype == la.dtype == torch.float32 and abs(float(lf) - float(la)) < 0.01 * abs(float(la))
    for (name, pf), pa in zip(m_f.named_parameters(), m_a.parameters()):
        assert pf.grad.dtype == torch.float32, name
        cos = F.cosine_similarity(pf.grad.flatten(), pa.grad.flatten(), 0)
        assert cos > 0.97, (name, float(cos))  # both round to bfloat16, at different points
    for (name, bf), ba in zip(m_f.named_buffers(), m_a.buffers()):
        if bf.is_floating_point():
            assert bf.dtype == torch.float32 and torch.allclose(bf, ba, rtol=2e-2, atol=2e-3), name


def test_fp16_mixed_is_refused_on_a_cpu_and_unknown_precisions_are_named():
    with pytest.raises(ValueError, match="CUDA only.*bf16-mixed"):
        fit(build_model(MLP, seed=0), _vectors(), epochs=1, progress=False, device="cpu", precision="fp16-mixed")
    with pytest.raises(ValueError, match=r"unknown precision 'bf16'.*fp32"):
        fit(build_model(MLP, seed=0), _vectors(), epochs=1, progress=False, precision="bf16")
    with pytest.raises(ValueError, match="fp32"):
        TrainConfig(precision="half")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_mixed_with_loss_scaling_trains_on_cuda():
    m = build_model(CNN, seed=0)
    h = fit(m, _images(), epochs=2, batch_size=16, lr=0.05, progress=False, device="cuda", precision="fp16-mixed")
    assert h.precision == "fp16-mixed" and h.stopped == "completed"
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_bf16_mixed_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from test_resume import _interrupt_at_step
    from bnlab.train.resume import RunInterrupted

    kw = dict(epochs=3, batch_size=16, lr=0.05, seed=2, progress=False, precision="bf16-mixed")
    whole = build_model(CNN, seed=0)
    h = fit(whole, _images(), **kw)
    _interrupt_at_step(monkeypatch, 10)  # in epoch 3 (4 steps per epoch)
    with pytest.raises(RunInterrupted):
        fit(build_model(CNN, seed=0), _images(), **kw, state_dir=tmp_path / "s")
    monkeypatch.undo()
    again = build_model(CNN, seed=0)
    h2 = fit(again, _images(), **kw, state_dir=tmp_path / "s")
    assert h2.precision == "bf16-mixed"
    assert h2.step_loss == h.step_loss  # bfloat16 on a CPU is deterministic: bit for bit
    for k, v in whole.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_default_precision_leaves_run_settings_as_before_and_others_enter_them():
    spec = parse_model_spec(MLP)
    plain = run_settings(spec, TrainConfig())
    assert "precision" not in plain["train"]  # stores written before precisions keep their keys
    mixed = run_settings(spec, TrainConfig(precision="bf16-mixed"))
    assert mixed["train"]["precision"] == "bf16-mixed"


def test_experiment_records_precision_per_run_and_the_report_states_it(tmp_path):
    spec = parse_experiment({**TINY, "variants": {"fp32": {}, "bf16": {"train": {"precision": "bf16-mixed"}}}})
    run_experiment(spec, tmp_path / "exp", workers=1)
    _, runs, _ = load_results(tmp_path / "exp")
    by = {r["variant"]: r for r in runs}
    assert json.loads(by["bf16"]["config"])["train"]["precision"] == "bf16-mixed"
    assert "precision" not in json.loads(by["fp32"]["config"])["train"]
    build_report(tmp_path / "exp")
    assert "precision bf16-mixed and fp32" in (tmp_path / "exp" / "report.md").read_text()


def test_cli_train_takes_precision_and_refuses_fp16_on_cpu(tmp_path):
    r = CliRunner().invoke(app, ["train", "fashion-mlp-bn-before", "--dataset", "synthetic", "--epochs", "1",
                                 "--precision", "bf16-mixed", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "bf16-mixed" in r.output
    hist = json.loads((tmp_path / "r" / "history.json").read_text())
    assert hist["precision"] == "bf16-mixed"
    r = CliRunner().invoke(app, ["train", "fashion-mlp-bn-before", "--dataset", "synthetic", "--epochs", "1",
                                 "--precision", "fp16-mixed", "--device", "cpu", "--out", str(tmp_path / "h")])
    assert r.exit_code != 0 and "CUDA only" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "h").exists()
