"""The TensorBoard callback: what a run does, in TensorBoard's scalars, histograms and distributions tabs.

Written with ``torch.utils.tensorboard`` (the ``tensorboard`` package: ``pip install 'bnlab[tensorboard]'``):
* scalars ``step/loss``, ``step/accuracy`` every ``step_every`` steps (x: the optimizer step) and
  ``epoch/train_loss``, ``epoch/train_accuracy``, ``epoch/val_loss``, ``epoch/val_accuracy`` (x: the epoch);
* histograms ``preactivation/<layer>`` of every probed activation layer's input on the fixed probe batch
  at each sampled step (with probes on; in the distributions tab this is Ioffe & Szegedy's Figure 1:
  the percentiles of a layer's input over training);
* histograms ``bn/<layer>/running_mean`` and ``running_var`` of every batch-statistics norm at each epoch.
A resumed run drops the events after the step it continues from, and a run starting from zero in a
folder with events (``--restart``, a rerun) drops the earlier ones (``purge_step``): no step is shown twice.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.train.callbacks import Callback


class TensorBoard(Callback):
    def __init__(self, log_dir: str | Path, *, step_every: int = 1, histograms: bool = True):
        if step_every < 1:
            raise ValueError(f"step_every must be >= 1 (got {step_every})")
        self.log_dir, self.step_every, self.histograms = Path(log_dir), step_every, histograms
        self.writer = None

    def on_train_begin(self, ctx):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("the TensorBoard callback needs the tensorboard package: "
                              "pip install 'bnlab[tensorboard]'") from None
        # events from step done + 1 on are dropped from what the folder holds: a resumed run's lost steps,
        # or, for a run starting from zero (a restart, a rerun), everything of the earlier attempt
        done = ctx.history.epochs[-1].steps if ctx.history.epochs else 0
        self.writer = SummaryWriter(str(self.log_dir), purge_step=done + 1)

    def on_step_end(self, ctx, step, loss, correct, x, y):
        if step % self.step_every == 0:
            self.writer.add_scalar("step/loss", float(loss), step)
            self.writer.add_scalar("step/accuracy", float(correct) / len(y), step)
        last = getattr(ctx.probes, "last_inputs", None)
        if self.histograms and last is not None and last[0] == step:
            for name, h in last[1].items():
                self.writer.add_histogram(f"preactivation/{name}", h.detach().float().cpu(), step)

    def on_epoch_end(self, ctx, rec):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            value = getattr(rec, key)
            if value is not None:
                self.writer.add_scalar(f"epoch/{key}", value, rec.epoch)
        if self.histograms:
            for name, m in ctx.model.named_modules():
                if getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None:
                    self.writer.add_histogram(f"bn/{name}/running_mean", m.running_mean.detach().float().cpu(), rec.epoch)
                    self.writer.add_histogram(f"bn/{name}/running_var", m.running_var.detach().float().cpu(), rec.epoch)
        self.writer.flush()

    def on_train_end(self, ctx):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
