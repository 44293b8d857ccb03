"""Synchronized batch normalization that works on CPU (gloo) as well as CUDA (nccl).

torch's ``nn.SyncBatchNorm`` refuses CPU tensors, so synchronized BN could not be studied or tested
without GPUs. Here the maths is written once, with explicit collectives:

Forward (training, inside an initialised process group of P ranks): each rank r computes over its
local values (N_r·H·W per channel) the count n_r, mean μ_r and M2_r = Σ(x - μ_r)²; one all-gather
brings every rank's (n_r, μ_r, M2_r) and each rank merges them exactly (Chan et al.):

    n = Σ n_r,   μ = Σ n_r·μ_r / n,   M2 = Σ M2_r + Σ n_r·(μ_r - μ)²,   σ² = M2 / n  (biased)

so ranks with different batch sizes (even an empty one) are weighted correctly, and summing squares
of large values never cancels. y = γ·(x - μ)/sqrt(σ² + eps) + β with these global statistics, and the
running statistics are updated with the global count n (``update_running_stats``: torch stores
n/(n-1)·σ², Keras σ²), identically on every rank.

Backward: the only cross-rank quantities are the two per-channel sums Σdy and Σdy·(x - μ); one
all-reduce (both in one tensor) makes them global, and ``bnlab.nn.functional.input_grad`` (BN's own
backward) turns them into dx with the global count n. dγ = Σ_local dy·x̂ and dβ = Σ_local dy stay LOCAL:
DistributedDataParallel reduces parameter gradients itself (as torch's SyncBatchNorm does).

Outside a process group (or with one rank) and in eval mode it is exactly ``BatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from bnlab.nn.batchnorm import BatchNorm
from bnlab.nn.functional import _layout, input_grad, nonfinite_error, stats_dtype, update_running_stats
from bnlab.conventions import get_convention


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact merge of per-part (count, mean, M2): counts (P,), means and m2s (P, C) -> (n, mean, M2)
    with n a 0-dim tensor. Parts with count 0 contribute nothing."""
    n = counts.sum()
    w = (counts / n.clamp_min(1)).unsqueeze(1)  # (P, 1)
    mean = (w * means).sum(0)  # (C,)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return n, mean, m2


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized BN: returns (y, global_mean, global_biased_var, global_count)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, axis: int, group):
        _, dims, shape = _layout(x, axis)
        sd = stats_dtype(x.dtype)
        c = x.shape[axis]
        n_local = x.numel() // c
        if n_local:
            mean_local = x.mean(dims, dtype=sd)
            m2_local = (x.to(sd) - mean_local.view(shape)).square_().sum(dims)  # pairwise sums (as functional.py)
        else:  # an empty rank: nothing to say about the statistics
            mean_local = torch.zeros(c, dtype=sd, device=x.device)
            m2_local = torch.zeros(c, dtype=sd, device=x.device)
        mine = torch.cat([torch.tensor([float(n_local)], dtype=sd, device=x.device), mean_local, m2_local])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        allp = torch.stack(parts)  # (P, 1 + 2C)
        n, mean, m2 = merge_moments(allp[:, 0], allp[:, 1:1 + c], allp[:, 1 + c:])
        count = int(n.item())
        if count < 2:
            raise ValueError(f"expected more than 1 value per channel across all ranks when training "
                             f"(got {count}; this rank's input shape {tuple(x.shape)})")
        var = m2 / count
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if weight is None else inv_std * weight
        y = torch.sub(x, mean.view(shape)).mul_(scale.view(shape))
        if bias is not None:
            y.add_(bias.view(shape))
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.axis, ctx.group, ctx.count = axis, group, count
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, mean, inv_std = ctx.saved_tensors
        _, dims, shape = _layout(x, ctx.axis)
        xmu = torch.sub(x, mean.view(shape))  # (x - μ) in the statistics dtype
        sum_dy = dy.sum(dims, dtype=mean.dtype)  # (C,) local
        sum_dy_xmu = (xmu * dy).sum(dims)  # (C,) local
        dweight = (sum_dy_xmu * inv_std).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        sums = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums, group=ctx.group)  # the two sums over every rank's values (on every rank: a collective)
        g_dy, g_dy_xmu = sums.chunk(2)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(xmu, dy, weight, inv_std, g_dy, g_dy_xmu * inv_std, ctx.count, shape).to(x.dtype)
        return dx, dweight, dbias, None, None, None


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose training statistics are those of the whole global batch across the ranks of
    ``process_group`` (default: the world), on CPU and CUDA alike. See the module docstring for the
    merge and the backward. Every rank must call forward in training mode the same number of times
    (a collective per call), as with torch's SyncBatchNorm."""

    def __init__(self, num_features: int, *, process_group=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        if not use_batch or _group_size(self.process_group) == 1:
            return super().forward(x)
        self._check_input(x)
        ax = self.axis % x.dim()
        y, mean, var, count = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, ax, self.process_group)
        if self.check_finite and not bool(torch.isfinite(var).all()):
            raise nonfinite_error(x, var, ax)
        if self.training and self.running_mean is not None:
            update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked, mean, var,
                                 count=count, convention=get_convention(self.convention), momentum=self.momentum)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synchronized"
