"""Runs resume mid-way: an interrupted run continued from its saved state ends exactly as an
uninterrupted one (CPU, same thread count), for every engine and feature that keeps state; a
corrupt state or one of other settings is never resumed; a state write cut at any point leaves the
old or the new state; ``bnlab train`` killed with SIGKILL or SIGINT continues where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.data import load_dataset
from bnlab.models import build_model
from bnlab.train import engine, single
from bnlab.train import resume as resume_mod
from bnlab.train.config import TrainConfig
from bnlab.train.engine import fit
from bnlab.train.history import History
from bnlab.train.resume import (STATE_DIR, RunInterrupted, SettingsChanged, TrainState, discard_state, read_state,
                                resume_point, save_state, saved_progress, setting_differences)
from bnlab.train.single import train_run
from bnlab.cli.train import _how_to_resume
from bnlab.experiments.runner import ExperimentInterrupted, continuing

MLP = {"input_shape": [1, 8, 8], "hidden": [24, 16], "bn": "before"}
CNN = {"kind": "cnn", "input_shape": [1, 8, 8], "blocks": [4], "final_block": 6, "bn": "before", "dropout": 0.2}
DIGITS = {"dataset": "digits", "batch_size": 64, "epochs": 4}
STEPS = 20  # per epoch: 1,221 training digits in batches of 64


def _interrupt_at_step(monkeypatch, step: int) -> list:
    """Make training step number ``step`` (counted over every fit in this test) raise
    KeyboardInterrupt, as Ctrl-C would; the returned list counts the steps taken."""
    taken = []
    real = engine.make_step

    def make_step(model, *a, **k):
        inner, name = real(model, *a, **k)

        def stepping(x, y):
            taken.append(1)
            if len(taken) == step:
                raise KeyboardInterrupt
            return inner(x, y)

        stepping.applies_update = inner.applies_update
        return stepping, name

    monkeypatch.setattr(engine, "make_step", make_step)
    return taken


def _clockless(history: dict) -> dict:
    """A History's dict without its wall-clock values (the documented exceptions)."""
    h = dict(history, seconds_to_target=None)
    h["epochs"] = [dict(e, seconds=None) for e in h["epochs"]]
    return h


def _results(res) -> dict:
    clock = {"train_seconds", "mean_epoch_seconds", "seconds_to_target"}
    return {k: v for k, v in res.summary().items() if k not in clock}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_run(ref_dir: Path, ref, got_dir: Path, got) -> None:
    assert _clockless(got.history.to_dict()) == _clockless(ref.history.to_dict())
    assert _results(got) == _results(ref)
    assert (got.test_loss, got.test_accuracy) == (ref.test_loss, ref.test_accuracy)
    assert got.checkpoints == ref.checkpoints
    for sub in ("checkpoint", "checkpoint-final"):  # the best model before the interruption was kept
        assert _files(got_dir / sub) == _files(ref_dir / sub), sub


CASES = {
    # engine, optimizer state, BN running statistics
    "native-sgd-momentum": (MLP, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}, "native"),
    "native-plain-sgd": (MLP, {"lr": 0.1}, "native"),
    # dropout makes MLPs take the fused step: its masks come from the noise generator
    "fused-dropout-adam": ({**MLP, "dropout": 0.3}, {"optimizer": "adam", "lr": 3e-3}, "fused"),
    # nn.Dropout in the autograd path draws from torch's global RNG; augmentation from the noise generator
    "autograd-cnn-augment-rmsprop": (CNN, {"optimizer": "rmsprop", "lr": 3e-3, "engine": "autograd",
                                           "augment": {"shear_range": 10, "zoom_range": 0.1}}, "autograd"),
    # the fused CNN step: channels_last, its dropout masks from the noise generator
    "fused-cnn-augment-rmsprop": (CNN, {"optimizer": "rmsprop", "lr": 3e-3,
                                        "augment": {"shear_range": 10, "zoom_range": 0.1}}, "fused"),
    "fused-cnn-bf16-adam": (CNN, {"optimizer": "adam", "lr": 3e-3, "precision": "bf16-mixed"}, "fused"),
    "probes-with-landscape": (MLP, {"lr": 0.05, "probes": {"every": 7, "landscape": True, "landscape_every": 11,
                                                           "probe_batch": 32}}, "native"),
    "target-accuracy": (MLP, {"lr": 0.1, "momentum": 0.5, "target_accuracy": 0.5}, "native"),
    # a learning-rate schedule continues at the update it stopped at
    "cosine-schedule-cnn": (CNN, {"lr": 0.05, "momentum": 0.9, "lr_schedule": "cosine"}, "fused"),
    "step-schedule-plain-sgd": (MLP, {"lr": 0.1, "lr_schedule": "step"}, "native"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of (model, config), each run once for the module."""
    runs = {}

    def run(model: dict, cfg: TrainConfig):
        key = json.dumps([model, cfg.model_dump(mode="json")], sort_keys=True)
        if key not in runs:
            folder = tmp_path_factory.mktemp("ref")
            runs[key] = folder, train_run(model, cfg, out=folder, progress=False)
        return runs[key]

    return run


@pytest.mark.parametrize("model,train,engine_used", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("cut", [30, 3 * STEPS], ids=["mid-epoch-2", "last-step-of-epoch-3"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, uninterrupted, model, train,
                                                                engine_used, cut):
    cfg = TrainConfig(**DIGITS, **train)
    ref_dir, ref = uninterrupted(model, cfg)
    assert ref.history.engine == engine_used and ref.resumed_from is None
    taken = _interrupt_at_step(monkeypatch, cut)
    with pytest.raises(RunInterrupted) as stop:
        train_run(model, cfg, out=tmp_path / "cut", progress=False)
    done = (cut - 1) // STEPS  # the epochs completed before the interrupted step
    assert stop.value.epoch == done == resume_point(tmp_path / "cut")
    assert not (tmp_path / "cut" / "history.json").exists()  # nothing recorded as finished
    assert json.loads((tmp_path / "cut" / "checkpoint" / "config.json").read_text())["meta"]["epoch"] <= done
    res = train_run(model, cfg, out=tmp_path / "cut", progress=False)
    assert res.resumed_from == done and any(f"continued from epoch {done} of 4" in n for n in res.notes)
    assert len(taken) == cut + (4 - done) * STEPS  # the resumed run took only the steps after the state
    _assert_same_run(ref_dir, ref, tmp_path / "cut", res)
    history_json = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert history_json["resumed_from"] == done and history_json["results"]["stopped"] == "completed"
    if train.get("probes"):
        assert {r[2] for r in res.history.probes} >= {"p50", "grad_norm", "loss_range", "images"}


@pytest.mark.parametrize("stopper,train,stopped_at,cut", [
    # best epoch 2, then two epochs without improvement: the state after epoch 3 carries "1 since the best"
    ("early_stopping", {"lr": 3.0, "patience": 2, "monitor": "val_loss"}, 4, 3 * STEPS + 5),
    ("budget", {"lr": 0.1, "max_steps": 50}, 3, 2 * STEPS + 5),  # steps done carry over
], ids=["early-stopping", "max-steps"])
def test_stopping_rules_carry_over_a_resume(tmp_path, monkeypatch, stopper, train, stopped_at, cut):
    cfg = TrainConfig(**{**DIGITS, "epochs": 6}, **train)
    ref = train_run(MLP, cfg, out=tmp_path / "ref", progress=False)
    assert ref.history.stopped == stopper and len(ref.history.epochs) == stopped_at
    _interrupt_at_step(monkeypatch, cut)
    with pytest.raises(RunInterrupted):
        train_run(MLP, cfg, out=tmp_path / "cut", progress=False)
    res = train_run(MLP, cfg, out=tmp_path / "cut", progress=False)
    assert res.resumed_from == (cut - 1) // STEPS
    _assert_same_run(tmp_path / "ref", ref, tmp_path / "cut", res)


def test_a_run_interrupted_after_training_redoes_only_the_evaluation(tmp_path, monkeypatch):
    cfg = TrainConfig(**DIGITS, lr=0.05, momentum=0.9)
    ref = train_run(MLP, cfg, out=tmp_path / "ref", progress=False)
    real = single.evaluate
    monkeypatch.setattr(single, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(RunInterrupted) as stop:
        train_run(MLP, cfg, out=tmp_path / "cut", progress=False)
    assert stop.value.epoch == 4 == resume_point(tmp_path / "cut")
    assert saved_progress(tmp_path / "cut") == (4, True)  # training over: only the evaluation is left
    assert not (tmp_path / "cut" / "history.json").exists()
    # what the user is told: the evaluation is redone, not "continue from epoch 4 of 4"
    assert "redo only the evaluation" in _how_to_resume(tmp_path / "cut", 4)
    assert continuing("r", 4, 4, True) == "r: training finished at epoch 4 of 4; redoing its evaluation"
    lines = ExperimentInterrupted(2, tmp_path, ["r", "s"], {"r": (4, 4, True), "s": (2, 4, False)}).lines()
    assert "r finished training (epoch 4 of 4); its evaluation will be redone" in lines
    assert "s will continue from epoch 2 of 4" in lines
    monkeypatch.setattr(single, "evaluate", real)
    taken = _interrupt_at_step(monkeypatch, 10 ** 9)
    res = train_run(MLP, cfg, out=tmp_path / "cut", progress=False)
    assert taken == [] and res.resumed_from == 4  # no training step
    assert any("only the evaluation was redone" in n for n in res.notes)
    _assert_same_run(tmp_path / "ref", ref, tmp_path / "cut", res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_run_resumes_with_its_cuda_generator(tmp_path, monkeypatch):
    """On a GPU, nn.Dropout draws from the device's generator, which the state carries too. GPU
    kernels need not be bit-reproducible, so the comparison has a tolerance."""
    cfg = TrainConfig(**DIGITS, optimizer="adam", lr=3e-3, device="cuda")
    ref = train_run(CNN, cfg, out=tmp_path / "ref", progress=False)
    _interrupt_at_step(monkeypatch, 30)
    with pytest.raises(RunInterrupted):
        train_run(CNN, cfg, out=tmp_path / "cut", progress=False)
    res = train_run(CNN, cfg, out=tmp_path / "cut", progress=False)
    assert res.resumed_from == 1 and len(res.history.step_loss) == len(ref.history.step_loss)
    assert torch.allclose(torch.tensor(res.history.step_loss), torch.tensor(ref.history.step_loss), rtol=1e-3, atol=1e-5)


def test_without_a_folder_an_interrupted_run_never_returns_a_result(monkeypatch):
    _interrupt_at_step(monkeypatch, 25)
    with pytest.raises(RunInterrupted) as stop:
        train_run(MLP, TrainConfig(**DIGITS), progress=False)
    assert stop.value.epoch == 0


def test_fit_without_a_state_folder_returns_an_interrupted_history(monkeypatch):
    """The notebook behaviour: the History so far, marked interrupted (never 'completed')."""
    data = load_dataset("digits")
    _interrupt_at_step(monkeypatch, 25)
    h = fit(build_model(MLP, seed=0), data, epochs=3, batch_size=64, progress=False)
    assert h.stopped == "interrupted" and len(h.epochs) == 1


def test_fit_resumes_with_a_state_folder_of_its_own(tmp_path, monkeypatch):
    """fit alone (no run folder): the state is keyed by fit's own arguments, model and data."""
    data = load_dataset("digits")
    kw = dict(epochs=3, batch_size=64, lr=0.05, momentum=0.9, progress=False, seed=3)
    ref = fit(build_model(MLP, seed=0), data, **kw)
    (tmp_path / "mine.txt").write_text("a user's file")  # the state's writer removes only its own files
    _interrupt_at_step(monkeypatch, 25)
    with pytest.raises(RunInterrupted) as stop:
        fit(build_model(MLP, seed=0), data, state_dir=tmp_path, **kw)
    assert stop.value.epoch == 1
    other, why = read_state(tmp_path, {"other": "settings"})
    assert other is None and "other settings" in why
    model = build_model(MLP, seed=0)
    h = fit(model, data, state_dir=tmp_path, **kw)
    assert _clockless(h.to_dict()) == _clockless(ref.to_dict())
    assert (tmp_path / "mine.txt").read_text() == "a user's file"
    # another learning rate: the state is not resumed, the run starts from zero
    assert fit(build_model(MLP, seed=0), data, state_dir=tmp_path, **{**kw, "lr": 0.01}).step_loss[0] == ref.step_loss[0]


# ---------------------------------------------------------------- corrupt states and other settings


@pytest.fixture()
def interrupted(tmp_path, monkeypatch):
    """A run folder interrupted after epoch 2, and the uninterrupted result (from another folder)."""
    cfg = TrainConfig(**DIGITS, lr=0.05, momentum=0.9)
    ref = train_run(MLP, cfg, out=tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        _interrupt_at_step(m, 45)
        with pytest.raises(RunInterrupted):
            train_run(MLP, cfg, out=tmp_path / "run", progress=False)
    assert resume_point(tmp_path / "run") == 2
    return tmp_path / "run", cfg, ref


def _tensor_file(run: Path) -> Path:
    (f,) = (run / STATE_DIR).glob("tensors-*.safetensors")
    return f


def _truncate(run: Path) -> None:
    f = _tensor_file(run)
    f.write_bytes(f.read_bytes()[:-100])


def _flip_a_byte(run: Path) -> None:
    f = _tensor_file(run)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # a weight, not the header: still readable as safetensors
    f.write_bytes(bytes(data))
    assert load_file(f)  # readable: only the digest tells


def _edit_json(run: Path) -> None:
    p = run / STATE_DIR / "state.json"
    doc = json.loads(p.read_text())
    doc["body"]["history"]["epochs"][0]["val_accuracy"] = 0.99  # still valid JSON
    p.write_text(json.dumps(doc))


def _garble_json(run: Path) -> None:
    p = run / STATE_DIR / "state.json"
    p.write_text(p.read_text()[:50])


def _delete_tensors(run: Path) -> None:
    _tensor_file(run).unlink()


CORRUPTIONS = {"truncated-tensors": (_truncate, "checksum mismatch"),
               "flipped-weight-byte": (_flip_a_byte, "checksum mismatch"),
               "edited-json": (_edit_json, "checksum mismatch"),
               "partial-json": (_garble_json, "unreadable"),
               "missing-tensors": (_delete_tensors, "unreadable")}


@pytest.mark.parametrize("corrupt,why", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_state_is_ignored_not_trusted(interrupted, corrupt, why):
    run, cfg, ref = interrupted
    corrupt(run)
    assert resume_point(run) is None
    state, reason = read_state(run / STATE_DIR)
    assert state is None and why in reason
    res = train_run(MLP, cfg, out=run, progress=False)
    assert res.resumed_from is None
    assert any(n.startswith("not resumed: ") and why in n and "started from zero" in n for n in res.notes)
    _assert_same_run(run.parent / "ref", ref, run, res)


def test_a_folder_of_other_settings_is_refused_and_left_as_it_was(interrupted):
    run, cfg, _ = interrupted
    before = _files(run)
    with pytest.raises(SettingsChanged) as e:
        train_run(MLP, cfg.model_copy(update={"lr": 0.01, "seed": 4}), out=run, progress=False)
    assert e.value.differences == ["train.lr 0.05 -> 0.01", "train.seed 0 -> 4"]
    assert "train.lr 0.05 -> 0.01" in str(e.value)
    assert _files(run) == before and resume_point(run) == 2
    res = train_run(MLP, cfg.model_copy(update={"lr": 0.01}), out=run, progress=False, restart=True)
    assert res.resumed_from is None and res.history.stopped == "completed"


def test_a_state_of_other_settings_is_not_resumed_even_without_run_json(interrupted):
    run, cfg, _ = interrupted
    (run / "run.json").unlink()  # nothing left to refuse the folder by: the state's own settings decide
    res = train_run(MLP, cfg.model_copy(update={"lr": 0.01}), out=run, progress=False)
    assert res.resumed_from is None
    assert any("other settings (train.lr 0.05 -> 0.01)" in n for n in res.notes)


def test_resume_point_checks_the_state_against_run_json(interrupted):
    run, _, _ = interrupted
    saved = json.loads((run / "run.json").read_text())
    saved["train"]["lr"] = 0.5
    (run / "run.json").write_text(json.dumps(saved))
    assert resume_point(run) is None
    (run / "run.json").unlink()
    assert resume_point(run) is None
    discard_state(run)
    assert not (run / STATE_DIR).exists() and resume_point(run) is None


def test_the_exceptions_cross_process_boundaries_intact():
    """The runner's workers are processes: what they raise arrives pickled."""
    import pickle

    e = pickle.loads(pickle.dumps(RunInterrupted(3)))
    assert isinstance(e, KeyboardInterrupt) and e.epoch == 3 and "after epoch 3" in str(e)
    e = pickle.loads(pickle.dumps(SettingsChanged(Path("runs/a"), ["train.lr 0.1 -> 0.2"])))
    assert e.differences == ["train.lr 0.1 -> 0.2"] and str(e) == "runs/a holds a run of other settings (train.lr 0.1 -> 0.2)"


def test_setting_differences_name_each_setting():
    saved = {"model": {"hidden": [16], "bn": "before"}, "train": {"lr": 0.1, "augment": None}}
    now = {"model": {"hidden": [32], "bn": "before"}, "train": {"lr": 0.1, "augment": {"zoom_range": 0.1}}}
    assert setting_differences(saved, now) == ['model.hidden [16] -> [32]', "train.augment null -> unset",
                                               "train.augment.zoom_range unset -> 0.1"]
    assert setting_differences(saved, saved) == []
    # settings added inside an empty table are named once, by themselves
    assert setting_differences({"train": {}}, {"train": {"lr": 0.01}}) == ["train.lr unset -> 0.01"]
    assert setting_differences({"a": {}}, {}) == ["a {} -> unset"]


# ---------------------------------------------------------------- atomic writes


def _state(epoch: int) -> TrainState:
    h = History()
    from bnlab.train.history import EpochRecord
    h.epochs = [EpochRecord(e, 1.0, 0.5, 1.0, 0.5, 0.1, e * 10) for e in range(1, epoch + 1)]
    h.step_loss = [float(epoch)] * (10 * epoch)
    return TrainState(epoch, 10 * epoch, 1.0, False, h, 0.5, 1, 0, "native",
                      {"w": torch.full((50,), float(epoch))}, {0: {"momentum_buffer": torch.ones(3) * epoch}},
                      {"torch": torch.get_rng_state()})


class _Killed(BaseException):
    pass


def test_a_state_write_cut_at_any_point_leaves_the_old_or_the_new_state(tmp_path, monkeypatch):
    """Every file-system step of save_state, cut as kill -9 would: what is read back is the
    complete previous state or the complete new one, never a mix."""
    settings = {"s": 1}
    real = {name: getattr(os, name) for name in ("replace", "fsync", "unlink", "open")}  # Path.unlink: os.unlink
    n_ops = None
    for cut in range(1, 40):
        folder = tmp_path / f"cut{cut}"
        save_state(folder, _state(1), settings)
        ops = []

        def op(name):
            def wrapped(*a, **k):
                ops.append(name)
                if len(ops) == cut:
                    raise _Killed
                return real[name](*a, **k)
            return wrapped

        with monkeypatch.context() as m:
            for name in real:
                m.setattr(resume_mod.os, name, op(name))
            try:
                save_state(folder, _state(2), settings)
                n_ops = n_ops or len(ops)
            except _Killed:
                pass
        state, why = read_state(folder, settings)
        assert why is None and state.epoch in (1, 2), (cut, why)
        assert state.history.step_loss == [float(state.epoch)] * (10 * state.epoch)
        assert state.model["w"].eq(state.epoch).all() and state.optimizer[0]["momentum_buffer"].eq(state.epoch).all()
        save_state(folder, _state(3), settings)  # the next save clears whatever the cut left
        names = sorted(p.name for p in folder.iterdir())
        assert len(names) == 2 and names[0] == "state.json" and names[1].endswith(".safetensors"), names
        if n_ops is not None and cut > n_ops:
            break
    assert n_ops and n_ops >= 6  # the cuts did go through every step


# ---------------------------------------------------------------- bnlab train, as a user would


TRAIN = ["train", "fashion-mlp-bn-before", "--dataset", "mnist-5k", "--batch-size", "16", "--lr", "0.01"]


def _env() -> dict:
    """One thread: the same arithmetic in every process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


def _bnlab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnlab", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), preexec_fn=lambda: os.nice(5))  # the test polls first


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_epoch(proc: subprocess.Popen, run: Path, epoch: int, timeout: float = 240) -> int:
    """Poll the run's resume point until it reaches ``epoch``; the process must still be running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        point = resume_point(run)
        if point is not None and point >= epoch:
            return point
        assert proc.poll() is None, f"bnlab train ended before epoch {epoch} was saved:\n{proc.stdout.read()}"
        time.sleep(0.005)
    raise AssertionError(f"no state of epoch {epoch} within {timeout} s")


def _history(run: Path) -> dict:
    h = json.loads((run / "history.json").read_text())
    for k in ("notes", "resumed_from", "seconds_to_target"):
        h.pop(k)
    for k in ("train_seconds", "mean_epoch_seconds", "seconds_to_target"):
        h["results"].pop(k)
    h["epochs"] = [dict(e, seconds=None) for e in h["epochs"]]
    return h


def test_bnlab_train_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    """The issue's 'done when': a 12-epoch run killed -9 after ~60 % of its epochs continues from a
    completed epoch (and says which) and ends with the uninterrupted run's results."""
    cmd = [*TRAIN, "--epochs", "12"]
    ref = _bnlab(*cmd, "--out", str(tmp_path / "ref"))
    run = tmp_path / "run"
    proc = _bnlab(*cmd, "--out", str(run))
    try:
        _wait_for_epoch(proc, run, 7)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    point = resume_point(run)
    assert proc.returncode == -signal.SIGKILL and 7 <= point < 12, point
    assert not (run / "history.json").exists()
    code, out = _finish(_bnlab(*cmd, "--out", str(run)))
    assert code == 0, out
    assert f"continuing from epoch {point} of 12" in out and f"continued from epoch {point} of 12" in out
    assert f"epoch {point}/12" not in out and f"epoch {point + 1}/12" in out  # only the epochs left ran
    code, ref_out = _finish(ref)
    assert code == 0, ref_out
    assert _history(run) == _history(tmp_path / "ref")
    assert json.loads((run / "history.json").read_text())["resumed_from"] == point
    assert not (run / STATE_DIR).exists()  # the result is recorded: the state is gone
    assert _files(run / "checkpoint") == _files(tmp_path / "ref" / "checkpoint")


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_bnlab_train_stopped_by_a_signal_says_how_to_resume_and_exits_128_plus_it(tmp_path, stop, code):
    run = tmp_path / "run"
    proc = _bnlab(*TRAIN, "--epochs", "12", "--out", str(run))
    expected = code
    try:
        _wait_for_epoch(proc, run, 1)
        proc.send_signal(stop)
        code, out = _finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    point = resume_point(run)
    assert code == expected, out
    assert "Traceback" not in out
    assert (f"interrupted: no result recorded; the state after epoch {point} is saved in {run / STATE_DIR}; run the "
            f"same command again to continue from epoch {point}") in " ".join(out.split())
    assert not (run / "history.json").exists() and not (run / "checkpoint-final").exists()


def test_bnlab_train_refuses_a_folder_of_other_settings_and_restarts_on_request(tmp_path):
    run = tmp_path / "run"
    args = ["train", "fashion-mlp-bn-before", "--dataset", "digits", "--epochs", "1", "--out", str(run)]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, [*args, "--lr", "0.5"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "holds a run of other settings (train.lr 0.001 -> 0.5)" in text and "--restart" in text
    assert "another --out" in text
    r = CliRunner().invoke(app, [*args, "--lr", "0.5", "--restart"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "run.json").read_text())["train"]["lr"] == 0.5
