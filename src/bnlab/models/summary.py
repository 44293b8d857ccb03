"""A Keras-style model summary: layer, output shape, parameter count, and the three totals.

Counting follows Keras: trainable = parameters that require grad; non-trainable = frozen
parameters plus the running statistics (a BN layer over C channels: 2C trainable gamma/beta and
2C non-trainable moving mean/variance). torch's ``num_batches_tracked`` step counter has no Keras
counterpart and is not a parameter, so it is not counted.

Output shapes come from a forward pass on torch's ``meta`` device: a copy of the model whose parameters
and buffers have shapes but no memory, fed a meta input, so no activation is ever allocated (a declared
(4096, 4096, 1) input costs nothing). Only a model whose forward cannot run on meta (code that reads
values, e.g. a factory model) gets a real forward of zeros, and only where the estimated activation bytes
stay within ``MAX_SUMMARY_ACTIVATION_BYTES``; beyond it ``summarize`` refuses with a ValueError naming
the estimate.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

MAX_SUMMARY_ACTIVATION_BYTES = 1024**3  # the real forward's estimated largest activation (meta fallback only)


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    trainable: int


@dataclass(frozen=True)
class Summary:
    name: str
    rows: list[LayerRow]
    total: int
    trainable: int
    non_trainable: int

    def to_text(self) -> str:
        w = (38, 24, 12)
        line = "_" * sum(w)
        out = [f'Model: "{self.name}"', line,
               f"{'Layer (type)':<{w[0]}}{'Output Shape':<{w[1]}}{'Param #':>{w[2]}}", "=" * sum(w)]
        for r in self.rows:
            shape = "(None, " + ", ".join(str(s) for s in r.output_shape) + ")"
            out.append(f"{r.name + ' (' + r.type + ')':<{w[0]}}{shape:<{w[1]}}{r.params:>{w[2]},}")
        out += ["=" * sum(w), f"Total params: {self.total:,}", f"Trainable params: {self.trainable:,}",
                f"Non-trainable params: {self.non_trainable:,}", line]
        return "\n".join(out)


def _counts(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    stats = sum(b.numel() for n, b in module.named_buffers() if b.is_floating_point())
    return trainable, frozen + stats


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on ``meta`` (no data is copied)."""
    memo: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            memo[id(t)] = (nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else t.detach().to("meta"))
    return copy.deepcopy(model, memo)


def _activation_estimate(model: nn.Module, input_shape: tuple[int, ...], itemsize: int, batch: int) -> int:
    """Bytes of the largest activation a real forward may make, overestimated: the input's positions
    (its size over its smallest axis, the channels) times the widest layer of the model."""
    size = math.prod(input_shape)
    positions = size // max(1, min(input_shape)) if len(input_shape) > 1 else 1
    width = max([getattr(m, a) for m in model.modules() for a in ("out_channels", "out_features", "num_features")
                 if isinstance(getattr(m, a, None), int)], default=1)
    return batch * itemsize * max(size, positions * width)


def summarize(model: nn.Module, input_shape: tuple[int, ...], name: str = "model") -> Summary:
    """Summary of the top-level children of ``model`` (any nn.Module; a ResNet's stages are one row
    each, their layers counted in it) for one sample of ``input_shape``. A child called several times
    shows the output shape of its last call. Parameters held directly by ``model`` (not by a child)
    count in the totals. The shapes come from a forward pass on the meta device (no activation memory);
    see the module docstring for the bounded real forward that is the fallback."""
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    shapes: dict[str, tuple[int, ...]] = {}

    def run(net: nn.Module, device: str | None) -> None:
        shapes.clear()
        hooks = [child.register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
            for n, child in net.named_children()]
        was_training = net.training
        try:
            net.eval()  # a batch of 2 in eval mode: BN uses running stats, nothing is updated
            with torch.no_grad():
                net(torch.zeros((2, *input_shape), dtype=dtype, device=device))
        finally:
            net.train(was_training)
            for h in hooks:
                h.remove()

    try:
        run(_meta_copy(model), "meta")
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, IndexError):
        estimate = _activation_estimate(model, tuple(input_shape), dtype.itemsize, 2)
        if estimate > MAX_SUMMARY_ACTIVATION_BYTES:
            raise ValueError(
                f"{name}: the summary's forward pass at input shape {tuple(input_shape)} would allocate activations "
                f"of about {estimate:,} bytes, more than the {MAX_SUMMARY_ACTIVATION_BYTES:,} "
                "(bnlab.models.summary.MAX_SUMMARY_ACTIVATION_BYTES) a summary may (the model cannot run on the "
                "meta device, which needs none)") from None
        run(model, None)
    rows = []
    for n, child in model.named_children():
        tr, ntr = _counts(child)
        rows.append(LayerRow(n, type(child).__name__, shapes.get(n, ()), tr + ntr, tr))
    tr, ntr = _counts(model)
    return Summary(name, rows, tr + ntr, tr, ntr)
