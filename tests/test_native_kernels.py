"""The native kernels of the fused step (``train/native/bn_act.cpp``, ``dropout.cpp``, ``pool.cpp``) against
independent oracles: float64 autograd through torch's own BatchNorm and activation modules, ATen's
bfloat16 and max-pool kernels, the direct formulas over the whole batch."""

import pytest
import torch
from torch import nn

from bnlab.nn.activations import ACTIVATIONS, activation_parameter
from bnlab.train import native
from bnlab.train.fused import FusedMLPStep, _BatchNormAct, _Dropout, _MaxPool2d
from bnlab.models import build_model

K = native.kernels()
pytestmark = pytest.mark.skipif(K is None, reason="the native library cannot be built here")


def _maps(shape, dtype, seed=0, scale=2.0, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    return (x.to(dtype).contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.to(dtype))


def _oracle(x, w, b, act, dy, eps=1e-3):
    """float64 autograd: BN over every axis but 1 (biased variance, eps in the root), then the activation."""
    x = x.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    b = b.detach().double().requires_grad_(True)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    z = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)
    y = act(z)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy.double())
    return y.detach(), mean.detach(), var.detach(), dx, dw, db


SHAPES = [(6, 7), (40, 64), (5, 60, 3, 3), (4, 17, 2, 5), (3, 1001)]  # 1001: the one-value-at-a-time walk


@pytest.mark.parametrize("spec", ACTIVATIONS, ids=lambda a: a.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_equals_autograd(spec, shape):
    x = _maps(shape, torch.float64)
    c = shape[1]
    g = torch.Generator().manual_seed(1)
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    dy = _maps(shape, torch.float64, seed=2, scale=1.0, shift=0.0)
    module = spec.make(0.2)
    y, mean, invstd, var = K.bn_act_forward(x, w, b, None, None, True, 1e-3, spec.native, activation_parameter(module))
    want = _oracle(x, w, b, module, dy)
    assert torch.allclose(y, want[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(mean, want[1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(var, want[2], rtol=1e-10, atol=0)
    assert torch.allclose(invstd, (want[2] + 1e-3).rsqrt(), rtol=1e-12)
    dx, dw, db = K.bn_act_backward(dy, x, w, b, mean, invstd, spec.native, activation_parameter(module), True)
    for got, ref in zip((dx, dw, db), want[3:]):
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert dx.stride() == x.stride()  # channels_last in, channels_last out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_agrees_with_aten_and_keeps_float32_statistics(dtype):
    x = _maps((8, 60, 6, 6), dtype)
    w, b = torch.rand(60) + 0.5, torch.randn(60)
    y, mean, invstd, var = K.bn_act_forward(x, w, b, None, None, True, 1e-3, 0, 0.0)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == var.dtype == torch.float32
    want = x.double().var((0, 2, 3), unbiased=False)
    assert torch.allclose(var.double(), want, rtol=1e-5)  # statistics of the very values the layer saw
    ya, ma, ia = torch.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-3)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(y.double(), torch.relu(ya).double(), rtol=tol, atol=tol * 4)
    assert torch.allclose(mean, ma, rtol=1e-5) and torch.allclose(invstd, ia, rtol=1e-4)
    dy = _maps((8, 60, 6, 6), dtype, seed=3, scale=1.0, shift=0.0)
    dx, dw, db = K.bn_act_backward(dy, x, w, b, mean, invstd, 0, 0.0, True)
    dz = torch.ops.aten.threshold_backward(dy, y, 0)  # the same mask: ties at 0 may round either way
    dxa, dwa, dba = torch.ops.aten.native_batch_norm_backward(dz, x, w, None, None, mean, invstd, True, 1e-3,
                                                              [True, True, True])
    assert torch.allclose(dx.double(), dxa.double(), rtol=tol, atol=tol * 8)
    assert torch.allclose(dw, dwa, rtol=1e-3, atol=1e-3) and torch.allclose(db, dba, rtol=1e-3, atol=1e-3)


def test_tiny_variance_is_computed_not_rebuilt_from_invstd():
    x = _maps((32, 5), torch.float32, scale=1e-5, shift=1.0)  # var ~1e-10 << eps, float32 values
    _, _, invstd, var = K.bn_act_forward(x, None, None, None, None, True, 1e-3, 6, 0.0)
    want = x.double().var(0, unbiased=False)
    assert torch.allclose(var.double(), want, rtol=1e-5, atol=0)
    rebuilt = invstd.double().pow(-2) - 1e-3
    assert not torch.allclose(rebuilt, want, rtol=0.1, atol=0)  # what a variance rebuilt from invstd would have lost


def test_evaluation_uses_the_running_statistics():
    x = _maps((5, 6, 2, 2), torch.float64)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    bn = nn.BatchNorm2d(6, eps=1e-3).double().eval()
    bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    y, mean, _, var = K.bn_act_forward(x, bn.weight, bn.bias, rm, rv, False, 1e-3, 1, 0.0)
    assert torch.allclose(y, torch.sigmoid(bn(x)), rtol=1e-12) and torch.equal(mean, rm) and torch.equal(var, rv)


def test_no_affine_and_nan_and_clear_errors():
    x = _maps((4, 3), torch.float32)
    y, *_ = K.bn_act_forward(x, None, None, None, None, True, 1e-5, 6, 0.0)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)
    x[0, 1] = float("nan")
    y, mean, *_ = K.bn_act_forward(x, None, None, None, None, True, 1e-5, 0, 0.0)
    assert torch.isnan(mean[1]) and torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, 0]).any()
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        K.bn_act_forward(torch.ones(1, 3), None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="channels_last"):
        K.bn_act_forward(torch.ones(2, 3, 4, 4), None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="weight must be a contiguous vector of 3 values"):
        K.bn_act_forward(torch.ones(2, 3), torch.ones(4), None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        K.bn_act_forward(torch.ones(2, 3), None, None, None, None, True, 1e-5, 9, 0.0)
    with pytest.raises(RuntimeError, match="bfloat16, float32 or float64"):
        K.bn_act_forward(torch.ones(2, 3, dtype=torch.float16), None, None, None, None, True, 1e-5, 0, 0.0)


def test_the_fused_cnn_step_runs_its_bn_and_dropout_in_the_kernels():
    spec = {"kind": "cnn", "input_shape": [3, 8, 8], "num_classes": 5, "blocks": [4], "final_block": 5,
            "bn": "before", "dropout": 0.2}
    step = FusedMLPStep(build_model(spec, seed=0))
    kinds = [type(op) for op in step.ops]
    assert _BatchNormAct in kinds and nn.ReLU not in [getattr(op, "kind", None) for op in step.ops]
    assert all(op.kernels is K for op in step.ops if isinstance(op, (_BatchNormAct, _Dropout)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_hashed_dropout_rate_scale_determinism(dtype):
    x = _maps((50, 12, 10, 10), dtype, shift=5.0)
    y = K.hashed_dropout(x, 0.3, 1234)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - 0.7) < 4 * (0.21 / n) ** 0.5  # binomial: 4 standard errors
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(y[kept].double(), x[kept].double() / 0.7, rtol=tol)
    assert torch.equal(y, K.hashed_dropout(x, 0.3, 1234)) and not torch.equal(y, K.hashed_dropout(x, 0.3, 1235))
    assert y.stride() == x.stride()
    # the mask depends on the position in memory only: the gradient through it uses the same mask
    ones = torch.ones_like(x)
    assert torch.equal(K.hashed_dropout(ones, 0.3, 1234) != 0, kept)
    assert torch.equal(K.hashed_dropout(x, 0.0, 9), x) and not K.hashed_dropout(x, 1.0, 9).any()
    with pytest.raises(RuntimeError, match=r"dropout rate must be in \[0, 1\]"):
        K.hashed_dropout(x, 1.5, 0)


def test_fused_dropout_backward_follows_the_forward_mask_across_layouts():
    g = torch.Generator().manual_seed(0)
    op = _Dropout(nn.Dropout(0.4), g, K)
    h = _maps((6, 5, 4, 4), torch.float64)
    y = op.forward(h, True)
    dy = torch.ones(6, 5, 4, 4, dtype=torch.float64)  # NCHW, as a Flatten's gradient comes back
    dx = op.backward(dy, True, None)
    assert torch.equal(dx != 0, y != 0)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(_Dropout(nn.Dropout(0.4), g2, K).forward(h, True), y)  # seeded by the run's generator


def _aten_pool(x, k, dy):
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, [k, k], [k, k], [0, 0], [1, 1], False)
    return y, torch.ops.aten.max_pool2d_with_indices_backward(dy, x, [k, k], [k, k], [0, 0], [1, 1], False, idx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape,k", [((3, 60, 8, 8), 2), ((2, 5, 7, 9), 2), ((2, 17, 9, 6), 3), ((1, 3, 4, 4), 1)])
def test_max_pool_equals_atens_values_and_gradients(dtype, shape, k):
    x = _maps(shape, dtype)
    x[0, 0, :2, :2] = x[0, 0, 0, 0]  # a tie: the first position in the window wins, as in ATen
    x[-1, -1, 0, 0] = float("nan")  # a NaN is the maximum
    y, where = K.max_pool_forward(x, k)
    dy = _maps(y.shape, dtype, seed=5)
    want_y, want_dx = _aten_pool(x, k, dy)
    assert y.isnan().any() and torch.equal(y.isnan(), want_y.isnan()) and torch.equal(y.nan_to_num(0), want_y.nan_to_num(0))
    dx = K.max_pool_backward(dy, where, list(x.shape), k)
    assert torch.equal(dx, want_dx)  # every gradient where ATen puts it, 0 elsewhere (uncovered rows too)
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)


def test_max_pool_refuses_what_it_does_not_take():
    x = _maps((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="channels_last"):
        K.max_pool_forward(x.contiguous(), 2)
    with pytest.raises(RuntimeError, match="does not fit"):
        K.max_pool_forward(x, 5)
    y, where = K.max_pool_forward(x, 2)
    with pytest.raises(RuntimeError, match="do not pool to"):
        K.max_pool_backward(y, where, [2, 3, 8, 8], 2)


@pytest.mark.parametrize("module,native", [(nn.MaxPool2d(2), True), (nn.MaxPool2d(3), True),
                                           (nn.MaxPool2d(2, stride=1), False), (nn.MaxPool2d(2, padding=1), False),
                                           (nn.MaxPool2d(2, ceil_mode=True), False)])
def test_the_fused_step_pools_natively_only_side_by_side_windows(module, native):
    op = _MaxPool2d(module, K)
    x = _maps((2, 4, 7, 7), torch.float64)
    y = op.forward(x, True)
    assert op.native is native
    dy = torch.ones_like(y)  # NCHW: the op puts it in the forward's layout first
    dx = op.backward(dy, True, None)
    ref = x.detach().clone().requires_grad_(True)
    module(ref).backward(torch.ones_like(y))
    assert torch.equal(y, module(x)) and torch.equal(dx, ref.grad)


# ---- found by a user trial (session 9): each failed before its fix

def _pool_then_flatten(filters, pool):
    return {"kind": "layers", "input_shape": [2, 6, 6], "num_classes": 3, "layers": [
        {"type": "conv2d", "filters": filters, "padding": "same"}, {"type": "batchnorm"},
        {"type": "activation", "activation": "relu"}, {"type": "maxpool", "pool_size": pool},
        {"type": "flatten"}, {"type": "dense", "units": 3}]}


@pytest.mark.parametrize("filters,pool", [(1, 2), (5, 6)])  # C == 1, or a 1x1 pooled map, then Flatten
def test_pooling_into_flatten_with_size_one_dimensions(filters, pool):
    import copy

    from bnlab.train.engine import AutogradStep
    model = build_model(_pool_then_flatten(filters, pool), seed=0).double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    FusedMLPStep(model)(x, y)  # the gradient reaching the pool is NCHW with size-1 dims: still its layout
    AutogradStep(ref)(x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_bfloat16_subnormals_are_kept_as_aten_keeps_them():
    x = (torch.rand(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e-39).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(K.max_pool_forward(x, 2)[0], torch.nn.functional.max_pool2d(x, 2))
    x = torch.randn(65, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    w, b = torch.full((16,), 1e-39), torch.zeros(16)
    y = K.bn_act_forward(x, w, b, None, None, True, 1e-5, 6, 0.0)[0]
    ref = torch.nn.functional.batch_norm(x.float(), None, None, w, b, True, 0.1, 1e-5).bfloat16()
    assert (y != 0).sum() > 900 and torch.equal(y != 0, ref != 0)  # subnormal outputs, not flushed to 0


def test_an_outlying_first_row_keeps_the_variance_digits():
    g = torch.Generator().manual_seed(0)
    x = 10 + 0.01 * torch.randn(4096, 8, generator=g)
    x[0] = 0.0  # the first row far from the others: sums of x - x[0] in float lost 1e-4 of the variance
    var = K.bn_act_forward(x, None, None, None, None, True, 1e-5, 6, 0.0)[3]
    assert torch.allclose(var.double(), x.double().var(0, unbiased=False), rtol=1e-5)


def test_parameter_and_window_errors_are_clear():
    x = _maps((4, 37), torch.float32)
    with pytest.raises(RuntimeError, match="weight must be float32 or float64"):
        K.bn_act_forward(x, torch.ones(37, dtype=torch.float16), None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="weight must be a contiguous vector of 37 values"):
        K.bn_act_forward(x, torch.ones(74)[::2], None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="empty"):
        K.bn_act_forward(torch.ones(0, 3), None, None, None, None, True, 1e-5, 0, 0.0)
    dy = _maps((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="windows of 1 to 15"):  # was a division by zero (SIGFPE)
        K.max_pool_backward(dy, torch.zeros_like(dy), [2, 3, 8, 8], 0)
