"""Ioffe & Szegedy's Figure 1 at full length (issue 16): the [data] fallback chosen once and kept by a
resumed experiment, the test-accuracy probe (against ``evaluate``, resumed, stacked), the drift statistic
(against a direct numpy / scipy computation), and the report's Fig. 1(a) and drift table."""

import json
import math

import numpy as np
import pytest
import scipy.stats as st
import torch

from bnlab.data import Dataset, available_offline, load_dataset, write_idx
from bnlab.experiments import load_results
from bnlab.experiments.drift import drift, drift_rows
from bnlab.experiments.runner import run_experiment
from bnlab.experiments.spec import SpecError, apply_quick, choose_data, load_experiment, parse_experiment
from bnlab.experiments.store import RunStore
from bnlab.models import build_model
from bnlab.probes import ProbeConfig, eval_accuracy
from bnlab.train import engine
from bnlab.train.engine import evaluate, fit
from bnlab.train.resume import RunInterrupted
from bnlab.train.stacked import fit_stacked


def _fake_mnist(folder, n_train=60, n_test=20):
    """The four MNIST files, unzipped (hand-placed raw IDX files are checked by their format only)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                    "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
                    "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                    "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)}.items():
        write_idx(folder / name, a)
    return folder


def _spec(data_dir, **over):
    """mnist with the embedded digits as its fallback: a tiny sigmoid MLP, 2 variants x 3 seeds."""
    return parse_experiment({
        "name": "fig1", "seeds": 3,
        "data": {"dataset": "mnist", "data_dir": str(data_dir), "validation": 10,
                 "fallback": {"dataset": "digits", "validation": 0.2}},
        "model": {"input_shape": [1, 28, 28], "hidden": [8, 6], "activation": "sigmoid"},
        "train": {"lr": 0.5, "batch_size": 30, "epochs": 2},
        "probes": {"every": 5, "tracked_units": 2, "probe_batch": 16, "test_accuracy": True},
        "variants": {"no-bn": {"model": {"bn": "none"}}, "bn": {"model": {"bn": "before"}}}, **over})


# ---------------------------------------------------------------- the data choice

def test_the_fallback_is_chosen_when_mnist_is_absent_and_not_when_present(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not available_offline("mnist", str(empty)) and available_offline("mnist-5k")
    runs_spec, choice = choose_data(_spec(empty))
    assert choice.fallback and choice.dataset == runs_spec.data.dataset == "digits"
    assert runs_spec.data.validation == 0.2 and runs_spec.data.data_dir == str(empty)
    note = choice.note()
    assert "not downloaded" in note and str(empty) in note and "load_dataset('mnist')" in note and "--data-dir" in note

    here = _fake_mnist(tmp_path / "here")
    assert available_offline("mnist", str(here))
    runs_spec, choice = choose_data(_spec(here))
    assert not choice.fallback and runs_spec.data.dataset == "mnist" and runs_spec.data.validation == 10
    assert len(load_dataset("mnist", data_dir=str(here), download=False, validation=10).y_train) == 50


def test_a_fallback_must_be_embedded_and_the_primary_not():
    base = {"name": "x", "variants": {"a": {}}}
    with pytest.raises(SpecError, match="must be available offline.*got 'cifar10'"):
        parse_experiment({**base, "data": {"dataset": "mnist", "fallback": {"dataset": "cifar10"}}})
    with pytest.raises(SpecError, match="is embedded, always available"):
        parse_experiment({**base, "data": {"dataset": "digits", "fallback": {"dataset": "mnist-5k"}}})


def test_the_preset_falls_back_to_mnist_5k_and_quick_keeps_the_protocol(tmp_path):
    spec = load_experiment("paper-mnist")
    quick = apply_quick(spec)
    assert quick.data == spec.data and quick.probes["test_accuracy"] and quick.smoke_test
    for s in (spec.model_copy(update={"data": spec.data.model_copy(update={"data_dir": str(tmp_path)})}),):
        runs_spec, choice = choose_data(s)
        assert choice.fallback and runs_spec.data.dataset == "mnist-5k" and runs_spec.data.validation == 0.125
    assert spec.seed_list() == [0, 1, 2, 3, 4] and spec.train["max_steps"] == 50000 and spec.train["batch_size"] == 60
    # max_steps decides: mnist-5k's 4,375 training images give 73 batches of 60 per epoch
    assert spec.train["epochs"] * 73 >= 50000 and spec.probes["every"] == 250


def test_the_choice_is_stored_and_a_resumed_experiment_keeps_it(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    messages = []
    spec = _spec(data_dir, seeds=1)
    run_experiment(spec, tmp_path / "e", workers=1, on_progress=lambda p, m: messages.append(m))
    assert any(m.startswith("data: digits") and "not downloaded" in m for m in messages)
    store = RunStore(tmp_path / "e" / "runs.sqlite", readonly=True)
    stored = json.loads(store.get_meta("data_choice"))
    store.close()
    assert stored["dataset"] == "digits" and stored["fallback"] is True
    assert all(json.loads(r["config"])["train"]["dataset"] == "digits" for r in load_results(tmp_path / "e")[1])
    assert json.loads((tmp_path / "e" / "spec.json").read_text())["data"]["dataset"] == "mnist"  # the spec as written

    _fake_mnist(data_dir)  # MNIST arrives: the folder goes on with its digits, and says so
    messages.clear()
    run_experiment(_spec(data_dir, seeds=2), tmp_path / "e", workers=1, on_progress=lambda p, m: messages.append(m))
    assert any(m.startswith("data: digits") and "never switches data" in m for m in messages)
    runs = load_results(tmp_path / "e")[1]
    assert len(runs) == 4 and {json.loads(r["config"])["train"]["dataset"] for r in runs} == {"digits"}

    # a folder started on MNIST whose files went away: a clear error, never a silent switch
    run_experiment(_spec(data_dir, seeds=1), tmp_path / "m", workers=1)
    for f in data_dir.iterdir():
        f.unlink()
    with pytest.raises(SpecError, match="was started on 'mnist', whose files are no longer found"):
        run_experiment(_spec(data_dir, seeds=2), tmp_path / "m", workers=1)


# ---------------------------------------------------------------- the test-accuracy probe

def _toy(n=220, f=12, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = (x[:, :c].argmax(1) + (torch.rand(n, generator=g) < 0.2).long()) % c
    return Dataset("toy", x[:120], y[:120], x[120:160], y[120:160], x[160:], y[160:], c)


TOY = {"hidden": [16, 8], "input_shape": [12], "num_classes": 3, "bn": "before", "activation": "sigmoid"}
KW = dict(lr=0.5, batch_size=16, epochs=5, progress=False)


def test_the_probe_is_evaluate_on_the_test_set_at_the_sampled_step():
    data, n = _toy(), 13
    trained = build_model(TOY, seed=1)
    fit(trained, data, seed=1, max_steps=n, **KW)
    expected = evaluate(trained, data.x_test, data.y_test)[1]
    probed = build_model(TOY, seed=1)
    h = fit(probed, data, seed=1, max_steps=n + 1, probes=ProbeConfig(every=n, test_accuracy=True, probe_batch=8), **KW)
    rows = {r[0]: r[3] for r in h.probes if r[1:3] == ["model", "test_accuracy"]}
    assert sorted(rows) == [1, n + 1]
    assert rows[n + 1] == expected  # before step n + 1's update: the model after n steps
    assert rows[1] == evaluate(build_model(TOY, seed=1), data.x_test, data.y_test)[1]
    assert not any(r[2] == "test_accuracy" for r in fit(build_model(TOY, seed=1), data, seed=1, max_steps=3,
                                                           probes=ProbeConfig(every=1), **KW).probes)


def test_the_probe_changes_no_buffer_and_restores_each_mode():
    model = build_model(TOY, seed=0).train()
    model(torch.randn(32, 12))  # running statistics away from their initial values
    model[-1].eval()  # a module in its own mode stays in it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _toy()
    acc = eval_accuracy(model, data.x_test, data.y_test, batch_size=7)  # batches do not change the result
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model[-1].training
    model.eval()
    assert acc == int((model(data.x_test).argmax(1) == data.y_test).sum()) / len(data.y_test)


def test_a_resumed_run_records_what_an_uninterrupted_one_records(tmp_path, monkeypatch):
    from bnlab.train.config import TrainConfig
    from bnlab.train.single import train_run

    cfg = TrainConfig(dataset="digits", batch_size=64, epochs=3, lr=0.5,
                      probes={"every": 7, "probe_batch": 16, "test_accuracy": True})
    model = {"input_shape": [1, 8, 8], "hidden": [16], "bn": "before", "activation": "sigmoid"}
    whole = train_run(model, cfg, out=tmp_path / "whole", progress=False).history.probes
    taken, real = [], engine.make_step

    def make_step(m, *a, **k):  # Ctrl-C at the 30th step (mid-epoch 2)
        inner, name = real(m, *a, **k)

        def stepping(x, y):
            taken.append(1)
            if len(taken) == 30:
                raise KeyboardInterrupt
            return inner(x, y)

        stepping.applies_update = inner.applies_update
        return stepping, name

    monkeypatch.setattr(engine, "make_step", make_step)
    with pytest.raises(RunInterrupted):
        train_run(model, cfg, out=tmp_path / "cut", progress=False)
    res = train_run(model, cfg, out=tmp_path / "cut", progress=False)
    assert res.resumed_from == 1
    acc = [r for r in res.history.probes if r[2] == "test_accuracy"]
    assert len(acc) == 9 and acc == [r for r in whole if r[2] == "test_accuracy"]  # steps 1, 8, ..., 57
    assert res.history.probes == whole


def test_stacked_members_record_their_single_runs_test_accuracy():
    seeds = [3, 0, 7]
    data = _toy()
    config = ProbeConfig(every=4, probe_batch=8, test_accuracy=True)
    kw = dict(lr=0.5, batch_size=16, epochs=2)
    models = [build_model(TOY, seed=s).double() for s in seeds]
    double = Dataset("toy", *(t.double() if t.is_floating_point() else t for t in (
        data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test)), 3)
    hists = fit_stacked(models, double, seeds, probes=config, **kw)
    for seed, h in zip(seeds, hists):
        single = fit(build_model(TOY, seed=seed).double(), double, seed=seed, progress=False, probes=config, **kw)
        got = [r for r in h.probes if r[2] == "test_accuracy"]
        assert len(got) == 4 and got == [r for r in single.probes if r[2] == "test_accuracy"], seed


# ---------------------------------------------------------------- the drift statistic

def test_drift_against_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    steps = 1 + 250 * np.arange(200)  # paper-mnist: 1, 251, ..., 49751
    values = rng.normal(size=200).cumsum()
    # the first and last tenth of the span 1..49751 hold 20 sampled steps each
    assert math.isclose(drift(steps, values), abs(values[-20:].mean() - values[:20].mean()), rel_tol=1e-12)
    with pytest.raises(ValueError, match="two distinct sampled steps"):
        drift([5], [1.0])


def test_drift_rows_against_scipy():
    rng = np.random.default_rng(1)
    steps = 1 + 10 * np.arange(30)  # tenths: 3 sampled steps each
    probes, runs, per = [], [], {"no-bn": {}, "bn": {}}
    for variant, scale in (("no-bn", 3.0), ("bn", 1.0)):
        for seed in range(4):
            rid = f"{variant}/seed-{seed}"
            runs.append({"run_id": rid, "variant": variant, "seed": seed, "status": "done"})
            v = rng.normal(size=30) + scale * np.linspace(0, 1, 30)
            per[variant][seed] = abs(v[-3:].mean() - v[:3].mean())
            probes += [{"run_id": rid, "step": int(s), "layer": "sigmoid_1", "metric": "unit4.p85", "value": float(x)}
                       for s, x in zip(steps, v)]
            probes += [{"run_id": rid, "step": int(s), "layer": "sigmoid_0", "metric": "unit4.p85", "value": 0.0}
                       for s in steps]  # another layer: not counted
    (row,) = drift_rows(probes, runs, ["no-bn", "bn"], "sigmoid_1")
    assert row.quantity == "unit 4, p85"
    for variant in per:
        x = np.array([per[variant][s] for s in range(4)])
        lo, hi = st.t.interval(0.95, 3, loc=x.mean(), scale=st.sem(x))
        e = row.per_variant[variant]
        assert np.allclose([e.mean, e.low, e.high], [x.mean(), lo, hi], rtol=1e-12) and e.n == 4
    d = np.array([per["bn"][s] - per["no-bn"][s] for s in range(4)])
    lo, hi = st.t.interval(0.95, 3, loc=d.mean(), scale=st.sem(d))
    e = row.differences["bn"]
    assert np.allclose([e.mean, e.low, e.high], [d.mean(), lo, hi], rtol=1e-12)


# ---------------------------------------------------------------- the report

def test_the_report_shows_fig_1a_the_drift_table_and_the_data(tmp_path):
    from bnlab.report import build_report

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    run_experiment(_spec(data_dir), tmp_path / "e", workers=1)
    report = build_report(tmp_path / "e")
    md = report.markdown.read_text()
    assert (tmp_path / "e" / "figures" / "probe_test_accuracy.png").is_file()
    assert "Fig. 1(a)" in md and "Test accuracy against optimizer steps" in md
    assert "## Drift of the last hidden layer's input" in md and "| percentile of the input | no-bn: drift | bn: drift " \
                                                                 "| bn - no-bn |" in md
    assert "drift = |mean over the sampled steps in the last tenth" in md
    assert "all units, p15" in md and "unit " in md
    assert "Data: digits, the spec's fallback for mnist (mnist is not downloaded" in md
    page = report.html.read_text()
    assert "<h2>Drift of the last hidden layer's input</h2>" in page and "Data: digits" in page
