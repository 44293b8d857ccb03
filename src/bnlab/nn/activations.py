"""The activations bnlab's models, engines, probes and importers know: one table (Python's only one;
the native kernels have theirs, ``enum Act`` with each formula forward and backward, in
``train/native/activations.h``, in ``native`` order).

Adding an activation: a row here, its name in ``bnlab.models.spec.Activation`` (the torch-free
vocabulary pydantic validates specs with; ``tests/test_activations.py`` holds the two equal) and, for
the native MLP step and the fused BN kernels, its case in activations.h. The builder, the describer, the
Keras importer, the probes, the fused and native steps all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

aten = torch.ops.aten
SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


@dataclass(frozen=True)
class ActivationDef:
    name: str  # the spec's (and Keras's) name
    module: type[nn.Module]
    make: Callable[[float], nn.Module]  # from the model's leaky slope
    # d(loss)/d(input) from d(loss)/d(output), the module and what the forward saved
    backward: Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]
    saves_input: bool  # the backward needs the input (else the output)
    keras_layer: str  # Keras's layer-name stem (re_lu, leaky_re_lu, ...)
    native: int  # its ``enum Act`` value in train/native/activations.h
    probed: bool = True  # a nonlinearity the probes record the inputs of
    # the fused steps run it inside the BN kernel before it (train/native/bn_act.cpp), which recomputes it
    # in the backward pass: free for a comparison, not for exp / tanh, which that C++ evaluates one value at
    # a time (a sigmoid BN on (60, 500), forward + backward: 379 us fused, 60 us as BN and then ATen's
    # vectorised sigmoid and its backward from the saved output; measured)
    fuses_with_bn: bool = True


ACTIVATIONS: tuple[ActivationDef, ...] = (
    ActivationDef("relu", nn.ReLU, lambda s: nn.ReLU(), lambda dy, m, out: aten.threshold_backward(dy, out, 0),
                  False, "re_lu", 0),
    ActivationDef("sigmoid", nn.Sigmoid, lambda s: nn.Sigmoid(), lambda dy, m, out: aten.sigmoid_backward(dy, out),
                  False, "sigmoid", 1, fuses_with_bn=False),
    ActivationDef("tanh", nn.Tanh, lambda s: nn.Tanh(), lambda dy, m, out: aten.tanh_backward(dy, out),
                  False, "tanh", 2, fuses_with_bn=False),
    ActivationDef("leaky_relu", nn.LeakyReLU, lambda s: nn.LeakyReLU(s),
                  lambda dy, m, x: aten.leaky_relu_backward(dy, x, m.negative_slope, False), True, "leaky_re_lu", 3),
    ActivationDef("elu", nn.ELU, lambda s: nn.ELU(),
                  lambda dy, m, out: aten.elu_backward(dy, m.alpha, 1.0, 1.0, True, out), False, "elu", 4,
                  fuses_with_bn=False),
    ActivationDef("selu", nn.SELU, lambda s: nn.SELU(),
                  lambda dy, m, out: aten.elu_backward(dy, SELU_ALPHA, SELU_SCALE, 1.0, True, out), False, "selu", 5,
                  fuses_with_bn=False),
    ActivationDef("linear", nn.Identity, lambda s: nn.Identity(), lambda dy, m, out: dy, False, "linear", 6,
                  probed=False),
)
BY_NAME = {a.name: a for a in ACTIVATIONS}
BY_MODULE = {a.module: a for a in ACTIVATIONS}
NAMES = tuple(BY_NAME)
MODULES = tuple(BY_MODULE)
PROBED = tuple(a.module for a in ACTIVATIONS if a.probed)


def activation_parameter(module: nn.Module | None) -> float:
    """The one number an activation module carries (LeakyReLU's slope, ELU's alpha; else 0), as the
    native kernels take it."""
    return float(getattr(module, "negative_slope", getattr(module, "alpha", 0.0)))


def activation_module(name: str, slope: float) -> nn.Module:
    return BY_NAME[name].make(slope)
