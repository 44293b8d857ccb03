"""The NumPy reference: gradient checks, the two backward forms, inference and running stats."""

import numpy as np
import pytest

from bnlab import reference as ref

SHAPES = {
    "NC": ((16, 4), 1),
    "NCL": ((6, 3, 5), 1),
    "NCHW": ((4, 3, 3, 3), 1),
    "NHWC-axis-1": ((4, 3, 3, 2), -1),
}


def _inputs(shape, axis, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    return x, rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)


@pytest.mark.parametrize("shape,axis", SHAPES.values(), ids=SHAPES.keys())
def test_central_difference_gradcheck_float64(shape, axis):
    x, g, b = _inputs(shape, axis)
    errs = ref.check_batch_norm_gradients(x, g, b, eps=1e-5, axis=axis, seed=1)
    assert max(errs.values()) <= 1e-7, errs


def _backward_eps_outside_root(dy, cache):
    """The seed notebooks' slip: eps added outside the square root (sqrt(var) + eps)."""
    from dataclasses import replace
    wrong = replace(cache, var=(np.sqrt(cache.var) + cache.eps) ** 2 - cache.eps)
    return ref.batch_norm_backward(dy, wrong)


def _backward_without_mean_term(dy, cache):
    """A planted bug: forgets that the mean depends on x (drops the -Σdy term)."""
    dx, dgamma, dbeta = ref.batch_norm_backward(dy, cache)
    m = cache.x.size // cache.x.shape[cache.axis]
    shape = [1] * cache.x.ndim
    shape[cache.axis] = -1
    scale = cache.gamma / np.sqrt(cache.var + cache.eps) / m
    return dx + (scale * dbeta).reshape(shape), dgamma, dbeta


def _backward_wrong_dgamma(dy, cache):
    dx, dgamma, dbeta = ref.batch_norm_backward(dy, cache)
    return dx, dgamma * 1.001, dbeta


@pytest.mark.parametrize("wrong", [_backward_eps_outside_root, _backward_without_mean_term,
                                   _backward_wrong_dgamma],
                         ids=["eps-outside-root", "missing-mean-term", "dgamma-off-by-0.1%"])
def test_gradcheck_catches_planted_wrong_gradient(wrong):
    x, g, b = _inputs((8, 3), 1)
    # a large eps makes the eps-placement bug visible in the gradient
    errs = ref.check_batch_norm_gradients(x, g, b, eps=0.5, axis=1, seed=1, backward=wrong)
    assert max(errs.values()) > 1e-4, errs


@pytest.mark.parametrize("shape,axis", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compact_and_staged_backward_agree(shape, axis, dtype):
    x, g, b = _inputs(shape, axis, dtype=dtype)
    y, cache = ref.batch_norm_forward(x, g, b, eps=1e-5, axis=axis)
    assert y.dtype == dtype
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    compact = ref.batch_norm_backward(dy, cache)
    staged = ref.batch_norm_backward_staged(dy, cache)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, s in zip(compact, staged):
        assert a.dtype == dtype
        assert ref.relative_error(a, s) <= tol


def test_forward_normalises_with_biased_variance_and_eps_inside_root():
    x = np.array([[1.0], [2.0], [3.0], [6.0]])
    y, cache = ref.batch_norm_forward(x, None, None, eps=0.25)
    mean, var = 3.0, np.mean((x - 3.0) ** 2)  # biased: 3.5
    np.testing.assert_allclose(cache.var, [var])
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 0.25))


def test_channels_last_equals_transposed_channels_first():
    x, g, b = _inputs((4, 3, 5, 5), 1)
    y_first, _ = ref.batch_norm_forward(x, g, b, eps=1e-3, axis=1)
    y_last, _ = ref.batch_norm_forward(np.moveaxis(x, 1, -1), g, b, eps=1e-3, axis=-1)
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), y_first, rtol=1e-12)


def test_inference_formula_and_single_sample():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4))
    g, b, mu, var = (rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4),
                     rng.random(4) + 0.5)
    y = ref.batch_norm_inference(x, g, b, mu, var, eps=1e-3)
    np.testing.assert_allclose(y, g * (x - mu) / np.sqrt(var + 1e-3) + b, rtol=1e-12)


def test_torch_running_rule_by_hand():
    m, v = np.array([0.0]), np.array([1.0])
    # batch [1, 2, 3, 6]: mean 3, biased var 3.5, unbiased var 14/3
    m, v = ref.update_running_stats(m, v, [3.0], [3.5], count=4, momentum=0.1, convention="torch")
    np.testing.assert_allclose(m, [0.3])
    np.testing.assert_allclose(v, [0.9 * 1.0 + 0.1 * 14 / 3])


def test_torch_cumulative_average_with_momentum_none():
    m, v = np.zeros(1), np.ones(1)
    batches = [([1.0], [2.0]), ([3.0], [4.0]), ([8.0], [0.5])]
    for n, (bm, bv) in enumerate(batches, start=1):
        m, v = ref.update_running_stats(m, v, bm, bv, count=3, momentum=None, convention="torch",
                                        num_batches_tracked=n)
    np.testing.assert_allclose(m, [4.0])  # plain average of 1, 3, 8: the initial 0 is forgotten
    np.testing.assert_allclose(v, [np.mean([2.0, 4.0, 0.5]) * 3 / 2])


def test_keras_running_rule_by_hand():
    m, v = np.array([0.0]), np.array([1.0])
    m, v = ref.update_running_stats(m, v, [3.0], [3.5], count=4, momentum=0.99, convention="keras")
    np.testing.assert_allclose(m, [0.99 * 0.0 + 0.01 * 3.0])
    np.testing.assert_allclose(v, [0.99 * 1.0 + 0.01 * 3.5])  # biased variance stored


@pytest.mark.parametrize("convention,momentum,correction", [("torch", 1.0, 4 / 3), ("keras", 0.0, 1.0)],
                         ids=["torch-momentum-1", "keras-momentum-0"])
def test_factor_1_replaces_the_running_statistics_exactly_in_float32(convention, momentum, correction):
    """(1 - f)·old + f·new at f = 1 keeps a variance of 1e-9 that old + f·(new - old) rounds to 0."""
    one = np.ones(1, np.float32)
    m, v = ref.update_running_stats(one, one, np.float32([2.5]), np.float32([1e-9]), count=4, momentum=momentum,
                                    convention=convention)
    assert m.dtype == v.dtype == np.float32
    np.testing.assert_allclose(v, [1e-9 * correction], rtol=1e-6)
    np.testing.assert_array_equal(m, np.float32([2.5]))


def test_factor_0_keeps_the_running_statistics_exactly():
    for convention, momentum in (("torch", 0.0), ("keras", 1.0)):
        m, v = ref.update_running_stats(np.float32([0.1]), np.float32([0.3]), [7.0], [9.0], count=4,
                                        momentum=momentum, convention=convention)
        np.testing.assert_array_equal(m, np.float32([0.1]))
        np.testing.assert_array_equal(v, np.float32([0.3]))


def test_conv_counts_values_per_channel():
    """A conv BN's count is N·H·W: the reference's unbiased variance over (N, H, W) with m = 2·3·3."""
    x = np.random.default_rng(1).standard_normal((2, 3, 3, 3))
    _, cache = ref.batch_norm_forward(x, eps=1e-5)
    _, v = ref.update_running_stats(np.zeros(3), np.ones(3), cache.mean, cache.var, count=x.size // 3, momentum=1.0)
    np.testing.assert_allclose(v, x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda: ref.batch_norm_forward(np.ones((1, 3)), eps=1e-5), "more than 1 value per channel"),
    (lambda: ref.batch_norm_forward(np.ones(5), eps=1e-5), "got 1D input"),
    (lambda: ref.batch_norm_forward(np.ones((4, 3)), np.ones(2), eps=1e-5), r"gamma must have shape \(3,\)"),
    (lambda: ref.batch_norm_forward(np.ones((4, 3), dtype=int), eps=1e-5), "floating-point"),
    (lambda: ref.update_running_stats([0], [1], [0], [1], count=4, momentum=None, convention="keras"),
     "momentum=None"),
    (lambda: ref.update_running_stats([0], [1], [0], [1], count=4, momentum=0.1, convention="tf"),
     "unknown BN convention 'tf'"),
    (lambda: ref.update_running_stats([0], [1], [0], [1], count=4, momentum=1.5), r"\[0, 1\]"),
], ids=["single-value", "rank-1", "gamma-shape", "int-input", "keras-none", "bad-convention",
        "momentum-range"])
def test_reference_errors_say_what_was_expected(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_reference_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, bnlab.reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
