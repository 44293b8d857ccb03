"""Which statistics BN uses at test time: its moving averages, the test batch's own, or statistics
recalibrated on unlabeled test-domain data (AdaBN, Li et al. 2016).

- ``"running"``: eval mode, the moving averages from training (what ``model.eval()`` gives).
- ``"batch"``: every forward normalises with the statistics of the batch it is given ("prediction-time
  BN"; Nado et al. 2020): the prediction of one image then depends on the other images of its batch,
  and a batch must hold more than one value per channel: (1, C) features cannot be normalised (an error
  says so), while a (1, C, H, W) map has H·W values per channel and can (instance-norm-like statistics).
- ``"recalibrated"``: precise population statistics over unlabeled inputs of the test domain
  (``bnlab.deploy.recalibrate``, mode "inference"), then eval mode: one set of statistics for all
  test batches, whatever their size.

Layer, group and instance norms use each sample's own statistics: the three options give them the same
answer. The input model is never modified.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.nn import BatchNorm

BN_STATS = ("running", "batch", "recalibrated")


def check_bn_stats(stats: str) -> None:
    if stats not in BN_STATS:
        raise ValueError(f"unknown BN statistics {stats!r}: expected one of {', '.join(BN_STATS)}")


def batch_too_small(n: int) -> str:
    """Why test-batch statistics cannot normalise a batch of ``n`` samples (BN said so)."""
    return (f"test-batch statistics cannot normalise a batch of {n} sample(s): a batch norm over (N, C) features "
            "needs at least 2 samples (1 value per channel has no variance); send batches of 2 or more, or use "
            "BN statistics 'running' or 'recalibrated'")


def is_batch_too_small(e: Exception) -> bool:
    return isinstance(e, ValueError) and "value per channel" in str(e)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose batch norms (bnlab's and torch's) normalise each forward with
    that batch's own statistics and keep no running statistics (so nothing is updated)."""
    new = copy.deepcopy(model).eval()
    found = False
    for m in new.modules():
        if isinstance(m, (BatchNorm, _BatchNorm)):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
            found = True
    if not found:
        raise ValueError("the model has no batch norm: test-batch statistics change nothing")
    return new


def for_bn_stats(model: nn.Module, stats: str, unlabeled: torch.Tensor | None = None, *,
                 batch_size: int = 512) -> nn.Module:
    """The model (a copy, eval mode) that uses ``stats`` at test time; ``unlabeled``: the test-domain inputs
    to recalibrate on (``"recalibrated"`` only; preprocessed as in training)."""
    check_bn_stats(stats)
    if stats == "batch":
        return with_batch_statistics(model)
    if stats == "recalibrated":
        if unlabeled is None:
            raise ValueError("bn stats 'recalibrated' needs unlabeled inputs of the test domain to recalibrate on")
        from bnlab.deploy.precise import recalibrate
        return recalibrate(model, unlabeled, batch_size=batch_size, mode="inference")
    return copy.deepcopy(model).eval()


@torch.no_grad()
def evaluate_bn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stats: str = "running",
                batch_size: int = 1000, unlabeled: torch.Tensor | None = None, seed: int = 0) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y) with BN using ``stats``, in test batches of
    ``batch_size`` drawn by a seeded shuffle (so a batch is an i.i.d. sample of the test set, not a run of
    neighbouring images). With ``"batch"``, a batch that BN cannot normalise raises ValueError; a last
    batch of one sample joins the previous one (as in training). ``unlabeled`` defaults to ``x`` itself for
    ``"recalibrated"`` (transductive: the test inputs, not their labels)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if len(y) == 0:
        return float("nan"), float("nan")
    net = for_bn_stats(model, stats, x if unlabeled is None and stats == "recalibrated" else unlabeled)
    device = next(net.parameters()).device
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    bounds = list(range(0, len(y), batch_size)) + [len(y)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1 and batch_size > 1:
        del bounds[-2]
    loss, correct = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = order[a:b]
        try:
            out = net(x[idx].to(device)).float()
        except ValueError as e:
            if stats != "batch" or not is_batch_too_small(e):
                raise
            raise ValueError(batch_too_small(b - a)) from None
        yb = y[idx].to(device)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return loss / len(y), correct / len(y)


__all__ = ["BN_STATS", "batch_too_small", "check_bn_stats", "is_batch_too_small", "evaluate_bn", "for_bn_stats", "with_batch_statistics"]
