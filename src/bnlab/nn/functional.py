"""Functional batch normalization for torch with our own explicit backward.

Pure functions: the mode is the explicit ``training`` argument and running
statistics are passed in and updated in place, as ``torch.nn.functional.batch_norm``
does. The maths is the compact form of ``bnlab.reference`` (see its docstring).

Speed note: on CPU the cost of BN on a large activation is dominated by first-touch
page faults of each freshly allocated output, not by arithmetic. So forward and backward
each allocate exactly one full-size tensor (y, dx) and do every other pass in place.

Half precision: for float16/bfloat16 inputs the statistics (mean, variance, the backward's channel
sums) are accumulated in float32, as Keras does; outputs and gradients come back in the input's dtype
and running statistics stay in their own dtype. (In float16 the sum of squares of 256 values of
std 40 already exceeds 65504.)
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bnlab.conventions import Convention, check_momentum, get_convention, running_update

_HALF = (torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BN statistics are accumulated in: float32 for half inputs, else the input's."""
    return torch.float32 if dtype in _HALF else dtype


def _layout(x: torch.Tensor, axis: int) -> tuple[int, tuple[int, ...], list[int]]:
    """Channel axis (non-negative), the reduction dims, and the (1, C, 1, ...) view shape."""
    ax = axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != ax)
    shape = [1] * x.dim()
    shape[ax] = -1
    return ax, dims, shape


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: returns (y, batch_mean, biased_batch_var); only y is differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, axis: int):
        _, dims, shape = _layout(x, axis)
        m = x.numel() // x.shape[axis]
        mean = x.mean(dims, dtype=stats_dtype(x.dtype))  # (C,), float32 for half x
        y = torch.sub(x, mean.view(shape))  # the one allocation (float32 for half x); holds x - mean for now
        # (C,) biased. Not linalg.vector_norm: over several dims it sums float32 squares with a relative
        # error of 2e-4 (measured on a CNN's first BN on MNIST), where sum() sums pairwise (2e-7)
        var = y.square().sum(dims).div_(m)
        inv_std = torch.rsqrt(var + eps)  # eps inside the root
        scale = inv_std if weight is None else inv_std * weight
        y.mul_(scale.view(shape))
        if bias is not None:
            y.add_(bias.view(shape))
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.axis, ctx.bias_dtype = axis, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, inv_std = ctx.saved_tensors
        _, dims, shape = _layout(x, ctx.axis)
        m = x.numel() // x.shape[ctx.axis]
        sum_dy = dy.sum(dims, dtype=mean.dtype)  # (C,) = dbeta, float32 for half x
        buf = torch.sub(x, mean.view(shape))  # x - mean; becomes dx below (the one allocation)
        sum_dy_xhat = buf.mul_(dy).sum(dims).mul_(inv_std)  # (C,) = dgamma
        dx = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(torch.sub(x, mean.view(shape), out=buf), dy, weight, inv_std, sum_dy, sum_dy_xhat, m,
                            shape).to(x.dtype)
        dweight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


def input_grad(xmu: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, inv_std: torch.Tensor,
               sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, m: int, shape: list[int]) -> torch.Tensor:
    """BN's input gradient from the two per-channel sums over the m values that made the statistics:
    dx = gamma·inv_std/m · (m·dy - Σdy - x_hat·Σ(dy·x_hat)), expanded per channel as
    dx = k·dy + a·(x - mean) + b  with  k = gamma·inv_std, a = -k·inv_std·Σ(dy·x_hat)/m, b = -k·Σdy/m.
    ``xmu`` (x - mean) is overwritten with dx. SyncBN passes sums over every process's values."""
    k = inv_std if weight is None else inv_std * weight
    a = -k * inv_std * sum_dy_xhat / m
    b = -k * sum_dy / m
    return xmu.mul_(a.view(shape)).add_(b.view(shape)).addcmul_(dy, k.view(shape))


def resolve_defaults(convention: str | Convention, eps: float | None,
                     momentum: float | None | str) -> tuple[Convention, float, float | None]:
    """Fill eps/momentum from the convention; ``momentum="default"`` means the convention's."""
    conv = convention if isinstance(convention, Convention) else get_convention(convention)
    eps = conv.eps if eps is None else float(eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (got {eps})")
    momentum = conv.momentum if isinstance(momentum, str) and momentum == "default" else momentum
    check_momentum(conv, momentum)
    return conv, eps, momentum


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               training: bool, momentum: float | None | str = "default", eps: float | None = None,
               axis: int = 1, convention: str | Convention = "torch",
               num_batches_tracked: torch.Tensor | None = None,
               check_finite: bool = True) -> torch.Tensor:
    """Batch normalization with an explicit mode, under the torch or keras convention.

    training=True (or no running statistics): normalise with the batch mean and BIASED batch
    variance; if running statistics are given, update them in place:
      torch: running = (1-momentum)·running + momentum·batch, var stored UNBIASED (m/(m-1));
             momentum=None: cumulative average with factor 1/num_batches_tracked.
      keras: running = momentum·running + (1-momentum)·batch, var stored BIASED.
    training=False: y = weight·(x - running_mean)/sqrt(running_var + eps) + bias.
    The output has the input's dtype; for float16/bfloat16 inputs the statistics are float32.
    """
    conv, eps, momentum = resolve_defaults(convention, eps, momentum)
    ax, dims, shape = _layout(x, axis)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        # scale and shift (C,) in float32 or wider: a float16 var + eps, or its rsqrt, loses digits
        wide = torch.promote_types(stats_dtype(x.dtype), running_var.dtype)
        inv_std = torch.rsqrt(running_var.to(wide) + eps)
        scale = inv_std if weight is None else inv_std * weight
        shift = -running_mean * scale if bias is None else torch.addcmul(bias, running_mean, scale, value=-1)
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)

    m = x.numel() // x.shape[ax]
    if m < 2:
        raise ValueError(
            f"expected more than 1 value per channel when training (got input shape {tuple(x.shape)}): "
            "use a batch of more than one sample, call model.eval() to use the running statistics, "
            "or use a normalization that does not need a batch (layer or group norm)"
        )
    y, mean, var = BatchNormFunction.apply(x, weight, bias, eps, ax)
    if check_finite and not bool(torch.isfinite(var).all()):
        raise nonfinite_error(x, var, ax)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count=m,
                             convention=conv, momentum=momentum)
    return y


def nonfinite_error(x: torch.Tensor, batch_var: torch.Tensor, axis: int) -> FloatingPointError:
    """Why a batch variance is NaN/inf: the input holds NaN/inf, or finite input overflowed the
    dtype the statistics were computed in. Called only once the statistics are known to be bad."""
    _, dims, _ = _layout(x, axis)
    bad = torch.nonzero(~torch.isfinite(batch_var)).flatten().tolist()
    where = f"non-finite batch statistics in channel(s) {bad[:10]}{'...' if len(bad) > 10 else ''}"
    bad_in = torch.nonzero(~torch.isfinite(x).all(dim=dims)).flatten().tolist()
    if bad_in:
        return FloatingPointError(
            f"{where}: the input to this BN layer contains NaN or inf in channel(s) "
            f"{bad_in[:10]}{'...' if len(bad_in) > 10 else ''} (a diverged run? lower the learning rate)")
    dt = batch_var.dtype
    wider = {torch.float16: "float32 or bfloat16", torch.bfloat16: "float32",
             torch.float32: "float64"}.get(dt)
    fix = f"compute in {wider} or scale the input down" if wider else "scale the input down"
    return FloatingPointError(
        f"{where}: the input is finite (largest |x| = {float(x.detach().abs().amax()):.3g}) but its variance "
        f"overflowed {str(dt).removeprefix('torch.')} (largest finite value {torch.finfo(dt).max:.3g}): {fix}")


@torch.no_grad()
def _blend_(running: torch.Tensor, batch: torch.Tensor, f: float) -> None:
    """running = (1 - f)·running + f·batch in place (exact at f = 0 and 1, unlike running + f·(batch -
    running)), computed in the wider dtype of the two; the buffer keeps its dtype."""
    if batch.dtype == running.dtype:
        running.mul_(1.0 - f).add_(batch, alpha=f)
    else:
        wide = torch.promote_types(running.dtype, batch.dtype)
        running.copy_(running.to(wide).mul_(1.0 - f).add_(batch.to(wide), alpha=f))


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         num_batches_tracked: torch.Tensor | None, batch_mean: torch.Tensor,
                         batch_var: torch.Tensor, *, count: int, convention: Convention,
                         momentum: float | None) -> None:
    """In place: count this batch, then blend the batch statistics into the running ones with
    ``bnlab.conventions.running_update`` (factor, and m/(m-1) where the convention stores the
    unbiased variance). batch_var is the BIASED variance; count is the values per channel
    (N·H·W for (N, C, H, W))."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    n = int(num_batches_tracked) if momentum is None and num_batches_tracked is not None else 1
    u = running_update(convention, momentum, n, count)
    _blend_(running_mean, batch_mean, u.factor)
    _blend_(running_var, batch_var * u.var_correction if u.var_correction != 1.0 else batch_var, u.factor)
