"""LayerNorm, GroupNorm, InstanceNorm, Batch Renorm, Ghost BN, Weight Norm: references, layers, specs."""

import numpy as np
import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from bnlab import reference as R
from bnlab.deploy import fold, recalibrate
from bnlab.models import build_model, summary
from bnlab.nn import (BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormalizeFunction,
                      WeightNorm, WeightNormFunction)

rng = np.random.default_rng(0)
X4 = rng.standard_normal((4, 6, 3, 3)) * 2 + 1
G6, B6 = rng.standard_normal(6), rng.standard_normal(6)

REFERENCE_CASES = {
    "layer": (lambda x, g, b: R.layer_norm_forward(x, g, b, normalized_ndim=1), R.layer_norm_backward,
              {"x": rng.standard_normal((5, 7)), "g": rng.standard_normal(7), "b": rng.standard_normal(7)}),
    "layer-3d": (lambda x, g, b: R.layer_norm_forward(x, g, b, normalized_ndim=2), R.layer_norm_backward,
                 {"x": rng.standard_normal((3, 4, 5)), "g": rng.standard_normal((4, 5)), "b": rng.standard_normal((4, 5))}),
    "group": (lambda x, g, b: R.group_norm_forward(x, 3, g, b), R.group_norm_backward, {"x": X4, "g": G6, "b": B6}),
    "instance": (lambda x, g, b: R.instance_norm_forward(x, g, b), R.instance_norm_backward, {"x": X4, "g": G6, "b": B6}),
    # r and d clipped (the paper stops their gradients; where clipped they ARE constant)
    "renorm-clipped": (lambda x, g, b: R.batch_renorm_forward(x, g, b, np.zeros(6), np.full(6, 0.25), eps=1e-5,
                                                              r_max=1.5, d_max=0.5), R.batch_renorm_backward,
                       {"x": X4, "g": G6, "b": B6}),
    "ghost": (lambda x, g, b: R.ghost_batch_norm_forward(x, g, b, eps=1e-5, ghost_size=2), R.ghost_batch_norm_backward,
              {"x": X4, "g": G6, "b": B6}),
    "weight": (R.weight_norm_forward, R.weight_norm_backward,
               {"v": rng.standard_normal((4, 5)), "g": rng.standard_normal(4)}),
    "weight-conv": (R.weight_norm_forward, R.weight_norm_backward,
                    {"v": rng.standard_normal((3, 2, 3, 3)), "g": rng.standard_normal(3)}),
}


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=REFERENCE_CASES.keys())
def test_reference_gradients_float64(case):
    fwd, bwd, inputs = REFERENCE_CASES[case]
    errs = R.check_gradients(fwd, bwd, inputs, seed=1)
    assert max(errs.values()) <= 1e-7, errs


def test_gradient_check_catches_a_planted_weight_norm_bug():
    def wrong(dw, cache):  # forgets the projection term
        v, gs, norm, axes = cache
        return gs / norm * dw, (dw * v / norm).sum(axis=axes)
    errs = R.check_gradients(R.weight_norm_forward, wrong, dict(REFERENCE_CASES["weight"][2]))
    assert errs["v"] > 1e-3


def test_renorm_reference_equals_bn_with_rmax_1_dmax_0():
    y, c = R.batch_renorm_forward(X4, G6, B6, np.ones(6) * 3, np.ones(6) * 9, eps=1e-5, r_max=1.0, d_max=0.0)
    y_bn, c_bn = R.batch_norm_forward(X4, G6, B6, eps=1e-5)
    assert R.relative_error(y, y_bn) < 1e-14
    dy = rng.standard_normal(y.shape)
    for a, b in zip(R.batch_renorm_backward(dy, c), R.batch_norm_backward(dy, c_bn)):
        assert R.relative_error(a, b) < 1e-12


def _copy_params(ours, theirs):
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p.view_as(q))


BUILTINS = {
    "layer": (lambda d: LayerNorm(7, dtype=d), lambda d: torch.nn.LayerNorm(7, dtype=d), (16, 7)),
    "layer-chw": (lambda d: LayerNorm((6, 3, 3), dtype=d), lambda d: torch.nn.LayerNorm((6, 3, 3), dtype=d), (4, 6, 3, 3)),
    "group": (lambda d: GroupNorm(3, 6, dtype=d), lambda d: torch.nn.GroupNorm(3, 6, dtype=d), (4, 6, 3, 3)),
    "group-1d": (lambda d: GroupNorm(2, 6, dtype=d), lambda d: torch.nn.GroupNorm(2, 6, dtype=d), (5, 6, 7)),
    "instance": (lambda d: InstanceNorm(6, dtype=d), lambda d: torch.nn.InstanceNorm2d(6, affine=True, dtype=d),
                 (4, 6, 3, 3)),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"])
@pytest.mark.parametrize("case", BUILTINS, ids=BUILTINS.keys())
def test_matches_torch_builtin(case, dtype, tol):
    make_ours, make_theirs, shape = BUILTINS[case]
    ours, theirs = make_ours(dtype), make_theirs(dtype)
    _copy_params(ours, theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    dy = torch.randn(shape, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.backward(dy)
    yb.backward(dy)
    rel = lambda a, b: float((a - b).detach().abs().max() / b.detach().abs().max())  # noqa: E731
    assert rel(ya, yb) <= tol and rel(xa.grad, xb.grad) <= tol
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert rel(p.grad, q.grad.view_as(p.grad)) <= tol


HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _half_input(shape, dtype, seed=0):
    """std 40: over a few hundred values the float16 sum of squares (> 65504) overflows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 40 + 5).to(dtype)


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("case", ["layer-300", "group-128"])
def test_per_sample_norms_in_half_precision_match_float32(case, dtype):
    ours, theirs, shape = ((LayerNorm(300, dtype=dtype), torch.nn.LayerNorm(300), (4, 300)) if case == "layer-300"
                           else (GroupNorm(3, 6, dtype=dtype), torch.nn.GroupNorm(3, 6), (4, 6, 8, 8)))
    x, dy = _half_input(shape, dtype), torch.randn(shape)
    xa, xb = x.clone().requires_grad_(), x.float().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.backward(dy.to(dtype))
    yb.backward(dy)
    assert ya.dtype == xa.grad.dtype == dtype
    assert R.relative_error(ya.detach().double(), yb.detach().double()) <= 2e-2
    assert R.relative_error(xa.grad.double(), xb.grad.double()) <= 2e-2


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_renorm_and_ghost_in_half_precision(dtype):
    """Oracles: renorm with r_max = 1, d_max = 0 is torch's float32 BN; ghost BN over batches of 64 is
    torch's BN applied to each in turn; renorm with active r, d is the float64 reference."""
    x = _half_input((256, 6), dtype)
    xf = x.float()
    renorm, ghost = BatchRenorm(6, r_max=1.0, d_max=0.0, dtype=dtype), GhostBatchNorm(6, ghost_size=64, dtype=dtype)
    t_renorm, t_ghost = torch.nn.BatchNorm1d(6), torch.nn.BatchNorm1d(6)
    xa = x.clone().requires_grad_()
    ya = renorm(xa)
    ya.sum().backward()
    assert ya.dtype == xa.grad.dtype == dtype and bool(xa.grad.isfinite().all())
    pairs = [(ya, t_renorm(xf)), (ghost(x), torch.cat([t_ghost(part) for part in xf.split(64)]))]
    for ours, theirs in ((renorm, t_renorm), (ghost, t_ghost)):
        pairs += [(ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)]
        assert ours.running_var.dtype == dtype
    active = BatchRenorm(6, r_max=3.0, d_max=5.0, dtype=dtype)
    with torch.no_grad():
        active.running_mean.fill_(2.0)
        active.running_var.fill_(900.0)  # r = 40/30, d = 0.1: both active
    y_ref, _ = R.batch_renorm_forward(x.double().numpy(), None, None, np.full(6, 2.0), np.full(6, 900.0),
                                      eps=active.eps, r_max=3.0, d_max=5.0)
    pairs.append((active(x), torch.from_numpy(y_ref)))
    for i, (a, b) in enumerate(pairs):
        assert a.dtype in (dtype, torch.float32, torch.float64)
        assert R.relative_error(a.detach().double().numpy(), b.detach().double().numpy()) <= 2e-2, i


def test_renorm_names_the_cause_of_non_finite_statistics():
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"contains NaN or inf in channel\(s\) \[1\]"):
        BatchRenorm(3)(x)


def test_weight_norm_matches_torch_parametrization():
    lin = torch.nn.Linear(5, 3).double()
    ours = WeightNorm(lin)
    ref = torch.nn.Linear(5, 3).double()
    ref.bias.data.copy_(lin.bias)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    with torch.no_grad():
        ours.weight_g.mul_(1.7)
        ref.parametrizations.weight.original0.copy_(ours.weight_g.view(-1, 1))
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(6, 5, dtype=torch.float64)
    ours(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    assert torch.allclose(ours(x), ref(x), rtol=1e-12)
    assert torch.allclose(ours.weight_g.grad, ref.parametrizations.weight.original0.grad.view(-1), rtol=1e-10)
    assert torch.allclose(ours.weight_v.grad, ref.parametrizations.weight.original1.grad, rtol=1e-10)


def test_autograd_functions_gradcheck():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: NormalizeFunction.apply(t, (1, 2), 1e-5), (x,))
    v = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(WeightNormFunction.apply, (v, g))


def test_gradcheck_catches_a_wrong_normalize_backward(monkeypatch):
    original = NormalizeFunction.backward

    def wrong(ctx, dxh):
        dx, a, b = original(ctx, dxh)
        return dx * 1.01, a, b

    monkeypatch.setattr(NormalizeFunction, "backward", staticmethod(wrong))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda t: NormalizeFunction.apply(t, (1,), 1e-5), (x,))


def test_batch_renorm_equals_bn_with_rmax_1_dmax_0_over_steps():
    a = BatchRenorm(6, r_max=1.0, d_max=0.0, dtype=torch.float64)
    b = BatchNorm(6, dtype=torch.float64)
    for step in range(4):
        x = torch.randn(8, 6, 3, 3, dtype=torch.float64) * 2 + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn_like(x)
        ya, yb = a(xa), b(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.allclose(ya, yb, atol=1e-12) and torch.allclose(xa.grad, xb.grad, atol=1e-12)
        assert torch.allclose(a.running_var, b.running_var) and torch.allclose(a.running_mean, b.running_mean)
    a.eval()
    b.eval()
    x = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    assert torch.allclose(a(x), b(x))


def test_batch_renorm_matches_reference_and_warms_up():
    layer = BatchRenorm(6, r_max=2.0, d_max=1.0, warmup_steps=10, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(0.3)
        layer.running_var.fill_(0.5)
    assert layer.limits() == (1.0, 0.0)
    layer.num_batches_tracked.fill_(5)
    assert layer.limits() == (1.5, 0.5)
    layer.num_batches_tracked.fill_(50)
    rm, rv = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    y = layer(torch.from_numpy(X4)).detach().numpy()
    y_ref, _ = R.batch_renorm_forward(X4, None, None, rm, rv, eps=layer.eps, r_max=2.0, d_max=1.0)
    assert R.relative_error(y, y_ref) < 1e-12


def test_ghost_bn():
    x = torch.randn(12, 6, dtype=torch.float64)
    big, bn = GhostBatchNorm(6, ghost_size=32, dtype=torch.float64), BatchNorm(6, dtype=torch.float64)
    assert torch.equal(big(x), bn(x))
    ghost = GhostBatchNorm(6, ghost_size=4, dtype=torch.float64)
    y_ref, _ = R.ghost_batch_norm_forward(x.numpy(), None, None, eps=ghost.eps, ghost_size=4)
    assert R.relative_error(ghost(x).detach().numpy(), y_ref) < 1e-12
    assert int(ghost.num_batches_tracked) == 3  # one running update per virtual batch
    odd = GhostBatchNorm(6, ghost_size=4)(torch.randn(9, 6))  # 4 + 5: a lone last sample joins the previous
    assert odd.shape == (9, 6)


@pytest.mark.parametrize("make,x,match", [
    (lambda: GroupNorm(4, 6), None, "groups must divide the channels"),
    (lambda: InstanceNorm(6), torch.randn(4, 6), "spatial axes"),
    (lambda: LayerNorm(7), torch.randn(4, 6), r"ending in shape \(7,\)"),
    (lambda: BatchRenorm(4, r_max=0.5), None, "r_max >= 1"),
    (lambda: GhostBatchNorm(4, ghost_size=1), None, "ghost_size must be >= 2"),
], ids=["groups", "instance-2d", "layer-shape", "renorm-rmax", "ghost-size"])
def test_clear_errors(make, x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        m = make()
        m(x)


# ---------------------------------------------------------------- model specs


@pytest.mark.parametrize("norm,trainable_extra,non_trainable", [
    ("batch", 48, 48), ("renorm", 48, 48), ("ghost:8", 48, 48), ("layer", 48, 0), ("group:4", 48, 0),
    ("weight", 24, 0), ("none", 0, 0)])
def test_spec_norms_and_summary_counts(norm, trainable_extra, non_trainable):
    base = summary(build_model({"hidden": [16, 8], "input_shape": [64], "bn": "none"}))
    s = summary(build_model({"hidden": [16, 8], "input_shape": [64], "bn": "after", "norm": norm}))
    assert s.trainable == base.trainable + trainable_extra and s.non_trainable == non_trainable


def test_bias_rule_per_norm():
    def has_bias(norm):
        return build_model({"hidden": [4], "input_shape": [3], "bn": "before", "norm": norm}).dense.bias is not None
    assert not has_bias("batch") and not has_bias("renorm") and not has_bias("ghost:4")
    assert has_bias("layer") and has_bias("group:2")  # per-sample norms do not cancel a per-unit bias


@pytest.mark.parametrize("spec,match", [
    ({"norm": "group:0"}, "pattern"), ({"norm": "batchnorm"}, "pattern"),
    ({"norm": "instance", "bn": "after", "input_shape": [4]}, "spatial axes"),
], ids=["group-0", "unknown", "instance-mlp"])
def test_spec_norm_errors(spec, match):
    from pydantic import ValidationError
    with pytest.raises((ValueError, ValidationError), match=match):
        build_model(spec)


@pytest.mark.parametrize("norm", ["layer", "group:2", "instance", "renorm", "ghost:4", "weight"])
def test_every_norm_trains_in_a_cnn_and_folds_where_it_can(norm):
    from bnlab.data import load_dataset
    from bnlab.train import fit
    data = load_dataset("digits")
    spec = {"kind": "cnn", "input_shape": [1, 8, 8], "blocks": [8], "final_block": 8, "bn": "before",
            "norm": norm, "num_classes": 10}
    model = build_model(spec, seed=0)
    h = fit(model, data, epochs=2, lr=1e-2, optimizer="adam", batch_size=32, progress=False)
    assert h.engine == "autograd" and h.final.val_accuracy > 0.3
    model.eval()
    folded, rep = fold(model)
    with torch.no_grad():
        assert torch.allclose(folded(data.x_test), model(data.x_test), rtol=1e-4, atol=1e-5)
    kept = [e for e in rep.entries if e.folded_into is None]
    if norm in ("layer", "group:2", "instance"):
        assert kept and all("its own statistics" in e.how for e in kept)
    else:
        assert not kept


def test_precise_statistics_refuse_per_sample_norms():
    model = build_model({"hidden": [8], "input_shape": [4], "bn": "before", "norm": "layer"})
    with pytest.raises(ValueError, match="layer, group and instance norm use each sample's own statistics"):
        recalibrate(model, torch.randn(64, 4), mode="train")
    renorm = build_model({"hidden": [8], "input_shape": [4], "bn": "before", "norm": "renorm"})
    new = recalibrate(renorm, torch.randn(64, 4) * 2 + 1, mode="train")
    assert float(new.batch_renormalization.running_var.mean()) > 0.5


def test_small_batch_study_reports_error_vs_batch_size(tmp_path):
    """A reduced small-batch study (2 methods x 2 batch sizes): the figure and within-batch-size comparisons."""
    from bnlab.experiments import load_experiment, parse_experiment, run_experiment
    from bnlab.report import build_report
    full = load_experiment("small-batch")
    groups = {v.group for v in full.variants.values()}
    assert groups == {"BatchNorm", "GroupNorm", "Batch Renorm", "Ghost BN, batch 32"}
    assert full.reference_group == "GroupNorm" and full.seed_list() == [0, 1, 2, 3, 4]
    sizes = sorted({v.train["batch_size"] for v in full.variants.values()})
    assert sizes == [2, 4, 8, 16, 32]
    lrs = {v.train["batch_size"]: v.train["lr"] for v in full.variants.values()}
    assert lrs[32] == 0.05 and lrs[2] == pytest.approx(0.05 * 2 / 32)  # linear lr scaling
    assert full.train["lr_schedule"] == "cosine" and full.model["norm_options"]["warmup_fraction"] == 0.25
    ghost = [v for v in full.variants.values() if v.group.startswith("Ghost")]
    assert {v.train["batch_size"] for v in ghost} == {32} and {v.train["lr"] for v in ghost} == {0.05}
    keep = ["bn-b4", "bn-b16", "gn-b4", "gn-b16"]
    data = full.model_dump()
    data["variants"] = {k: v for k, v in data["variants"].items() if k in keep}
    data.update(seeds=2, train={**data["train"], "epochs": 1, "max_steps": 30},
                data={**data["data"], "options": {"train_limit": 600, "test_limit": 500}})
    spec = parse_experiment(data)
    run_experiment(spec, tmp_path / "sb", workers=2)
    report = build_report(tmp_path / "sb")
    assert (tmp_path / "sb" / "figures" / "error_vs_batch_size.png").is_file()
    md = report.markdown.read_text()
    comparisons = [line for line in md.splitlines() if line.startswith("- ") and "bn-b" in line]
    assert len(comparisons) == 2  # bn vs gn at batch 4, and at batch 16; never across batch sizes
    assert all(("b4" in c and "b16" not in c) or ("b16" in c and "b4" not in c) for c in comparisons)
    assert "### Against the reference method" in md and "| BatchNorm | GroupNorm | test error (final model) | 8 |" in md
