"""Optimisers by name, with Keras's defaults where the seeds rely on them.

``rmsprop`` with ``keras_defaults=True`` is Keras's RMSprop (rho 0.9, epsilon 1e-7; torch's are
alpha 0.99, eps 1e-8). Both put epsilon outside the square root. ``adam`` with keras defaults uses
epsilon 1e-7. The seeds' ``SGD(lr=1e-3)`` is ``make_optimizer("sgd", params, lr=1e-3)``.
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("sgd", "rmsprop", "adam")
# how the learning rate changes over a run's updates (its budget: epochs x batches, or max_steps if fewer)
LR_SCHEDULES = ("constant", "cosine", "step")
STEP_DROPS = ((0.5, 0.1), (0.75, 0.01))  # "step": x0.1 after half the updates, x0.01 after three quarters


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


def scheduled_lr(lr: float, schedule: str, step: int, total: int) -> float:
    """The learning rate of update ``step`` (0-based) of ``total``: ``constant``; ``cosine``
    (Loshchilov & Hutter 2017 without restarts: lr * (1 + cos(pi * step / total)) / 2, from lr down
    towards 0 at the end of the budget); ``step`` (lr, then x0.1 at half the budget and x0.01 at three
    quarters, the ResNet recipe's drops by fractions of the run)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: expected one of {LR_SCHEDULES}")
    if schedule == "constant":
        return lr
    frac = min(step, total) / max(total, 1)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr * next((f for at, f in reversed(STEP_DROPS) if frac >= at), 1.0)


class LRSchedule:
    """Sets the optimizer's learning rate before each update (a function of the update's index alone,
    so a resumed run continues the schedule exactly where it stopped)."""

    def __init__(self, opt: torch.optim.Optimizer, lr: float, schedule: str, total: int):
        scheduled_lr(lr, schedule, 0, 1)  # an unknown schedule fails before training
        self.opt, self.lr, self.schedule, self.total = opt, lr, schedule, total

    def __call__(self, step: int) -> None:
        if self.schedule != "constant":
            value = scheduled_lr(self.lr, self.schedule, step, self.total)
            for g in self.opt.param_groups:
                g["lr"] = value


def planned_updates(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """The updates a run is budgeted (what a schedule spans): early stopping does not shorten it."""
    total = epochs * steps_per_epoch
    return total if max_steps is None else min(total, max_steps)
