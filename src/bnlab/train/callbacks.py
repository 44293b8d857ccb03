"""``fit(..., callbacks=[...])``: the hooks of a training run, and the built-in callbacks.

The protocol (override what you need; every method gets the run's ``TrainContext``):

    on_train_begin(ctx)                             before the first step (after a resume: its state is back)
    on_step_begin(ctx, step)                        before optimizer step ``step`` (1-based, over the run)
    on_step_end(ctx, step, loss, correct, x, y)     after it; ``loss`` is the batch's mean loss and
                                                    ``correct`` its count of right answers, both 0-d tensors
                                                    (``float()`` waits for a GPU: call it only when needed);
                                                    x, y the batch
    on_epoch_end(ctx, record)                       after evaluating; ``record`` an EpochRecord
    on_train_end(ctx)                               once, also after divergence or an interruption

``ctx.request_stop(message)`` ends training after the current epoch (``History.stopped = "callback"``).
Callbacks run in list order, after fit's own (progress, best model and early stopping, probes).
A resumed run calls them for the epochs it runs only; user callbacks keep no state across a resume.

Built in: ``ProgressBar``, ``Monitor`` (best-model checkpoint + early stopping, Keras's ModelCheckpoint
with save_best_only and EarlyStopping in one since both follow the same monitored value), ``ProbeRecorder``,
``CSVLogger``, and ``bnlab.train.tensorboard.TensorBoard``.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bnlab.train.history import EpochRecord, History
from bnlab.train.progress import TrainProgress


@dataclass
class TrainContext:
    model: nn.Module
    data: object  # the bnlab Dataset
    history: History
    epochs: int
    steps_per_epoch: int
    device: torch.device
    lr: float
    probes: object | None = None  # the run's bnlab.probes.Probes, if any
    resumed_epoch: int = 0  # the epoch a resumed run continues after (0: from the start)
    stop_message: str | None = None
    extra: dict = field(default_factory=dict)

    def request_stop(self, message: str = "stopped by a callback") -> None:
        self.stop_message = message


class Callback:
    def on_train_begin(self, ctx: TrainContext) -> None: ...

    def on_step_begin(self, ctx: TrainContext, step: int) -> None: ...

    def on_step_end(self, ctx: TrainContext, step: int, loss: torch.Tensor, correct: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor) -> None: ...

    def on_epoch_end(self, ctx: TrainContext, record: EpochRecord) -> None: ...

    def on_train_end(self, ctx: TrainContext) -> None: ...


def overrides(cb: Callback, method: str) -> bool:
    """Whether ``cb`` has its own ``method`` (fit calls per-step hooks only on callbacks that do)."""
    return getattr(type(cb), method) is not getattr(Callback, method)


class ProgressBar(Callback):
    """A rich bar that advances within the epoch (at most 10 redraws a second), one line per epoch."""

    def __init__(self, enabled: bool = True, refresh_seconds: float = 0.1, console=None):
        self.enabled, self.refresh, self.console = enabled, refresh_seconds, console
        self.bar: TrainProgress | None = None
        self._pending, self._last = 0, 0.0

    def on_train_begin(self, ctx):
        self.bar = TrainProgress(ctx.epochs, ctx.steps_per_epoch, enabled=self.enabled, console=self.console).__enter__()
        self.bar.advance(ctx.resumed_epoch * ctx.steps_per_epoch)
        self._last = time.perf_counter()

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.epoch_done(line)

    def on_step_end(self, ctx, step, loss, correct, x, y):
        self._pending += 1
        now = time.perf_counter()
        if self.bar is not None and self.bar.interactive and now - self._last >= self.refresh:
            self.bar.advance(self._pending, f"loss {float(loss):.4f}")
            self._pending, self._last = 0, now

    def on_epoch_end(self, ctx, rec):
        if self.bar is None:
            return
        self.bar.advance(self._pending)
        self._pending = 0
        self.bar.epoch_done(f"epoch {rec.epoch}/{ctx.epochs}: loss {rec.train_loss:.4f} acc {rec.train_accuracy:.4f}"
                            + (f" val_loss {rec.val_loss:.4f} val_acc {rec.val_accuracy:.4f}"
                               if rec.val_loss is not None else "") + f" ({rec.seconds:.1f}s)")

    def on_train_end(self, ctx):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class Monitor(Callback):
    """Tracks the best epoch by ``monitor`` (val_accuracy, or -val_loss; the training loss without a
    validation set), saves that model to ``checkpoint_dir`` when it improves, and stops training after
    ``patience`` epochs without improvement."""

    def __init__(self, monitor: str = "val_accuracy", patience: int | None = None,
                 checkpoint_dir: str | Path | None = None, checkpoint_meta: dict | None = None,
                 best_value: float = float("-inf"), best_epoch: int | None = None, since_best: int = 0):
        self.monitor, self.patience = monitor, patience
        self.checkpoint_dir, self.checkpoint_meta = checkpoint_dir, checkpoint_meta or {}
        self.best_value, self.best_epoch, self.since_best = best_value, best_epoch, since_best
        self.stopped = False

    def score(self, rec: EpochRecord) -> float:
        if rec.val_loss is None:
            return -rec.train_loss
        return rec.val_accuracy if self.monitor == "val_accuracy" else -rec.val_loss

    def on_epoch_end(self, ctx, rec):
        score = self.score(rec)
        if score > self.best_value:
            self.best_value, self.best_epoch, self.since_best = score, rec.epoch, 0
            if self.checkpoint_dir is not None:
                from bnlab.checkpoint import save_checkpoint

                data = ctx.data
                save_checkpoint(self.checkpoint_dir, ctx.model, preprocessing=data.preprocessing,
                                meta={**self.checkpoint_meta, "kind": "best", "monitor": self.monitor,
                                      "epoch": rec.epoch, "val_accuracy": _nan_none(rec.val_accuracy),
                                      "val_loss": _nan_none(rec.val_loss), "dataset": data.name,
                                      "classes": list(data.classes) if data.classes else None})
        else:
            self.since_best += 1
        self.stopped = self.patience is not None and self.since_best >= self.patience


def _nan_none(v):
    return float("nan") if v is None else v


class ProbeRecorder(Callback):
    """Runs ``bnlab.probes.Probes`` around each step (activation probes before it, weight probes after)."""

    def __init__(self, probes):
        self.probes = probes

    def on_step_begin(self, ctx, step):
        self.probes.before_step(step)

    def on_step_end(self, ctx, step, loss, correct, x, y):
        self.probes.after_step(step, x, y)


class CSVLogger(Callback):
    """One row per epoch (epoch, steps, train_loss, train_accuracy, val_loss, val_accuracy, seconds) in
    ``path``; a resumed run rewrites the rows it already has, so the file never holds an epoch twice."""

    FIELDS = ("epoch", "steps", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _write(self, rows, mode: str) -> None:
        with open(self.path, mode, newline="") as f:
            w = csv.writer(f)
            if mode == "w":
                w.writerow(self.FIELDS)
            for rec in rows:
                w.writerow(["" if getattr(rec, k) is None else getattr(rec, k) for k in self.FIELDS])

    def on_train_begin(self, ctx):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(ctx.history.epochs, "w")

    def on_epoch_end(self, ctx, rec):
        self._write([rec], "a")
