"""The distribution-shift grid: its rows, each against the direct evaluation it stands for."""

from __future__ import annotations

import pytest
import torch

from bnlab.data.corrupt import corrupt
from bnlab.deploy.shift import TEST_BATCH_SIZES, conditions, shift_grid
from bnlab.deploy.testtime import evaluate_bn
from bnlab.models import build_model
from bnlab.train.engine import evaluate


@pytest.fixture(scope="module")
def digits():
    from bnlab.data import load_dataset
    return load_dataset("digits", scaling="unit")


def _trained(kind: str, norm: str, digits):
    from bnlab.train.engine import fit
    spec = ({"kind": "mlp", "hidden": [32]} if kind == "mlp" else
            {"kind": "cnn", "blocks": [8], "final_block": None, "convs_per_block": 1, "head": "gap"})
    model = build_model({**spec, "input_shape": [1, 8, 8], "num_classes": 10, "bn": "before", "norm": norm}, seed=0)
    fit(model, digits, epochs=2, batch_size=32, lr=0.1, momentum=0.9, progress=False)
    return model.eval()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_grid_rows_are_the_evaluations_they_name(digits, kind):
    model = _trained(kind, "batch", digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits.x_test[:200], digits.y_test[:200]
    rows = shift_grid(model, x, y, x_train=digits.x_train, corruptions=("contrast", "rotation"), severities=(1, 3))
    assert len(rows) == len(conditions(("contrast", "rotation"), (1, 3))) * (3 + len(TEST_BATCH_SIZES)) == 40
    by = {(r.corruption, r.severity, r.bn_stats, r.test_batch): r for r in rows}
    assert by[("none", 0, "running", None)].accuracy == pytest.approx(evaluate(model, x, y)[1])
    shifted = corrupt(x, "rotation", 3)
    assert by[("rotation", 3, "running", None)].accuracy == pytest.approx(evaluate(model, shifted, y)[1])
    assert by[("rotation", 3, "batch", 64)].accuracy == pytest.approx(
        evaluate_bn(model, shifted, y, stats="batch", batch_size=64)[1])
    assert by[("rotation", 3, "recalibrated", None)].accuracy == pytest.approx(
        evaluate_bn(model, shifted, y, stats="recalibrated")[1])
    one = by[("contrast", 1, "batch", 1)]
    if kind == "mlp":  # BN over features cannot normalise one sample: the row says so
        assert one.accuracy is None and "cannot normalise a batch of 1 sample" in one.note
    else:  # a feature map of one image has H·W values per channel
        assert one.accuracy is not None and one.note == ""
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_without_batch_norm_gets_running_rows_only(digits):
    model = _trained("mlp", "layer", digits)
    rows = shift_grid(model, digits.x_test[:100], digits.y_test[:100], x_train=digits.x_train,
                      corruptions=("brightness",), severities=(2,))
    assert [(r.corruption, r.bn_stats) for r in rows] == [("none", "running"), ("brightness", "running")]
