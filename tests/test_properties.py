"""Property tests (hypothesis) of BN's defining behaviour, for the reference and the layer."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bnlab import reference as ref
from bnlab.nn import BatchNorm

FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@st.composite
def batches(draw, min_n=4):
    n = draw(st.integers(min_n, 24))
    c = draw(st.integers(1, 6))
    x = draw(arrays(np.float64, (n, c), elements=FINITE))
    # exclude (near-)constant channels: BN divides by their spread
    spread = x.std(axis=0)
    scale = np.abs(x).max(axis=0) + 1.0
    from hypothesis import assume
    assume(np.all(spread > 1e-3 * scale))
    return x


@settings(max_examples=60, deadline=None)
@given(batches())
def test_training_output_has_zero_mean_unit_variance(x):
    y, _ = ref.batch_norm_forward(x, None, None, eps=1e-12)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=0), 1.0, rtol=1e-6)
    yt = BatchNorm(x.shape[1], eps=1e-12, dtype=torch.float64)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(yt, y, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches(), st.data())
def test_output_invariant_to_per_channel_positive_scale_and_shift(x, data):
    c = x.shape[1]
    a = np.array(data.draw(st.lists(st.floats(0.1, 10.0), min_size=c, max_size=c)))
    b = np.array(data.draw(st.lists(st.floats(-100, 100), min_size=c, max_size=c)))
    g = np.linspace(0.5, 2.0, c)
    y1, _ = ref.batch_norm_forward(x, g, None, eps=1e-12)
    y2, _ = ref.batch_norm_forward(x * a + b, g, None, eps=1e-12)
    np.testing.assert_allclose(y2, y1, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_keras_momentum_0_makes_eval_equal_last_training_output(x):
    bn = BatchNorm(x.shape[1], convention="keras", momentum=0.0, dtype=torch.float64)
    xt = torch.from_numpy(x)
    bn(xt * 3 + 1)  # an earlier batch, forgotten at momentum 0
    y_train = bn(xt).detach()
    bn.eval()
    np.testing.assert_allclose(bn(xt).detach().numpy(), y_train.numpy(), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_torch_momentum_1_keeps_last_batch_but_with_the_unbiased_variance(x):
    """torch momentum=1 stores the last batch's statistics, but running_var is UNBIASED, so eval
    differs from training by exactly sqrt((σ²+eps) / (σ²·m/(m-1) + eps)): the trap of the table."""
    n, c = x.shape
    eps = 1e-5
    bn = BatchNorm(c, momentum=1.0, eps=eps, dtype=torch.float64)
    xt = torch.from_numpy(x)
    bn(xt * 3 + 1)
    y_train = bn(xt).detach().numpy()
    bn.eval()
    y_eval = bn(xt).detach().numpy()
    var = x.var(axis=0)
    np.testing.assert_allclose(y_eval, y_train * np.sqrt((var + eps) / (var * n / (n - 1) + eps)),
                               rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(batches(), st.integers(-8, 6), st.sampled_from([("torch", 1.0), ("keras", 0.0)]))
def test_factor_1_stores_the_batch_statistics_at_any_scale_in_float32(x, exponent, rule):
    """A factor of exactly 1 replaces the running statistics, however small the variance: the blend
    (1 - f)·old + f·new keeps a 1e-16 variance that old + f·(new - old) would round to 0 against 1."""
    convention, momentum = rule
    n, c = x.shape
    x32 = torch.from_numpy(x * 10.0**exponent).float()
    bn = BatchNorm(c, convention=convention, momentum=momentum)
    bn(x32)
    xd = x32.double().numpy()
    var = xd.var(axis=0, ddof=1 if convention == "torch" else 0)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-3)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), xd.mean(axis=0), rtol=1e-4,
                               atol=1e-4 * np.abs(xd).max())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])  # batches() filters
@given(st.lists(batches(), min_size=1, max_size=4))
def test_momentum_none_is_the_plain_average_of_the_batch_statistics(xs):
    """torch's cumulative average: the initial (0, 1) is forgotten at the first batch."""
    c = min(x.shape[1] for x in xs)
    xs = [x[:, :c] for x in xs]  # batches of different sizes, the same channels
    bn = BatchNorm(xs[0].shape[1], momentum=None, dtype=torch.float64)
    for x in xs:
        bn(torch.from_numpy(x))
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean([x.mean(0) for x in xs], axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean([x.var(0, ddof=1) for x in xs], axis=0), rtol=1e-9)
