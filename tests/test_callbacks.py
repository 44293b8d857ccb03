"""fit's callbacks: the protocol, the built-ins (progress within an epoch, CSV, TensorBoard read back
from its event files), stopping, and resuming with callbacks. Oracle: the History fit returns."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
import torch
from rich.console import Console

from bnlab.data import load_dataset
from bnlab.models import build_model
from bnlab.probes import ProbeConfig
from bnlab.train.callbacks import Callback, CSVLogger, ProgressBar
from bnlab.train.engine import fit
from bnlab.train.resume import RunInterrupted, read_state

SPEC = {"kind": "mlp", "input_shape": [1, 8, 8], "hidden": [16, 8], "bn": "before", "activation": "sigmoid"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class Recorder(Callback):
    def __init__(self):
        self.calls, self.losses, self.records = [], [], []

    def on_train_begin(self, ctx):
        self.calls.append("begin")

    def on_step_begin(self, ctx, step):
        self.calls.append(("step", step))

    def on_step_end(self, ctx, step, loss, correct, x, y):
        self.losses.append(float(loss))
        assert 0 <= int(correct) <= len(y) and len(x) == len(y)

    def on_epoch_end(self, ctx, rec):
        self.records.append(rec)
        self.calls.append(("epoch", rec.epoch))

    def on_train_end(self, ctx):
        self.calls.append("end")


def test_protocol_sees_every_step_and_epoch(digits):
    rec = Recorder()
    h = fit(build_model(SPEC, seed=0), digits, epochs=2, batch_size=64, lr=0.1, progress=False, callbacks=[rec])
    steps = h.epochs[-1].steps
    assert rec.calls[0] == "begin" and rec.calls[-1] == "end"
    assert [c for c in rec.calls if c[0] == "step"] == [("step", s) for s in range(1, steps + 1)]
    assert rec.losses == pytest.approx(h.step_loss, rel=1e-6)
    assert rec.records == h.epochs


def test_a_callback_can_stop_training(digits):
    class StopAfterOne(Callback):
        def on_epoch_end(self, ctx, rec):
            ctx.request_stop(f"enough after epoch {rec.epoch}")

    h = fit(build_model(SPEC, seed=0), digits, epochs=5, batch_size=64, progress=False, callbacks=[StopAfterOne()])
    assert len(h.epochs) == 1 and h.stopped == "callback" and h.message == "enough after epoch 1"


def test_progress_bar_advances_within_the_epoch(digits):
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    bar = ProgressBar(True, refresh_seconds=0.0, console=console)
    seen = []

    class Look(Callback):
        def on_step_end(self, ctx, step, loss, correct, x, y):
            if step == 3:  # the first epoch has 18 steps: the bar must not wait for its end
                seen.append(bar.bar._progress.tasks[0].completed)

    fit(build_model(SPEC, seed=0), digits, epochs=1, batch_size=64, progress=bar, callbacks=[Look()])
    assert seen == [3]
    assert "epoch 1/1" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())  # rich colours digits


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_logger_matches_history_and_survives_a_resume(digits, tmp_path):
    h = fit(build_model(SPEC, seed=0), digits, epochs=3, batch_size=64, progress=False,
            callbacks=[CSVLogger(tmp_path / "full.csv")])
    rows = _rows(tmp_path / "full.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["val_accuracy"]) for r in rows] == pytest.approx([e.val_accuracy for e in h.epochs])

    class CtrlCAtEpoch2(Callback):
        def on_epoch_end(self, ctx, rec):
            if rec.epoch == 2:
                raise KeyboardInterrupt

    state = tmp_path / "state"
    with pytest.raises(RunInterrupted):
        fit(build_model(SPEC, seed=0), digits, epochs=3, batch_size=64, progress=False, state_dir=state,
            callbacks=[CSVLogger(tmp_path / "resumed.csv"), CtrlCAtEpoch2()])
    assert read_state(state)[0].epoch == 1  # epoch 2 was interrupted before its state was saved
    h2 = fit(build_model(SPEC, seed=0), digits, epochs=3, batch_size=64, progress=False, state_dir=state,
             callbacks=[CSVLogger(tmp_path / "resumed.csv")])
    again = _rows(tmp_path / "resumed.csv")
    assert [int(r["epoch"]) for r in again] == [1, 2, 3]  # epoch 2 once, not twice
    assert [e.val_accuracy for e in h2.epochs] == [e.val_accuracy for e in h.epochs]
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in rows]


# ---- TensorBoard

def _events(folder):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_tensorboard_logs_read_back(digits, tmp_path):
    from bnlab.train.tensorboard import TensorBoard

    probes = ProbeConfig(every=5, probe_batch=32)
    h = fit(build_model(SPEC, seed=0), digits, epochs=2, batch_size=64, progress=False, probes=probes,
            callbacks=[TensorBoard(tmp_path / "tb")])
    acc = _events(tmp_path / "tb")
    tags = acc.Tags()
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, h.epochs[-1].steps + 1))
    assert np.allclose([e.value for e in loss], h.step_loss, rtol=1e-6)
    assert [e.value for e in acc.Scalars("epoch/val_accuracy")] == pytest.approx([e.val_accuracy for e in h.epochs])
    # Figure 1 in TensorBoard: the sigmoid inputs on the probe batch at every sampled step
    pre = [t for t in tags["histograms"] if t.startswith("preactivation/")]
    assert len(pre) == 2
    sampled = [e.step for e in acc.Histograms(pre[0])]
    assert sampled == list(range(1, h.epochs[-1].steps + 1, 5))
    hist0 = acc.Histograms(pre[0])[0].histogram_value
    assert hist0.num == 32 * 16  # probe images x units of the first hidden layer
    bn = [t for t in tags["histograms"] if t.startswith("bn/")]
    assert len(bn) == 4 and [e.step for e in acc.Histograms(bn[0])] == [1, 2]


def test_tensorboard_from_the_cli_and_an_experiment_spec(tmp_path):
    from typer.testing import CliRunner

    from bnlab.cli import app
    from bnlab.experiments import parse_experiment, run_experiment
    from tiny_specs import TINY

    res = CliRunner().invoke(app, ["train", "fashion-mlp-bn-before", "--dataset", "digits", "--epochs", "1",
                                   "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.output
    assert "epoch/val_accuracy" in _events(tmp_path / "tb").Tags()["scalars"]
    spec = parse_experiment({**TINY, "train": {**TINY["train"], "tensorboard": True, "csv_log": True}})
    run_experiment(spec, tmp_path / "e", workers=1)
    run = tmp_path / "e" / "runs" / "bn" / "seed-0"
    assert "step/loss" in _events(run / "tensorboard").Tags()["scalars"]
    assert len(_rows(run / "epochs.csv")) == 1


def test_tensorboard_after_a_resume_shows_each_step_once(digits, tmp_path):
    from bnlab.train.tensorboard import TensorBoard

    class CtrlCMidEpoch2(Callback):
        def on_step_end(self, ctx, step, loss, correct, x, y):
            if step == ctx.steps_per_epoch + 5:  # 5 steps into epoch 2: their events are written, then lost
                raise KeyboardInterrupt

    state, tb = tmp_path / "state", tmp_path / "tb"
    with pytest.raises(RunInterrupted):
        fit(build_model(SPEC, seed=0), digits, epochs=2, batch_size=64, progress=False, state_dir=state,
            callbacks=[TensorBoard(tb), CtrlCMidEpoch2()])
    h = fit(build_model(SPEC, seed=0), digits, epochs=2, batch_size=64, progress=False, state_dir=state,
            callbacks=[TensorBoard(tb)])
    loss = _events(tb).Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, h.epochs[-1].steps + 1))  # no step twice
    assert np.allclose([e.value for e in loss], h.step_loss, rtol=1e-6)


def test_tensorboard_of_a_run_started_again_from_zero_replaces_the_old_events(digits, tmp_path):
    from bnlab.train.tensorboard import TensorBoard

    for _ in range(2):  # the same folder twice, as bnlab train --restart (or a rerun) does
        h = fit(build_model(SPEC, seed=0), digits, epochs=1, batch_size=64, progress=False,
                callbacks=[TensorBoard(tmp_path / "tb")])
    acc = _events(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, h.epochs[-1].steps + 1))
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [1]
