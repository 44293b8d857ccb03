"""Precise BN statistics: replace the moving averages by population statistics computed over the
training data with the weights fixed (Ioffe & Szegedy 2015, Algorithm 2, steps 8-11):

    E[x]   = mean over mini-batches of μ_B
    Var[x] = m/(m-1) · mean over mini-batches of σ²_B      (unbiased, pooled over all batches)

Each BN layer sees what it saw in training: earlier BN layers use their batch statistics, dropout
is off. Mini-batches of the given size m; an incomplete last batch is left out. The input model is
not modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnlab.nn import BatchNorm


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, *, batch_size: int = 32, max_batches: int | None = None,
                generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose BN running statistics are the precise ones."""
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)]
    if not bns:
        raise ValueError("the model has no batch-statistics normalization (batch, renorm, ghost) to recalibrate; "
                         "layer, group and instance norm use each sample's own statistics and have none")
    if batch_size < 2 or len(x) < batch_size:
        raise ValueError(f"need batch_size >= 2 and at least one full batch (got batch_size={batch_size}, "
                         f"{len(x)} examples)")
    new = copy.deepcopy(model)
    new.eval()
    layers = [m for m in new.modules() if isinstance(m, BatchNorm)]
    sums = {id(m): [0.0, 0.0] for m in layers}  # Σ μ_B, Σ σ²_B  (float64 tensors once seen)

    def hook(module, inputs):
        h = inputs[0].double()
        dims = tuple(d for d in range(h.dim()) if d != module.axis % h.dim())
        var, mean = torch.var_mean(h, dim=dims, correction=0)
        acc = sums[id(module)]
        acc[0] = acc[0] + mean
        acc[1] = acc[1] + var

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    for m in layers:  # batch statistics, as in training (the running stats they update are replaced below)
        m.train()
    counters = [m.num_batches_tracked.clone() for m in layers]
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    n_batches = len(x) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    try:
        for b in range(n_batches):
            new(x[order[b * batch_size:(b + 1) * batch_size]])
    finally:
        for h in handles:
            h.remove()
    m_ = batch_size
    for m, nbt in zip(layers, counters):
        mean_sum, var_sum = sums[id(m)]
        m.running_mean.copy_((mean_sum / n_batches).to(m.running_mean.dtype))
        m.running_var.copy_((var_sum / n_batches * m_ / (m_ - 1)).to(m.running_var.dtype))
        m.num_batches_tracked.copy_(nbt)
    new.eval()
    return new
