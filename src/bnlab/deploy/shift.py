"""A trained model under distribution shift: accuracy per corruption, severity, BN statistics and test
batch size (the evaluation grid of the ``bn-shift`` study, issue 16).

For every condition (the clean test set, then each corruption of ``bnlab.data.corrupt`` at each
severity) the model is evaluated with BN using

- ``running``: its moving averages;
- ``precise``: population statistics over the clean training data (``bnlab.deploy.recalibrate``, mode
  "inference"), computed once;
- ``batch``: each test batch's own statistics, at each test batch size (a size BN cannot normalise is a
  row with its reason instead of an accuracy);
- ``recalibrated``: population statistics over the shifted test inputs themselves (unlabeled; AdaBN).

A model without batch norm gets the ``running`` rows only (its norms use each sample's own statistics:
the other options would repeat them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from bnlab.data.corrupt import CORRUPTIONS, SEVERITIES, corrupt
from bnlab.deploy.precise import can_recalibrate
from bnlab.deploy.testtime import evaluate_bn

TEST_BATCH_SIZES = (1, 2, 8, 64, 1000)


@dataclass
class ShiftRow:
    corruption: str  # "none": the clean test set
    severity: int  # 0 for the clean test set
    bn_stats: str  # running | precise | batch | recalibrated
    test_batch: int | None  # batch: the test batch size; None for the others (any size gives the same)
    accuracy: float | None
    loss: float | None
    note: str = ""  # why there is no accuracy


def conditions(corruptions=CORRUPTIONS, severities=SEVERITIES) -> list[tuple[str, int]]:
    return [("none", 0)] + [(c, s) for c in corruptions for s in severities]


def shift_grid(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *, x_train: torch.Tensor | None = None,
               corruptions=CORRUPTIONS, severities=SEVERITIES, batch_sizes=TEST_BATCH_SIZES,
               eval_batch: int = 1000, seed: int = 0) -> list[ShiftRow]:
    """The rows of the grid (see the module docstring) for ``model`` (not modified) on (x_test, y_test),
    images in [0, 1]. ``x_train``: the clean training inputs for ``precise`` (no precise rows without it)."""
    bn = can_recalibrate(model)
    precise = None
    if bn and x_train is not None:
        from bnlab.deploy.precise import recalibrate
        precise = recalibrate(model, x_train, batch_size=512, mode="inference")
    rows = []
    for kind, severity in conditions(corruptions, severities):
        x = x_test if kind == "none" else corrupt(x_test, kind, severity, seed=seed)

        def row(stats, net, test_batch=None, unlabeled=None):
            try:
                loss, acc = evaluate_bn(net, x, y_test, stats="running" if stats == "precise" else stats,
                                        batch_size=test_batch or eval_batch, unlabeled=unlabeled, seed=seed)
                rows.append(ShiftRow(kind, severity, stats, test_batch, acc, loss))
            except ValueError as e:
                rows.append(ShiftRow(kind, severity, stats, test_batch, None, None, str(e)))

        row("running", model)
        if not bn:
            continue
        if precise is not None:
            row("precise", precise)
        for size in batch_sizes:
            row("batch", model, size)
        row("recalibrated", model, unlabeled=x)
    return rows


def as_records(rows: list[ShiftRow]) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = ["TEST_BATCH_SIZES", "ShiftRow", "as_records", "conditions", "shift_grid"]
