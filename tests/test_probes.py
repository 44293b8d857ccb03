"""Probes: numbers checked against an independent computation (np.percentile over the probe batch,
autograd along the gradient); the probe batch is fixed; report panels are over all seeds."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bnlab.data.dataset import Dataset
from bnlab.models import build_model
from bnlab.probes import PROBE_LAYER, ProbeConfig, Probes, probe_mode, saturated_fraction, select_probe_batch
from bnlab.train import fit


def _data(n=96, f=5, seed=0, val=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    if not val:
        return Dataset("toy", x[:64], y[:64], x[:0], y[:0], x[:0], y[:0], 3)
    return Dataset("toy", x[:64], y[:64], x[64:], y[64:], x[:0], y[:0], 3)


SPEC = {"hidden": [7, 6], "activation": "sigmoid", "input_shape": [5], "num_classes": 3}


def _expected_probe_images(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """The documented rule, written out: randperm(n, seed)[:k] in ascending order."""
    idx = np.sort(torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k].numpy())
    return x[torch.from_numpy(idx)]


# ---------------------------------------------------------------- the probe batch


def test_probe_batch_is_the_same_images_at_every_step_for_every_seed_and_variant(monkeypatch):
    seen = []
    original = Probes._activation_inputs

    def spy(self, x):
        seen.append(x.clone())
        return original(self, x)

    monkeypatch.setattr(Probes, "_activation_inputs", spy)
    data = _data()
    cfg = ProbeConfig(every=3, probe_batch=20, tracked_units=2)
    units = set()
    for bn in ("none", "before"):
        for seed in (0, 1, 2):
            h = fit(build_model({**SPEC, "bn": bn}, seed=seed), data, epochs=2, batch_size=16, seed=seed,
                    progress=False, probes=cfg)
            units.add(tuple(sorted({m.split(".")[0] for _, layer, m, _ in h.probes
                                    if layer == "sigmoid_1" and m.startswith("unit")})))
            assert [r[3] for r in h.probes if r[1] == PROBE_LAYER] == [20.0, 1.0]  # 20 images, validation
    expected = _expected_probe_images(data.x_val, 20)
    assert len(seen) == 2 * 3 * 3  # steps 1, 4, 7 of 8, in 6 runs
    assert all(torch.equal(x, expected) for x in seen)
    assert len(units) == 1 and len(next(iter(units))) == 2  # the same tracked unit indices in every run


def test_probe_batch_falls_back_to_training_images_and_caps_at_the_set_size():
    data = _data(val=False)
    x, from_val = select_probe_batch(data, ProbeConfig(probe_batch=10, probe_seed=4))
    assert not from_val and torch.equal(x, _expected_probe_images(data.x_train, 10, seed=4))
    x, from_val = select_probe_batch(_data(), ProbeConfig(probe_batch=1000))
    assert from_val and x.shape[0] == 32


# ---------------------------------------------------------------- activation percentiles


def _last_sigmoid_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent forward: a copy in train mode (BN with the batch's statistics), up to sigmoid_1."""
    m = copy.deepcopy(model).train()
    h = x
    with torch.no_grad():
        for name, layer in m.named_children():
            if name == "sigmoid_1":
                return h
            h = layer(h)
    raise AssertionError("no sigmoid_1")


@pytest.mark.parametrize("bn", ["none", "before"])
@pytest.mark.parametrize("engine", ["native", "fused", "autograd"])
def test_percentiles_match_np_percentile_over_the_probe_batch(engine, bn):
    """Step 1 (initial weights) and step 5 (after 4 updates): layer-wide and tracked-unit percentiles
    of the last sigmoid's input equal np.percentile over the probe batch, computed independently."""
    data = _data()
    spec = {**SPEC, "bn": bn}
    cfg = ProbeConfig(every=4, tracked_units=2, probe_batch=24)
    h = fit(build_model(spec, seed=0), data, epochs=2, batch_size=16, lr=0.5, seed=3, progress=False,
            engine=engine, probes=cfg)
    rows = {(s, layer, m): v for s, layer, m, v in h.probes}
    xp = _expected_probe_images(data.x_val, 24)
    units = sorted({int(m.split(".")[0][4:]) for (_, layer, m) in rows
                    if layer == "sigmoid_1" and m.startswith("unit")})
    assert len(units) == 2 and rows[(1, "sigmoid_1", "width")] == 6
    for step in (1, 5):
        ref = build_model(spec, seed=0)
        if step > 1:  # the weights step 5 starts from: 4 steps of the same training
            fit(ref, data, epochs=2, batch_size=16, lr=0.5, seed=3, progress=False, engine=engine, max_steps=step - 1)
        z = _last_sigmoid_input(ref, xp).double().numpy()  # (24, 6)
        want = np.percentile(z.ravel(), [15, 50, 85])
        got = [rows[(step, "sigmoid_1", q)] for q in ("p15", "p50", "p85")]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert rows[(step, "sigmoid_1", "mean")] == pytest.approx(z.mean(), rel=1e-5, abs=1e-6)
        assert rows[(step, "sigmoid_1", "std")] == pytest.approx(z.std(ddof=1), rel=1e-5)
        s = 1 / (1 + np.exp(-z))
        assert rows[(step, "sigmoid_1", "saturated")] == pytest.approx(np.mean(s * (1 - s) < 0.0125))
        for u in units:
            want = np.percentile(z[:, u], [15, 50, 85])
            got = [rows[(step, "sigmoid_1", f"unit{u}.{q}")] for q in ("p15", "p50", "p85")]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_conv_percentiles_run_over_images_and_pixels():
    """A conv layer's input: layer-wide over N·C·H·W values, a tracked channel over N·H·W."""
    spec = {"kind": "cnn", "input_shape": [1, 6, 6], "num_classes": 3, "activation": "relu", "bn": "before",
            "blocks": [4], "final_block": None, "convs_per_block": 1, "head": "gap"}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = Dataset("img", x[:24], y[:24], x[24:], y[24:], x[:0], y[:0], 3)
    model = build_model(spec, seed=0)
    ref = copy.deepcopy(model)
    h = fit(model, data, epochs=1, batch_size=8, lr=0.1, progress=False, probes=ProbeConfig(every=10, tracked_units=1))
    rows = {(s, layer, m): v for s, layer, m, v in h.probes}
    with torch.no_grad():
        z = ref.batch_normalization(ref.conv2d(data.x_val)).double().numpy()  # (16, 4, 6, 6), train mode
    np.testing.assert_allclose([rows[(1, "re_lu", q)] for q in ("p15", "p50", "p85")],
                               np.percentile(z.ravel(), [15, 50, 85]), rtol=1e-5, atol=1e-6)
    (unit,) = {m.split(".")[0] for (_, layer, m) in rows if layer == "re_lu" and m.startswith("unit")}
    c = int(unit[4:])
    np.testing.assert_allclose([rows[(1, "re_lu", f"{unit}.{q}")] for q in ("p15", "p50", "p85")],
                               np.percentile(z[:, c].ravel(), [15, 50, 85]), rtol=1e-5, atol=1e-6)
    assert rows[(1, "re_lu", "width")] == 4


def test_weight_probes_match_a_direct_computation_on_the_step_batch():
    """grad_norm and update_ratio are about the training step: its batch, its update."""
    data = _data()
    ref = build_model(SPEC, seed=0)
    lr = 0.5
    h = fit(build_model(SPEC, seed=0), data, epochs=1, batch_size=64, lr=lr, seed=3, progress=False,
            probes=ProbeConfig(every=1))
    rows = {(s, layer, m): v for s, layer, m, v in h.probes}
    loss = F.cross_entropy(ref(data.x_train), data.y_train)  # the one batch: all 64, order is irrelevant
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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_probes_do_not_change_training(dropout):
    """The probe forward draws no random numbers and leaves running statistics alone."""
    data = _data()
    spec = {**SPEC, "bn": "before", "dropout": dropout}
    ma = build_model(spec, seed=0)
    a = fit(ma, data, epochs=2, batch_size=8, progress=False)
    mb = build_model(spec, seed=0)
    b = fit(mb, data, epochs=2, batch_size=8, progress=False,
            probes=ProbeConfig(every=1, landscape=True, landscape_every=3))
    assert a.step_loss == b.step_loss
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_probe_mode_restores_buffers_and_modes():
    model = build_model({**SPEC, "bn": "before", "dropout": 0.2}, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with probe_mode(model):
        assert model.training and not model.dropout.training
        model(torch.randn(10, 5))
        assert int(model.batch_normalization.num_batches_tracked) == 1
    assert not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- landscape


def _line_search(model: nn.Module, x, y, etas):
    """Independent: loss and gradient at W - eta * g, g = grad L(W), via functional_call on a copy in
    train mode (BN with batch statistics; buffers copied fresh for every point)."""
    m = copy.deepcopy(model).train()
    names = [n for n, _ in m.named_parameters()]
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in m.named_buffers()}

    def at(w):
        w = {n: t.detach().clone().requires_grad_(True) for n, t in w.items()}
        loss = F.cross_entropy(functional_call(m, ({**w}, {n: b.clone() for n, b in bufs.items()}), (x,)), y)
        grads = torch.autograd.grad(loss, [w[n] for n in names])
        return float(loss.detach()), torch.cat([g.reshape(-1).double() for g in grads]), dict(zip(names, grads))

    loss0, g0_flat, g0 = at(w0)
    losses, changes, ratios = [loss0], [], []
    for eta in etas:
        loss, g, _ = at({n: w0[n] - eta * g0[n] for n in names})
        losses.append(loss)
        changes.append(float((g - g0_flat).norm()))
        ratios.append(changes[-1] / (eta * float(g0_flat.norm())))
    return {"loss_range": max(losses) - min(losses), "grad_change": max(changes), "beta_smoothness": max(ratios),
            "g": g0_flat}


@pytest.mark.parametrize("engine", ["native", "autograd"])
def test_landscape_moves_along_the_gradient_not_the_momentum_update(engine):
    """SGD momentum 0.9: at step 4 the update is not -lr * g; the probe equals an independent autograd
    computation along -g. Every step's batch is the whole training set (batch 64 of 64 examples)."""
    data = _data()
    spec = {**SPEC, "bn": "before"}
    lr, scales = 0.3, [0.5, 1.0, 2.0]
    kw = dict(batch_size=64, lr=lr, momentum=0.9, seed=1, progress=False, engine=engine)
    cfg = ProbeConfig(every=1000, landscape=True, landscape_every=3, landscape_scales=scales)
    h = fit(build_model(spec, seed=0), data, epochs=5, probes=cfg, **kw)
    assert h.engine == engine
    rows = {(s, m): v for s, layer, m, v in h.probes if layer == "model"}
    assert sorted({s for s, _ in rows}) == [1, 4]
    w3 = build_model(spec, seed=0)
    fit(w3, data, epochs=3, max_steps=3, **kw)  # the weights step 4 starts from
    w4 = build_model(spec, seed=0)
    fit(w4, data, epochs=4, max_steps=4, **kw)
    want = _line_search(w3, data.x_train, data.y_train, [lr * s for s in scales])
    for metric in ("loss_range", "grad_change", "beta_smoothness"):
        assert rows[(4, metric)] == pytest.approx(want[metric], rel=2e-4), metric
    # the optimizer's update at step 4 is not along -g (momentum carries the earlier steps)
    update = torch.cat([(b - a).detach().reshape(-1).double() for a, b in zip(w3.parameters(), w4.parameters())]) / -lr
    cos = float(update @ want["g"] / (update.norm() * want["g"].norm()))
    assert cos < 0.9  # (measured 0.28, and |update| / |lr g| = 5.7)
    along_update = _line_search_along(w3, data.x_train, data.y_train, update, [lr * s for s in scales])
    assert abs(along_update - rows[(4, "grad_change")]) > 0.01 * rows[(4, "grad_change")]


def _line_search_along(model, x, y, direction, etas) -> float:
    """max ||grad L(W - eta d) - grad L(W)|| along a given flat direction d (the mutant's quantity)."""
    m = copy.deepcopy(model).train()
    params = list(m.parameters())
    w0 = [p.detach().clone() for p in params]
    bufs = [b.detach().clone() for b in m.buffers()]

    def grad_at(shift):
        with torch.no_grad():
            off = 0
            for p, w in zip(params, w0):
                p.copy_(w - shift * direction[off:off + p.numel()].reshape(p.shape).to(p.dtype))
                off += p.numel()
            for b, v in zip(m.buffers(), bufs):
                b.copy_(v)
        loss = F.cross_entropy(m(x), y)
        return torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params)])

    g0 = grad_at(0.0)
    return max(float((grad_at(e) - g0).norm()) for e in etas)


def test_beta_smoothness_on_a_tiny_model_and_exact_restore():
    """A 3-4-2 float64 network with BN, driven by hand: SGD momentum 0.9 for two steps, the landscape
    probe on the second; beta equals an independent computation and every parameter, buffer and
    .grad is bit-for-bit what it was."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("dense", nn.Linear(3, 4, dtype=torch.float64))
    model.add_module("batch_normalization", nn.BatchNorm1d(4, dtype=torch.float64))
    model.add_module("sigmoid", nn.Sigmoid())
    model.add_module("dense_1", nn.Linear(4, 2, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 2, (8,), generator=g) for _ in range(2)]
    lr, scales = 0.2, [0.25, 1.0, 3.0]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    probes = Probes(model, ProbeConfig(every=1000, landscape=True, landscape_every=1, landscape_scales=scales),
                    lr=lr)
    for step, (x, y) in enumerate(zip(xs, ys), start=1):
        probes.before_step(step)
        if step == 2:
            before = copy.deepcopy(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 2:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            grads = [p.grad.clone() for p in model.parameters()]
        probes.after_step(step, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, gr) for p, gr in zip(model.parameters(), grads))
    rows = {(s, m): v for s, _, m, v in probes.records}
    want = _line_search(before, xs[1], ys[1], [lr * s for s in scales])
    for metric in ("loss_range", "grad_change", "beta_smoothness"):
        assert rows[(2, metric)] == pytest.approx(want[metric], rel=1e-10), metric
    # by hand for one point: ||g(W - eta g) - g|| / (eta ||g||) <= beta
    assert rows[(2, "beta_smoothness")] >= rows[(2, "grad_change")] / (lr * max(scales) * float(want["g"].norm()))


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
    assert all(math.isfinite(r[3]) and r[3] > 0 for r in h.probes if r[2] in ("grad_change", "beta_smoothness"))
    assert sum(r[2] == "beta_smoothness" for r in h.probes) == 2


def test_landscape_scales_must_be_positive():
    with pytest.raises(ValueError, match="landscape_scales must be positive"):
        ProbeConfig(landscape_scales=[1.0, 0.0])


# ---------------------------------------------------------------- panels


VARIANTS = ["no-bn", "bn"]
SEEDS = [0, 1, 2]


def _fake_runs():
    cfg = {"train": {"lr": 0.5, "batch_size": 60, "probes": {"landscape_scales": [0.5, 1.0], "landscape_every": 10,
                                                             "probe_batch": 256}}}
    runs = [{"run_id": f"{v}-s{s}", "variant": v, "seed": s, "status": "done", "config": json.dumps(cfg),
             "final_val_accuracy": 0.8 + 0.01 * s + 0.05 * i, "mean_epoch_seconds": 1.0 + 0.1 * s}
            for i, v in enumerate(VARIANTS) for s in SEEDS]
    runs.append({"run_id": "bn-s9", "variant": "bn", "seed": 9, "status": "failed", "config": json.dumps(cfg),
                 "final_val_accuracy": None, "mean_epoch_seconds": None})
    return runs


def _value(variant, seed, step, metric):
    """A distinct number per (variant, seed, step, metric) so the mean / min / max are checkable."""
    return ((1 + VARIANTS.index(variant)) * (1 + 0.1 * step) + 0.37 * seed + 0.25 * metric.startswith("unit")
            + {"p15": -1.0, "p50": 0.0, "p85": 1.0}.get(metric.split(".")[-1], 0.5))


def _fake_probes(runs):
    rows = []
    for r in runs:
        if r["status"] != "done":
            rows += [{"run_id": r["run_id"], "step": 1, "layer": "sigmoid_2", "metric": "p50", "value": 1e6}]
            continue
        v, s = r["variant"], r["seed"]
        rows.append({"run_id": r["run_id"], "step": 1, "layer": PROBE_LAYER, "metric": "images", "value": 256.0})
        rows.append({"run_id": r["run_id"], "step": 1, "layer": PROBE_LAYER, "metric": "from_validation", "value": 1.0})
        for layer in ("sigmoid_1", "sigmoid_2"):
            rows.append({"run_id": r["run_id"], "step": 1, "layer": layer, "metric": "width", "value": 100.0})
        for step in (1, 11, 21):
            for layer in ("sigmoid_1", "sigmoid_2"):
                for m in ("p15", "p50", "p85", "unit5.p15", "unit5.p50", "unit5.p85", "saturated"):
                    rows.append({"run_id": r["run_id"], "step": step, "layer": layer, "metric": m,
                                 "value": _value(v, s, step, m)})
            for layer in ("dense", "dense_1"):
                rows.append({"run_id": r["run_id"], "step": step, "layer": layer, "metric": "grad_norm",
                             "value": _value(v, s, step, "grad_norm")})
            for m in ("loss_range", "grad_change", "beta_smoothness"):
                rows.append({"run_id": r["run_id"], "step": step, "layer": "model", "metric": m,
                             "value": _value(v, s, step, m)})
    return rows


def _fake_epochs(runs):
    return [{"run_id": r["run_id"], "epoch": e, "train_accuracy": 0.5 + 0.1 * e + 0.01 * r["seed"],
             "val_accuracy": 0.45 + 0.1 * e + 0.02 * r["seed"], "train_loss": 1.0 / e, "val_loss": 1.1 / e}
            for r in runs if r["status"] == "done" for e in (1, 2, 3)]


def _all_figures():
    from types import SimpleNamespace

    from bnlab.report import plots
    runs = _fake_runs()
    probes, epochs = _fake_probes(runs), _fake_epochs(runs)
    bs_runs = [{**r, "config": json.dumps({"train": {"batch_size": 8 * (1 + i % 2)}})} for i, r in enumerate(runs)]
    spec = SimpleNamespace(variants={v: SimpleNamespace(group=v) for v in VARIANTS})
    return {
        "learning_curves": plots.learning_curves(runs, epochs, VARIANTS, "t"),
        "final_accuracy": plots.final_accuracy(runs, VARIANTS),
        "epoch_time": plots.epoch_time(runs, VARIANTS),
        "error_vs_batch_size": plots.error_vs_batch_size(bs_runs, spec),
        "probe_percentiles": plots.percentile_panels(probes, runs, VARIANTS),
        "probe_gradient_norms": plots.gradient_norm_panels(probes, runs, VARIANTS),
        "probe_saturation": plots.saturation_panel(probes, runs, VARIANTS),
        "probe_landscape": plots.landscape_panels(probes, runs, VARIANTS),
    }


def _fill_y_at(collection, x):
    """The y values of a fill_between polygon at abscissa x."""
    v = collection.get_paths()[0].vertices
    return sorted({round(float(y), 9) for xx, y in v if abs(xx - x) < 1e-9})


def test_percentile_panel_is_over_all_seeds_with_a_min_max_band():
    import matplotlib.pyplot as plt

    from bnlab.report import plots
    runs = _fake_runs()
    probes = _fake_probes(runs)
    fig, caption = plots.percentile_panels(probes, runs, VARIANTS)
    axes = fig.axes
    assert len(axes) == 2 * 2  # (layer-wide, unit 5) x (no-bn, bn)
    for col, v in enumerate(VARIANTS):
        for row, prefix in enumerate(("", "unit5.")):
            ax = axes[row * 2 + col]  # subplots in row-major order
            assert ax.get_title().startswith(v)
            lines = {ln.get_label(): ln for ln in ax.get_lines()}
            for q, label in (("p15", "15th percentile"), ("p50", "50th percentile (median)"),
                             ("p85", "85th percentile")):
                per_seed = np.array([[_value(v, s, st, prefix + q) for st in (1, 11, 21)] for s in SEEDS])
                np.testing.assert_allclose(lines[label].get_xdata(), [1, 11, 21])
                np.testing.assert_allclose(lines[label].get_ydata(), per_seed.mean(0))  # mean over 3 seeds
            # three bands (one per percentile), each from the lowest to the highest seed
            assert len(ax.collections) == 3
            per_seed = np.array([[_value(v, s, st, prefix + "p50") for st in (1, 11, 21)] for s in SEEDS])
            band = ax.collections[1]
            for i, st in enumerate((1, 11, 21)):
                assert _fill_y_at(band, st) == sorted({round(per_seed[:, i].min(), 9), round(per_seed[:, i].max(), 9)})
    assert "sigmoid_2" in caption and "3 seeds" in caption and "min..max" in caption
    assert "256 validation images" in caption and "all 100 units" in caption and "unit 5" in caption
    assert max(ln.get_ydata().max() for ax in axes for ln in ax.get_lines()) < 100  # the failed run is left out
    plt.close(fig)


def test_seed_band_arrays():
    from bnlab.report.plots import ProbeTable
    runs = _fake_runs()
    band = ProbeTable(_fake_probes(runs), runs).band("bn", "model", "beta_smoothness")
    per_seed = np.array([[_value("bn", s, st, "beta_smoothness") for st in (1, 11, 21)] for s in SEEDS])
    assert band.runs == 3
    np.testing.assert_allclose(band.mean, per_seed.mean(0))
    np.testing.assert_allclose(band.lo, per_seed.min(0))
    np.testing.assert_allclose(band.hi, per_seed.max(0))


def test_every_figure_has_a_caption_labelled_axes_and_a_legend_outside_the_data():
    import matplotlib.pyplot as plt
    figures = _all_figures()
    assert all(made is not None for made in figures.values())
    for name, (fig, caption) in figures.items():
        assert isinstance(caption, str) and len(caption) > 40 and caption.endswith("."), name
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unlabelled axes {ax.get_title()!r}"
            assert ax.get_legend() is None, f"{name}: a legend inside the axes"
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), \
                    f"{name}: the legend overlaps {ax.get_title()!r}"
        if name not in ("final_accuracy", "epoch_time"):  # those need none: the variants are the x axis
            assert fig.legends, f"{name}: no legend"
        plt.close(fig)
    assert "min..max" in figures["probe_landscape"][1] and "β" in figures["probe_landscape"][1]
    landscape = figures["probe_landscape"][1]
    assert "η = lr × [0.5, 1.0]" in landscape and "Every 10 steps" in landscape and "lr 0.5" in landscape


def test_paper_mnist_quick_report_shows_percentiles_and_landscape(tmp_path):
    from bnlab.experiments import load_experiment, run_experiment
    from bnlab.report import build_report

    spec = load_experiment("paper-mnist")
    assert spec.probes["landscape"] is True and spec.quick.probes["landscape_every"] == 60
    spec = spec.model_copy(update={"quick": spec.quick.model_copy(update={"seeds": 1})})
    run_experiment(spec, tmp_path / "pm", quick=True, workers=2)
    report = build_report(tmp_path / "pm")
    html = report.html.read_text()
    for name in ("probe_percentiles", "probe_landscape", "probe_saturation", "probe_gradient_norms"):
        assert (tmp_path / "pm" / "figures" / f"{name}.png").is_file(), name
    assert "effective β-smoothness" in html or "Santurkar" in html
    assert html.count("<figcaption>") == len(report.figures)
    md = report.markdown.read_text()
    assert "*15th, 50th and 85th percentiles of the input to sigmoid_2" in md


def test_with_one_seed_no_figure_promises_a_band():
    import matplotlib.pyplot as plt

    from bnlab.report import plots
    runs = [r for r in _fake_runs() if r["seed"] == SEEDS[0]]
    probes, epochs = _fake_probes(runs), _fake_epochs(runs)
    figures = {"learning_curves": plots.learning_curves(runs, epochs, VARIANTS, "t"),
               "probe_percentiles": plots.percentile_panels(probes, runs, VARIANTS),
               "probe_gradient_norms": plots.gradient_norm_panels(probes, runs, VARIANTS),
               "probe_saturation": plots.saturation_panel(probes, runs, VARIANTS),
               "probe_landscape": plots.landscape_panels(probes, runs, VARIANTS)}
    for name, (fig, caption) in figures.items():
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert plots.BAND not in labels and "min..max" not in caption and "1 seed per variant" in caption, name
        plt.close(fig)
    fig, caption = _all_figures()["probe_percentiles"]  # three seeds: the band is there and named
    assert plots.BAND in [t.get_text() for legend in fig.legends for t in legend.get_texts()] and "min..max" in caption
    plt.close(fig)
