"""Functional batch normalization for torch with our own explicit backward.

Pure functions: the mode is the explicit ``training`` argument and running
statistics are passed in and updated in place, as ``torch.nn.functional.batch_norm``
does. The maths is the compact form of ``bnlab.reference`` (see its docstring).

Speed note: on CPU the cost of BN on a large activation is dominated by first-touch
page faults of each freshly allocated output, not by arithmetic. So forward and backward
each allocate exactly one full-size tensor (y, dx) and do every other pass in place.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bnlab.conventions import Convention, check_momentum, get_convention, running_update_factor


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
        mean = x.mean(dims)  # (C,)
        y = torch.sub(x, mean.view(shape))  # the one allocation; holds x - mean for now
        var = torch.linalg.vector_norm(y, 2, dim=dims).square_().div_(m)  # (C,) biased
        inv_std = torch.rsqrt(var + eps)  # eps inside the root
        scale = inv_std if weight is None else inv_std * weight
        y.mul_(scale.view(shape))
        if bias is not None:
            y.add_(bias.view(shape))
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.axis = axis
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, inv_std = ctx.saved_tensors
        _, dims, shape = _layout(x, ctx.axis)
        m = x.numel() // x.shape[ctx.axis]
        sum_dy = dy.sum(dims)  # (C,) = dbeta
        buf = torch.sub(x, mean.view(shape))  # x - mean; becomes dx below (the one allocation)
        sum_dy_xhat = buf.mul_(dy).sum(dims).mul_(inv_std)  # (C,) = dgamma
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = gamma·inv_std/m · (m·dy - Σdy - x_hat·Σ(dy·x_hat)), expanded per channel as
            # dx = k·dy + a·(x - mean) + b  with  k = gamma·inv_std
            k = inv_std if weight is None else inv_std * weight
            a = -k * inv_std * sum_dy_xhat / m
            b = -k * sum_dy / m
            dx = torch.sub(x, mean.view(shape), out=buf)
            dx.mul_(a.view(shape)).add_(b.view(shape)).addcmul_(dy, k.view(shape))
        dweight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


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
    """
    conv, eps, momentum = resolve_defaults(convention, eps, momentum)
    ax, dims, shape = _layout(x, axis)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        inv_std = torch.rsqrt(running_var + eps)
        scale = inv_std if weight is None else inv_std * weight
        shift = -running_mean * scale if bias is None else torch.addcmul(bias, running_mean, scale, value=-1)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    m = x.numel() // x.shape[ax]
    if m < 2:
        raise ValueError(
            f"expected more than 1 value per channel when training (got input shape {tuple(x.shape)}): "
            "use a batch of more than one sample, call model.eval() to use the running statistics, "
            "or use a normalization that does not need a batch (layer or group norm)"
        )
    y, mean, var = BatchNormFunction.apply(x, weight, bias, eps, ax)
    if check_finite and not bool(torch.isfinite(var).all()):
        bad = torch.nonzero(~torch.isfinite(var)).flatten().tolist()
        raise FloatingPointError(
            f"non-finite batch statistics in channel(s) {bad[:10]}{'...' if len(bad) > 10 else ''}: "
            "the input to this BN layer contains NaN or inf (a diverged run? lower the learning rate)"
        )
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count=m,
                             convention=conv, momentum=momentum)
    return y


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         num_batches_tracked: torch.Tensor | None, batch_mean: torch.Tensor,
                         batch_var: torch.Tensor, *, count: int, convention: Convention,
                         momentum: float | None) -> None:
    """In place: count this batch, then blend the batch statistics into the running ones.

    batch_var is the BIASED variance; the torch convention stores it unbiased (·m/(m-1)).
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    n = int(num_batches_tracked) if num_batches_tracked is not None else 1
    f = running_update_factor(convention, momentum, n)
    stored_var = batch_var * (count / (count - 1)) if convention.running_var_unbiased else batch_var
    running_mean.mul_(1.0 - f).add_(batch_mean.to(running_mean.dtype), alpha=f)
    running_var.mul_(1.0 - f).add_(stored_var.to(running_var.dtype), alpha=f)
