"""Model specs, the seed networks' parameter counts, initialisers and the summary command."""

import math
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.models import MODEL_PRESETS, build_model, expand, load_model_spec, parse_model_spec, summary
from bnlab.nn import BatchNorm

# (total, trainable, non-trainable): the seeds' printed counts, and seed 002's CNN counted by hand
EXPECTED = {
    "fashion-mlp-baseline": (266_610, 266_610, 0),
    "fashion-mlp-bn-after": (271_346, 268_978, 2_368),
    "fashion-mlp-bn-before": (270_946, 268_578, 2_368),
    "mnist-mlp-bn-elu": (270_946, 268_578, 2_368),
    # 1,680 + 32,460 + 3 x 64,920 + 54,100 + 90,100 + 40,100; BN adds 4 x (8 x 60 + 2 x 100)
    "cifar100-cnn": (413_200, 413_200, 0),
    "cifar100-cnn-bn": (415_920, 414_560, 1_360),
}


@pytest.mark.parametrize("name", EXPECTED, ids=EXPECTED.keys())
def test_preset_parameter_counts(name):
    s = summary(name)
    assert (s.total, s.trainable, s.non_trainable) == EXPECTED[name]
    text = s.to_text()
    assert f"Total params: {EXPECTED[name][0]:,}" in text
    assert f"Trainable params: {EXPECTED[name][1]:,}" in text
    assert f"Non-trainable params: {EXPECTED[name][2]:,}" in text


def test_every_preset_builds_and_runs():
    for name in MODEL_PRESETS:
        spec = load_model_spec(name)
        m = build_model(spec, seed=0)
        out = m(torch.rand(4, *spec.input_shape))
        assert out.shape == (4, spec.num_classes)


def test_cnn_output_shapes_follow_seed_002():
    rows = {r.name: r.output_shape for r in summary("cifar100-cnn").rows}
    assert rows["max_pooling2d"] == (60, 16, 16)
    assert rows["max_pooling2d_3"] == (60, 2, 2)
    assert rows["flatten"] == (400,) and rows["dense"] == (100,)


@pytest.mark.parametrize("bn,bias,expect_bias,order", [
    ("none", "auto", True, ["Linear", "ReLU"]),
    ("before", "auto", False, ["Linear", "BatchNorm", "ReLU"]),
    ("after", "auto", True, ["Linear", "ReLU", "BatchNorm"]),
    ("before", "on", True, ["Linear", "BatchNorm", "ReLU"]),
    ("after", "off", False, ["Linear", "ReLU", "BatchNorm"]),
], ids=["none", "before-auto-drops-bias", "after-auto-keeps-bias", "before-on", "after-off"])
def test_mlp_placement_and_bias_rule(bn, bias, expect_bias, order):
    m = build_model({"hidden": [5], "bn": bn, "bias": bias, "input_shape": [3], "num_classes": 2})
    kinds = [type(c).__name__ for c in m.children()][1:-1]  # drop flatten and the output layer
    assert kinds == order
    assert (m.dense.bias is not None) == expect_bias
    assert m.dense_1.bias is not None  # the output layer keeps its bias


def test_input_bn_and_dropout():
    m = build_model({"hidden": [8, 4], "input_bn": True, "dropout": 0.5, "input_shape": [1, 2, 2]})
    kinds = [type(c).__name__ for c in m.children()]
    assert kinds[:2] == ["Flatten", "BatchNorm"] and kinds.count("Dropout") == 2


def test_bn_settings_reach_every_layer():
    m = build_model({"bn": "before", "norm_options": {"convention": "keras", "momentum": 0.9}, "input_shape": [4]})
    bns = [c for c in m.modules() if isinstance(c, BatchNorm)]
    assert bns and all(b.convention == "keras" and b.momentum == 0.9 and b.eps == 1e-3 for b in bns)


@pytest.mark.parametrize("init,check", [
    ("he_normal", lambda w, fi, fo: abs(w.std() - math.sqrt(2 / fi)) < 0.05 * math.sqrt(2 / fi)
     and w.abs().max() <= 2 * math.sqrt(2 / fi) / 0.87962566103423978 + 1e-6),
    ("glorot_uniform", lambda w, fi, fo: w.abs().max() <= math.sqrt(6 / (fi + fo)) + 1e-7
     and w.abs().max() > 0.95 * math.sqrt(6 / (fi + fo))),
    ("normal", lambda w, fi, fo: abs(w.std() - 0.05) < 0.003),
], ids=["he_normal", "glorot_uniform", "normal"])
def test_initialisers(init, check):
    m = build_model({"hidden": [400], "init": init, "init_std": 0.05, "input_shape": [500]}, seed=1)
    w = m.dense.weight.detach()
    assert check(w, 500, 400)
    assert torch.count_nonzero(m.dense.bias) == 0


def test_seeded_build_is_reproducible():
    a = build_model(load_model_spec("fashion-mlp-bn-after"), seed=3)
    b = build_model(load_model_spec("fashion-mlp-bn-after"), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_layers_spec_and_gap_head():
    spec = {"kind": "layers", "input_shape": [1, 8, 8], "num_classes": 3, "layers": [
        {"type": "conv2d", "filters": 4, "activation": "relu"}, {"type": "batchnorm"},
        {"type": "maxpool"}, {"type": "gap"}, {"type": "dense", "units": 3}]}
    m = build_model(spec)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    cnn = build_model({"kind": "cnn", "input_shape": [3, 16, 16], "num_classes": 5, "blocks": [4, 8],
                       "final_block": None, "head": "gap", "dense": [6], "bn": "before"})
    assert cnn(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert [ld.type for ld in expand(cnn.spec)][-4:] == ["dense", "batchnorm", "activation", "dense"]


@pytest.mark.parametrize("spec,match", [
    ({"activation": "swish"}, "activation"),
    ({"bn": "middle"}, "bn"),
    ({"hidden": [0]}, "greater than or equal to 1"),
    ({"unknown_key": 1}, "unknown_key"),
    ({"kind": "rnn"}, "kind"),
], ids=["activation", "placement", "width", "extra-key", "kind"])
def test_spec_errors_name_the_key(spec, match):
    with pytest.raises(ValidationError, match=match):
        parse_model_spec(spec)


@pytest.mark.parametrize("spec,match", [
    ({"kind": "layers", "input_shape": [1, 4, 4], "layers": [{"type": "dense", "units": 10}]}, "flat input"),
    ({"kind": "layers", "input_shape": [4], "layers": [{"type": "dense", "units": 7}]}, "num_classes is 10"),
    ({"kind": "cnn", "input_shape": [3, 4, 4], "blocks": [4, 4, 4]}, "shrank"),
], ids=["dense-needs-flatten", "wrong-output", "too-much-pooling"])
def test_build_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec)


def test_spec_from_toml_file(tmp_path):
    (tmp_path / "m.toml").write_text('[model]\nkind = "mlp"\nhidden = [20]\nbn = "after"\ninput_shape = [1, 8, 8]\n')
    spec = load_model_spec(tmp_path / "m.toml")
    assert spec.hidden == [20] and spec.bn == "after"
    (tmp_path / "bad.toml").write_text("hidden = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_model_spec(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="neither a model preset"):
        load_model_spec("no-such-preset")


def test_summary_cli_as_a_user():
    out = subprocess.run([sys.executable, "-m", "bnlab", "summary", "fashion-mlp-bn-after"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Total params: 271,346" in out.stdout and "Trainable params: 268,978" in out.stdout
    assert "batch_normalization_2 (BatchNorm)" in out.stdout


def test_summary_cli_bad_model():
    r = CliRunner().invoke(app, ["summary", "fashion-mlp-bn-sideways"])
    assert r.exit_code == 2 and "neither a model preset" in r.output


def test_models_and_datasets_listing():
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0 and "cifar100-cnn-bn" in r.output
    r = CliRunner().invoke(app, ["datasets"])
    assert r.exit_code == 0 and "mnist-5k" in r.output and "download" in r.output


def test_torch_default_init_is_seeded_without_the_global_rng():
    spec = {"kind": "mlp", "input_shape": [1, 8, 8], "hidden": [16], "num_classes": 10, "bn": "none",
            "init": "torch_default"}
    torch.manual_seed(1)
    a = build_model(spec, seed=5).state_dict()
    torch.manual_seed(2)  # another global state must not change seeded weights
    b = build_model(spec, seed=5).state_dict()
    c = build_model(spec, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["dense.weight"], c["dense.weight"])
    # torch's own bounds: kaiming_uniform(a=sqrt(5)) gives |w| <= 1/sqrt(fan_in), bias the same
    assert float(a["dense.weight"].abs().max()) <= 1 / 8 + 1e-7
    assert float(a["dense.bias"].abs().max()) <= 1 / 8 + 1e-7
