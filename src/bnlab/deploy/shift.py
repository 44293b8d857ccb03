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

import numpy as np
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


def pixels(x: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Model inputs scaled with ``preprocessing`` (``Dataset.preprocessing``) -> their pixels in [0, 1]
    (raw values / the pixel maximum), where the corruptions apply."""
    from bnlab.data.dataset import unscale

    u = torch.from_numpy(unscale(x.cpu().numpy(), preprocessing) / preprocessing["divide"])
    lo, hi = (float(u.min()), float(u.max())) if u.numel() else (0.0, 1.0)
    if lo < -1e-3 or hi > 1 + 1e-3:  # beyond float rounding: not pixels of an image in [0, max]
        raise ValueError(f"the corruptions need images whose pixels lie in [0, 1] once unscaled; these run from "
                         f"{lo:.3g} to {hi:.3g} (scaling {preprocessing.get('scaling')!r}; raw pixels with scaling "
                         "'none' are not divided by their maximum: use scaling unit, center or standardize)")
    return u.clamp_(0.0, 1.0).to(x.device)


def scaled(u: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Pixels in [0, 1] -> the model's inputs: the raw values scaled as the training data were (the rule
    predict and serve apply to raw inputs: ``bnlab.deploy.predict.model_scaled``)."""
    from bnlab.deploy.predict import model_scaled

    raw = u.cpu().numpy() * preprocessing["divide"]
    return torch.from_numpy(np.ascontiguousarray(model_scaled(raw, preprocessing, False))).to(u.device)


def shift_grid(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, *, x_train: torch.Tensor | None = None,
               corruptions=CORRUPTIONS, severities=SEVERITIES, batch_sizes=TEST_BATCH_SIZES,
               eval_batch: int = 1000, seed: int = 0, preprocessing: dict | None = None,
               precise: nn.Module | None = None) -> list[ShiftRow]:
    """The rows of the grid (see the module docstring) for ``model`` (not modified) on (x_test, y_test).
    ``x_test``: images in [0, 1], or, with ``preprocessing`` (a ``Dataset.preprocessing``), the model's
    inputs scaled with it: each corruption then applies to their pixels in [0, 1] and the scaling is
    redone (the clean condition uses ``x_test`` as given). ``x_train``: the clean training inputs, as the
    model takes them, for ``precise`` (no precise rows without it), or ``precise``: that model already
    recalibrated on them (``bnlab.deploy.recalibrate``, mode "inference"), so it is not computed twice."""
    base = x_test if preprocessing is None else pixels(x_test, preprocessing)

    def shifted(kind: str, severity: int) -> torch.Tensor:
        x = corrupt(base, kind, severity, seed=seed)
        return x if preprocessing is None else scaled(x, preprocessing)

    bn = can_recalibrate(model)
    if bn and precise is None and x_train is not None:
        from bnlab.deploy.precise import recalibrate
        precise = recalibrate(model, x_train, batch_size=512, mode="inference")
    rows = []
    for kind, severity in conditions(corruptions, severities):
        x = x_test if kind == "none" else shifted(kind, severity)

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


__all__ = ["TEST_BATCH_SIZES", "ShiftRow", "as_records", "conditions", "pixels", "scaled", "shift_grid"]
