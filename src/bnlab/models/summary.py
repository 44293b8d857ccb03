"""A Keras-style model summary: layer, output shape, parameter count, and the three totals.

Counting follows Keras: trainable = parameters that require grad; non-trainable = frozen
parameters plus the running statistics (a BN layer over C channels: 2C trainable gamma/beta and
2C non-trainable moving mean/variance). torch's ``num_batches_tracked`` step counter has no Keras
counterpart and is not a parameter, so it is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def summarize(model: nn.Module, input_shape: tuple[int, ...], name: str = "model") -> Summary:
    """Summary of the top-level children of ``model`` (any nn.Module; a ResNet's stages are one row
    each, their layers counted in it) for one sample of ``input_shape``. A child called several times
    shows the output shape of its last call. Parameters held directly by ``model`` (not by a child)
    count in the totals."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [child.register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
        for n, child in model.named_children()]
    was_training = model.training
    try:
        model.eval()  # a batch of 2 in eval mode: BN uses running stats, nothing is updated
        with torch.no_grad():
            p = next(model.parameters(), None)
            model(torch.zeros((2, *input_shape), dtype=p.dtype if p is not None else torch.float32))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows = []
    for n, child in model.named_children():
        tr, ntr = _counts(child)
        rows.append(LayerRow(n, type(child).__name__, shapes.get(n, ()), tr + ntr, tr))
    tr, ntr = _counts(model)
    return Summary(name, rows, tr + ntr, tr, ntr)
