"""One rule for running statistics (``bnlab.conventions.running_update``), applied by every engine.

Oracles are independent of bnlab: the update written out from the conventions table over all the
values of each batch (N per channel after a Linear, N·H·W after a Conv), and torch.nn.BatchNorm1d/2d.
Factors of exactly 0 and 1 (torch momentum 0/1, keras momentum 1/0, momentum=None's first batch),
both conventions, float32 and float64, dense and conv, batch sizes that change between steps.
"""

import numpy as np
import pytest
import torch
from torch import nn

from bnlab import reference as ref
from bnlab.conventions import RunningUpdate, get_convention, running_update
from bnlab.nn import BatchNorm, BatchRenorm, GhostBatchNorm
from bnlab.train import FusedMLPStep
from bnlab.train import native as native_module
from bnlab.train.engine import AutogradStep

TORCH, KERAS = get_convention("torch"), get_convention("keras")
C = 4
BATCH_SIZES = (8, 5, 16, 8)  # m/(m-1) changes with the batch; the native step re-reads it
LAYOUTS = {"dense": (C,), "conv": (C, 3, 2)}
# (convention, momentum): every factor kind, exactly 0 and exactly 1 included
MOMENTA = [("torch", 0.1), ("torch", 0.0), ("torch", 1.0), ("torch", None),
           ("keras", 0.99), ("keras", 0.0), ("keras", 1.0)]
MOMENTUM_IDS = [f"{c}-momentum={m}" for c, m in MOMENTA]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def _batches(layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n, *LAYOUTS[layout]), generator=g, dtype=torch.float64) * 2.5 + 1.0).to(dtype)
            for n in BATCH_SIZES]


def direct(batches, convention, momentum):
    """The running statistics after these batches, from the conventions table, in float64."""
    c = batches[0].shape[1]
    mean, var = np.zeros(c), np.ones(c)
    for n, x in enumerate(batches, start=1):
        v = x.double().numpy().swapaxes(0, 1).reshape(c, -1)  # (C, every value of the channel)
        count = v.shape[1]  # N after a Linear, N·H·W after a Conv
        bm, bv = v.mean(1), v.var(1)  # biased
        if convention == "torch":
            f = 1.0 / n if momentum is None else momentum  # weight of the NEW statistic
            bv = bv * count / (count - 1)  # torch stores the unbiased variance
        else:
            f = 1.0 - momentum  # keras momentum weighs the OLD statistic
        mean, var = (1 - f) * mean + f * bm, (1 - f) * var + f * bv
    return mean, var


def rel(a, b) -> float:
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else b
    return ref.relative_error(a, b)


def native_or_skip():
    if native_module.load() is None:
        pytest.skip(f"the native step cannot be built here ({native_module.unavailable_reason()})")


# ---------------------------------------------------------------- the rule itself


@pytest.mark.parametrize("conv,momentum,n,count,factor,correction", [
    (TORCH, 0.1, 7, 32, 0.1, 32 / 31),
    (TORCH, 0.0, 1, 2, 0.0, 2.0),
    (TORCH, 1.0, 3, 5, 1.0, 5 / 4),
    (TORCH, None, 1, 10, 1.0, 10 / 9),  # the first batch replaces the initial (0, 1)
    (TORCH, None, 4, 10, 0.25, 10 / 9),
    (KERAS, 0.99, 9, 32, 1.0 - 0.99, 1.0),
    (KERAS, 0.0, 1, 1, 1.0, 1.0),  # keras stores the biased variance: one value per channel is fine
    (KERAS, 1.0, 2, 8, 0.0, 1.0),
], ids=["torch-0.1", "torch-0", "torch-1", "torch-None-first", "torch-None-4th", "keras-0.99", "keras-0",
        "keras-1"])
def test_running_update_against_the_table(conv, momentum, n, count, factor, correction):
    u = running_update(conv, momentum, n, count)
    assert u == RunningUpdate(factor, correction)  # exact: 0 and 1 must be exactly 0 and 1


@pytest.mark.parametrize("args,match", [
    ((TORCH, 0.1, 1, 1), "at least 2 values per channel"),
    ((TORCH, None, 0, 8), "num_batches_tracked counts the current batch"),
    ((KERAS, None, 1, 8), "momentum=None"),
    ((TORCH, 1.5, 1, 8), r"\[0, 1\]"),
], ids=["count-1", "counter-0", "keras-None", "momentum-range"])
def test_running_update_errors(args, match):
    with pytest.raises(ValueError, match=match):
        running_update(*args)


# ---------------------------------------------------------------- the layers and the reference


def _run_reference(batches, convention, momentum):
    c = batches[0].shape[1]
    dt = batches[0].numpy().dtype
    mean, var = np.zeros(c, dt), np.ones(c, dt)
    for n, x in enumerate(batches, start=1):
        _, cache = ref.batch_norm_forward(x.numpy(), eps=1e-5)
        mean, var = ref.update_running_stats(mean, var, cache.mean, cache.var, count=x.numel() // c,
                                             momentum=momentum, convention=convention, num_batches_tracked=n)
    assert mean.dtype == dt and var.dtype == dt  # the reference computes in its input's dtype
    return mean, var


def _run_layer(layer, batches):
    layer.train()
    for x in batches:
        layer(x)
    assert int(layer.num_batches_tracked) == len(batches)
    return layer.running_mean, layer.running_var


LAYERS = {
    "reference": None,
    "bn": lambda c, **kw: BatchNorm(c, **kw),
    "renorm": lambda c, **kw: BatchRenorm(c, r_max=1.0, d_max=0.0, **kw),  # renorm with r=1, d=0 updates as BN
    "ghost": lambda c, **kw: GhostBatchNorm(c, ghost_size=64, **kw),  # ghost batches >= the batch: one update
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("convention,momentum", MOMENTA, ids=MOMENTUM_IDS)
@pytest.mark.parametrize("engine", LAYERS)
def test_layers_and_reference_follow_the_table(engine, convention, momentum, layout, dtype):
    batches = _batches(layout, dtype)
    if engine == "reference":
        got_mean, got_var = (torch.from_numpy(a) for a in _run_reference(batches, convention, momentum))
    else:
        layer = LAYERS[engine](C, convention=convention, momentum=momentum, dtype=dtype)
        got_mean, got_var = _run_layer(layer, batches)
    assert got_mean.dtype == dtype and got_var.dtype == dtype
    mean, var = direct(batches, convention, momentum)
    assert rel(got_mean, mean) <= TOL[dtype]
    assert rel(got_var, var) <= TOL[dtype]
    if (convention, momentum) in (("torch", 0.0), ("keras", 1.0)):  # factor exactly 0: nothing moves
        assert torch.equal(got_mean, torch.zeros(C, dtype=dtype)) and torch.equal(got_var, torch.ones(C, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None], ids=lambda m: f"momentum={m}")
def test_torch_convention_equals_torch_nn_batchnorm_with_changing_batch_sizes(momentum, layout, dtype):
    """torch.nn.BatchNorm1d/2d as the oracle; conv batches count N·H·W values per channel."""
    ours = BatchNorm(C, momentum=momentum, dtype=dtype)
    theirs = (nn.BatchNorm1d if layout == "dense" else nn.BatchNorm2d)(C, momentum=momentum, dtype=dtype)
    for x in _batches(layout, dtype, seed=1):
        ours(x)
        theirs(x)
        assert rel(ours.running_mean, theirs.running_mean) <= TOL[dtype]
        assert rel(ours.running_var, theirs.running_var) <= TOL[dtype]
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_conv_unbiases_with_the_values_per_channel_not_the_images():
    x = torch.randn(2, C, 5, 5, dtype=torch.float64)  # 2 images, 50 values per channel
    bn = BatchNorm(C, momentum=1.0, dtype=torch.float64)
    bn(x)
    expect = x.transpose(0, 1).reshape(C, -1).var(1, correction=1)  # ·50/49, not ·2/1
    assert torch.allclose(bn.running_var, expect, rtol=1e-13)


# ---------------------------------------------------------------- the fused and native MLP steps


def _mlp(convention, momentum, dtype):
    torch.manual_seed(0)
    kw = {"convention": convention, "momentum": momentum}
    return nn.Sequential(BatchNorm(C, **kw), nn.Linear(C, 6), BatchNorm(6, **kw), nn.ReLU(),
                         nn.Linear(6, 3)).to(dtype)


@torch.no_grad()
def _bn_inputs(model, x):
    """What each BN of ``_mlp`` sees, by direct formulas in float64 (weights do not move: lr = 0)."""
    bn0, lin = model[0], model[1]
    xd = x.double()
    mu, var = xd.mean(0), xd.var(0, correction=0)
    z = (xd - mu) / torch.sqrt(var + bn0.eps) * bn0.weight.double() + bn0.bias.double()
    return xd, z @ lin.weight.double().T + lin.bias.double()


STEPS = {"fused": lambda m: FusedMLPStep(m, sgd_lr=0.0), "native": lambda m: native_module.NativeMLPStep(m, sgd_lr=0.0)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("convention,momentum", MOMENTA, ids=MOMENTUM_IDS)
@pytest.mark.parametrize("kind", STEPS)
def test_mlp_steps_follow_the_rule(kind, convention, momentum, dtype):
    """The native step applies momentum=None's 1/n in C++: its result must equal the Python rule
    (the reference's update) and the table, over several batches of changing size."""
    if kind == "native":
        native_or_skip()
    model = _mlp(convention, momentum, dtype)
    step = STEPS[kind](model)
    batches = _batches("dense", dtype, seed=2)
    seen = [[], []]
    for x in batches:
        for i, h in enumerate(_bn_inputs(model, x)):
            seen[i].append(h)
        step(x, torch.zeros(x.shape[0], dtype=torch.long))
    for i, bn in ((0, model[0]), (1, model[2])):
        assert int(bn.num_batches_tracked) == len(batches)
        mean, var = direct(seen[i], convention, momentum)
        rule_mean, rule_var = _run_reference(seen[i], convention, momentum)  # the Python rule, float64
        assert ref.relative_error(rule_mean, mean) <= 1e-13 and ref.relative_error(rule_var, var) <= 1e-13
        assert rel(bn.running_mean, rule_mean) <= TOL[dtype], i
        assert rel(bn.running_var, rule_var) <= TOL[dtype], i
        if (convention, momentum) in (("torch", 0.0), ("keras", 1.0)):
            assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("kind", STEPS)
def test_momentum_1_stores_a_variance_of_1e_9_float32(kind):
    """Factor 1 in float32 on a feature of variance ~1e-9: old + f·(new - old) would store 0 (1e-9 - 1
    rounds to -1); (1 - f)·old + f·new stores the variance. Same as autograd within 1e-4 relative."""
    if kind == "native":
        native_or_skip()

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(12, 4), BatchNorm(4, momentum=1.0), nn.ReLU(), nn.Linear(4, 3))
        with torch.no_grad():
            m[0].weight[0] *= 1.6e-5 / m[0].weight[0].norm()  # x has std 2: var(h₀) ≈ 4·(1.6e-5)² ≈ 1e-9
        return m

    a, b = make(), make()
    # lr 0: one SGD step would move the tiny weights far (BN divides their gradient by σ ≈ 3e-3)
    step = (FusedMLPStep if kind == "fused" else native_module.NativeMLPStep)(a, sgd_lr=0.0)
    ref_step = AutogradStep(b)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(64, 12, generator=g) * 2 + 0.5, torch.randint(0, 3, (64,), generator=g)
        with torch.no_grad():  # the direct value, from the weights before this step
            h = x.double() @ b[0].weight.double().T + b[0].bias.double()
        expect = h.var(0, correction=1)
        assert 1e-10 < float(expect[0]) < 1e-8
        step(x, y)
        ref_step(x, y)
        rv_ours, rv_autograd = a[1].running_var, b[1].running_var
        assert torch.allclose(rv_ours, rv_autograd, rtol=1e-4, atol=0), (rv_ours, rv_autograd)
        assert torch.allclose(rv_ours.double(), expect, rtol=1e-4, atol=0), (rv_ours, expect)


# ---------------------------------------------------------------- one rule: every engine consumes it


def test_every_engine_takes_factor_and_correction_from_running_update(monkeypatch):
    """Swap the rule for a made-up one: every engine must follow it, so none keeps its own copy."""
    import bnlab.nn.functional
    import bnlab.reference.batchnorm
    import bnlab.train.fused

    def made_up(convention, momentum, num_batches_tracked, count):
        return RunningUpdate(0.5, 2.0)

    for module in (bnlab.reference.batchnorm, bnlab.nn.functional, bnlab.train.fused, native_module):
        monkeypatch.setattr(module, "running_update", made_up)
    x = _batches("dense", torch.float64, seed=3)[0]
    bm, bv = x.mean(0), x.var(0, correction=0)
    expect_mean, expect_var = 0.5 * bm, 0.5 + 0.5 * 2.0 * bv
    got = {"reference": tuple(torch.from_numpy(a) for a in ref.update_running_stats(
        np.zeros(C), np.ones(C), bm.numpy(), bv.numpy(), count=len(x), momentum=0.1))}
    for name in ("bn", "renorm", "ghost"):
        got[name] = _run_layer(LAYERS[name](C, momentum=0.1, dtype=torch.float64), [x])
    steps = dict(STEPS) if native_module.load() is not None else {"fused": STEPS["fused"]}
    for kind, make in steps.items():
        model = nn.Sequential(BatchNorm(C, momentum=0.1), nn.Linear(C, 3)).double()
        make(model)(x, torch.zeros(len(x), dtype=torch.long))
        got[kind] = (model[0].running_mean, model[0].running_var)
    for name, (mean, var) in got.items():
        assert rel(mean, expect_mean) <= 1e-12 and rel(var, expect_var) <= 1e-12, name
