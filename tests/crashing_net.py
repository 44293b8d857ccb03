"""A network whose backward pass fails on purpose: a run of it passes every check made before anything
is stored (its forward pass works: ``check_models_fit``, ``check_runnable``) and crashes in its first
training step, as a user's own code can. The tests of failure handling run it as a factory model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FACTORY = f"{Path(__file__).resolve()}:net"  # a factory spec's "factory" (a file path: any working directory)
MESSAGE = "crashing_net: this network's backward pass fails on purpose"


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(MESSAGE)


class CrashingNet(nn.Module):
    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):  # (N, ...) -> (N, num_classes)
        return _FailingBackward.apply(self.fc(x.flatten(1)))


def net(features: int = 6, num_classes: int = 2) -> nn.Module:
    return CrashingNet(features, num_classes)


def crashing_variant(input_shape: list[int], num_classes: int) -> dict:
    """A variant of an experiment spec whose runs fail when run (the spec's own [model] must be empty)."""
    features = 1
    for n in input_shape:
        features *= n
    return {"model": {"factory": FACTORY, "kwargs": {"features": features}, "input_shape": input_shape,
                      "num_classes": num_classes}}
