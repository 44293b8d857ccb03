"""LayerNorm, GroupNorm, InstanceNorm, Batch Renorm, Ghost BN and Weight Normalization as torch modules.

The per-sample normalizations share ``NormalizeFunction`` (explicit compact backward, as in
``bnlab.reference.norms``); Batch Renorm builds on it with r, d treated as constants, as the paper
prescribes; Ghost BN runs bnlab's BN functional per virtual batch. Batch Renorm and Ghost BN are
``BatchNorm`` subclasses: in eval mode they ARE batch normalization with running statistics, so
folding and precise statistics apply to them unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from bnlab.nn.batchnorm import BatchNorm
from bnlab.conventions import get_convention
from bnlab.nn.functional import batch_norm, nonfinite_error, stats_dtype, update_running_stats


class NormalizeFunction(torch.autograd.Function):
    """x_hat = (x - mean) / sqrt(var + eps) over ``dims`` (biased variance), explicit backward:
    dx = inv/m · (m·dx_hat - Σ dx_hat - x_hat·Σ dx_hat·x_hat).
    float16/bfloat16 inputs are computed in float32 (their sums of squares overflow float16) and
    returned in their own dtype."""

    @staticmethod
    def forward(ctx, x, dims: tuple[int, ...], eps: float):
        xs = x.to(stats_dtype(x.dtype))
        var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
        inv = torch.rsqrt(var + eps)
        xh = (xs - mean) * inv
        ctx.save_for_backward(xh, inv)
        ctx.dims, ctx.dtype = dims, x.dtype
        return xh.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dxh):
        xh, inv = ctx.saved_tensors
        dxh = dxh.to(xh.dtype)
        m = math.prod(xh.shape[d] for d in ctx.dims)
        s1 = dxh.sum(ctx.dims, keepdim=True)
        s2 = (dxh * xh).sum(ctx.dims, keepdim=True)
        return (inv / m * (m * dxh - s1 - xh * s2)).to(ctx.dtype), None, None


def normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    return NormalizeFunction.apply(x, tuple(d % x.dim() for d in dims), eps)


class LayerNorm(nn.Module):
    """Normalises each sample over its last ``len(normalized_shape)`` axes; elementwise affine of
    that shape. Matches ``torch.nn.LayerNorm`` (and its state-dict keys)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, *, dtype=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, dtype=dtype)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, dtype=dtype)) if elementwise_affine else None

    def forward(self, x):
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"expected input ending in shape {self.normalized_shape} (got {tuple(x.shape)})")
        y = normalize(x, tuple(range(-k, 0)), self.eps)
        return y if self.weight is None else torch.addcmul(self.bias, y, self.weight)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class GroupNorm(nn.Module):
    """Normalises each sample over groups of ``num_channels / num_groups`` channels (and all spatial
    positions); per-channel affine. Matches ``torch.nn.GroupNorm``. LayerNorm-like with 1 group,
    InstanceNorm-like with one group per channel."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *, dtype=None):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"the number of groups must divide the channels (got {num_groups} groups for "
                             f"{num_channels} channels)")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, dtype=dtype)) if affine else None

    def forward(self, x):
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}, ...) input (got {tuple(x.shape)})")
        n = x.shape[0]
        xg = x.reshape(n, self.num_groups, -1)
        y = normalize(xg, (2,), self.eps).reshape(x.shape)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class InstanceNorm(GroupNorm):
    """Normalises each sample and channel over its spatial positions (GroupNorm with one group per
    channel). Matches ``torch.nn.InstanceNorm1d/2d`` with affine=True, track_running_stats=False."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, *, dtype=None):
        super().__init__(num_features, num_features, eps, affine, dtype=dtype)

    def forward(self, x):
        if x.dim() < 3:
            raise ValueError(f"instance norm needs spatial axes: expected (N, C, L) or (N, C, H, W) input "
                             f"(got {x.dim()}D input); use layer or batch norm for (N, C) features")
        return super().forward(x)


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017). Training: x_hat = (x - μ_B)/σ_B · r + d with
    r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B - μ)/σ, -d_max, d_max) held constant in the backward
    pass, σ = sqrt(running_var + eps). r_max and d_max grow linearly from 1 and 0 over ``warmup_steps``
    (the paper's schedule shape), or over ``warmup_fraction`` of the run's planned updates, which
    ``plan_updates`` sets (bnlab's fit calls it: ``plan_run_length``), so a warm-up keeps its share of a run
    whatever the batch size and run length. With r_max = 1, d_max = 0 it is exactly ``BatchNorm``.
    Running statistics follow the layer's convention, as in BatchNorm; eval mode is BatchNorm's."""

    def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0,
                 warmup_fraction: float | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"expected r_max >= 1 and d_max >= 0 (got r_max={r_max}, d_max={d_max})")
        if not self.track_running_stats:
            raise ValueError("batch renorm corrects toward the running statistics: track_running_stats must be True")
        if warmup_fraction is not None and not 0 < warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in (0, 1] (got {warmup_fraction})")
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps
        self.warmup_fraction, self.planned = warmup_fraction, False

    def plan_updates(self, total: int) -> None:
        """The run will make ``total`` updates: a ``warmup_fraction`` becomes its share of them."""
        if self.warmup_fraction is not None:
            self.warmup_steps, self.planned = max(1, round(self.warmup_fraction * total)), True

    def limits(self) -> tuple[float, float]:
        if self.warmup_fraction is not None and not self.planned:
            raise RuntimeError("this batch renorm's warm-up is a fraction of the run (warmup_fraction="
                               f"{self.warmup_fraction}): call plan_run_length(model, total_updates) before "
                               "training (bnlab's fit does), or give warmup_steps instead")
        t = 1.0 if self.warmup_steps <= 0 else min(1.0, int(self.num_batches_tracked) / self.warmup_steps)
        return 1.0 + (self.r_max - 1.0) * t, self.d_max * t

    def forward(self, x):
        self._check_input(x)
        if not self.training:
            return super().forward(x)
        ax = self.axis % x.dim()
        dims = tuple(d for d in range(x.dim()) if d != ax)
        m = x.numel() // x.shape[ax]
        if m < 2:
            return super().forward(x)  # the layer's clear error
        shape = [1] * x.dim()
        shape[ax] = -1
        r_max, d_max = self.limits()
        with torch.no_grad():  # statistics, r and d in float32 or wider (half inputs overflow)
            var_b, mu_b = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=dims, correction=0)
            if self.check_finite and not bool(torch.isfinite(var_b).all()):
                raise nonfinite_error(x, var_b, ax)
            sigma = torch.sqrt(self.running_var.to(var_b.dtype) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mu_b - self.running_mean) / sigma).clamp(-d_max, d_max)
        xh = normalize(x, dims, self.eps) * r.view(shape).to(x.dtype) + d.view(shape).to(x.dtype)
        update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked, mu_b, var_b,
                             count=m, convention=get_convention(self.convention), momentum=self.momentum)
        if self.weight is not None:
            xh = xh * self.weight.view(shape)
        return xh + self.bias.view(shape) if self.bias is not None else xh

    def extra_repr(self):
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"


def plan_run_length(model: nn.Module, total: int) -> None:
    """Tell the layers whose training depends on the run's length (batch renorm's warm-up fraction) that the
    run makes ``total`` updates."""
    for m in model.modules():
        if isinstance(m, BatchRenorm):
            m.plan_updates(total)


class GhostBatchNorm(BatchNorm):
    """Ghost BN (Hoffer et al. 2017): in training, batch statistics over consecutive virtual batches
    of ``ghost_size`` samples, each updating the running statistics; eval mode is BatchNorm's.
    With ghost_size >= the batch size it is exactly ``BatchNorm``."""

    def __init__(self, num_features: int, *, ghost_size: int = 32, **kwargs):
        super().__init__(num_features, **kwargs)
        if ghost_size < 2:
            raise ValueError(f"ghost_size must be >= 2 (got {ghost_size})")
        self.ghost_size = ghost_size

    def forward(self, x):
        self._check_input(x)
        if not self.training or x.shape[0] <= self.ghost_size:
            return super().forward(x)
        n, s = x.shape[0], self.ghost_size
        bounds = list(range(0, n, s)) + [n]
        if bounds[-1] - bounds[-2] < 2:  # a last ghost batch of one sample joins the previous one
            del bounds[-2]
        return torch.cat([
            batch_norm(x[a:b], self.running_mean, self.running_var, self.weight, self.bias, training=True,
                       momentum=self.momentum, eps=self.eps, axis=self.axis, convention=self.convention,
                       num_batches_tracked=self.num_batches_tracked, check_finite=self.check_finite)
            for a, b in zip(bounds[:-1], bounds[1:])])

    def extra_repr(self):
        return super().extra_repr() + f", ghost_size={self.ghost_size}"


class WeightNormFunction(torch.autograd.Function):
    """w = g · v / ||v|| (norm over every axis but 0), explicit backward."""

    @staticmethod
    def forward(ctx, v, g):
        dims = tuple(range(1, v.dim()))
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        gs = g.view((-1,) + (1,) * (v.dim() - 1))
        ctx.save_for_backward(v, gs, norm)
        return gs * v / norm

    @staticmethod
    @once_differentiable
    def backward(ctx, dw):
        v, gs, norm = ctx.saved_tensors
        dims = tuple(range(1, v.dim()))
        vhat = v / norm
        proj = (dw * vhat).sum(dims, keepdim=True)
        return gs / norm * (dw - proj * vhat), proj.reshape(-1)


class WeightNorm(nn.Module):
    """Wraps a Linear or Conv2d: its weight becomes g · v / ||v|| per output unit, with parameters
    ``weight_g`` (out,) and ``weight_v`` (the weight's shape); matches
    ``torch.nn.utils.parametrizations.weight_norm`` (original0 = g, original1 = v)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"weight norm wraps Linear or Conv2d layers (got {type(layer).__name__})")
        w = layer.weight.detach()
        self.layer = layer
        self.weight_v = nn.Parameter(w.clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1))
        del layer.weight  # the wrapped layer's weight is derived from g and v at each call

    @property
    def weight(self) -> torch.Tensor:
        return WeightNormFunction.apply(self.weight_v, self.weight_g)

    def forward(self, x):
        w = self.weight
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)

    def extra_repr(self):
        return f"{type(self.layer).__name__}"
