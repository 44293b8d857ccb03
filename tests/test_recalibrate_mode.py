"""`bnlab recalibrate` writes, by default, the statistics the run's report calls precise (issue 28 item 7).

`bnlab train` and the experiment reports measure "precise statistics" with ``bnlab.deploy.recalibrate`` in
mode "inference" (``bnlab.train.single._precise``); the command's default must write the same statistics,
name the mode in its output and in the checkpoint's meta. Mode "train" gives other statistics after the first
BN layer, so the comparison below tells the two apart.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnlab.checkpoint import load_checkpoint
from bnlab.cli import _checkpoint_data, app
from bnlab.deploy import recalibrate
from bnlab.nn import BatchNorm
from bnlab.train import evaluate
from bnlab.train.config import TrainConfig
from bnlab.train.single import _precise


def bns(model):
    return [m for m in model.modules() if isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm))]


def rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "one"
    r = CliRunner().invoke(app, ["train", "fashion-mlp-bn-after", "--dataset", "mnist-5k", "--epochs", "1",
                                 "--max-steps", "30", "--lr", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_default_writes_the_reports_precise_statistics(run, tmp_path):
    r = CliRunner().invoke(app, ["recalibrate", str(run / "checkpoint-final"), "--out", str(tmp_path / "p")],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    text = r.output.replace("\n", "")
    assert f"wrote {tmp_path / 'p'} (precise statistics, mode inference" in text, r.output
    assert "mode train" not in r.output  # the default computes and writes one mode
    ck = load_checkpoint(tmp_path / "p")
    rec = ck.meta["recalibrated"]
    data = _checkpoint_data(ck, None, None)
    assert rec["mode"] == "inference" and rec["examples"] == len(data.x_train) and rec["batch_size"] >= 1

    # the reports' path: the run's own precise pass over the same final model and training data
    final = load_checkpoint(run / "checkpoint-final")
    config = TrainConfig(**final.meta["train"])
    res = SimpleNamespace(precise_val_accuracy=None, precise_test_accuracy=None)
    reports = _precise(final.model, data, config, res, [])
    trainmode = recalibrate(final.model, data.x_train, batch_size=rec["batch_size"], mode="train", seed=0)
    for a, b, t in zip(bns(ck.model), bns(reports), bns(trainmode)):
        assert rel(a.running_mean, b.running_mean) < 1e-4 and rel(a.running_var, b.running_var) < 1e-4
    # mode train is told apart: after the first BN layer its statistics differ by far more than that tolerance
    assert max(rel(t.running_var, b.running_var) for t, b in zip(bns(trainmode), bns(reports))) > 1e-3

    # the number the run recorded as precise is the written checkpoint's number
    recorded = json.loads((run / "history.json").read_text())["results"]
    assert evaluate(ck.model, data.x_test, data.y_test)[1] == pytest.approx(recorded["precise_test_accuracy"],
                                                                          abs=1e-9)


def test_help_names_the_default_mode():
    r = CliRunner().invoke(app, ["recalibrate", "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "inference (default" in text and "--mode both" in text and "writes inference" in text


def test_the_library_default_is_the_cli_default():
    """One default mode: bnlab.deploy.recalibrate(model, x) is mode inference, as bnlab recalibrate and the reports."""
    import torch

    from bnlab.deploy import recalibrate
    from bnlab.models import build_model

    model = build_model({"input_shape": [6], "hidden": [8, 8], "bn": "before"}, seed=0).eval()
    x = torch.randn(96, 6) * 3 + 1
    default, inference, train = (recalibrate(model, x, batch_size=16, **kw)
                                 for kw in ({}, {"mode": "inference"}, {"mode": "train"}))
    for a, b, c in zip(*(m.state_dict().values() for m in (default, inference, train))):
        assert torch.equal(a, b)
    assert any(not torch.equal(b, c) for b, c in zip(inference.state_dict().values(), train.state_dict().values()))
