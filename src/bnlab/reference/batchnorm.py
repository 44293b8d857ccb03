"""NumPy reference for batch normalization, with explicit backward passes.

Training-mode forward over a batch, per channel c (statistics over every axis
except the channel axis; m = number of values per channel):

    mu_c      = 1/m · Σ x                       # batch mean
    var_c     = 1/m · Σ (x - mu_c)²             # BIASED batch variance (squared!)
    x_hat     = (x - mu_c) / sqrt(var_c + eps)  # eps INSIDE the square root
    y         = gamma_c · x_hat + beta_c

Backward (compact closed form, Ioffe & Szegedy 2015 simplified):

    dbeta  = Σ dy
    dgamma = Σ dy · x_hat
    dx     = gamma / (m · sqrt(var + eps)) · (m·dy - Σ dy - x_hat · Σ dy·x_hat)

Works in the input's floating dtype (float32 or float64); no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.conventions import check_momentum, get_convention, running_update


@dataclass(frozen=True)
class BatchNormCache:
    """What the backward passes need from the forward pass."""

    x: np.ndarray  # input, any shape with the channel axis at `axis`
    x_hat: np.ndarray  # normalised input, same shape as x
    mean: np.ndarray  # (C,) batch mean
    var: np.ndarray  # (C,) biased batch variance
    gamma: np.ndarray  # (C,) scale used (ones when there was none)
    eps: float
    axis: int  # non-negative channel axis


def channel_axis(ndim: int, axis: int) -> int:
    """Normalise a possibly negative channel axis and check it exists."""
    if ndim < 2:
        raise ValueError(f"expected an input with a batch axis and a channel axis (got {ndim}D input)")
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a {ndim}D input")
    return axis % ndim


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """(C,) -> broadcastable shape, e.g. (1, C, 1, 1) for NCHW or (1, 1, 1, C) for NHWC."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _params(x: np.ndarray, gamma, beta, axis: int) -> tuple[np.ndarray, np.ndarray]:
    c = x.shape[axis]
    gamma = np.ones(c, x.dtype) if gamma is None else np.asarray(gamma, dtype=x.dtype)
    beta = np.zeros(c, x.dtype) if beta is None else np.asarray(beta, dtype=x.dtype)
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},) for {c} channels (got {p.shape})")
    return gamma, beta


def batch_norm_forward(x, gamma=None, beta=None, *, eps: float, axis: int = 1):
    """Training-mode BN forward. Returns ``(y, cache)``.

    x: (N, C), (N, C, L), (N, C, H, W), or channels-last with ``axis=-1``.
    gamma, beta: (C,) or None (None = 1 and 0, i.e. no affine transform).
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected a floating-point input (got dtype {x.dtype})")
    ax = channel_axis(x.ndim, axis)
    gamma, beta = _params(x, gamma, beta, ax)
    red = _reduce_axes(x.ndim, ax)
    m = x.size // x.shape[ax]
    if m < 2:
        raise ValueError(
            f"expected more than 1 value per channel in training mode (got input shape {x.shape})"
        )
    mean = x.mean(axis=red)  # (C,)
    xc = x - _per_channel(mean, x.ndim, ax)
    var = (xc * xc).mean(axis=red)  # (C,) biased: divide by m, not m-1
    inv_std = 1.0 / np.sqrt(var + eps)  # eps inside the root
    x_hat = xc * _per_channel(inv_std, x.ndim, ax)
    y = _per_channel(gamma, x.ndim, ax) * x_hat + _per_channel(beta, x.ndim, ax)
    return y, BatchNormCache(x=x, x_hat=x_hat, mean=mean, var=var, gamma=gamma, eps=eps, axis=ax)


def batch_norm_backward(dy, cache: BatchNormCache):
    """Compact closed-form backward. Returns ``(dx, dgamma, dbeta)``."""
    dy = np.asarray(dy, dtype=cache.x.dtype)
    ax, nd = cache.axis, cache.x.ndim
    red = _reduce_axes(nd, ax)
    m = cache.x.size // cache.x.shape[ax]
    dbeta = dy.sum(axis=red)  # (C,)
    dgamma = (dy * cache.x_hat).sum(axis=red)  # (C,)
    scale = cache.gamma / np.sqrt(cache.var + cache.eps) / m  # (C,)
    dx = _per_channel(scale, nd, ax) * (
        m * dy - _per_channel(dbeta, nd, ax) - cache.x_hat * _per_channel(dgamma, nd, ax)
    )
    return dx, dgamma, dbeta


def batch_norm_backward_staged(dy, cache: BatchNormCache):
    """Step-by-step backward through the computation graph (the form of seed notebook 004).

    Graph: xc = x - mu; var = mean(xc²); x_hat = xc·(var+eps)^-1/2; y = gamma·x_hat + beta.
    Each line is one local chain-rule step; the result equals :func:`batch_norm_backward`.
    """
    dy = np.asarray(dy, dtype=cache.x.dtype)
    ax, nd = cache.axis, cache.x.ndim
    red = _reduce_axes(nd, ax)
    m = cache.x.size // cache.x.shape[ax]
    pc = lambda v: _per_channel(v, nd, ax)  # noqa: E731 - local shorthand for broadcasting
    xc = cache.x - pc(cache.mean)
    var_eps = cache.var + cache.eps

    dbeta = dy.sum(axis=red)
    dgamma = (dy * cache.x_hat).sum(axis=red)
    dx_hat = dy * pc(cache.gamma)
    # x_hat = xc · var_eps^(-1/2):  d(var) = Σ dx_hat · xc · (-1/2) · var_eps^(-3/2)
    dvar = (dx_hat * xc).sum(axis=red) * -0.5 * var_eps**-1.5
    # mu enters through xc directly and through var; d(var)/d(mu) = mean(-2·xc) = 0 in exact
    # arithmetic, kept here so the graph is complete
    dmean = (-dx_hat / pc(np.sqrt(var_eps))).sum(axis=red) + dvar * (-2.0 * xc).mean(axis=red)
    dx = dx_hat / pc(np.sqrt(var_eps)) + pc(dvar) * 2.0 * xc / m + pc(dmean) / m
    return dx, dgamma, dbeta


def batch_norm_inference(x, gamma, beta, running_mean, running_var, *, eps: float, axis: int = 1):
    """Eval-mode BN with stored population statistics:

        y = gamma · (x - running_mean) / sqrt(running_var + eps) + beta

    Works on any batch size, a single sample included.
    """
    x = np.asarray(x)
    ax = channel_axis(x.ndim, axis)
    gamma, beta = _params(x, gamma, beta, ax)
    mean = np.asarray(running_mean, dtype=x.dtype)
    var = np.asarray(running_var, dtype=x.dtype)
    pc = lambda v: _per_channel(v, x.ndim, ax)  # noqa: E731
    return pc(gamma) * (x - pc(mean)) / np.sqrt(pc(var) + eps) + pc(beta)


def update_running_stats(running_mean, running_var, batch_mean, batch_var, *, count: int,
                         momentum: float | None, convention: str = "torch",
                         num_batches_tracked: int = 1):
    """One running-statistics update after a training batch. Returns ``(new_mean, new_var)``.

    batch_var is the BIASED batch variance (what the forward normalised with); count is m,
    the number of values per channel in the batch (N for (N, C), N·H·W for (N, C, H, W)).
    Factor and variance correction come from ``bnlab.conventions.running_update``:

    torch:  new = (1 - momentum)·old + momentum·batch, storing var·m/(m-1) (unbiased);
            momentum=None: cumulative average, factor 1/num_batches_tracked (counting this batch).
    keras:  new = momentum·old + (1 - momentum)·batch, storing the biased var.
    """
    conv = get_convention(convention)
    check_momentum(conv, momentum)
    u = running_update(conv, momentum, num_batches_tracked, count)  # the one rule (bnlab.conventions)
    f = u.factor
    batch_var = np.asarray(batch_var) * u.var_correction
    # (1 - f)·old + f·new: exact at f = 0 and f = 1
    new_mean = (1.0 - f) * np.asarray(running_mean) + f * np.asarray(batch_mean)
    new_var = (1.0 - f) * np.asarray(running_var) + f * batch_var
    return new_mean, new_var
