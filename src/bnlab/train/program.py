"""A network as one program: its ops in order (each a kind and its module), and one support check whose
reasons say what each engine cannot run. The fused step (``bnlab.train.fused``), the native C++ step
(``bnlab.train.native``) and stacked seeds (``bnlab.train.stacked``) are all built from it; what an
activation computes forward and backward lives in ``bnlab.nn.activations``.

Supported by the fused step: an ``nn.Sequential`` of Conv2d (zero padding given as numbers, one group),
MaxPool2d, bnlab BatchNorm (not renorm / ghost), activations and Dropout on feature maps, then a Flatten
and Linear, BN on (N, C), activations and Dropout, ending in Linear. Stacking takes all of these; the
native step the MLPs among them (no Conv2d / MaxPool2d), on a CPU, float32/64, with no active dropout and
no frozen or non-contiguous tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnlab.nn import BatchNorm
from bnlab.nn.activations import MODULES

ENGINES_BUILT = ("fused", "native", "stacked")


@dataclass(frozen=True)
class Op:
    kind: str  # flatten | linear | conv2d | maxpool2d | batchnorm | activation | dropout
    name: str
    module: nn.Module


def _conv_supported(mod: nn.Module) -> bool:
    return (type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
            and mod.groups == 1)


@dataclass
class Program:
    ops: list[Op]
    reasons: list[str]  # why the fused step cannot run the model (empty: it can)

    @property
    def is_mlp(self) -> bool:
        return not any(op.kind in ("conv2d", "maxpool2d") for op in self.ops)

    def unsupported(self, engine: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
                    model: nn.Module | None = None) -> list[str]:
        """Why ``engine`` (fused | native | stacked) cannot run this program (empty: it can)."""
        if engine not in ENGINES_BUILT:
            raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES_BUILT}")
        bad = list(self.reasons)
        if engine == "fused":
            return bad
        if engine == "native":
            bad += [f"{op.name} ({type(op.module).__name__}: the native step is for MLPs)" for op in self.ops
                    if op.kind in ("conv2d", "maxpool2d")]
            if device is not None and device.type != "cpu":
                bad.append(f"device {device.type}")
            if dtype is not None and dtype not in (torch.float32, torch.float64):
                bad.append(f"dtype {dtype}")
            bad += [f"{op.name} (Dropout)" for op in self.ops if op.kind == "dropout" and op.module.p > 0]
            if model is not None and any(not t.is_contiguous() for t in (*model.parameters(), *model.buffers())):
                bad.append("non-contiguous parameters")  # the C++ loops walk raw memory
        if model is not None and any(not p.requires_grad for p in model.parameters()):
            bad.append("frozen parameters")  # the native step and the stack train every tensor they hold
        return bad


def program_of(model: nn.Module) -> Program:
    """The program of ``model``, with the reasons the fused step cannot run it."""
    if not isinstance(model, nn.Sequential):
        return Program([], [f"{type(model).__name__} is not an nn.Sequential"])
    ops, bad = [], []
    children = list(model.named_children())
    flat = False  # after a Flatten only vectors flow
    for name, mod in children:
        kind = None
        if isinstance(mod, nn.Flatten) and not flat:
            flat, kind = True, "flatten"
        elif type(mod) is nn.Linear:
            kind = "linear"
        elif type(mod) is nn.Dropout:
            kind = "dropout"
        elif type(mod) in MODULES:
            kind = "activation"
        elif not flat and _conv_supported(mod):
            kind = "conv2d"
        elif not flat and type(mod) is nn.MaxPool2d and not mod.return_indices:
            kind = "maxpool2d"
        elif type(mod) is BatchNorm and (mod.axis in (1, -1) if flat else mod.axis == 1):  # not renorm / ghost
            kind = "batchnorm"
        if kind is None:
            bad.append(f"{name} ({type(mod).__name__})")
        else:
            ops.append(Op(kind, name, mod))
    if not children or not isinstance(children[-1][1], nn.Linear):
        bad.append("the last layer is not Linear")
    return Program(ops, bad)
