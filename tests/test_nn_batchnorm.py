"""bnlab.nn.BatchNorm against torch.nn.BatchNorm*d, the keras rule, gradcheck and errors."""

import itertools
import zlib

import numpy as np
import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from bnlab import reference as ref
from bnlab.nn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNormFunction

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel(a, b) -> float:
    return ref.relative_error(a.detach().double().numpy(), b.detach().double().numpy())


def torch_bn(shape, **kw):
    return (torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d)(shape[1], **kw)


@pytest.mark.parametrize("weight", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((5, 2, 4), 1), ((3, 2, 3, 3), 1),
                                         ((3, 3, 2, 2), -1)], ids=["NC", "NCL", "NCHW", "NHWC"])
def test_autograd_function_gradcheck_float64(shape, axis, weight):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    c = shape[axis]
    w = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() if weight else None
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() if weight else None
    assert torch.autograd.gradcheck(lambda *a: BatchNormFunction.apply(*a, 1e-5, axis % len(shape))[0],
                                    (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_catches_a_wrong_backward(monkeypatch):
    original = BatchNormFunction.backward

    def wrong(ctx, dy, dm, dv):
        dx, dw, db = original(ctx, dy, dm, dv)[:3]
        return dx * 1.01, dw, db, None, None

    monkeypatch.setattr(BatchNormFunction, "backward", staticmethod(wrong))
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda t: BatchNormFunction.apply(t, None, None, 1e-5, 1)[0], (x,))


SEQUENCES = {"train3-eval": "TTTE", "train-eval-train-eval": "TETE", "train1": "T"}
SHAPES = {"NC": (32, 8), "NCL": (8, 4, 10), "NCHW": (8, 4, 5, 5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_matches_torch_batchnorm(steps, shape, affine, momentum, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(f"{steps}{shape}".encode()))  # hash() of str varies per run
    ours = BatchNorm(shape[1], momentum=momentum, affine=affine, dtype=dtype)
    theirs = torch_bn(shape, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            for p in ("weight", "bias"):
                v = torch.randn(shape[1], generator=g, dtype=dtype)
                getattr(ours, p).copy_(v)
                getattr(theirs, p).copy_(v)
    tol = TOL[dtype]
    for step in steps:
        ours.train(step == "T")
        theirs.train(step == "T")
        x = torch.randn(shape, generator=g, dtype=dtype) * 2.5 - 1.0
        dy = torch.randn(shape, generator=g, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert rel(ya, yb) <= tol
        assert rel(xa.grad, xb.grad) <= tol
        if affine:
            assert rel(ours.weight.grad, theirs.weight.grad) <= tol
            assert rel(ours.bias.grad, theirs.bias.grad) <= tol
            ours.zero_grad()
            theirs.zero_grad()
        assert rel(ours.running_mean, theirs.running_mean) <= tol
        assert rel(ours.running_var, theirs.running_var) <= tol
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_track_running_stats_false_uses_batch_stats_in_eval_like_torch():
    x = torch.randn(16, 5)
    ours, theirs = BatchNorm(5, track_running_stats=False), torch.nn.BatchNorm1d(5, track_running_stats=False)
    ours.eval()
    theirs.eval()
    assert rel(ours(x), theirs(x)) <= 1e-6
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("affine,track", list(itertools.product([True, False], [True, False])),
                         ids=lambda v: str(v))
def test_state_dict_round_trips_both_ways(affine, track):
    theirs = torch.nn.BatchNorm2d(6, affine=affine, track_running_stats=track)
    theirs.train()
    theirs(torch.randn(4, 6, 3, 3))
    ours = BatchNorm2d(6, affine=affine, track_running_stats=track)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours(torch.randn(4, 6, 3, 3))
    back = torch.nn.BatchNorm2d(6, affine=affine, track_running_stats=track)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_old_state_dict_without_num_batches_tracked_loads():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    ours = BatchNorm(3)
    ours.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == 0


def test_parameters_trainable_and_buffers_not():
    bn = BatchNorm(7)
    assert sum(p.numel() for p in bn.parameters() if p.requires_grad) == 14
    assert sum(b.numel() for n, b in bn.named_buffers() if n != "num_batches_tracked") == 14


# ---------------------------------------------------------------- keras convention


def test_keras_defaults_and_rule_by_hand():
    bn = BatchNorm(1, convention="keras", dtype=torch.float64)
    assert (bn.eps, bn.momentum) == (1e-3, 0.99)
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=torch.float64)  # mean 3, biased var 3.5
    y = bn(x)
    np.testing.assert_allclose(y.detach().numpy(), ((x - 3) / np.sqrt(3.5 + 1e-3)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [0.99 * 0 + 0.01 * 3], rtol=1e-12)
    np.testing.assert_allclose(bn.moving_variance.numpy(), [0.99 * 1 + 0.01 * 3.5], rtol=1e-12)
    bn.eval()
    mm, mv = 0.03, 0.99 + 0.035
    np.testing.assert_allclose(bn(x).detach().numpy(), ((x - mm) / np.sqrt(mv + 1e-3)).numpy(), rtol=1e-12)


def test_keras_center_scale_switches():
    bn = BatchNorm(4, convention="keras", center=False)
    assert bn.beta is None and bn.gamma is not None
    assert sum(p.numel() for p in bn.parameters()) == 4
    bn = BatchNorm(4, convention="keras", scale=False)
    assert bn.gamma is None and bn.beta is not None
    x = torch.randn(10, 4)
    with torch.no_grad():
        bn.bias.fill_(2.0)
    y = bn(x)
    np.testing.assert_allclose(y.mean(0).detach().numpy(), np.full(4, 2.0), atol=1e-5)


def test_keras_channels_last_conv_input():
    x = torch.randn(4, 5, 5, 3, dtype=torch.float64)  # NHWC
    bn = BatchNorm(3, convention="keras", axis=-1, dtype=torch.float64)
    y = bn(x)
    y_ref, _ = ref.batch_norm_forward(x.numpy(), None, None, eps=1e-3, axis=-1)
    assert ref.relative_error(y.detach().numpy(), y_ref) <= 1e-12


def test_keras_rejects_cumulative_momentum():
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNorm(3, convention="keras", momentum=None)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("module,x,err,match", [
    (BatchNorm(4), torch.randn(8, 3), ValueError, r"expected 4 channels on axis 1 \(got 3"),
    (BatchNorm(4), torch.randn(8), ValueError, r"got 1D input"),
    (BatchNorm2d(4), torch.randn(8, 4), ValueError, r"expected 4D \(N, C, H, W\) input \(got 2D"),
    (BatchNorm1d(4), torch.randn(8, 4, 2, 2), ValueError, r"expected 2D \(N, C\) or 3D \(N, C, L\)"),
    (BatchNorm(4), torch.randn(1, 4), ValueError, "more than 1 value per channel.*batch of more than "
                                                  "one sample.*model.eval\\(\\).*layer or group norm"),
    (BatchNorm(4), torch.tensor([[1.0, 2, 3, float("nan")], [1, 2, 3, 4]]), FloatingPointError,
     r"non-finite batch statistics in channel\(s\) \[3\]: the input to this BN layer contains NaN or inf in "
     r"channel\(s\) \[3\]"),
    (BatchNorm2d(3), torch.tensor([1.0, float("inf"), 2.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2), FloatingPointError,
     r"channel\(s\) \[1\]: the input .* contains NaN or inf in channel\(s\) \[1\]"),
    (BatchNorm(2), torch.tensor([[3e20, 1.0], [-3e20, 2.0]]), FloatingPointError,
     r"channel\(s\) \[0\]: the input is finite \(largest \|x\| = 3e\+20\) but its variance overflowed "
     r"float32 .*compute in float64"),
    (BatchNorm(2), torch.ones(4, 2, dtype=torch.long), TypeError, "floating-point"),
], ids=["channels", "rank", "rank-2d-alias", "rank-1d-alias", "one-value-per-channel", "nan", "inf-conv",
        "overflow", "int"])
def test_clear_errors(module, x, err, match):
    with pytest.raises(err, match=match):
        module(x)


def test_single_sample_works_in_eval_mode():
    bn = BatchNorm(4)
    bn(torch.randn(16, 4))
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)


@pytest.mark.parametrize("kw,match", [({"eps": 0}, "eps must be > 0"), ({"momentum": 2.0}, r"\[0, 1\]"),
                                      ({"convention": "tf"}, "unknown BN convention"),
                                      ({"num_features": 0}, "positive int")])
def test_constructor_errors(kw, match):
    kw = {"num_features": 3, **kw}
    with pytest.raises(ValueError, match=match):
        BatchNorm(kw.pop("num_features"), **kw)


# ---------------------------------------------------------------- half precision


HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _direct_keras(x, momentum=0.99, eps=1e-3):
    """Keras BN on one batch by direct formulas in float64: output, moving mean and variance (biased)."""
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    mean, var = xd.mean(dims), xd.var(dims, correction=0)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return y, momentum * 0 + (1 - momentum) * mean, momentum * 1 + (1 - momentum) * var


@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("shape", [(256, 6), (16, 6, 4, 4)], ids=["dense-256-rows", "conv-256-values"])
@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_half_precision_accumulates_in_float32(dtype, shape, convention):
    """std-40 input: the float16 sum of squares over 256 values (~4e5) overflows 65504. Statistics are
    accumulated in float32 (as Keras does): within 2e-2 of torch's float32 BatchNorm (torch convention)
    or of the direct float64 formulas (keras), outputs, gradients and running statistics alike."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 40 + 5).to(dtype)  # the half values both sides see
    dy = torch.randn(shape, generator=g)
    ours = BatchNorm(6, convention=convention, dtype=dtype)
    xa = x.clone().requires_grad_()
    ya = ours(xa)
    ya.backward(dy.to(dtype))
    assert ya.dtype == xa.grad.dtype == ours.weight.grad.dtype == ours.running_var.dtype == dtype
    if convention == "torch":
        theirs = torch_bn(shape)
        xb = x.float().requires_grad_()
        yb = theirs(xb)
        yb.backward(dy)
        pairs = [(ya, yb), (xa.grad, xb.grad), (ours.weight.grad, theirs.weight.grad),
                 (ours.bias.grad, theirs.bias.grad), (ours.running_mean, theirs.running_mean),
                 (ours.running_var, theirs.running_var)]
        ours.eval()
        theirs.eval()
        pairs.append((ours(x), theirs(x.float())))
    else:
        yb, mean, var = _direct_keras(x)
        pairs = [(ya, yb), (ours.running_mean, mean), (ours.running_var, var)]
    for i, (a, b) in enumerate(pairs):
        assert rel(a, b) <= 2e-2, i


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_half_precision_eval_with_float32_running_statistics(dtype):
    """A half input through a float32 layer (mixed precision): output in the input's dtype."""
    bn = BatchNorm(3)
    bn(torch.randn(64, 3) * 40)
    bn.eval()
    x = (torch.randn(32, 3) * 40).to(dtype)
    y = bn(x)
    assert y.dtype == dtype
    assert rel(y, torch.nn.functional.batch_norm(x.float(), bn.running_mean, bn.running_var, eps=bn.eps)) <= 1e-2


def test_float32_statistics_of_a_peaked_map_keep_their_digits():
    """Mostly-zero maps (a first conv on MNIST): the variance was a float32 linalg.vector_norm over
    (N, H, W), off by 2e-4 relative, which put 1-5 % into a CNN's gradients; now pairwise sums."""
    from bnlab.nn import BatchNorm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, 28, 28, generator=g) * (torch.rand(32, 8, 28, 28, generator=g) < 0.2) * 0.3 - 0.02
    bn32, bn64 = BatchNorm(8, momentum=1.0), BatchNorm(8, momentum=1.0).double()  # running = the batch's
    a, b = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    dy = torch.randn(x.shape, generator=g)
    y32, y64 = bn32(a), bn64(b)
    y32.backward(dy)
    y64.backward(dy.double())
    assert (y32.double() - y64).abs().max() < 1e-5 * y64.abs().max()
    assert (a.grad.double() - b.grad).abs().max() < 1e-5 * b.grad.abs().max()
    assert torch.allclose(bn32.running_var.double(), x.double().var((0, 2, 3), unbiased=True), rtol=1e-6)
