"""Central-difference gradient checking for the NumPy reference (float64)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """∂f/∂x by central differences, (f(x+h) - f(x-h)) / 2h, one element at a time."""
    x = np.array(x, dtype=np.float64)  # a copy: perturbed in place below
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f(x)
        x[i] = old - h
        fm = f(x)
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


def relative_error(a, b) -> float:
    """Max-norm relative error ``max|a - b| / max(max|a|, max|b|)``; 0 when both are all zero.

    Scale-aware on purpose: the element-wise ratio |a-b|/|b| explodes on entries that are
    near zero by cancellation (common in BN's dx, whose per-channel sum is exactly 0).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return float(np.abs(a - b).max(initial=0.0)) / scale if scale > 0 else 0.0


def check_batch_norm_gradients(x, gamma, beta, *, eps: float = 1e-5, axis: int = 1,
                               seed: int = 0, backward=None) -> dict[str, float]:
    """Compare an analytic BN backward with central differences of L = Σ dy·y.

    Returns the relative error for dx, dgamma and dbeta. ``backward`` defaults to the
    compact :func:`batch_norm_backward`; pass another (e.g. a wrong one) to test the check.
    """
    from bnlab.reference.batchnorm import batch_norm_backward, batch_norm_forward

    backward = backward or batch_norm_backward
    x = np.asarray(x, np.float64)
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    y, cache = batch_norm_forward(x, gamma, beta, eps=eps, axis=axis)
    dy = np.random.default_rng([seed, 0xD7]).standard_normal(y.shape)  # own stream, never x's
    dx, dgamma, dbeta = backward(dy, cache)

    def loss(xx, gg, bb):
        return float((batch_norm_forward(xx, gg, bb, eps=eps, axis=axis)[0] * dy).sum())

    return {
        "dx": relative_error(dx, numerical_gradient(lambda v: loss(v, gamma, beta), x)),
        "dgamma": relative_error(dgamma, numerical_gradient(lambda v: loss(x, v, beta), gamma)),
        "dbeta": relative_error(dbeta, numerical_gradient(lambda v: loss(x, gamma, v), beta)),
    }


def check_gradients(forward, backward, inputs: dict[str, np.ndarray], *, seed: int = 0) -> dict[str, float]:
    """Generic: ``forward(**inputs) -> (y, cache)``, ``backward(dy, cache) -> grads`` in the order of
    ``inputs``; returns the relative error of each analytic gradient against central differences
    of L = Σ dy·y."""
    inputs = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    y, cache = forward(**inputs)
    dy = np.random.default_rng([seed, 0xD7]).standard_normal(np.shape(y))
    grads = backward(dy, cache)
    errs = {}
    for (name, value), analytic in zip(inputs.items(), grads):
        def loss(v, name=name):
            return float((forward(**{**inputs, name: v})[0] * dy).sum())
        errs[name] = relative_error(analytic, numerical_gradient(loss, value))
    return errs
