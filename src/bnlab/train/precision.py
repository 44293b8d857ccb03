"""Training precision: ``fp32`` (bnlab's default: exact numerics), ``bf16-mixed`` and ``fp16-mixed``.

Mixed precision is torch's automatic mixed precision: matrix products and convolutions run in the
low-precision type under ``torch.autocast``; parameters, gradients and optimizer state stay float32;
bnlab's BatchNorm accumulates its statistics in float32 whatever its input's type (its running
statistics keep the layer's dtype). ``fp16-mixed`` adds loss scaling (``torch.amp.GradScaler``), which
float16's narrow exponent needs, and runs on CUDA only (a CPU has no fast float16 matrix unit;
bfloat16 is the CPU's mixed type). Evaluation (validation, test, precise statistics) runs in float32
whatever the training precision: the model a run produces is float32 and is measured as it is saved.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """A ValueError when ``precision`` cannot run on ``device`` (fp16-mixed anywhere but CUDA). Called before
    anything is written (``bnlab.train.runnable.check_runnable``) and again by ``fit``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp16-mixed" and device.type != "cuda":
        here = "" if torch.cuda.is_available() else ": this machine has no CUDA device"
        raise ValueError(f"precision 'fp16-mixed' runs on CUDA only (got device {device}{here}); "
                         "use 'bf16-mixed' or 'fp32' on a CPU")


def autocast(precision: str, device: torch.device):
    """The context the forward pass runs in (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


class OptimizerStep:
    """Applies an optimizer step after a backward pass; with fp16 loss scaling, the scaler unscales
    the gradients, skips steps whose gradients overflowed and adapts the scale."""

    def __init__(self, opt, precision: str, device: torch.device):
        self.opt = opt
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def __call__(self) -> None:
        if self.opt is None:
            return
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()
