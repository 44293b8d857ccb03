"""NumPy references for the other normalizations, each with an explicit backward.

All of LayerNorm, GroupNorm and InstanceNorm normalise each sample over some axes:

    x_hat = (x - mean_A(x)) / sqrt(var_A(x) + eps)        (biased variance over the axes A, m values)
    dx    = 1/(m·sqrt(var + eps)) · (m·dx_hat - Σ_A dx_hat - x_hat·Σ_A dx_hat·x_hat)

  LayerNorm:    A = the last k axes; gamma, beta have the shape of those axes (torch.nn.LayerNorm)
  GroupNorm:    (N, C, *) seen as (N, G, C/G, *), A = every axis after G; gamma, beta per channel
  InstanceNorm: GroupNorm with G = C

Batch Renormalization (Ioffe 2017): in training
    x_hat = (x - μ_B)/σ_B · r + d,  r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((μ_B - μ)/σ, -d_max, d_max)
with σ_B = sqrt(σ²_B + eps), σ = sqrt(running_var + eps), and r, d treated as constants in the
backward pass; r_max = 1, d_max = 0 is exactly batch normalization.

Ghost BN: batch normalization over consecutive virtual batches of a chosen size.

Weight normalization (Salimans & Kingma 2016): w = g · v / ||v||, per output unit (dim 0).
    dg = Σ dw·v / ||v||,   dv = g/||v|| · (dw - (Σ dw·v̂) v̂),   v̂ = v/||v||
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.reference.batchnorm import batch_norm_backward, batch_norm_forward, channel_axis


@dataclass(frozen=True)
class NormCache:
    x_hat: np.ndarray
    inv_std: np.ndarray  # broadcastable to x
    axes: tuple[int, ...]
    m: int


def normalize_forward(x, axes: tuple[int, ...], eps: float):
    """x_hat over ``axes`` (per everything else). Returns (x_hat, cache)."""
    x = np.asarray(x)
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    m = int(np.prod([x.shape[a] for a in axes]))
    return xc * inv, NormCache(xc * inv, inv, axes, m)


def normalize_backward(dx_hat, cache: NormCache):
    s1 = dx_hat.sum(axis=cache.axes, keepdims=True)
    s2 = (dx_hat * cache.x_hat).sum(axis=cache.axes, keepdims=True)
    return cache.inv_std / cache.m * (cache.m * dx_hat - s1 - cache.x_hat * s2)


def layer_norm_forward(x, gamma=None, beta=None, *, eps: float = 1e-5, normalized_ndim: int = 1):
    x = np.asarray(x)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    xh, cache = normalize_forward(x, axes, eps)
    g = np.ones(x.shape[-normalized_ndim:], x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    b = np.zeros_like(g) if beta is None else np.asarray(beta, x.dtype)
    return g * xh + b, (cache, g)


def layer_norm_backward(dy, cache):
    nc, g = cache
    red = tuple(range(dy.ndim - g.ndim))
    return normalize_backward(dy * g, nc), (dy * nc.x_hat).sum(axis=red), dy.sum(axis=red)


def _per_channel(v, ndim):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def group_norm_forward(x, groups: int, gamma=None, beta=None, *, eps: float = 1e-5):
    x = np.asarray(x)
    n, c = x.shape[:2]
    if groups < 1 or c % groups:
        raise ValueError(f"the number of groups must divide the channels (got {groups} groups for {c} channels)")
    xg = x.reshape((n, groups, c // groups) + x.shape[2:])
    xh, nc = normalize_forward(xg, tuple(range(2, xg.ndim)), eps)
    xh = xh.reshape(x.shape)
    g = np.ones(c, x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    b = np.zeros(c, x.dtype) if beta is None else np.asarray(beta, x.dtype)
    return _per_channel(g, x.ndim) * xh + _per_channel(b, x.ndim), (nc, g, x.shape, groups)


def group_norm_backward(dy, cache):
    nc, g, shape, groups = cache
    red = (0,) + tuple(range(2, dy.ndim))
    xh = nc.x_hat.reshape(shape)
    dgamma, dbeta = (dy * xh).sum(axis=red), dy.sum(axis=red)
    dxh = (dy * _per_channel(g, dy.ndim)).reshape(nc.x_hat.shape)
    return normalize_backward(dxh, nc).reshape(shape), dgamma, dbeta


def instance_norm_forward(x, gamma=None, beta=None, *, eps: float = 1e-5):
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"instance norm needs spatial axes: expected (N, C, L) or (N, C, H, W) input "
                         f"(got {x.ndim}D input)")
    return group_norm_forward(x, x.shape[1], gamma, beta, eps=eps)


instance_norm_backward = group_norm_backward


def batch_renorm_forward(x, gamma, beta, running_mean, running_var, *, eps: float, r_max: float, d_max: float,
                         axis: int = 1):
    """Training-mode Batch Renorm. Returns (y, cache) with cache.r, cache.d the clipped corrections."""
    x = np.asarray(x)
    ax = channel_axis(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    mu_b = x.mean(axis=red)
    sigma_b = np.sqrt(x.var(axis=red) + eps)
    sigma = np.sqrt(np.asarray(running_var) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - np.asarray(running_mean)) / sigma, -d_max, d_max)
    _, bn_cache = batch_norm_forward(x, None, None, eps=eps, axis=axis)
    xh = bn_cache.x_hat * r.reshape(shape) + d.reshape(shape)
    g = np.ones(x.shape[ax], x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    b = np.zeros_like(g) if beta is None else np.asarray(beta, x.dtype)
    y = g.reshape(shape) * xh + b.reshape(shape)
    return y, {"bn": bn_cache, "r": r, "d": d, "gamma": g, "x_hat": xh, "shape": shape, "red": red}


def batch_renorm_backward(dy, cache):
    """r and d are constants: dx is BN's backward of dy·gamma·r."""
    shape, red = cache["shape"], cache["red"]
    dgamma = (dy * cache["x_hat"]).sum(axis=red)
    dbeta = dy.sum(axis=red)
    dxh_b = dy * cache["gamma"].reshape(shape) * cache["r"].reshape(shape)
    dx, _, _ = batch_norm_backward(dxh_b, cache["bn"])  # gamma = 1 in that cache
    return dx, dgamma, dbeta


def ghost_batch_norm_forward(x, gamma=None, beta=None, *, eps: float, ghost_size: int, axis: int = 1):
    x = np.asarray(x)
    parts = [batch_norm_forward(x[i:i + ghost_size], gamma, beta, eps=eps, axis=axis)
             for i in range(0, len(x), ghost_size)]
    return np.concatenate([y for y, _ in parts]), [c for _, c in parts]


def ghost_batch_norm_backward(dy, caches):
    out, start = [], 0
    dgamma = dbeta = 0
    for c in caches:
        n = len(c.x)
        dx, dg, db = batch_norm_backward(dy[start:start + n], c)
        out.append(dx)
        dgamma, dbeta = dgamma + dg, dbeta + db
        start += n
    return np.concatenate(out), dgamma, dbeta


def weight_norm_forward(v, g):
    """w = g · v / ||v|| with the norm over every axis but 0; g has shape (out,)."""
    v = np.asarray(v)
    axes = tuple(range(1, v.ndim))
    norm = np.sqrt((v * v).sum(axis=axes, keepdims=True))
    gs = np.asarray(g).reshape((-1,) + (1,) * (v.ndim - 1))
    return gs * v / norm, (v, gs, norm, axes)


def weight_norm_backward(dw, cache):
    v, gs, norm, axes = cache
    vhat = v / norm
    proj = (dw * vhat).sum(axis=axes, keepdims=True)
    dg = proj.reshape(-1)
    dv = gs / norm * (dw - proj * vhat)
    return dv, dg
