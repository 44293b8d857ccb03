"""Fold BN into the neighbouring Linear / Conv for inference (eval mode only).

With s = γ / sqrt(running_var + eps) and t = β - running_mean·s, an eval-mode BN is y = s·x + t:

* BN after a Linear/Conv (x = W·h + b):  W' = s·W (per output unit),  b' = s·(b - mean) + β;
* BN before a Linear (the input BN, BN after an activation feeding the next Dense):
  W' = W·diag(s),  b' = b + W·t;
* BN before an unpadded Conv: W'[o,c] = W[o,c]·s[c],  b' = b + Σ_{c,kh,kw} W[o,c,kh,kw]·t[c].

Batch Renorm and Ghost BN are BN in eval mode and fold the same way. Weight-normalised layers are
materialised (w = g·v/||v|| becomes a plain weight). LayerNorm, GroupNorm and InstanceNorm normalise
each sample with its own statistics, which no fixed linear layer can absorb: they stay.

Refused, with the reason in the fold report: BN before a zero-padded convolution (the padding
zeros would need to be t/s, not 0, so the borders would differ), and BN with a non-linearity on
both sides. Dropout and Identity between BN and the layer are skipped (identities in eval mode).
The input model is never modified; dtypes are kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bnlab.nn import BatchNorm, GroupNorm, LayerNorm, WeightNorm

_IDENTITY_AT_EVAL = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class FoldEntry:
    bn: str
    folded_into: str | None  # the layer that absorbed it, None if it stays
    how: str  # "output side", "input side", or the reason it was not folded


@dataclass
class FoldReport:
    entries: list[FoldEntry]

    @property
    def folded(self) -> int:
        return sum(e.folded_into is not None for e in self.entries)

    def to_text(self) -> str:
        lines = [f"{self.folded} of {len(self.entries)} normalization layers folded"]
        for e in self.entries:
            lines.append(f"  {e.bn}: " + (f"folded into {e.folded_into} ({e.how})" if e.folded_into
                                          else f"kept: {e.how}"))
        return "\n".join(lines)


def _scale_shift(bn: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None:
        raise ValueError("cannot fold a BN without running statistics (track_running_stats=False)")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t  # float64: folding rounds once, at the end


def _fold_output_side(layer: nn.Module, bn: BatchNorm) -> None:
    s, t = _scale_shift(bn)
    w = layer.weight.double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    _assign(layer, w * s.view(shape), b * s + t)


def _fold_input_side(layer: nn.Module, bn: BatchNorm) -> None:
    s, t = _scale_shift(bn)
    w = layer.weight.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                       device=w.device)
    if isinstance(layer, nn.Linear):
        new_w, new_b = w * s.view(1, -1), b + w @ t
    else:  # unpadded conv: every kernel tap sees t[c]
        new_w, new_b = w * s.view(1, -1, 1, 1), b + (w * t.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    _assign(layer, new_w, new_b)


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write float64 folded values back in the layer's own dtype; a layer without bias gains one."""
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def _neighbour(children, i: int, step: int):
    j = i + step
    while 0 <= j < len(children) and isinstance(children[j][1], _IDENTITY_AT_EVAL):
        j += step
    return children[j] if 0 <= j < len(children) else (None, None)


def fold(model: nn.Sequential) -> tuple[nn.Sequential, FoldReport]:
    """A new model with every foldable BN folded away, and the report of what happened."""
    if model.training:
        raise ValueError("fold() needs a model in eval mode: call model.eval() first (folding uses the "
                         "running statistics; in training mode BN normalises with batch statistics instead)")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"fold() works on nn.Sequential models such as bnlab's (got {type(model).__name__})")
    new = copy.deepcopy(model)
    entries, drop = [], set()
    for name, m in list(new.named_children()):
        if isinstance(m, WeightNorm):
            layer = m.layer
            with torch.no_grad():
                layer.weight = nn.Parameter(m.weight.detach().clone())
            setattr(new, name, layer)
            entries.append(FoldEntry(name, name, "weight norm materialised into a plain weight"))
    children = list(new.named_children())
    for i, (name, m) in enumerate(children):
        if isinstance(m, (LayerNorm, GroupNorm)):
            entries.append(FoldEntry(name, None, f"{type(m).__name__} normalises each sample with its own "
                                                  "statistics; no fixed layer can absorb it"))
            continue
        if not isinstance(m, BatchNorm):
            continue
        pname, prev = _neighbour(children, i, -1)
        nname, nxt = _neighbour(children, i, +1)
        if isinstance(prev, (nn.Linear, nn.Conv2d)) and pname not in drop:
            _fold_output_side(prev, m)
            entries.append(FoldEntry(name, pname, "output side"))
            drop.add(name)
        elif isinstance(nxt, nn.Linear) and nxt.in_features == m.num_features:
            _fold_input_side(nxt, m)
            entries.append(FoldEntry(name, nname, "input side"))
            drop.add(name)
        elif isinstance(nxt, nn.Conv2d) and all(p == 0 for p in nxt.padding) and nxt.padding_mode == "zeros":
            _fold_input_side(nxt, m)
            entries.append(FoldEntry(name, nname, "input side of an unpadded conv"))
            drop.add(name)
        elif isinstance(nxt, nn.Conv2d):
            entries.append(FoldEntry(name, None, f"it feeds the zero-padded convolution {nname}: folding would "
                                                  "change the border outputs"))
        else:
            entries.append(FoldEntry(name, None, f"no Linear/Conv directly before it ({pname}: "
                                                  f"{type(prev).__name__}) or after it ({nname}: "
                                                  f"{type(nxt).__name__})"))
    kept = [(n, m) for n, m in children if n not in drop]
    folded = nn.Sequential()
    for n, m in kept:
        folded.add_module(n, m)
    folded.eval()
    return folded, FoldReport(entries)
