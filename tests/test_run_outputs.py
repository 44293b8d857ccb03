"""What a run records and saves: every result field, the best and the final model (each measured
from its saved file), precise BN statistics, diverged runs, and the paired design (same seed, same
batches and initial weights across variants)."""

import json

import pytest
import torch

from bnlab.checkpoint import CheckpointError, load_checkpoint
from bnlab.data import load_dataset
from bnlab.deploy import recalibrate
from bnlab.experiments.results import RESULT_FIELDS
from bnlab.experiments.runner import execute_run
from bnlab.models import build_model
from bnlab.train import engine
from bnlab.train.config import TrainConfig
from bnlab.train.engine import fit
from bnlab.train.resume import discard_state
from bnlab.train.single import train_run

SYNTH = {"n_train": 300, "n_test": 400}
MLP_BN = {"input_shape": [10], "hidden": [16], "bn": "after"}


def _plan(model: dict, run_id="v/seed-0", **train) -> dict:
    return {"run_id": run_id, "model": model, "train": TrainConfig(**train).model_dump()}


@torch.no_grad()
def _accuracy_loss(model, x, y) -> tuple[float, float]:
    """Independent of bnlab.train.evaluate: one forward pass over the whole set, float64 loss."""
    model.eval()
    logits = model(x).double()
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return float((logits.argmax(1) == y).double().mean()), loss


# ---------------------------------------------------------------- every field, from the saved models


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A tiny BN MLP on real digits (mnist-5k: tested on the 10,000 MNIST test digits) that reaches
    an easy target, so that every field has a value."""
    out = tmp_path_factory.mktemp("exp")
    res = execute_run(_plan({"input_shape": [1, 28, 28], "hidden": [32], "bn": "before"}, dataset="mnist-5k",
                            lr=0.05, epochs=2, max_steps=40, target_accuracy=0.3), str(out))
    return out, res


def test_every_result_field_is_filled_for_a_done_run(done_run):
    _, res = done_run
    assert res["status"] == "done", res.get("error")
    empty = [f.name for f in RESULT_FIELDS if res.get(f.name) is None]
    assert not empty, f"result fields without a value: {empty}"
    assert res["stopped"] == "budget" and res["steps_run"] == 40 and res["epochs_run"] == 1
    assert res["steps_to_target"] <= res["steps_run"] and res["seconds_to_target"] <= res["train_seconds"] + 1e-9
    assert res["artefacts"]["checkpoint"] == "checkpoint" and res["artefacts"]["checkpoint_final"] == "checkpoint-final"


def test_reported_test_metrics_are_those_of_the_saved_models(done_run):
    out, res = done_run
    data = load_dataset("mnist-5k")
    assert len(data.y_test) == 10000
    run = out / "runs" / "v" / "seed-0"
    final = load_checkpoint(run, which="final")
    best = load_checkpoint(run)  # the default: the best-validation model
    assert (final.kind, best.kind) == ("final", "best")
    acc, loss = _accuracy_loss(final.model, data.x_test, data.y_test)
    assert res["test_accuracy"] == pytest.approx(acc, abs=1e-12) and res["test_loss"] == pytest.approx(loss, rel=1e-5)
    acc, loss = _accuracy_loss(best.model, data.x_test, data.y_test)
    assert res["best_test_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["best_test_loss"] == pytest.approx(loss, rel=1e-5)
    assert best.meta["epoch"] == res["best_epoch"] and final.meta["epoch"] == res["epochs_run"]
    assert best.meta["test_accuracy"] == res["best_test_accuracy"]
    hist = json.loads((run / "history.json").read_text())
    assert {f.name for f in RESULT_FIELDS} <= set(hist["results"])


def test_precise_statistics_are_those_of_the_final_model(done_run):
    out, res = done_run
    data = load_dataset("mnist-5k")
    final = load_checkpoint(out / "runs" / "v" / "seed-0", which="final")
    cfg = TrainConfig(**json.loads((out / "runs" / "v" / "seed-0" / "run.json").read_text())["train"])
    precise = recalibrate(final.model, data.x_train, batch_size=cfg.batch_size, mode="inference")
    assert res["precise_val_accuracy"] == pytest.approx(_accuracy_loss(precise, data.x_val, data.y_val)[0])
    assert res["precise_test_accuracy"] == pytest.approx(_accuracy_loss(precise, data.x_test, data.y_test)[0])


def test_best_and_final_model_are_reported_separately(tmp_path):
    """Early stopping ends one epoch after the best: two different models, each measured from its file."""
    res = execute_run(_plan(MLP_BN, dataset="synthetic", dataset_options=SYNTH, epochs=8, lr=0.5, patience=1),
                      str(tmp_path))
    assert res["status"] == "done" and res["stopped"] == "early_stopping"
    assert res["best_epoch"] < res["epochs_run"]
    data = load_dataset("synthetic", **SYNTH)
    run = tmp_path / "runs" / "v" / "seed-0"
    best_acc, best_loss = _accuracy_loss(load_checkpoint(run / "checkpoint").model, data.x_test, data.y_test)
    final_acc, final_loss = _accuracy_loss(load_checkpoint(run / "checkpoint-final").model, data.x_test, data.y_test)
    assert best_loss != pytest.approx(final_loss)  # two different models, or this test proves nothing
    assert res["best_test_accuracy"] == pytest.approx(best_acc) and res["best_test_loss"] == pytest.approx(best_loss)
    assert res["test_accuracy"] == pytest.approx(final_acc) and res["test_loss"] == pytest.approx(final_loss)
    assert res["final_val_accuracy"] == json.loads((run / "checkpoint-final" / "config.json").read_text())[
        "meta"]["val_accuracy"]


def test_models_without_batch_statistics_get_no_precise_values(tmp_path):
    for i, model in enumerate(({"input_shape": [10], "hidden": [16]},
                               {"input_shape": [10], "hidden": [16], "bn": "after", "norm": "layer"})):
        # a folder of its own each: a run folder holding another model's run is refused
        res = execute_run(_plan(model, dataset="synthetic", dataset_options=SYNTH, epochs=1), str(tmp_path / f"x{i}"))
        assert res["status"] == "done" and res["test_accuracy"] is not None
        assert res["precise_val_accuracy"] is None and res["precise_test_accuracy"] is None


def _diverge_at(monkeypatch, step_no: int):
    """Make the training step blow up (weights and loss non-finite) at step ``step_no``."""
    real = engine.make_step

    def make_step(model, *a, **k):
        step, name = real(model, *a, **k)
        calls = {"n": 0}

        def exploding(x, y):
            calls["n"] += 1
            loss, corr = step(x, y)
            if calls["n"] >= step_no:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
                loss = torch.tensor(float("nan"))
            return loss, corr

        exploding.applies_update = step.applies_update
        return exploding, name

    monkeypatch.setattr(engine, "make_step", make_step)


def test_a_diverged_run_has_sensible_values(tmp_path, monkeypatch):
    """Diverged in its second epoch (8 steps per epoch): the final model is not finite, so it is
    neither saved nor measured; the best model (epoch 1) is; time-to-target is censored at the last
    evaluation."""
    _diverge_at(monkeypatch, 15)
    res = execute_run(_plan(MLP_BN, dataset="synthetic", dataset_options=SYNTH, epochs=3, lr=0.1,
                            target_accuracy=0.99), str(tmp_path))
    assert res["status"] == "diverged" and res["stopped"] == "diverged" and "diverged" in res["error"]
    assert {f.name for f in RESULT_FIELDS} <= set(res)
    for name in ("final_val_accuracy", "final_val_loss", "test_accuracy", "test_loss", "precise_val_accuracy",
                 "precise_test_accuracy", "epochs_to_target", "steps_to_target", "seconds_to_target"):
        assert res[name] is None, name
    assert res["best_epoch"] == 1 and res["epochs_run"] == 1 and res["steps_run"] == 8  # 240 train / 32
    assert res["train_seconds"] > 0 and res["mean_epoch_seconds"] == pytest.approx(res["train_seconds"])
    assert res["best_val_accuracy"] is not None and 0 <= res["best_test_accuracy"] <= 1
    run = tmp_path / "runs" / "v" / "seed-0"
    assert not (run / "checkpoint-final").exists() and res["artefacts"]["checkpoint_final"] is None
    data = load_dataset("synthetic", **SYNTH)
    assert res["best_test_accuracy"] == pytest.approx(
        _accuracy_loss(load_checkpoint(run).model, data.x_test, data.y_test)[0])
    with pytest.raises(CheckpointError, match="no final model.*use --model best"):
        load_checkpoint(run, which="final")


def test_a_run_diverging_before_its_first_evaluation(tmp_path, monkeypatch):
    _diverge_at(monkeypatch, 1)
    res = execute_run(_plan(MLP_BN, dataset="synthetic", dataset_options=SYNTH, epochs=2), str(tmp_path))
    assert res["status"] == "diverged"
    assert (res["epochs_run"], res["steps_run"], res["train_seconds"]) == (0, 0, 0)
    assert all(res[n] is None for n in ("best_epoch", "best_test_accuracy", "best_val_accuracy", "test_accuracy",
                                        "mean_epoch_seconds"))
    with pytest.raises(CheckpointError, match="not a bnlab checkpoint"):
        load_checkpoint(tmp_path / "runs" / "v" / "seed-0")


def test_a_redone_run_never_keeps_an_earlier_attempts_model(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="synthetic", dataset_options=SYNTH, epochs=1)
    train_run(MLP_BN, cfg, out=tmp_path, progress=False)
    assert (tmp_path / "checkpoint").is_dir() and (tmp_path / "checkpoint-final").is_dir()
    discard_state(tmp_path)  # as the runner does once the result is stored: a redo starts from zero
    _diverge_at(monkeypatch, 1)
    res = train_run(MLP_BN, cfg, out=tmp_path, progress=False)
    assert res.checkpoints == {} and not (tmp_path / "checkpoint").exists()
    assert not (tmp_path / "checkpoint-final").exists()


# ---------------------------------------------------------------- paired design


def _record_batches(monkeypatch) -> list:
    """Record (x, y) of every training step, whatever the engine."""
    seen = []
    real = engine.make_step

    def make_step(model, *a, **k):
        step, name = real(model, *a, **k)

        def recording(x, y):
            seen.append((x.clone(), y.clone()))
            return step(x, y)

        recording.applies_update = step.applies_update
        return recording, name

    monkeypatch.setattr(engine, "make_step", make_step)
    return seen


def _batches(monkeypatch, spec: dict, seed: int, augment=None, epochs=2) -> list:
    data = load_dataset("synthetic", n_train=100, n_test=10, features=6, classes=3)
    seen = _record_batches(monkeypatch)
    fit(build_model({"input_shape": [6], "num_classes": 3, "hidden": [8], **spec}, seed=seed), data, epochs=epochs,
        batch_size=16, seed=seed, augment=augment, progress=False, lr=0.1)
    monkeypatch.undo()
    return seen


VARIANTS = {"none": {}, "bn-before": {"bn": "before"}, "bn-after": {"bn": "after"}, "dropout": {"dropout": 0.5},
            "bn-dropout": {"bn": "after", "dropout": 0.3}}


@pytest.mark.parametrize("variant", ["bn-before", "bn-after", "dropout", "bn-dropout"])
def test_variants_with_one_seed_see_the_same_batches(monkeypatch, variant):
    ref = _batches(monkeypatch, VARIANTS["none"], seed=3)
    got = _batches(monkeypatch, VARIANTS[variant], seed=3)
    assert len(got) == len(ref) == 10  # 80 training examples (20 % validation) / 16 = 5 steps per epoch
    for (xa, ya), (xb, yb) in zip(ref, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_different_seeds_see_different_orders(monkeypatch):
    a = _batches(monkeypatch, {}, seed=0)
    b = _batches(monkeypatch, {}, seed=1)
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def test_augmentation_draws_no_number_from_the_data_order(monkeypatch):
    """With images and augmentation: the same examples in the same order (labels and the epoch
    permutation); only the pixels differ, by the augmentation."""
    from bnlab.data.augment import RandomAffine

    data = load_dataset("digits")
    orders = {}
    for name, aug in (("plain", None), ("augmented", RandomAffine(shear_range=10, zoom_range=0.1,
                                                                  horizontal_flip=True))):
        perms = []
        real = engine.epoch_order
        monkeypatch.setattr(engine, "epoch_order", lambda n, g: perms.append(real(n, g)) or perms[-1])
        seen = _record_batches(monkeypatch)
        fit(build_model({"input_shape": [1, 8, 8], "hidden": [8], "dropout": 0.2}, seed=5), data, epochs=2,
            batch_size=64, seed=5, augment=aug, progress=False)
        monkeypatch.undo()
        orders[name] = (perms, [y for _, y in seen], [x for x, _ in seen])
    (pa, ya, xa), (pb, yb, xb) = orders["plain"], orders["augmented"]
    assert len(pa) == 2 and all(torch.equal(p, q) for p, q in zip(pa, pb))
    assert all(torch.equal(p, q) for p, q in zip(ya, yb))
    assert not torch.equal(xa[0], xb[0])  # the augmentation did act


def test_the_data_order_is_the_seeded_permutation():
    g = torch.Generator().manual_seed(7)
    first, second = engine.epoch_order(50, g), engine.epoch_order(50, g)
    assert sorted(first.tolist()) == list(range(50)) and not torch.equal(first, second)
    assert torch.equal(first, torch.randperm(50, generator=torch.Generator().manual_seed(7)))
    assert engine.stream_seed(7, "noise") != engine.stream_seed(8, "noise") != engine.stream_seed(7, "other")


@pytest.mark.parametrize("init", ["he_normal", "glorot_uniform", "normal"])
def test_equal_architectures_start_from_equal_weights(init):
    def weights(spec, seed):
        m = build_model({"input_shape": [1, 8, 8], "hidden": [12, 10], "init": init, **spec}, seed=seed)
        return [mod.weight for mod in m.modules() if isinstance(mod, (torch.nn.Linear,))]

    ref = weights({}, 4)
    for spec in VARIANTS.values():
        assert all(torch.equal(a, b) for a, b in zip(ref, weights(spec, 4), strict=True)), spec
    assert not torch.equal(ref[0], weights({}, 5)[0])
    cnn = {"kind": "cnn", "input_shape": [1, 8, 8], "blocks": [4], "final_block": 6, "init": init}
    a = build_model({**cnn, "bn": "none"}, seed=1)
    b = build_model({**cnn, "bn": "before"}, seed=1)
    assert all(torch.equal(p.weight, q.weight) for p, q in zip(
        [m for m in a.modules() if isinstance(m, torch.nn.Conv2d)],
        [m for m in b.modules() if isinstance(m, torch.nn.Conv2d)], strict=True))


def test_train_run_is_reproducible_with_torch_default_init(tmp_path):
    """torch's default init draws from the global RNG: a run must not depend on its state."""
    spec = {"input_shape": [10], "hidden": [16], "init": "torch_default"}
    cfg = TrainConfig(dataset="synthetic", dataset_options=SYNTH, epochs=1, seed=2)
    torch.manual_seed(123)
    a = train_run(spec, cfg, progress=False)
    torch.manual_seed(456)
    b = train_run(spec, cfg, progress=False)
    assert a.history.step_loss == b.history.step_loss and a.test_loss == b.test_loss


def test_cli_train_prints_both_models_and_where_they_are(tmp_path):
    from typer.testing import CliRunner

    from bnlab.cli import app

    r = CliRunner().invoke(app, ["train", "fashion-mlp-bn-after", "--dataset", "synthetic", "--epochs", "2",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for words in ("final model (epoch 2): test loss", "with precise BN statistics: validation accuracy",
                  "best-validation model (epoch", "by val_accuracy): test loss", "test set: 200 examples",
                  "checkpoint/ (the best-validation model, used by predict / serve / export by default)",
                  "checkpoint-final/ (the final model)"):
        assert words in text, words

