"""The fused step on CNNs (Conv2d, BN on (N, C, H, W), activations, max-pooling, dropout; channels_last end
to end) against autograd through the same layers: loss, every gradient and the running statistics."""

import copy

import pytest
import torch

from bnlab.models import build_model
from bnlab.train import fit
from bnlab.train.engine import AutogradStep, make_step
from bnlab.train.fused import FusedMLPStep, unsupported_layers
from bnlab.data.dataset import Dataset


def _cnn(activation="relu", convention="torch", bn="before", momentum="default", dropout=0.0, **extra):
    norm = {"convention": convention} | ({} if momentum == "default" else {"momentum": momentum})
    spec = {"kind": "cnn", "input_shape": [3, 8, 8], "num_classes": 5, "blocks": [4, 6], "final_block": 5,
            "bn": bn, "dropout": dropout, "activation": activation, "norm_options": norm, **extra}
    return build_model(spec, seed=0).double()


def _compare(model, steps=3, tol=1e-10, n=16):
    ref = copy.deepcopy(model)
    fused, name = make_step(model, "auto", None)
    auto = AutogradStep(ref)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (n,), generator=g)
        la, ca = fused(x, y)
        lb, cb = auto(x, y)
        assert abs(float(la) - float(lb)) <= tol and int(ca) == int(cb)
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=tol, atol=tol), pname
        opt_a.step()
        opt_b.step()
    for (bname, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.allclose(b.to(c.dtype), c, rtol=tol, atol=tol), bname
    return name


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "selu", "sigmoid", "tanh"])
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_fused_cnn_step_matches_autograd_in_float64(activation, convention):
    assert _compare(_cnn(activation, convention)) == "fused"


@pytest.mark.parametrize("momentum", [0.0, 1.0, None])
def test_momentum_edges_and_bn_after_the_activation(momentum):
    convention = "torch" if momentum is None else "keras"
    _compare(_cnn(bn="after", convention=convention, momentum=momentum))


def test_tiny_variances_keep_their_digits_in_the_running_variance():
    model = _cnn(convention="keras", momentum=0.0)  # the running statistics are the batch's
    with torch.no_grad():
        model[0].weight.mul_(1e-6)  # the first conv's outputs vary by ~1e-6: var ~1e-12 << eps = 1e-3
    ref = copy.deepcopy(model)
    _compare(model, steps=1)
    AutogradStep(ref)(*_batch())
    got, want = model[1].running_var, ref[1].running_var
    assert float(want.max()) < 1e-9
    assert torch.allclose(got, want, rtol=1e-9, atol=0)  # relative: digits kept, not rebuilt from invstd


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def test_gap_head_and_no_bn():
    _compare(_cnn(head="gap"))
    _compare(_cnn(bn="none"))


def test_dropout_masks_come_from_the_runs_generator_and_training_is_reproducible():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    data = Dataset("img", x[:32], y[:32], x[32:], y[32:], x[:0], y[:0], 5)
    spec = {"kind": "cnn", "input_shape": [3, 8, 8], "num_classes": 5, "blocks": [4], "final_block": 5,
            "bn": "before", "dropout": 0.3}
    h1 = fit(build_model(spec, seed=0), data, epochs=2, batch_size=8, lr=0.05, progress=False)
    h2 = fit(build_model(spec, seed=0), data, epochs=2, batch_size=8, lr=0.05, progress=False)
    h3 = fit(build_model(spec, seed=0), data, epochs=2, batch_size=8, lr=0.05, progress=False, seed=1)
    assert h1.engine == "fused" and h1.step_loss == h2.step_loss and h1.step_loss != h3.step_loss


def test_layers_the_fused_step_does_not_cover_are_named():
    strided_same = build_model({"kind": "layers", "input_shape": [3, 8, 8], "num_classes": 2, "layers": [
        {"type": "conv2d", "filters": 2, "strides": 2}, {"type": "flatten"}, {"type": "dense", "units": 2}]})
    bad = unsupported_layers(strided_same)
    assert bad and any("ZeroPad2d" in b for b in bad)
    with pytest.raises(ValueError, match="does not support"):
        FusedMLPStep(strided_same)
    assert make_step(strided_same, "auto", None)[1] == "autograd"


@pytest.mark.parametrize("activation", ["relu", "elu"])
def test_without_the_native_kernels_the_aten_path_matches_autograd_too(activation, monkeypatch):
    import bnlab.train.fused as fused
    monkeypatch.setattr(fused, "native_kernels_for", lambda w: None)  # no compiler: ATen's BN, uniform dropout
    model = _cnn(activation, bn="after")
    step = FusedMLPStep(copy.deepcopy(model))
    assert not any(isinstance(op, fused._BatchNormAct) for op in step.ops)
    assert _compare(model) == "fused"


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "sgd"])
def test_optimizer_steps_on_fused_gradients_equal_autograds(optimizer):
    """The fused step's gradients keep each parameter's layout (autograd's contract): torch's fused Adam
    reads .grad as flat memory in the parameter's order, so a channels_last conv-weight gradient under a
    contiguous weight updated the wrong elements."""
    from bnlab.train.optim import make_optimizer
    model = _cnn("elu")
    ref = copy.deepcopy(model)
    fused, _ = make_step(model, "auto", None)
    auto = AutogradStep(ref)
    opt_a = make_optimizer(optimizer, list(model.parameters()), lr=0.03, momentum=0.9 if optimizer == "sgd" else 0.0)
    opt_b = make_optimizer(optimizer, list(ref.parameters()), lr=0.03, momentum=0.9 if optimizer == "sgd" else 0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
        fused(x, y)
        auto(x, y)
        for p in model.parameters():
            assert p.grad.stride() == p.stride()
        opt_a.step()
        opt_b.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "selu", "sigmoid", "tanh"])
def test_bn_runs_the_activation_after_it_only_where_that_is_cheap(activation):
    # the kernel recomputes a fused activation in the backward pass: comparisons yes, exp / tanh no
    from bnlab.nn.activations import BY_NAME
    from bnlab.train import fused
    if fused.native_kernels_for(torch.zeros(1)) is None:
        pytest.skip("the native kernels are not available")
    from bnlab.nn import BatchNorm
    model = _cnn(activation).float()
    step = FusedMLPStep(model)
    kinds = [type(op).__name__ for op in step.ops]
    assert kinds.count("_BatchNormAct") == sum(isinstance(m, BatchNorm) for m in model.modules()) > 0
    assert ("_Activation" in kinds) == (not BY_NAME[activation].fuses_with_bn)
    assert BY_NAME[activation].fuses_with_bn == (activation in ("relu", "leaky_relu"))
