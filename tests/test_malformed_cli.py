"""Strict command-line options: every malformed option, path or model spec given to a command ends in
`error: ...` (or typer's usage error) and exit 2, naming the option or value, before anything is written;
never a traceback. Library and user text (paths, pydantic's `[type=..., input_value=...]`) is printed
verbatim, not as rich markup.

The spec-file table and the first CLI table are in tests/test_malformed_inputs.py; checkpoints, dataset
files and stores in tests/test_malformed_files.py."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from bnlab.cli import app
from tiny_specs import TINY_TOML

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

SPEC = TINY_TOML
TRAIN = ["train", "fashion-mlp-bn-before", "--dataset", "digits", "--epochs", "1", "--out", "NEW"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the device exists")


def _case(id_, args, match, *marks):
    return pytest.param(args, match, id=id_, marks=marks)


# (arguments, what the message must name); upper-case words are the fixture's paths (see `where`)
CASES = [
    # bnlab run
    _case("run-seeds-not-a-number", ["run", "SPEC", "--out", "NEW", "--seeds", "three"], r"--seeds.*valid integer"),
    _case("run-seeds-fraction", ["run", "SPEC", "--out", "NEW", "--seeds", "1.5"], r"--seeds.*valid integer"),
    _case("run-workers-negative", ["run", "SPEC", "--out", "NEW", "--workers", "-1"], r"--workers"),
    _case("run-spec-empty-file", ["run", "EMPTY.toml", "--out", "NEW"], r"variants|name"),
    # bnlab train: options TrainConfig refuses, named by the option the user typed
    _case("train-momentum-inf", [*TRAIN, "--momentum", "inf"], r"--momentum: .*finite"),
    _case("train-validation-nan", [*TRAIN, "--validation", "nan"], r"--validation: .*finite"),
    _case("train-validation-inf", [*TRAIN, "--validation", "inf"], r"--validation: .*finite"),
    _case("train-target-nan", [*TRAIN, "--target", "nan"], r"--target: .*finite"),
    _case("train-target-zero", [*TRAIN, "--target", "0"], r"--target: .*greater than 0"),
    _case("train-seed-huge", [*TRAIN, "--seed", "99999999999999"], r"--seed: .*less than or equal to 2147483647"),
    _case("train-epochs-huge", [*TRAIN, "--epochs", str(10**23)], r"--epochs: .*less than or equal to 100000"),
    _case("train-batch-size-huge", [*TRAIN, "--batch-size", str(10**12)], r"--batch-size: .*less than or equal"),
    _case("train-lr-not-a-number", [*TRAIN, "--lr", "fast"], r"--lr.*valid number"),
    _case("train-engine-empty", [*TRAIN, "--engine", ""], r"--engine"),
    _case("train-device-cuda-index", [*TRAIN, "--device", "cuda:123"], r"--device: expected auto, cpu, cuda or cuda:N"),
    _case("train-device-cuda-absent", [*TRAIN, "--device", "cuda"], r"device: .*got 'cuda'.*cuda\.is_available\(\) is False",
          NO_CUDA),
    _case("train-out-under-a-file", [*TRAIN[:-1], "FILE/sub"], r"--out .*afile/sub: cannot create a folder there: "
          r".*afile is a file"),
    _case("train-model-cannot-take-the-data", ["train", "CNN.json", "--dataset", "digits", "--out", "NEW"],
          r"feature map shrank"),
    _case("train-model-spec-is-a-directory", ["train", "DIR", "--dataset", "digits"], r"adir"),
    _case("train-model-spec-not-utf8", ["train", "LATIN1.toml", "--dataset", "digits"], r"latin1\.toml: not UTF-8"),
    # bnlab summary
    _case("summary-spec-missing", ["summary", "nothing.json"], r"'nothing\.json' is neither a model preset"),
    _case("summary-spec-is-a-directory", ["summary", "DIR"], r"adir"),
    _case("summary-spec-not-json", ["summary", "BROKEN.json"], r"broken\.json: not valid JSON"),
    _case("summary-spec-not-utf8", ["summary", "LATIN1.toml"], r"latin1\.toml: not UTF-8"),
    _case("summary-hidden-too-wide", ["summary", "WIDE.json"], r"hidden.*less than or equal to 65536"),
    _case("summary-pydantic-brackets-survive", ["summary", "BRACKETS.json"],
          r"not a valid model spec: hidden: Input should be a valid list \(got '\[data\]'\)"),
    # bnlab recalibrate
    _case("recalibrate-out-is-a-file", ["recalibrate", "CHECKPOINT", "--out", "FILE"],
          r"--out .*afile: expected a folder for the recalibrated checkpoint, but it is a file"),
    _case("recalibrate-out-under-a-file", ["recalibrate", "CHECKPOINT", "--out", "FILE/sub"], r"--out .*cannot create"),
    _case("recalibrate-batch-size-zero", ["recalibrate", "CHECKPOINT", "--out", "NEW", "--batch-size", "0"],
          r"--batch-size.*greater than or equal to 1"),
    _case("recalibrate-seed-negative", ["recalibrate", "CHECKPOINT", "--out", "NEW", "--seed", "-1"],
          r"--seed.*greater than or equal to 0"),
    _case("recalibrate-checkpoint-is-a-file", ["recalibrate", "FILE", "--out", "NEW"], r"afile: a file, expected a "
          r"checkpoint folder"),
    _case("recalibrate-dataset-unknown", ["recalibrate", "CHECKPOINT", "--out", "NEW", "--dataset", "imagenet"],
          r"unknown dataset 'imagenet'"),
    # bnlab fold
    _case("fold-out-is-a-file", ["fold", "CHECKPOINT", "--out", "FILE"], r"--out .*afile: expected a folder"),
    _case("fold-out-under-a-file-with-brackets", ["fold", "CHECKPOINT", "--out", "FILE/[data]/sub"],
          r"--out .*afile/\[data\]/sub: cannot create a folder there"),
    _case("fold-checkpoint-is-an-empty-folder", ["fold", "DIR", "--out", "NEW"], r"adir: not a bnlab checkpoint"),
    # bnlab predict
    _case("predict-input-is-a-directory", ["predict", "CHECKPOINT", "DIR"], r"adir"),
    _case("predict-input-not-an-image", ["predict", "CHECKPOINT", "FILE"], r"afile: expected an image"),
    _case("predict-missing-input-with-brackets", ["predict", "CHECKPOINT", "[x].png"], r"\[x\]\.png"),
    # bnlab export
    _case("export-onnx-is-a-folder", ["export", "CHECKPOINT", "--onnx", "DIR"], r"--onnx .*adir: expected a file name"),
    _case("export-onnx-under-a-file", ["export", "CHECKPOINT", "--onnx", "FILE/model.onnx"],
          r"--onnx .*afile/model\.onnx: cannot create a file there"),
    _case("export-model-choice-unknown", ["export", "CHECKPOINT", "--onnx", "NEW", "--model", "worst"], r"worst"),
    # bnlab serve: refused before the server starts
    _case("serve-port-too-large", ["serve", "CHECKPOINT", "--port", "70000"], r"--port.*less than or equal to 65535"),
    _case("serve-port-negative", ["serve", "CHECKPOINT", "--port", "-1"], r"--port.*greater than or equal to 0"),
    _case("serve-port-not-a-number", ["serve", "CHECKPOINT", "--port", "http"], r"--port.*valid integer"),
    _case("serve-decoders-zero", ["serve", "CHECKPOINT", "--decoders", "0"], r"decoders.*0"),
    _case("serve-max-body-bytes-zero", ["serve", "CHECKPOINT", "--max-body-bytes", "0"], r"max_body_bytes.*0"),
    _case("serve-max-image-pixels-negative", ["serve", "CHECKPOINT", "--max-image-pixels", "-5"],
          r"max_image_pixels.*-5"),
]


def run_cli(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, " ".join(r.output.split())  # rich wraps long lines


@pytest.fixture
def where(tmp_path, digits_checkpoint) -> dict[str, str]:
    """The paths the cases name: a spec, a file, a folder, model spec files, a checkpoint, and NEW, which
    a refused command must not create."""
    (tmp_path / "spec.toml").write_text(SPEC)
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    (tmp_path / "latin1.toml").write_bytes('kind = "mlp"  # réseau\n'.encode("latin-1"))
    (tmp_path / "broken.json").write_text('{"kind": "mlp",')
    (tmp_path / "cnn.json").write_text(json.dumps({"kind": "cnn", "input_shape": [1, 28, 28]}))
    (tmp_path / "wide.json").write_text(json.dumps({"kind": "mlp", "hidden": [10**9]}))
    (tmp_path / "brackets.json").write_text(json.dumps({"kind": "mlp", "hidden": "[data]"}))
    names = {"SPEC": "spec.toml", "EMPTY.toml": "empty.toml", "FILE": "afile", "DIR": "adir", "NEW": "new",
             "LATIN1.toml": "latin1.toml", "BROKEN.json": "broken.json", "CNN.json": "cnn.json",
             "WIDE.json": "wide.json", "BRACKETS.json": "brackets.json"}
    paths = {k: str(tmp_path / v) for k, v in names.items()}
    paths["CHECKPOINT"] = str(digits_checkpoint)
    return paths


def _resolve(arg: str, where: dict[str, str]) -> str:
    head, _, tail = arg.partition("/")
    return where[head] + "/" + tail if tail and head in where else where.get(arg, arg)


@pytest.mark.parametrize("args, match", CASES)
def test_a_malformed_option_is_refused_with_exit_2_and_nothing_written(tmp_path, where, args, match):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r, text = run_cli([_resolve(a, where) for a in args])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert re.search(match, text), f"{match!r} not in: {text}"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "a refused command wrote files"


def test_the_table_is_big_enough():
    assert len(CASES) >= 30


def test_option_bounds_copied_from_the_library_match_it():
    """recalibrate's --seed and --batch-size are bounded at parse time (importing TrainConfig there would
    load torch for `bnlab --help`): their bounds must stay TrainConfig's."""
    import typer.main

    from bnlab.train.config import MAX_BATCH, MAX_SEED

    params = {p.name: p for p in typer.main.get_command(app).commands["recalibrate"].params}
    assert (params["seed"].min, params["seed"].max) == (0, MAX_SEED)
    assert (params["batch_size"].min, params["batch_size"].max) == (1, MAX_BATCH)


def test_errors_go_to_stderr_and_json_output_stays_empty(where):
    """stdout carries only the command's output: `bnlab predict --json ... | jq` never reads an error."""
    r = CliRunner().invoke(app, ["predict", where["CHECKPOINT"], where["FILE"] + "-missing.png", "--json"])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "afile-missing.png" in r.stderr


def test_paths_with_brackets_are_printed_verbatim(tmp_path, where):
    """Rich markup would delete `[data]` from the path (and `:x:` would become an emoji)."""
    out = tmp_path / "[data]:x:folded"
    r, text = run_cli(["fold", where["CHECKPOINT"], "--out", out])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in text


def test_the_good_commands_of_the_table_run(where):
    """The controls: the cases above differ from these by one option, and these run."""
    r, _ = run_cli(["summary", where["WIDE.json"].replace("wide", "cnn")])
    assert r.exit_code == 0, r.output
    r, _ = run_cli(["recalibrate", where["CHECKPOINT"], "--out", where["NEW"], "--mode", "train", "--seed", "0"])
    assert r.exit_code == 0, r.output


def _limit_memory():  # address space: an allocation beyond it fails with an error instead of the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is Linux's")
def test_a_model_larger_than_memory_is_an_error_not_a_crash(tmp_path):
    """Eight dense layers of 65536 units (17 GB each) under a 6 GiB limit: exit 2 saying so."""
    spec = tmp_path / "huge.json"
    spec.write_text(json.dumps({"kind": "mlp", "input_shape": [1, 28, 28], "hidden": [65536] * 8}))
    out = subprocess.run([sys.executable, "-m", "bnlab", "summary", str(spec)], capture_output=True, text=True,
                         timeout=120, preexec_fn=_limit_memory)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and re.search(r"memory|parameters", out.stderr), out.stderr
