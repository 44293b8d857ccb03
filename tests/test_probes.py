"""Probes: numbers checked against a direct computation on a small model; report panels."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.data.dataset import Dataset
from bnlab.models import build_model
from bnlab.probes import ProbeConfig, saturated_fraction
from bnlab.train import fit


def _data(n=96, f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return Dataset("toy", x[:64], y[:64], x[64:], y[64:], x[:0], y[:0], 3)


SPEC = {"hidden": [7, 6], "activation": "sigmoid", "input_shape": [5], "num_classes": 3}


@pytest.mark.parametrize("engine", ["native", "fused", "autograd"])
def test_probe_numbers_match_a_direct_computation(engine):
    """Replay the first step by hand: pre-activations, percentiles, saturation, grad norm, update ratio."""
    data = _data()
    model = build_model(SPEC, seed=0)
    ref = build_model(SPEC, seed=0)
    lr = 0.5
    h = fit(model, data, epochs=1, batch_size=64, lr=lr, seed=3, progress=False, engine=engine,
            probes=ProbeConfig(every=1, tracked_units=2))
    rows = {(s, layer, m): v for s, layer, m, v in h.probes}
    # the first (only) step of the epoch sees the batch of fit's seeded permutation
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    xb, yb = data.x_train[perm], data.y_train[perm]
    with torch.no_grad():
        z1 = ref.dense(xb)  # input to the first sigmoid
    q = torch.quantile(z1.double().flatten(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
    assert rows[(1, "sigmoid", "p15")] == pytest.approx(float(q[0]), rel=1e-5, abs=1e-6)
    assert rows[(1, "sigmoid", "p50")] == pytest.approx(float(q[1]), rel=1e-5, abs=1e-6)
    assert rows[(1, "sigmoid", "p85")] == pytest.approx(float(q[2]), rel=1e-5, abs=1e-6)
    assert rows[(1, "sigmoid", "mean")] == pytest.approx(float(z1.mean()), rel=1e-5, abs=1e-6)
    assert rows[(1, "sigmoid", "std")] == pytest.approx(float(z1.std()), rel=1e-5)
    s = torch.sigmoid(z1)
    assert rows[(1, "sigmoid", "saturated")] == pytest.approx(float((s * (1 - s) < 0.0125).float().mean()))
    units = sorted({m.split(".")[0] for (_, layer, m) in rows if layer == "sigmoid" and m.startswith("unit")})
    assert len(units) == 2
    u = int(units[0][4:])
    assert rows[(1, "sigmoid", f"{units[0]}.p50")] == pytest.approx(float(torch.quantile(z1[:, u].double(), 0.5)),
                                                                     rel=1e-5, abs=1e-6)
    loss = F.cross_entropy(ref(xb), yb)
    loss.backward()
    g = ref.dense.weight.grad
    assert rows[(1, "dense", "grad_norm")] == pytest.approx(float(g.norm()), rel=1e-4)
    ratio = float((lr * g).norm() / ref.dense.weight.detach().norm())
    assert rows[(1, "dense", "update_ratio")] == pytest.approx(ratio, rel=1e-4)


def test_percentiles_equal_torch_quantile():
    from bnlab.probes import percentiles
    x = torch.randn(4, 37, dtype=torch.float64)
    q = torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64)
    assert torch.allclose(torch.from_numpy(percentiles(x)), torch.quantile(x, q, dim=1).T)
    assert torch.allclose(torch.from_numpy(percentiles(x[0])), torch.quantile(x[0], q))
    assert torch.allclose(torch.from_numpy(percentiles(x[0, :2])), torch.quantile(x[0, :2], q))


def test_sampling_every_k_steps_and_off_by_default():
    data = _data()
    h = fit(build_model(SPEC, seed=0), data, epochs=2, batch_size=8, progress=False)
    assert h.probes == []
    h = fit(build_model(SPEC, seed=0), data, epochs=2, batch_size=8, progress=False,
            probes=ProbeConfig(every=5, tracked_units=0))
    assert sorted({r[0] for r in h.probes}) == [1, 6, 11, 16]


def test_saturation_definition():
    h = torch.tensor([0.0, 5.0, -5.0, 2.0])
    # sigmoid'(x) = s(1-s) < 0.0125 for |x| > ~4.37
    assert saturated_fraction(nn.Sigmoid, h) == 0.5
    # tanh'(x) = 1 - tanh² < 0.05 for |x| > ~2.18
    assert saturated_fraction(nn.Tanh, h) == 0.5
    assert saturated_fraction(nn.ReLU, h) is None


def test_landscape_probes_restore_the_model():
    data = _data()
    model = build_model({**SPEC, "bn": "before"}, seed=0)
    cfg = ProbeConfig(every=1000, landscape=True, landscape_every=2, landscape_scales=[1.0, 2.0])
    h = fit(model, data, epochs=1, batch_size=16, lr=0.1, progress=False, probes=cfg)
    ref = build_model({**SPEC, "bn": "before"}, seed=0)
    h2 = fit(ref, data, epochs=1, batch_size=16, lr=0.1, progress=False)
    assert h.engine == h2.engine == "native"
    assert h.step_loss == h2.step_loss  # probing left the trajectory untouched
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    lr_rows = [r for r in h.probes if r[2] == "loss_range"]
    assert [r[0] for r in lr_rows] == [1, 3] and all(r[3] >= 0 for r in lr_rows)
    assert all(math.isfinite(r[3]) for r in h.probes if r[2] == "grad_change")


def test_probes_do_not_change_training():
    data = _data()
    a = fit(build_model(SPEC, seed=0), data, epochs=2, batch_size=8, progress=False)
    b = fit(build_model(SPEC, seed=0), data, epochs=2, batch_size=8, progress=False, probes=ProbeConfig(every=1))
    assert a.step_loss == b.step_loss


def test_paper_mnist_quick_report_has_percentile_panels(tmp_path):
    from bnlab.experiments import load_experiment, run_experiment
    from bnlab.report import build_report

    spec = load_experiment("paper-mnist")
    assert spec.probes  # recorded by default
    spec = spec.model_copy(update={"quick": spec.quick.model_copy(update={"seeds": 1})})
    run_experiment(spec, tmp_path / "pm", quick=True, workers=2)
    report = build_report(tmp_path / "pm")
    html = report.html.read_text()
    assert "probe percentiles" in html and (tmp_path / "pm" / "figures" / "probe_percentiles.png").is_file()
    assert "probe saturation" in html and "probe gradient norms" in html
