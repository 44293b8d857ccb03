"""Memory layout for inference: many no-grad forward passes (evaluation, precise statistics)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` laid out for many no-grad forward passes: channels_last when it has 2-d
    convolutions (measured 2-3x faster on this CPU for the small-batch CNN's 10,000 test digits; the
    same values to float32 rounding), else ``model`` itself."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)
