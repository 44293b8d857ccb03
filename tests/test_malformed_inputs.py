"""Strict inputs: malformed spec files and command-line options end in `error: ...` (or typer's usage
error) and exit 2, naming the problem, before anything is stored; never a traceback. Plus a fuzz of
spec dicts: parse_experiment accepts or raises SpecError, nothing else.

Checkpoints, dataset files and stores have their own table in tests/test_malformed_files.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bnlab.cli import app
from tiny_specs import TINY_TOML
from bnlab.experiments.spec import SpecError, parse_experiment

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

GOOD = TINY_TOML


def invoke(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, " ".join(r.output.split())  # rich wraps long lines


def refused(args, match: str) -> str:
    r, text = invoke(args)
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert re.search(match, text), f"{match!r} not in: {text}"
    return text


def _spec(body: str) -> str:
    return body


# (id, spec text or bytes, what the message must name)
SPECS = [
    ("variant-path-traversal", GOOD.replace("[variants.a]", '[variants."../../../x"]'), r"variant name '\.\./\.\./\.\./x'"),
    ("variant-empty-name", GOOD.replace("[variants.a]", '[variants.""]'), r"variant name ''"),
    ("variant-with-slash", GOOD.replace("[variants.a]", '[variants."a/b"]'), r"variant name 'a/b'"),
    ("variant-dot-dot", GOOD.replace("[variants.a]", '[variants.".."]'), r"variant name '\.\.'"),
    ("no-variants", GOOD.split("[variants.a]")[0], r"variants"),
    ("seeds-zero", GOOD.replace("seeds = 1", "seeds = 0"), r"seeds must be a count 1\.\.1000"),
    ("seeds-negative", GOOD.replace("seeds = 1", "seeds = -3"), r"seeds must be a count"),
    ("seeds-ten-million", GOOD.replace("seeds = 1", "seeds = 10000000"), r"seeds must be a count 1\.\.1000.*10000000"),
    ("seeds-huge-value", GOOD.replace("seeds = 1", "seeds = [1, 99999999999999]"), r"seeds must be"),
    ("seeds-repeated", GOOD.replace("seeds = 1", "seeds = [1, 1]"), r"distinct"),
    ("seeds-empty-list", GOOD.replace("seeds = 1", "seeds = []"), r"seeds must be"),
    ("seeds-float", GOOD.replace("seeds = 1", "seeds = 2.5"), r"seeds must be"),
    ("seeds-bool", GOOD.replace("seeds = 1", "seeds = true"), r"seeds must be"),
    ("seeds-string", GOOD.replace("seeds = 1", 'seeds = "3"'), r"seeds must be"),
    ("data-unknown-key", GOOD.replace('dataset = "synthetic"', 'dataset = "synthetic"\nshuffle = true'), r"data\.shuffle"),
    ("data-unknown-dataset", GOOD.replace('"synthetic"', '"imagenet"'), r"unknown dataset 'imagenet'"),
    ("data-option-unknown", GOOD.replace("features = 4", "features = 4, n_trian = 5"), r"n_trian.*its options"),
    ("data-option-wrong-type", GOOD.replace("features = 4", 'features = "four"'), r"features"),
    ("data-option-inf", GOOD.replace("features = 4", "features = inf"), r"features"),
    ("data-option-huge", GOOD.replace("n_train = 60", "n_train = 1000000000000"), r"n_train.*less than or equal"),
    ("data-option-on-a-file-dataset", GOOD.replace('"synthetic"', '"mnist-5k"').replace(
        "options = { n_train = 60, n_test = 20, features = 4 }", "options = { n_train = 60 }"), r"n_train.*mnist-5k|mnist-5k.*n_train"),
    ("data-validation-inf", GOOD.replace('dataset = "synthetic"', 'dataset = "synthetic"\nvalidation = inf'), r"data\.validation.*finite"),
    ("data-validation-zero", GOOD.replace('dataset = "synthetic"', 'dataset = "synthetic"\nvalidation = 0'), r"data\.validation"),
    ("data-scaling-unknown", GOOD.replace('dataset = "synthetic"', 'dataset = "synthetic"\nscaling = "zscore"'), r"data\.scaling"),
    ("train-lr-nan", GOOD.replace("epochs = 1", "epochs = 1\nlr = nan"), r"train\.lr.*finite"),
    ("train-lr-inf", GOOD.replace("epochs = 1", "epochs = 1\nlr = inf"), r"train\.lr.*finite"),
    ("train-epochs-zero", GOOD.replace("epochs = 1", "epochs = 0"), r"train\.epochs"),
    ("train-epochs-huge", GOOD.replace("epochs = 1", "epochs = 1000000000000"), r"train\.epochs.*less than or equal"),
    ("train-batch-huge", GOOD.replace("epochs = 1", "epochs = 1\nbatch_size = 99999999999"), r"train\.batch_size"),
    ("train-unknown-key", GOOD.replace("epochs = 1", "epochs = 1\nlearning_rate = 0.1"), r"train\.learning_rate"),
    ("train-seed-key", GOOD.replace("epochs = 1", "epochs = 1\nseed = 3"), r"belong in \[data\] or seeds"),
    ("train-device-tpu", GOOD.replace("epochs = 1", 'epochs = 1\ndevice = "tpu"'), r"expected auto, cpu, cuda or cuda:N"),
    ("train-engine-turbo", GOOD.replace("epochs = 1", 'epochs = 1\nengine = "turbo"'), r"train\.engine.*turbo"),
    ("model-hidden-huge", GOOD.replace("hidden = [8]", "hidden = [1000000000]"), r"hidden.*less than or equal to 65536"),
    ("model-convs-huge", GOOD.replace('kind = "mlp", hidden = [8]', 'kind = "cnn", convs_per_block = 1000000000'),
     r"convs_per_block.*less than or equal to 16"),
    ("model-input-shape-5d", GOOD.replace("hidden = [8]", "hidden = [8], input_shape = [1, 2, 3, 4, 5]"), r"input_shape"),
    ("model-dropout-nan", GOOD.replace("hidden = [8]", "hidden = [8], dropout = nan"), r"dropout"),
    ("model-cnn-on-feature-vectors", GOOD.replace('kind = "mlp", hidden = [8]', 'kind = "cnn"'),
     r"variants\.a: the model cannot take the data of 'synthetic'"),
    ("target-above-one", GOOD.replace("seeds = 1", "seeds = 1\ntarget_accuracy = 2"), r"target_accuracy"),
    ("primary-metric-unknown", GOOD.replace("seeds = 1", 'seeds = 1\nprimary_metric = "speed"'), r"primary_metric"),
    ("not-toml", "this is [not toml", r"not valid TOML"),
    ("not-utf8", b'name = "\xff\xfe\xfa"\n', r"not UTF-8 text \(byte 0xff at offset 8\)"),
]


@pytest.mark.parametrize("body, match", [c[1:] for c in SPECS], ids=[c[0] for c in SPECS])
def test_a_malformed_spec_is_refused_before_anything_is_stored(tmp_path, body, match):
    spec = tmp_path / "spec.toml"
    (spec.write_bytes if isinstance(body, bytes) else spec.write_text)(body)
    out = tmp_path / "out"
    refused(["run", spec, "--out", out], match)
    assert not (out / "runs.sqlite").exists()


def test_the_good_spec_of_the_table_runs(tmp_path):
    """The control: the cases above differ from it by one thing, and it runs."""
    spec = tmp_path / "spec.toml"
    spec.write_text(GOOD)
    r, text = invoke(["run", spec, "--out", tmp_path / "out"])
    assert r.exit_code == 0, r.output


def test_bracketed_text_survives_the_error_formatter(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(GOOD.replace("epochs = 1", "epochs = 1\nseed = 3"))
    text = refused(["run", spec, "--out", tmp_path / "out"], r"\['seed'\] belong in \[data\] or seeds, not \[train\]")
    assert "[train]" in text


# (id, arguments after the command, what the message must name); checkpoint = a good checkpoint
CLI = [
    ("run-seeds-zero", ["run", "SPEC", "--seeds", "0"], r"--seeds"),
    ("run-seeds-negative", ["run", "SPEC", "--seeds", "-3"], r"--seeds"),
    ("run-seeds-ten-million", ["run", "SPEC", "--seeds", "10000000"], r"--seeds"),
    ("run-workers-zero", ["run", "SPEC", "--workers", "0"], r"--workers"),
    ("run-workers-huge", ["run", "SPEC", "--workers", "100000"], r"--workers"),
    ("run-out-is-a-file", ["run", "SPEC", "--out", "FILE"], r"expected a folder for the experiment, but it is a file"),
    ("run-out-under-a-file", ["run", "SPEC", "--out", "FILE/sub"], r"Not a directory"),
    ("run-spec-missing", ["run", "nothing.toml"], r"'nothing\.toml' is neither an experiment preset"),
    ("run-spec-is-a-directory", ["run", "DIR"], r"expected a TOML file, but it is a directory"),
    ("train-engine-turbo", ["train", "fashion-mlp-bn-before", "--engine", "turbo"], r"--engine.*turbo"),
    ("train-epochs-zero", ["train", "fashion-mlp-bn-before", "--epochs", "0"], r"--epochs: .*greater than or equal to 1"),
    ("train-batch-size-zero", ["train", "fashion-mlp-bn-before", "--batch-size", "0"], r"--batch-size"),
    ("train-lr-negative", ["train", "fashion-mlp-bn-before", "--lr", "-1"], r"--lr"),
    ("train-lr-inf", ["train", "fashion-mlp-bn-before", "--lr", "inf"], r"--lr: .*finite"),
    ("train-lr-nan", ["train", "fashion-mlp-bn-before", "--lr", "nan"], r"--lr: .*finite"),
    ("train-momentum-one", ["train", "fashion-mlp-bn-before", "--momentum", "1"], r"--momentum"),
    ("train-seed-negative", ["train", "fashion-mlp-bn-before", "--seed", "-1"], r"--seed"),
    ("train-validation-zero", ["train", "fashion-mlp-bn-before", "--validation", "0"], r"--validation"),
    ("train-target-two", ["train", "fashion-mlp-bn-before", "--target", "2"], r"--target"),
    ("train-max-steps-zero", ["train", "fashion-mlp-bn-before", "--max-steps", "0"], r"--max-steps"),
    ("train-patience-zero", ["train", "fashion-mlp-bn-before", "--patience", "0"], r"--patience"),
    ("train-optimizer-unknown", ["train", "fashion-mlp-bn-before", "--optimizer", "adamw"], r"--optimizer.*adamw"),
    ("train-device-tpu", ["train", "fashion-mlp-bn-before", "--device", "tpu"], r"--device: expected auto, cpu, cuda or cuda:N"),
    ("train-dataset-unknown", ["train", "fashion-mlp-bn-before", "--dataset", "imagenet"], r"unknown dataset 'imagenet'"),
    ("train-out-is-a-file", ["train", "fashion-mlp-bn-before", "--out", "FILE"], r"expected a folder for the run"),
    ("train-model-unknown", ["train", "no-such-model"], r"no-such-model"),
    ("summary-model-unknown", ["summary", "no-such-model"], r"no-such-model"),
    ("recalibrate-mode-unknown", ["recalibrate", "CHECKPOINT", "--out", "NEW", "--mode", "fast"], r"--mode"),
    ("predict-model-choice-unknown", ["predict", "CHECKPOINT", "FILE", "--model", "worst"], r"worst"),
    ("predict-input-missing", ["predict", "CHECKPOINT", "missing.png"], r"missing\.png"),
]


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint) -> Path:
    return digits_checkpoint


@pytest.mark.parametrize("args, match", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_a_bad_option_is_refused_with_exit_2(tmp_path, checkpoint, args, match):
    spec = tmp_path / "spec.toml"
    spec.write_text(GOOD)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    where = {"SPEC": str(spec), "FILE": str(tmp_path / "afile"), "FILE/sub": str(tmp_path / "afile" / "sub"),
             "DIR": str(tmp_path / "adir"), "CHECKPOINT": str(checkpoint), "NEW": str(tmp_path / "new")}
    args = [where.get(a, a) for a in args]
    if args[0] == "train" and "--dataset" not in args:
        args += ["--dataset", "digits"]
    refused(args, match)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob("**/runs.sqlite"))


def test_the_tables_are_big_enough():
    assert len(SPECS) + len(CLI) >= 60


# ---------------------------------------------------------------- fuzz

_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.lists(st.integers(min_value=-5, max_value=10**12), max_size=4))
_keys = st.sampled_from(["seeds", "name", "target_accuracy", "primary_metric", "data", "train", "model",
                         "variants", "probes", "quick", "dataset", "options", "validation", "scaling", "lr",
                         "epochs", "batch_size", "hidden", "kind", "bn", "n_train", "features", "x"])
_tree = st.recursive(_values, lambda inner: st.dictionaries(_keys, inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(_keys, _tree, max_size=4), variant=st.dictionaries(_keys, _tree, max_size=3))
def test_fuzzed_specs_are_accepted_or_refused_with_a_spec_error(changes, variant):
    base = {"name": "fuzz", "data": {"dataset": "synthetic", "options": {"n_train": 20, "n_test": 5}},
            "variants": {"a": {"model": {"hidden": [4]}}}}
    spec = {**base, **changes}
    if isinstance(spec.get("variants"), dict) and variant:
        spec["variants"] = {**spec["variants"], "b": variant}
    try:
        parsed = parse_experiment(spec)
    except SpecError as e:
        assert str(e)
        return
    # accepted: every run is bounded and finite
    assert 1 <= len(parsed.seed_list()) <= 1000
    assert all(math.isfinite(v) for v in [parsed.target_accuracy or 0.5])
