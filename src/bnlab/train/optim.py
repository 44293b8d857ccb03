"""Optimisers by name, with Keras's defaults where the seeds rely on them.

``rmsprop`` with ``keras_defaults=True`` is Keras's RMSprop (rho 0.9, epsilon 1e-7; torch's are
alpha 0.99, eps 1e-8). Both put epsilon outside the square root. ``adam`` with keras defaults uses
epsilon 1e-7. The seeds' ``SGD(lr=1e-3)`` is ``make_optimizer("sgd", params, lr=1e-3)``.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "rmsprop", "adam")


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, keras_defaults: bool = True) -> torch.optim.Optimizer:
    if lr <= 0:
        raise ValueError(f"lr must be > 0 (got {lr})")
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay, foreach=True)
    if name == "rmsprop":
        alpha, eps = (0.9, 1e-7) if keras_defaults else (0.99, 1e-8)
        return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                                   weight_decay=weight_decay, foreach=True)
    if name == "adam":
        eps = 1e-7 if keras_defaults else 1e-8
        fused = all(p.device.type in ("cpu", "cuda") for p in params) if isinstance(params, list) else False
        return torch.optim.Adam(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused or None)
    raise ValueError(f"unknown optimizer {name!r}: expected one of {OPTIMIZERS}")
