"""`bnlab check` run as a user runs it, and its failure path."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from bnlab.cli import app


def test_bnlab_check_quick_as_a_user():
    out = subprocess.run([sys.executable, "-m", "bnlab", "check", "--quick"], capture_output=True,
                         text=True, timeout=300, env={"COLUMNS": "160", "PATH": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reference gradient check (float64)" in out.stdout
    assert "vs torch.nn.BatchNorm (float32)" in out.stdout
    assert "dgamma" in out.stdout and "running_var" in out.stdout
    assert "all " in out.stdout and "checks passed" in out.stdout
    assert "ratio" in out.stdout


def test_bnlab_check_json():
    result = CliRunner().invoke(app, ["check", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] is True
    assert all(row["value"] <= row["tolerance"] for row in data["checks"])
    assert data["speed"]["ratio"] > 0
    assert data["native_step"]["available"] is True
    assert any(r["case"].startswith("native:") for r in data["checks"])


def test_bnlab_check_exits_1_when_a_check_fails(monkeypatch):
    from bnlab.reference import batchnorm

    original = batchnorm.batch_norm_backward

    def planted_bug(dy, cache):
        dx, dgamma, dbeta = original(dy, cache)
        return dx, dgamma * 1.01, dbeta

    monkeypatch.setattr(batchnorm, "batch_norm_backward", planted_bug)
    result = CliRunner().invoke(app, ["check", "--quick"], env={"COLUMNS": "160"})
    assert result.exit_code == 1
    assert "FAIL" in result.output and "checks failed" in result.output


def test_every_command_has_an_example_in_its_help():
    import typer.main
    names = [c.name for c in typer.main.get_command(app).commands.values()]
    assert len(names) >= 14
    for name in names:
        result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, name
        assert f"Example: bnlab {name}" in result.output, name


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and "bnlab 0.1.0" in result.output


def test_training_step_check_catches_a_wrong_step(monkeypatch):
    """A step whose update is off by 1e-6 of the learning rate must fail the check."""
    import bnlab.train.fused as fused
    from bnlab.verify import training_step_checks

    class Skewed(fused.FusedMLPStep):
        def __init__(self, model, generator=None, *, sgd_lr=None):
            super().__init__(model, generator, sgd_lr=sgd_lr * (1 + 1e-6))

    monkeypatch.setattr(fused, "FusedMLPStep", Skewed)
    rows = training_step_checks()
    fused_rows = [r for r in rows if r.case.startswith("fused:") and r.quantity == "weights, stats"]
    assert fused_rows and not any(r.passed for r in fused_rows)
    assert all(r.passed for r in rows if r.case.startswith("native:"))
