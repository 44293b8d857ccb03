"""Hostile inputs (issue 27: "names are names", "every input validated up front, strictly typed"): each
attack is run as a user would run it, through the command line, and must end in one `error:` line naming
the setting, what was expected and what arrived, exit 2, no traceback, and nothing written anywhere (no
runs/ folder, no store, no run folder, no ONNX file).

The rules: experiment and variant names follow one rule (`bnlab.experiments.spec.check_name`); numbers are
strict (a boolean is not an integer, a string not a number, a float not an integer; an int is a float);
`validation` is a count when an int, a fraction when a float in (0, 1), and 1.0 is refused as ambiguous;
`lr` is at most 1e12; settings this machine cannot run are refused by `check_runnable` before `bnlab run`
stores or spawns anything and before `bnlab train` writes anything."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bnlab
from bnlab.cli import app
from bnlab.train.config import TrainConfig
from tiny_specs import TINY_TOML

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: fp16-mixed can run")
FEW_GPUS = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() > 7,
                              reason="this machine has a cuda:7")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(args, *patterns: str) -> str:
    """Run the command; it must exit 2 with one `error:` line matching every pattern (whitespace folded:
    rich wraps long lines), and no traceback."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert text.count("error:") == 1, r.output
    for p in patterns:
        assert re.search(p, text), f"{p!r} not in: {text}"
    return text


def spec_toml(*, name: str = "tiny", top: str = "", data: str = "", train: str = "epochs = 1",
              model: str = 'kind = "mlp", hidden = [8], bn = "before"', quick: str = "") -> str:
    """tiny_specs.TINY_TOML with parts replaced or added (one variant, one seed, synthetic data)."""
    text = (TINY_TOML.replace('name = "tiny"', f"name = {json.dumps(name)}" + (f"\n{top}" if top else ""))
            .replace('dataset = "synthetic"', 'dataset = "synthetic"' + (f"\n{data}" if data else ""))
            .replace("epochs = 1", train)
            .replace('model = { kind = "mlp", hidden = [8], bn = "before" }', f"model = {{ {model} }}"))
    return text + (f"\n[quick]\n{quick}\n" if quick else "")


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """A working directory two levels inside tmp_path: anything written outside it shows in tmp_path."""
    here = tmp_path / "a" / "b" / "cwd"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    return here


# ------------------------------------------------------------------------------------------ names are names

BAD_NAMES = ["../../x", "ABSOLUTE", "a/b", "..", ".hidden", "a\\b", "", "x" * 65, "tab\tname", "new\nline"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["dot-dot-up", "absolute", "slash", "dot-dot", "leading-dot",
                                                 "backslash", "empty", "too-long", "tab", "newline"])
def test_an_experiment_name_that_is_not_a_folder_name_is_refused_and_nothing_written(tmp_path, cwd, name):
    name = name.replace("ABSOLUTE", str(tmp_path / "abs"))
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_toml(name=name))
    before = files_under(tmp_path)
    refused(["run", spec], rf"name: experiment name {re.escape(' '.join(repr(name).split()))} is not allowed: "
            r"expected 1-64 ASCII letters, digits, '\.', '_' or '-', starting with a letter or digit .*no path separators, "
            r"no '\.\.', no absolute path")
    assert files_under(tmp_path) == before  # no runs/, no store, nothing beside or above the working directory


@pytest.mark.parametrize("name", ["/abs/x", *BAD_NAMES[2:]])
def test_experiment_and_variant_names_follow_one_rule(name):
    from bnlab.experiments.spec import check_name

    with pytest.raises(ValueError) as experiment:
        check_name(name, "experiment")
    with pytest.raises(ValueError) as variant:
        check_name(name, "variant")
    assert str(experiment.value).replace("experiment", "variant", 1) == str(variant.value)
    assert check_name("seed-000_mnist.v2", "experiment") == "seed-000_mnist.v2"


def test_a_variant_named_as_a_path_is_refused_through_the_same_rule(tmp_path, cwd):
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_toml().replace("[variants.a]", '[variants."../../../x"]'))
    before = files_under(tmp_path)
    refused(["run", spec], r"variant name '\.\./\.\./\.\./x' is not allowed: expected 1-64 ASCII letters")
    assert files_under(tmp_path) == before


# ------------------------------------------------------- every input validated up front, strictly typed

def _case(id_, parts: dict, *patterns, marks=()):
    return pytest.param(parts, patterns, id=id_, marks=marks)


RUN_CASES = [
    # booleans are not integers, strings are not numbers, floats are not integers
    _case("epochs-true", {"train": "epochs = true"}, r"train\.epochs: Input should be a valid integer \(got True\)"),
    _case("batch-size-float", {"train": "epochs = 1\nbatch_size = 16.0"},
          r"train\.batch_size: Input should be a valid integer \(got 16\.0\)"),
    _case("lr-string", {"train": 'epochs = 1\nlr = "0.1"'}, r"train\.lr: Input should be a valid number \(got '0\.1'\)"),
    _case("momentum-true", {"train": "epochs = 1\nmomentum = true"},
          r"train\.momentum: Input should be a valid number \(got True\)"),
    _case("nesterov-one", {"train": "epochs = 1\nnesterov = 1"},
          r"train\.nesterov: Input should be a valid boolean \(got 1\)"),
    _case("target-string", {"top": 'target_accuracy = "0.5"'},
          r"target_accuracy: Input should be a valid number \(got '0\.5'\)"),
    _case("model-hidden-float", {"model": 'kind = "mlp", hidden = [8.0], bn = "before"'},
          r"model\.hidden\.0: Input should be a valid integer \(got 8\.0\)"),
    _case("model-hidden-true", {"model": 'kind = "mlp", hidden = [true], bn = "before"'},
          r"model\.hidden\.0: Input should be a valid integer \(got True\)"),
    _case("model-input-bn-one", {"model": 'kind = "mlp", hidden = [8], input_bn = 1'},
          r"model\.input_bn: Input should be a valid boolean \(got 1\)"),
    _case("model-units-true", {"model": 'kind = "layers", layers = [{ type = "dense", units = true }]'},
          r"model\.layers\.0\.units: Input should be a valid integer \(got True\)"),
    _case("model-eps-string", {"model": 'kind = "mlp", hidden = [8], bn = "before", norm_options = { eps = "1e-3" }'},
          r"model\.norm_options\.eps: Input should be a valid number \(got '1e-3'\)"),
    # validation: an int is a count, a float in (0, 1) a fraction, 1.0 is ambiguous
    _case("validation-one-point-zero", {"data": "validation = 1.0"},
          r"data\.validation: expected a count of images \(an integer .*\) or a fraction of the training split "
          r"\(a number strictly between 0 and 1.*\); 1\.0 is ambiguous: write 1 for one image, or a fraction below 1 "
          r"\(got 1\.0\)"),
    _case("validation-count-as-float", {"data": "validation = 5000.0"},
          r"data\.validation: expected a count .*a count is written as an integer \(5000\).*\(got 5000\.0\)"),
    _case("validation-true", {"data": "validation = true"}, r"data\.validation: expected a count .*not a bool \(got True\)"),
    _case("validation-string", {"data": 'validation = "0.2"'},
          r"data\.validation: expected a count .*not a str \(got '0\.2'\)"),
    # absurd learning rates
    _case("lr-1e308", {"train": "epochs = 1\nlr = 1e308"},
          r"train\.lr: expected a number > 0 and at most 1e\+12: .*overflows float32.*\(got 1e\+308\)"),
    _case("weight-decay-1e300", {"train": "epochs = 1\nweight_decay = 1e300"},
          r"train\.weight_decay: expected a number > 0 and at most 1e\+12"),
    # settings this machine cannot run: refused, not stored as failed runs
    _case("batch-size-one-with-bn", {"train": "epochs = 1\nbatch_size = 1"},
          r"train\.batch_size: expected at least 2 for this model \(got 1\): .*batch_normalization would see one "
          r"value per channel"),
    _case("fp16-mixed-without-cuda", {"train": 'epochs = 1\nprecision = "fp16-mixed"'},
          r"train\.precision: .*'fp16-mixed' runs on CUDA only \(got device cpu: this machine has no CUDA device\)",
          marks=NO_CUDA),
    _case("cuda-device-absent", {"train": 'epochs = 1\ndevice = "cuda:7"'},
          r"train\.device: expected a device this machine has \(got 'cuda:7'", marks=FEW_GPUS),
    _case("devices-more-than-the-batch-feeds", {"train": "epochs = 1\ndevices = 8\nbatch_size = 4"},
          r"train\.devices: a global batch of 4 cannot give each of 8 processes 2 samples"),
    # unknown keys, everywhere
    _case("unknown-top-key", {"top": 'nmae = "x"'}, r"nmae: Extra inputs are not permitted"),
    _case("unknown-train-key", {"train": "epochs = 1\nepoch = 3"}, r"train\.epoch: Extra inputs are not permitted"),
    _case("unknown-model-key", {"model": 'kind = "mlp", hidden = [8], bn_placement = "before"'},
          r"model\.bn_placement: Extra inputs are not permitted"),
    _case("unknown-quick-key", {"quick": "epochs = 1"}, r"quick\.epochs: Extra inputs are not permitted"),
    _case("quick-seeds-true", {"quick": "seeds = true"}, r"quick\.seeds: seeds must be a count .*\(got True\)"),
]


@pytest.mark.parametrize("parts,patterns", RUN_CASES)
def test_bnlab_run_refuses_a_bad_setting_before_anything_is_stored(tmp_path, cwd, parts, patterns):
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_toml(**parts))
    before = files_under(tmp_path)
    refused(["run", spec], *patterns)
    assert not (cwd / "runs").exists() and files_under(tmp_path) == before


def test_bnlab_run_quick_refuses_a_bad_quick_setting_before_anything_is_stored(tmp_path, cwd):
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_toml(quick="train = { epochs = true }"))
    before = files_under(tmp_path)
    refused(["run", spec, "--quick"], r"train\.epochs: Input should be a valid integer \(got True\)")
    assert files_under(tmp_path) == before


TRAIN = ["train", "fashion-mlp-bn-before", "--dataset", "digits", "--epochs", "1", "--out", "OUT"]

TRAIN_CASES = [
    _case("validation-one-point-zero", {"args": ["--validation", "1.0"]},
          r"--validation: expected a count of images .*1\.0 is ambiguous: write 1 for one image.*\(got 1\.0\)"),
    _case("validation-not-a-number", {"args": ["--validation", "a fifth"]},
          r"--validation: expected a count .*not a str \(got 'a fifth'\)"),
    _case("lr-1e308", {"args": ["--lr", "1e308"]}, r"--lr: expected a number > 0 and at most 1e\+12.*\(got 1e\+308\)"),
    _case("batch-size-one-with-bn", {"args": ["--batch-size", "1"]},
          r"the run cannot start on this machine: batch_size: expected at least 2 for this model \(got 1\): in "
          r"training its batch-statistics norm layer\(s\) batch_normalization, batch_normalization_1, "
          r"batch_normalization_2 would see one value per channel"),
    _case("fp16-mixed-on-cpu", {"args": ["--precision", "fp16-mixed", "--device", "cpu"]},
          r"precision: .*'fp16-mixed' runs on CUDA only \(got device cpu"),
    _case("spec-file-units-true", {"model": {"kind": "mlp", "hidden": [True], "input_shape": [1, 8, 8]}},
          r"spec\.json: not a valid model spec: hidden\.0: Input should be a valid integer \(got True\)"),
]


@pytest.mark.parametrize("parts,patterns", TRAIN_CASES)
def test_bnlab_train_refuses_a_bad_setting_before_anything_is_written(tmp_path, cwd, parts, patterns):
    args = [str(tmp_path / "run") if a == "OUT" else a for a in TRAIN] + parts.get("args", [])
    if "model" in parts:
        (tmp_path / "spec.json").write_text(json.dumps(parts["model"]))
        args[1] = str(tmp_path / "spec.json")
    before = files_under(tmp_path)
    refused(args, *patterns)
    assert not (tmp_path / "run").exists() and files_under(tmp_path) == before


def test_validation_counts_and_fractions_are_what_they_say():
    from bnlab.data import load_dataset

    assert TrainConfig(validation=1).validation == 1 and type(TrainConfig(validation=1).validation) is int
    assert type(TrainConfig(validation=0.2).validation) is float
    assert type(TrainConfig(lr=1).lr) is float  # an int is a float
    one, fifth = load_dataset("digits", validation=1), load_dataset("digits", validation=0.2)
    n = len(one.y_train) + len(one.y_val)
    assert len(one.y_val) == 1 and abs(len(fifth.y_val) - 0.2 * n) <= 10  # stratified: rounded per class


def test_batch_size_one_is_fine_without_batch_statistics():
    """Only a norm that normalises over the batch needs 2 samples: no norm, or layer norm, trains at 1."""
    from bnlab.train.runnable import check_runnable
    from bnlab.models import build_model

    x = torch.randn(1, 4)
    config = TrainConfig(batch_size=1, device="cpu")
    for spec in ({"bn": "none"}, {"bn": "before", "norm": "layer"}):
        model = build_model({"kind": "mlp", "input_shape": [4], "num_classes": 2, "hidden": [8], **spec}, seed=0)
        assert check_runnable(config, model, x) == []
    model = build_model({"kind": "mlp", "input_shape": [4], "num_classes": 2, "hidden": [8, 8], "bn": "after"}, seed=0)
    problems = check_runnable(config, model, x)
    assert len(problems) == 1 and "batch_normalization, batch_normalization_1" in problems[0]  # every layer named
    assert model.training  # the check leaves the model's mode as it was


# ----------------------------------------------------------------------------- convert: impossible up front

def test_convert_refuses_instance_norm_on_features_up_front_naming_every_layer():
    from bnlab.models import build_model

    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6),
                          nn.LayerNorm(6)).train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as e:
        bnlab.convert(model, "instance", input_shape=(4,))
    msg = " ".join(str(e.value).split())
    for layer in ("1 (BatchNorm1d)", "4 (BatchNorm1d)", "5 (LayerNorm)"):
        assert re.search(re.escape(layer) + r": instance norm needs spatial axes, expected \(N, C, L\) or "
                         r"\(N, C, H, W\) input, but this layer normalises \(N, C\) features", msg), msg
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*give convert input_shape"):
        bnlab.convert(model, "instance")  # BatchNorm1d takes (N, C) and (N, C, L): it cannot tell
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched
    # a bnlab model knows its input shape; a BatchNorm1d over (N, C, L) converts
    mlp = build_model({"kind": "mlp", "input_shape": [4], "num_classes": 2, "hidden": [8], "bn": "before"},
                            seed=0)
    with pytest.raises(ValueError, match=r"batch_normalization \(BatchNorm\): .*\(N, C\) features"):
        bnlab.convert(mlp, "instance")
    seq = bnlab.convert(nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6)), "instance", input_shape=(2, 9))
    assert seq(torch.randn(3, 2, 9)).shape == (3, 6, 7)


def test_a_factory_spec_converted_to_instance_norm_on_features_is_refused_through_the_cli(tmp_path, cwd):
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef net(num_classes=10):\n    return nn.Sequential("
                                     "nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), "
                                     "nn.Linear(8, num_classes))\n")
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_toml(model=f'factory = "{tmp_path / "net.py"}:net", input_shape = [4], norm = "instance"'))
    before = files_under(tmp_path)
    refused(["run", spec, "--trust-factory"], r"variants\.a: .*cannot convert to instance: 2 \(BatchNorm1d\): "
            r"instance norm needs spatial axes")
    assert files_under(tmp_path) == before


# --------------------------------------------------------------------- export: weights that overflow float32

def _huge_checkpoint(folder: Path) -> Path:
    from bnlab.checkpoint import save_checkpoint
    from bnlab.models import build_model

    model = build_model({"kind": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16], "bn": "after"},
                        seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3e38)  # finite, and every product overflows float32
    save_checkpoint(folder, model, preprocessing={"scaling": "unit", "divide": 16.0},
                    meta={"kind": "best", "epoch": 1, "dataset": "digits", "classes": [str(k) for k in range(10)]})
    return folder


def test_export_onnx_refuses_a_model_whose_finite_weights_overflow(tmp_path):
    from bnlab.checkpoint import load_checkpoint
    from bnlab.deploy.export import export_onnx

    ck = load_checkpoint(_huge_checkpoint(tmp_path / "ck"))
    with pytest.raises(ValueError, match=r"expected finite outputs for raw inputs in its training range, got "
                                         r"(inf|NaN): its weights overflow float32 .*the largest, model\.\S+, "
                                         r"reaches 3e\+38"):
        export_onnx(ck.model, (1, 8, 8), tmp_path / "out" / "m.onnx", preprocessing=ck.preprocessing)
    assert not (tmp_path / "out").exists()


def test_bnlab_export_refuses_a_model_whose_finite_weights_overflow(tmp_path):
    ck = _huge_checkpoint(tmp_path / "ck")
    before = files_under(tmp_path)
    refused(["export", ck, "--onnx", tmp_path / "m.onnx"], r"expected finite outputs .*got (inf|NaN)")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("section,values", [
    ("probes", {"every": True}), ("probes", {"probe_batch": "64"}), ("probes", {"landscape_scales": [1, "2"]}),
    ("data.options", {"split_seed": True}), ("data.options", {"test_fraction": "0.2"}),
], ids=["probes-every-bool", "probes-batch-str", "probes-scale-str", "options-seed-bool", "options-fraction-str"])
def test_probe_and_dataset_options_are_strictly_typed(section, values):
    """A boolean is not a count and a string not a number in the [probes] and [data] options sections too."""
    from bnlab.experiments import parse_experiment

    data = {"name": "x", "seeds": 1, "data": {"dataset": "digits"}, "train": {"epochs": 1}, "variants": {"a": {}}}
    if section == "probes":
        data["probes"] = values
    else:
        data["data"]["options"] = values
    with pytest.raises(Exception, match=next(iter(values))):
        parse_experiment(data)


# ------------------------------------------------------- found by the adversarial re-run (issue 27)

def test_a_fraction_that_rounds_to_no_validation_image_is_refused(cwd):
    """validation = 1e-300 is a fraction of the training split, but it rounds to 0 images per class: the run
    would have no primary result, be stored as damaged and redone for ever. Refused before anything is written."""
    refused(["train", "fashion-mlp-bn-before", "--dataset", "digits", "--epochs", "1", "--validation", "1e-300",
             "--out", "run"], r"validation fraction 1e-300 of 1437 training examples gives 0 validation")
    assert files_under(cwd) == []
    from bnlab.data.dataset import split_validation

    import numpy as np

    y = np.repeat(np.arange(3), 4)
    assert len(split_validation(np.zeros((12, 2)), y, 0.25, 0)[3]) == 3  # one per class: fine
    with pytest.raises(ValueError, match="gives 12 validation and 0 training"):
        split_validation(np.zeros((12, 2)), y, 0.99, 0)


@pytest.mark.parametrize("norm", ["ghost:1000000000", "group:1000000"])
def test_an_absurd_norm_size_is_refused_by_the_spec(norm):
    from bnlab.models import parse_model_spec

    with pytest.raises(Exception, match="should match pattern"):
        parse_model_spec({"hidden": [8], "bn": "before", "norm": norm})
    parse_model_spec({"hidden": [8], "bn": "before", "norm": norm[:7]})  # a sensible size still parses


def test_a_typo_in_the_quick_section_is_refused_without_quick(cwd):
    spec = cwd / "q.toml"
    spec.write_text('name = "q"\nseeds = 1\n[data]\ndataset = "digits"\n[train]\nepochs = 1\n'
                    '[quick.train]\nepohcs = 1\n[variants.a]\n')
    refused(["run", spec], r"its \[quick\] section does not give a valid spec", r"variants\.a\.train\.epohcs: Extra "
            r"inputs are not permitted")
    assert files_under(cwd) == ["q.toml"]
