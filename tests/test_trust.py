"""A spec or checkpoint that names a factory (code) never runs it unless the call opts in or the process
registered it (issue: a config.json naming ``os:system`` ran a shell command on ``bnlab summary``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bnlab
from bnlab.checkpoint import CheckpointError, config_digest, load_checkpoint, save_checkpoint
from bnlab.cli import app
from bnlab.models import build_model
from bnlab.models.factory import UntrustedFactory, _REGISTERED, is_trusted, trusting

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

RESNET = f"{Path(__file__).resolve().parent.parent / 'examples' / 'resnet.py'}:resnet18"
SMALL = {"hidden": [4], "input_shape": [4], "num_classes": 3}


def _hostile_checkpoint(folder: Path, spec: dict) -> Path:
    """A valid checkpoint whose config.json was rewritten to ``spec`` and its digest recomputed, as an attacker
    who can write the file would do."""
    save_checkpoint(folder, build_model(SMALL, seed=0).eval())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["spec"] = spec
    cfg["config_sha256"] = config_digest(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def os_system(tmp_path) -> tuple[Path, Path]:
    """(checkpoint whose spec is os:system touching a marker, the marker)."""
    marker = tmp_path / "PWNED"
    ck = _hostile_checkpoint(tmp_path / "ck", {"kind": "factory", "factory": "os:system",
                                               "kwargs": {"command": f"touch {marker}"},
                                               "input_shape": [4], "num_classes": 3})
    return ck, marker


@pytest.fixture
def importing_file(tmp_path) -> tuple[str, Path]:
    """(a factory in a .py file whose import writes a marker, the marker): importing it at all is running code."""
    marker = tmp_path / "IMPORTED"
    module = tmp_path / "evil.py"
    module.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
                      "import torch\ndef net(num_classes=3, in_features=4):\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                      "torch.nn.Linear(in_features, num_classes))\n")
    return f"{module}:net", marker


COMMANDS = [
    ["summary", "{ck}"],
    ["predict", "{ck}", "{x}"],
    ["fold", "{ck}", "--out", "{tmp}/folded"],
    ["recalibrate", "{ck}", "--out", "{tmp}/recal", "--dataset", "digits"],
    ["export", "{ck}", "--onnx", "{tmp}/m.onnx"],
    ["serve", "{ck}", "--port", "0"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_no_command_runs_a_checkpoints_factory(command, os_system, tmp_path):
    ck, marker = os_system
    x = tmp_path / "x.npy"
    import numpy as np

    np.save(x, np.zeros((1, 4), dtype=np.float32))
    args = [a.format(ck=ck, x=x, tmp=tmp_path) for a in command]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert not marker.exists()  # the command never ran
    assert "error:" in res.output and "'os:system'" in res.output and "--trust-factory" in res.output
    assert "Traceback" not in res.output
    for out in ("folded", "recal", "m.onnx"):
        assert not (tmp_path / out).exists()  # refused before anything was written


def test_load_checkpoint_refuses_before_importing(os_system, importing_file, tmp_path):
    ck, marker = os_system
    with pytest.raises(CheckpointError, match=r"factory 'os:system'.*trust_factory=True.*register_factory"):
        load_checkpoint(ck)
    assert not marker.exists()
    name, imported = importing_file
    ck2 = _hostile_checkpoint(tmp_path / "ck2", {"factory": name, "input_shape": [4], "num_classes": 3})
    with pytest.raises(CheckpointError, match="--trust-factory"):
        load_checkpoint(ck2)
    with pytest.raises(UntrustedFactory):
        build_model({"factory": name})
    assert not imported.exists()  # not even imported
    with pytest.raises(CheckpointError):  # trusting another factory is not trusting this one
        load_checkpoint(ck2, trust_factory=["os:system"])
    assert not imported.exists()


def test_opting_in_loads_the_factory_for_that_call_only(tmp_path):
    model = build_model({"factory": RESNET, "kwargs": {"width": 2, "in_channels": 1}, "input_shape": [1, 8, 8]},
                        seed=0, trust_factory=True)
    save_checkpoint(tmp_path / "ck", model.eval())
    ck = load_checkpoint(tmp_path / "ck", trust_factory=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))
    assert not is_trusted(RESNET)  # nothing left trusted after the call
    with pytest.raises(CheckpointError, match="factory"):
        load_checkpoint(tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck", trust_factory=[RESNET]).model is not None  # by name
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "ck")])
    assert res.exit_code == 2 and "--trust-factory" in res.output
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "ck"), "--trust-factory"])
    assert res.exit_code == 0, res.output
    assert "conv1" in res.output
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "ck")])  # the CLI opt-in did not outlive its call
    assert res.exit_code == 2


def test_a_registered_factory_needs_no_opt_in(tmp_path):
    name = "my_nets.tiny:net"  # not importable: only the registration makes it exist

    def net(num_classes: int = 3) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, num_classes))

    with pytest.raises(UntrustedFactory, match="my_nets.tiny:net"):
        build_model({"factory": name, "input_shape": [4], "num_classes": 3})
    try:
        bnlab.register_factory(name)(net)  # the decorator form
        model = build_model({"factory": name, "input_shape": [4], "num_classes": 3}, seed=1)
        save_checkpoint(tmp_path / "ck", model.eval())
        assert isinstance(load_checkpoint(tmp_path / "ck").model[1], torch.nn.Linear)
    finally:
        _REGISTERED.pop(name, None)
    with pytest.raises(CheckpointError, match="register_factory"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match="package.module:function"):
        bnlab.register_factory("not a name", net)


def test_trust_nests_and_is_undone():
    with trusting(["a:f"]):
        assert is_trusted("a:f") and not is_trusted("b:g")
        with trusting(True):
            assert is_trusted("b:g")
        with trusting("b:g"):  # one name, not its letters
            assert is_trusted("b:g") and not is_trusted("b")
        assert not is_trusted("b:g")
    assert not is_trusted("a:f")
    for wrong in (0, 1, [1], None.__class__):  # a boolean is not an integer: say what is expected
        with pytest.raises(TypeError, match="expected True, False or factory names"):
            with trusting(wrong):
                pass


def test_train_and_run_refuse_a_factory_spec_before_writing_anything(importing_file, tmp_path, monkeypatch):
    name, imported = importing_file
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps({"factory": name, "input_shape": [64], "num_classes": 10}))
    res = CliRunner().invoke(app, ["train", str(spec), "--dataset", "digits", "--epochs", "1", "--out", "run"])
    assert res.exit_code == 2, res.output
    assert "--trust-factory" in res.output and not (tmp_path / "run").exists()
    exp = tmp_path / "exp.toml"
    exp.write_text(f'name = "own"\nseeds = 1\n[data]\ndataset = "digits"\n[model]\nfactory = "{name}"\n'
                   '[train]\nepochs = 1\n[variants.a]\n')
    res = CliRunner().invoke(app, ["run", str(exp), "--out", "e"])
    assert res.exit_code == 2, res.output
    assert "--trust-factory" in res.output and "'own'" in res.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "runs").exists()
    assert not imported.exists()


def test_train_with_trust_factory_trains_the_factory(importing_file, tmp_path):
    name, imported = importing_file
    spec = {"factory": name, "kwargs": {"in_features": 64}, "input_shape": [64], "num_classes": 10}
    from bnlab.train.config import TrainConfig
    from bnlab.train.single import train_run

    config = TrainConfig(dataset="digits", epochs=1, batch_size=64)
    with pytest.raises(UntrustedFactory):
        train_run(spec, config, out=tmp_path / "refused")
    assert not imported.exists() and not (tmp_path / "refused").exists()
    res = train_run(spec, config, out=tmp_path / "run", progress=False, trust_factory=True)
    assert imported.exists() and res.history.epochs
    assert not is_trusted(name)
    assert load_checkpoint(tmp_path / "run", trust_factory=[name]).model[1].in_features == 64


def test_an_unknown_preprocessing_key_is_refused(tmp_path):
    """predict acts on every preprocessing key: one it does not know would be silently ignored."""
    save_checkpoint(tmp_path / "ck", build_model(SMALL, seed=0).eval(),
                    preprocessing={"scaling": "unit", "divide": 255.0, "validation": 0.1, "seed": 0})
    assert load_checkpoint(tmp_path / "ck").preprocessing["divide"] == 255.0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["preprocessing"]["clip"] = [0, 1]
    cfg["config_sha256"] = config_digest(cfg)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="preprocessing.clip: Extra inputs are not permitted"):
        load_checkpoint(tmp_path / "ck")
