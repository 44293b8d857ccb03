"""Keras-compatible initialisers for Linear and Conv weights (biases start at zero, as in Keras)."""

from __future__ import annotations

import math

import torch
from torch import nn

# std of a standard normal truncated to [-2, 2]: Keras divides by it so the kept values have the
# requested std
_TRUNC_STD = 0.87962566103423978


def initialise(module: nn.Module, init: str, *, std: float = 0.01, generator: torch.Generator | None = None) -> None:
    """he_normal: truncated normal, std sqrt(2/fan_in); glorot_uniform: U(±sqrt(6/(fan_in+fan_out)));
    normal: N(0, std²) (the paper's "small random Gaussian"); torch_default: torch's own
    ``reset_parameters`` (kaiming_uniform with a=sqrt(5), bias U(±1/sqrt(fan_in))), drawn from
    ``generator`` so that a seed gives the same weights whatever the global RNG holds."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return
    w = module.weight
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    with torch.no_grad():
        if init == "torch_default":
            if generator is None:
                return  # torch already initialised it from the global RNG
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            return
        if init == "he_normal":
            s = math.sqrt(2.0 / fan_in) / _TRUNC_STD
            nn.init.trunc_normal_(w, 0.0, s, -2 * s, 2 * s, generator=generator)
        elif init == "glorot_uniform":
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(w, -limit, limit, generator=generator)
        elif init == "normal":
            nn.init.normal_(w, 0.0, std, generator=generator)
        else:
            raise ValueError(f"unknown initialiser {init!r}: expected he_normal, glorot_uniform, normal "
                             "or torch_default")
        if module.bias is not None:
            module.bias.zero_()
