"""Many seeds as one model: each member of a stacked run gives its single run's History and weights
(the oracle: ``fit`` on that seed alone, through the engine fit picks, and through autograd)."""

import math

import pytest
import torch

from bnlab.checkpoint import load_checkpoint
from bnlab.data.dataset import Dataset
from bnlab.models import build_model, load_model_spec
from bnlab.train import fit
from bnlab.train.stacked import fit_stacked, stack_unsupported

SEEDS = [3, 0, 7]


def _data(n=200, f=12, c=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=dtype)
    y = (x[:, :c].argmax(1) + (torch.rand(n, generator=g) < 0.2).long()) % c
    return Dataset("toy", x[:150], y[:150], x[150:], y[150:], x[:0], y[:0], c)


def _models(spec, dtype=torch.float64, seeds=SEEDS):
    return [build_model(spec, seed=s).to(dtype) for s in seeds]


def _close(a, b, tol):
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b)) and len(a) == len(b)


def _check_members(spec, hists, stacked_models, kw, tol, engine="auto", dtype=torch.float64, data=None):
    data = data or _data(dtype=dtype)
    for seed, h, m in zip(SEEDS, hists, stacked_models):
        single = build_model(spec, seed=seed).to(dtype)
        hs = fit(single, data, seed=seed, progress=False, engine=engine, **kw)
        assert h.stopped == hs.stopped and len(h.epochs) == len(hs.epochs), (seed, h.stopped, hs.stopped)
        assert _close(h.step_loss, hs.step_loss, tol), seed
        for e, es in zip(h.epochs, hs.epochs):
            assert e.steps == es.steps and e.train_accuracy == es.train_accuracy
            assert math.isclose(e.val_loss, es.val_loss, rel_tol=tol) and e.val_accuracy == es.val_accuracy
        assert h.best_epoch == hs.best_epoch and h.epochs_to_target == hs.epochs_to_target
        if h.stopped == "diverged":  # its final weights are neither saved nor measured (the single
            continue                 # step may have applied its non-finite update already)
        for k, v in single.state_dict().items():
            # atol at least 1e-9: a parameter whose gradient is zero by symmetry (an input BN's bias before a
            # Linear and BN) moves only by its rounding noise, which RMSprop / Adam normalise up to ~1e-10
            assert torch.allclose(m.state_dict()[k].to(v.dtype), v, rtol=tol, atol=max(tol, 1e-9)), (seed, k)


MLP = {"hidden": [16, 8], "input_shape": [12], "num_classes": 3}


@pytest.mark.parametrize("variant,optimizer", [
    ({"bn": "before"}, {"optimizer": "sgd"}),
    ({"bn": "after", "activation": "tanh", "norm_options": {"convention": "keras"}},
     {"optimizer": "sgd", "momentum": 0.9, "nesterov": True}),
    ({"bn": "before", "input_bn": True, "activation": "elu"}, {"optimizer": "rmsprop"}),
    ({"bn": "none", "activation": "leaky_relu"}, {"optimizer": "adam", "weight_decay": 1e-3}),
    ({"bn": "before", "norm_options": {"momentum": None}}, {"optimizer": "sgd"}),  # cumulative average
    ({"bn": "before", "norm_options": {"convention": "keras", "momentum": 0.0}}, {"optimizer": "sgd"}),
    ({"bn": "before", "norm_options": {"momentum": 1.0}}, {"optimizer": "adam"}),
    ({"bn": "before"}, {"optimizer": "sgd", "momentum": 0.9, "lr_schedule": "cosine"}),
    ({"bn": "before"}, {"optimizer": "sgd", "lr_schedule": "step"}),
])
def test_each_member_is_its_single_run_in_float64(variant, optimizer):
    spec = {**MLP, **variant}
    kw = dict(lr=0.05, batch_size=16, epochs=3, target_accuracy=0.5, **optimizer)
    models = _models(spec)
    hists = fit_stacked(models, _data(), SEEDS, **kw)
    assert all(h.engine == "stacked:3" for h in hists)
    _check_members(spec, hists, models, kw, 1e-10)


def test_dropout_masks_come_from_each_members_noise_stream():
    spec = {**MLP, "bn": "before", "dropout": 0.3}
    kw = dict(lr=0.05, batch_size=16, epochs=2)
    models = _models(spec)
    hists = fit_stacked(models, _data(), SEEDS, **kw)
    _check_members(spec, hists, models, kw, 1e-10)  # the fused single step: the same masks


def test_float32_members_match_within_float32_tolerance():
    spec = {**MLP, "bn": "before"}
    kw = dict(lr=0.05, batch_size=16, epochs=2)
    models = _models(spec, torch.float32)
    hists = fit_stacked(models, _data(dtype=torch.float32), SEEDS, **kw)
    _check_members(spec, hists, models, kw, 2e-4, dtype=torch.float32)


def test_a_diverging_member_stops_and_the_others_go_on():
    spec = {**MLP, "bn": "none"}
    data = _data()
    data.x_train[40:60] *= 1e300  # huge inputs: with these a run overflows once they are drawn
    kw = dict(lr=0.05, batch_size=16, epochs=3)
    models = _models(spec)
    hists = fit_stacked(models, data, SEEDS, **kw)
    assert all(h.stopped == "diverged" for h in hists)  # every seed draws them at some step
    _check_members(spec, hists, models, kw, 1e-10, data=data)


def test_a_diverging_member_leaves_while_the_others_finish():
    spec = {**MLP, "bn": "before"}
    kw = dict(lr=0.05, batch_size=16, epochs=3)
    models = _models(spec)
    with torch.no_grad():  # seed 0's network alone is broken: its loss is NaN from its first step
        models[1].dense.weight.fill_(float("nan"))
    hists = fit_stacked(models, _data(), SEEDS, **kw)
    assert [h.stopped for h in hists] == ["completed", "diverged", "completed"]
    assert hists[1].epochs == [] and "epoch 1, step 1" in hists[1].message
    for k in (0, 2):
        single = build_model(spec, seed=SEEDS[k]).double()
        hs = fit(single, _data(), seed=SEEDS[k], progress=False, **kw)
        assert _close(hists[k].step_loss, hs.step_loss, 1e-10)


def test_early_stopping_and_best_checkpoints_per_member(tmp_path):
    spec = {**MLP, "bn": "before"}
    kw = dict(lr=0.5, batch_size=16, epochs=6, patience=1, monitor="val_loss")
    models = _models(spec, torch.float32)  # checkpoints hold float32 models
    dirs = [tmp_path / f"best-{s}" for s in SEEDS]
    data = _data(dtype=torch.float32)
    hists = fit_stacked(models, data, SEEDS, checkpoint_dirs=dirs, **kw)
    for seed, h, d in zip(SEEDS, hists, dirs):
        single = build_model(spec, seed=seed)
        hs = fit(single, data, seed=seed, progress=False, checkpoint_dir=tmp_path / f"single-{seed}", **kw)
        assert (h.stopped, len(h.epochs), h.best_epoch) == (hs.stopped, len(hs.epochs), hs.best_epoch)
        a, b = load_checkpoint(d), load_checkpoint(tmp_path / f"single-{seed}")
        assert a.meta["epoch"] == b.meta["epoch"]
        for k, v in b.model.state_dict().items():
            assert torch.allclose(a.model.state_dict()[k], v, rtol=1e-4, atol=1e-5), k
    assert len({len(h.epochs) for h in hists}) > 1  # members left the stack at different epochs


def test_step_budget_and_the_seed_mlp_on_images():
    spec = load_model_spec("fashion-mlp-bn-before")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(120, 1, 28, 28, generator=g), torch.randint(0, 10, (120,), generator=g)
    data = Dataset("img", x[:90], y[:90], x[90:], y[90:], x[:0], y[:0], 10)
    kw = dict(lr=0.1, batch_size=32, epochs=5, max_steps=7)
    models = [build_model(spec, seed=s) for s in SEEDS]
    hists = fit_stacked(models, data, SEEDS, **kw)
    assert all(h.stopped == "budget" and h.epochs[-1].steps == 7 for h in hists)
    _check_members(spec, hists, models, kw, 2e-4, dtype=torch.float32, data=data)


def test_unsupported_models_are_named():
    layer = build_model({**MLP, "bn": "before", "norm": "layer"})
    assert any("LayerNorm" in r for r in stack_unsupported(layer))
    with pytest.raises(ValueError, match="stacked training does not support"):
        fit_stacked([layer], _data(), [0])
    with pytest.raises(ValueError, match="one seed per model"):
        fit_stacked(_models(MLP), _data(), [0, 1])


# ---- the runner: seeds of a variant as one unit of work

import json as _json

from bnlab.experiments import load_results, parse_experiment, run_experiment
from bnlab.experiments.runner import ExperimentInterrupted, stack_groups
from bnlab.experiments.spec import expand

EXP = {"name": "stacking", "seeds": 3,
       "data": {"dataset": "synthetic", "validation": 0.25,
                "options": {"n_train": 160, "n_test": 40, "features": 6, "classes": 3}},
       "model": {"kind": "mlp", "input_shape": [6], "num_classes": 3, "hidden": [8]},
       "train": {"lr": 0.1, "epochs": 3, "batch_size": 16, "patience": 2},
       "variants": {"bn": {"model": {"bn": "before"}}, "plain": {"model": {"bn": "none"}},
                    "probed": {"model": {"bn": "before"}, "train": {"probes": {"every": 5}}}}}


def _by_run(folder):
    return {r["run_id"]: r for r in load_results(folder)[1]}


def test_the_runner_stacks_seeds_and_stores_what_separate_runs_store(tmp_path):
    spec = parse_experiment(EXP)
    messages = []
    run_experiment(spec, tmp_path / "auto", workers=1, on_progress=lambda p, m: messages.append(m), stack="on")
    run_experiment(spec, tmp_path / "off", workers=1, stack="off")
    assert any("9 of them in 3 stacked group(s)" in m for m in messages), messages
    auto, off = _by_run(tmp_path / "auto"), _by_run(tmp_path / "off")
    assert auto.keys() == off.keys() and len(auto) == 9
    for rid, a in auto.items():
        b = off[rid]
        assert a["status"] == b["status"] == "done"
        assert a["engine"] == "stacked:3" and b["engine"] != "stacked:3"
        assert _close(_json.loads(a["step_loss"]), _json.loads(b["step_loss"]), 2e-4), rid
        for metric in ("final_val_accuracy", "test_accuracy", "best_epoch", "epochs_run", "steps_run"):
            assert a[metric] == b[metric], (rid, metric)
        hist = _json.loads((tmp_path / "auto" / "runs" / rid / "history.json").read_text())
        assert "trained stacked" in " ".join(hist["notes"])
        if rid.startswith("probed"):  # the probes a separate run records
            assert hist["probes"] == _json.loads((tmp_path / "off" / "runs" / rid / "history.json").read_text())["probes"] \
                or _close([r[3] for r in hist["probes"]], [r[3] for r in _json.loads(
                    (tmp_path / "off" / "runs" / rid / "history.json").read_text())["probes"]], 2e-3)
        assert (tmp_path / "auto" / "runs" / rid / "checkpoint" / "model.safetensors").is_file()


def test_stack_groups_keep_apart_what_cannot_stack(tmp_path):
    spec = parse_experiment({**EXP, "variants": {**EXP["variants"],
                                                 "bf16": {"model": {"bn": "before"}, "train": {"precision": "bf16-mixed"}},
                                                 "fp16": {"model": {"bn": "before"}, "train": {"precision": "fp16-mixed"}},
                                                 "layer": {"model": {"bn": "before", "norm": "layer"}}}})
    plans = expand(spec)
    refused = {}
    units = stack_groups(plans, tmp_path, "on", refused)
    sizes = {u[0].variant: len(u) for u in units}
    assert sizes == {"bn": 3, "plain": 3, "probed": 3, "bf16": 3, "fp16": 1, "layer": 1}
    assert refused["fp16"] == "precision fp16-mixed" and "LayerNorm" in refused["layer"] and "bf16" not in refused
    assert sum(map(len, units)) == len(plans)
    assert all(len(u) == 1 for u in stack_groups(plans, tmp_path, "off"))
    # a run with a saved state continues alone
    state = tmp_path / "runs" / "bn" / "seed-1" / "resume"
    state.mkdir(parents=True)
    from bnlab.experiments import runner
    real = runner.resume_point
    runner.resume_point = lambda folder: 2 if str(folder).endswith("bn/seed-1") else real(folder)
    try:
        units = stack_groups(plans, tmp_path, "on")
    finally:
        runner.resume_point = real
    assert sorted(len(u) for u in units if u[0].variant == "bn") == [1, 2]
    with pytest.raises(ValueError, match="stack mode 'yes'"):
        stack_groups(plans, tmp_path, "yes")
    # auto stacks on a GPU only
    on_cpu = stack_groups(plans, tmp_path, "auto")
    assert all(len(u) == 1 for u in on_cpu) if not torch.cuda.is_available() else any(len(u) > 1 for u in on_cpu)


def test_an_interrupted_stacked_group_continues_from_its_saved_epoch_bit_for_bit(tmp_path, monkeypatch):
    from bnlab.train import stacked

    spec = parse_experiment({**EXP, "train": {**EXP["train"], "optimizer": "adam", "lr": 0.01, "patience": None},
                             "variants": {"bn": EXP["variants"]["bn"]}})
    real = stacked._evaluate
    calls = []

    def evaluate_then_stop(*a, **k):  # epoch 3's evaluation: epochs 1 and 2 are saved
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stacked, "_evaluate", evaluate_then_stop)
    with pytest.raises(ExperimentInterrupted) as e:
        run_experiment(spec, tmp_path / "e", workers=1, stack="on")
    assert e.value.continue_from == {f"bn/seed-{s}": (2, 3, False) for s in range(3)}
    monkeypatch.setattr(stacked, "_evaluate", real)
    messages = []
    prog = run_experiment(spec, tmp_path / "e", workers=1, stack="on", on_progress=lambda p, m: messages.append(m))
    assert prog.done == 3 and any("continuing from epoch 2 of 3" in m for m in messages)
    assert any("3 of them in 1 stacked group" in m for m in messages)
    run_experiment(spec, tmp_path / "whole", workers=1, stack="on")  # never interrupted
    again, whole = _by_run(tmp_path / "e"), _by_run(tmp_path / "whole")
    for rid in whole:
        for col in ("step_loss", "final_val_accuracy", "test_accuracy", "final_val_loss", "best_epoch"):
            assert again[rid][col] == whole[rid][col], (rid, col)


def test_a_member_state_written_stacked_continues_alone(tmp_path, monkeypatch):
    """One member's state a different epoch from the others': each run continues alone from its own state
    (the single-run path reads the stacked state), with the results of the uninterrupted run (float32
    rounding aside)."""
    from bnlab.train import stacked
    from bnlab.train.resume import STATE_DIR
    import shutil

    spec = parse_experiment({**EXP, "train": {**EXP["train"], "optimizer": "rmsprop", "lr": 0.01, "patience": None},
                             "variants": {"bn": EXP["variants"]["bn"]}})
    real = stacked._evaluate
    calls = []

    def evaluate_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stacked, "_evaluate", evaluate_then_stop)
    with pytest.raises(ExperimentInterrupted):
        run_experiment(spec, tmp_path / "e", workers=1, stack="on")
    monkeypatch.setattr(stacked, "_evaluate", real)
    shutil.rmtree(tmp_path / "e" / "runs" / "bn" / "seed-0" / STATE_DIR)  # as if its state never got written
    messages = []
    run_experiment(spec, tmp_path / "e", workers=1, stack="on", on_progress=lambda p, m: messages.append(m))
    assert any("bn/seed-1: continuing from epoch 2 of 3" in m for m in messages)
    run_experiment(spec, tmp_path / "whole", workers=1, stack="on")
    again, whole = _by_run(tmp_path / "e"), _by_run(tmp_path / "whole")
    for rid in whole:
        assert again[rid]["status"] == "done"
        assert _close(_json.loads(again[rid]["step_loss"]), _json.loads(whole[rid]["step_loss"]), 1e-4), rid


def test_a_stacked_group_that_fails_runs_again_run_by_run(tmp_path, monkeypatch):
    from bnlab.train import single

    spec = parse_experiment({**EXP, "variants": {"bn": EXP["variants"]["bn"]}})
    monkeypatch.setattr(single, "train_runs_stacked", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    prog = run_experiment(spec, tmp_path / "e", workers=1, stack="on")
    runs = load_results(tmp_path / "e")[1]
    assert prog.done == 3 and all(r["status"] == "done" and r["engine"] != "stacked:3" for r in runs)


def test_diverged_members_are_recorded_as_diverged_by_the_runner(tmp_path):
    spec = parse_experiment({**EXP, "train": {**EXP["train"], "lr": 1e12}, "variants": {"plain": EXP["variants"]["plain"]}})
    run_experiment(spec, tmp_path / "e", workers=2, stack="on")
    runs = load_results(tmp_path / "e")[1]
    assert all(r["status"] == "diverged" and "diverged" in r["error"] for r in runs), [r["status"] for r in runs]
    assert all(r["engine"] == "stacked:3" for r in runs)


def test_probes_of_each_member_are_its_single_runs():
    from bnlab.probes import ProbeConfig

    spec = {**MLP, "bn": "before", "activation": "sigmoid"}
    config = ProbeConfig(every=3, tracked_units=2, probe_batch=20, landscape=True, landscape_every=5)
    kw = dict(lr=0.05, batch_size=16, epochs=2, optimizer="rmsprop")
    models = _models(spec)
    hists = fit_stacked(models, _data(), SEEDS, probes=config, **kw)
    for seed, h in zip(SEEDS, hists):
        hs = fit(build_model(spec, seed=seed).double(), _data(), seed=seed, progress=False, probes=config, **kw)
        assert len(h.probes) == len(hs.probes) > 0
        keys = [tuple(r[:3]) for r in h.probes]
        assert keys == [tuple(r[:3]) for r in hs.probes]
        assert {k[2] for k in keys} >= {"update_ratio", "grad_norm"}
        for a, b in zip(h.probes, hs.probes):
            assert math.isclose(a[3], b[3], rel_tol=1e-8, abs_tol=1e-10), (seed, a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_mixed_members_follow_their_single_bf16_runs(dropout):
    spec = {**MLP, "bn": "before", "dropout": dropout}
    kw = dict(lr=0.05, batch_size=16, epochs=1, precision="bf16-mixed")
    data = _data(dtype=torch.float32)
    models = _models(spec, torch.float32)
    hists = fit_stacked(models, data, SEEDS, **kw)
    for seed, h, m in zip(SEEDS, hists, models):
        single = build_model(spec, seed=seed)
        hs = fit(single, data, seed=seed, progress=False, **kw)
        assert h.precision == hs.precision == "bf16-mixed" and h.engine.startswith("stacked")
        # both round products and activations to bfloat16, at slightly different points (autocast's
        # batched products and ATen's BN here, the fused step's kernels there): the same path, not the same bits
        assert _close(h.step_loss[:3], hs.step_loss[:3], 2e-2), (h.step_loss[:3], hs.step_loss[:3])
        for k, v in single.state_dict().items():
            if v.is_floating_point():
                assert m.state_dict()[k].dtype == torch.float32, k
                cos = torch.nn.functional.cosine_similarity(m.state_dict()[k].flatten(), v.flatten(), 0)
                assert cos > 0.99, (seed, k, float(cos))


def test_stacking_refuses_fp16():
    with pytest.raises(ValueError, match="stacked training runs precision fp32 or bf16-mixed"):
        fit_stacked(_models(MLP), _data(), SEEDS, precision="fp16-mixed", epochs=1)


CNN = {"kind": "cnn", "input_shape": [2, 8, 8], "num_classes": 3, "blocks": [3, 4], "final_block": 5}


def _images(n=120, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 1, 4:].mean((1, 2)) > 0).long()
    return Dataset("toy-maps", x[:90], y[:90], x[90:], y[90:], x[:0], y[:0], 3)


@pytest.mark.parametrize("variant,optimizer", [
    ({"bn": "before", "dropout": 0.2}, {"optimizer": "sgd", "momentum": 0.9}),
    ({"bn": "after", "activation": "elu", "norm_options": {"convention": "keras"}}, {"optimizer": "adam"}),
    ({"bn": "before", "activation": "tanh", "norm_options": {"momentum": None}}, {"optimizer": "rmsprop"}),
    ({"bn": "none", "dropout": 0.3}, {"optimizer": "sgd"}),
])
def test_each_cnn_member_is_its_single_run_in_float64(variant, optimizer):
    spec = {**CNN, **variant}
    kw = dict(lr=0.03, batch_size=16, epochs=2, **optimizer)
    data = _images()
    models = _models(spec)
    hists = fit_stacked(models, data, SEEDS, **kw)
    assert all(h.engine == "stacked:3" for h in hists)
    _check_members(spec, hists, models, kw, 1e-9, data=data)  # grouped vs single convolutions: summation order


def test_cnn_members_in_float32():
    spec = {**CNN, "bn": "before", "dropout": 0.2}
    data = _images(dtype=torch.float32)
    kw = dict(lr=0.03, batch_size=16, epochs=2, optimizer="adam")
    models = _models(spec, torch.float32)
    hists = fit_stacked(models, data, SEEDS, **kw)
    _check_members(spec, hists, models, kw, 2e-4, dtype=torch.float32, data=data)


def test_a_diverging_cnn_member_leaves_and_the_others_go_on():
    spec = {**CNN, "bn": "none"}
    data = _images()
    data.x_train[60:62] *= 1e300  # a batch that overflows: each seed meets it at its own step
    kw = dict(lr=0.03, batch_size=16, epochs=2)
    models = _models(spec)
    hists = fit_stacked(models, data, SEEDS, **kw)
    assert all(h.stopped == "diverged" for h in hists) and len({h.message for h in hists}) == 3  # at 3 steps
    _check_members(spec, hists, models, kw, 1e-9, data=data)


@pytest.mark.parametrize("spec", [{**MLP, "bn": "before", "dropout": 0.3},
                                  {**CNN, "bn": "after", "activation": "elu", "dropout": 0.2}])
def test_without_the_native_kernels_members_are_still_their_single_runs(spec, monkeypatch):
    # no compiler (or a GPU): ATen's BN over the members' channels side by side, uniform dropout masks
    import bnlab.train.fused as fused
    import bnlab.train.stacked as stacked
    monkeypatch.setattr(fused, "native_kernels_for", lambda w: None)
    monkeypatch.setattr(stacked, "native_kernels_for", lambda w: None)
    data = _images() if spec.get("kind") == "cnn" else _data()
    kw = dict(lr=0.03, batch_size=16, epochs=2, optimizer="rmsprop")
    models = _models(spec)
    hists = fit_stacked(models, data, SEEDS, **kw)
    _check_members(spec, hists, models, kw, 1e-9, data=data)


def test_the_stacked_step_runs_the_fused_steps_ops():
    # one model program: BN (with ReLU inside it), pooling, flattening and activations are the fused step's
    # own ops; only Linear layers and dropout have stacked versions
    from bnlab.train import fused
    from bnlab.train.stacked import StackedNet, StackedStep
    step = StackedStep(StackedNet(_models({**CNN, "bn": "before", "dropout": 0.2})))
    kinds = {type(op).__name__ for op in step.ops}
    assert {"_BatchNormAct", "_MaxPool2d", "_Flatten", "_Conv2d"} <= kinds
    assert all(type(op).__module__ == fused.__name__ for op in step.ops
               if type(op).__name__ not in ("_StackedLinear", "_StackedDropout"))


@pytest.mark.parametrize("other,says", [
    ({"norm_options": {"eps": 0.5}}, "eps=0.5"),
    ({"dropout": 0.6}, "Dropout(p=0.6"),
    ({"activation": "tanh"}, "Tanh()"),
    ({"hidden": [16, 9]}, "out_features=9"),
    ({"norm_options": {"convention": "keras"}}, "convention=keras"),
    ({"norm": "layer"}, "LayerNorm"),
])
def test_members_that_are_not_one_network_are_refused(other, says):
    # every member runs the first member's layers: a member with other settings would silently train as it
    spec = {**MLP, "bn": "before", "dropout": 0.1}
    models = [build_model(spec, seed=3).double(), build_model({**spec, **other}, seed=0).double()]
    with pytest.raises(ValueError, match="member 1") as e:
        fit_stacked(models, _data(), [3, 0], epochs=1)
    assert says in str(e.value), str(e.value)


def test_members_of_another_type_than_the_data_are_refused():
    models = [build_model({**MLP, "bn": "before"}, seed=s).double() for s in (3, 0)]
    with pytest.raises(ValueError, match="member 1 has tensor .* torch.float32"):
        fit_stacked([models[0], models[1].float()], _data(), [3, 0], epochs=1)
    with pytest.raises(ValueError, match="the inputs are torch.float64 but the models are torch.float32"):
        fit_stacked([m.float() for m in models], _data(), [3, 0], epochs=1)
