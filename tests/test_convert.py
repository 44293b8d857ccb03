"""bnlab.convert / to_torch / from_torch and model factories in specs and experiments.
Oracles: torch's own layers (outputs, running statistics after a training step), the layers'
parameters themselves, a real experiment run through the runner on the embedded digits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnlab
from bnlab.checkpoint import load_checkpoint, save_checkpoint
from bnlab.data import load_dataset
from bnlab.deploy import fold
from bnlab.experiments import load_probes, load_results, parse_experiment, run_experiment
from bnlab.models import build_model
from bnlab.nn import BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm
from bnlab.train.engine import fit
from resnet import ResNet18

RESNET = f"{Path(__file__).resolve().parent.parent / 'examples' / 'resnet.py'}:resnet18"


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm, BatchNorm,
                                                         GroupNorm, LayerNorm))]


@pytest.mark.parametrize("target,cls", [("group:4", GroupNorm), ("layer", GroupNorm), ("instance", InstanceNorm),
                                        ("batch", BatchNorm), ("renorm", BatchRenorm), ("ghost:8", GhostBatchNorm)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_convert_swaps_every_norm_of_a_resnet_keeping_affine(target, cls):
    torch.manual_seed(0)
    model = ResNet18(width=8)
    with torch.no_grad():
        for m in _norms(model):
            m.weight.normal_()
            m.bias.normal_()
    new = bnlab.convert(model, target)
    old_names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert len(old_names) == 20
    for n in old_names:
        m = new.get_submodule(n)
        assert type(m) is cls, n
        assert torch.equal(m.weight, model.get_submodule(n).weight) and torch.equal(m.bias, model.get_submodule(n).bias)
    assert all(type(m) is nn.BatchNorm2d for m in _norms(model))  # the input model is untouched
    assert new(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_convert_to_none_and_back_to_batch_keeps_running_statistics():
    model = ResNet18(width=4)
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.7)
        model.bn1.num_batches_tracked.fill_(5)
    assert not _norms(bnlab.convert(model, "none"))
    keras = bnlab.convert(model, "batch", convention="keras")
    assert keras.bn1.convention == "keras" and keras.bn1.momentum == 0.99 and keras.bn1.eps == model.bn1.eps
    assert torch.equal(keras.bn1.running_mean, model.bn1.running_mean) and int(keras.bn1.num_batches_tracked) == 5


def test_convert_errors_name_each_layer_and_the_target():
    model = ResNet18(width=6)
    with pytest.raises(ValueError, match=r"group:4 needs a channel count divisible by 4 \(got 6 channels\)") as e:
        bnlab.convert(model, "group:4")
    assert "layer1.0.bn1" in str(e.value)
    with pytest.raises(ValueError, match="norm must be"):
        bnlab.convert(model, "weight")
    with pytest.raises(ValueError, match="no normalization layer"):
        bnlab.convert(nn.Linear(3, 3), "batch")
    # (N, C) features: no axis to normalise, refused up front naming every such layer
    dense = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"(?s)1 \(BatchNorm1d\): instance norm needs spatial axes.*"
                                         r"\(N, C\) features.*3 \(BatchNorm1d\)"):
        bnlab.convert(dense, "instance", input_shape=(3,))
    with pytest.raises(ValueError, match=r"(?s)1 \(BatchNorm1d\).*give convert input_shape.*3 \(BatchNorm1d\)"):
        bnlab.convert(dense, "instance")  # BatchNorm1d takes (N, C) and (N, C, L): it cannot tell which


def test_converted_batchnorm1d_is_right_for_both_of_its_ranks():
    """BatchNorm1d takes (N, C) and (N, C, L); "layer" must normalise each sample over its features
    (and positions) with a per-channel affine in both, as GroupNorm(1, C) does, never over L alone."""
    torch.manual_seed(0)
    new = bnlab.convert(nn.BatchNorm1d(6), "layer")
    oracle = nn.GroupNorm(1, 6)
    with torch.no_grad():
        new.weight.normal_()
        new.bias.normal_()
        oracle.weight.copy_(new.weight)
        oracle.bias.copy_(new.bias)
    for x in (torch.randn(4, 6), torch.randn(4, 6, 5)):
        assert torch.allclose(new(x), oracle(x), atol=1e-5)
    inst = bnlab.convert(nn.BatchNorm1d(6), "instance", input_shape=(6, 7))
    x = torch.randn(3, 6, 7)
    assert torch.allclose(inst(x), nn.InstanceNorm1d(6, affine=True)(x), atol=1e-5)


@pytest.mark.parametrize("target", ["renorm", "ghost:16"])
def test_convert_then_a_short_fit_learns(target):
    data = load_dataset("digits")  # 1x8x8 real digits
    torch.manual_seed(0)
    model = bnlab.convert(ResNet18(width=8, in_channels=1), target)
    h = fit(model, data, epochs=2, lr=0.01, optimizer="adam", batch_size=32, progress=False, seed=0)
    losses = [e.train_loss for e in h.epochs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert h.epochs[-1].val_accuracy > 0.3  # 10 classes: chance is 0.1


def test_converted_group_norm_trains_as_torchs_group_norm():
    """GN on this tiny-map ResNet learns slowly, but exactly as torch's own GroupNorm does."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    theirs = ResNet18(width=8, in_channels=1, norm=lambda c: nn.GroupNorm(4, c))
    ours = bnlab.convert(copy.deepcopy(theirs), "group:4")
    assert isinstance(ours.bn1, GroupNorm)
    runs = [fit(m, data, epochs=1, lr=0.01, optimizer="adam", batch_size=32, progress=False, seed=0)
            for m in (theirs, ours)]
    a, b = (r.epochs[0] for r in runs)
    assert abs(a.train_loss - b.train_loss) <= 1e-4 * a.train_loss and a.val_accuracy == pytest.approx(b.val_accuracy, abs=0.01)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_to_torch_is_recognised_by_torch_and_computes_the_same(convention):
    torch.manual_seed(1)
    spec = {"kind": "cnn", "input_shape": [3, 8, 8], "blocks": [4], "final_block": 4, "bn": "before",
            "num_classes": 3, "dense": [5], "norm_options": {"convention": convention}}
    model = build_model(spec, seed=0)
    with torch.no_grad():
        for m in _norms(model):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    plain = bnlab.to_torch(model)
    kinds = [type(m) for m in plain.modules() if isinstance(m, _BatchNorm)]
    n_bn = sum(isinstance(m, BatchNorm) for m in model.modules())
    assert n_bn == 5 and kinds == [nn.BatchNorm2d] * 4 + [nn.BatchNorm1d]  # 2 blocks x 2 convs, 1 dense
    assert not any(isinstance(m, BatchNorm) for m in plain.modules())
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), model.eval()(x), rtol=1e-6, atol=1e-6)
    # one training step: the running MEAN follows the same update in both (momentum converted);
    # the variance follows each convention's own rule (Keras biased, torch unbiased)
    model.train()(x)
    plain.train()(x)
    a = [m for m in model.modules() if isinstance(m, BatchNorm)][0]
    b = [m for m in plain.modules() if isinstance(m, _BatchNorm)][0]
    assert torch.allclose(a.running_mean, b.running_mean, rtol=1e-6, atol=1e-7)
    if convention == "torch":
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-6)
    back = bnlab.from_torch(plain, convention=convention)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), plain.eval()(x), rtol=1e-6, atol=1e-6)
    assert [m.convention for m in back.modules() if isinstance(m, BatchNorm)] == [convention] * n_bn


def test_to_torch_refuses_layers_torch_lacks():
    with pytest.raises(ValueError, match="Batch Renorm or Ghost BN"):
        bnlab.to_torch(build_model({"hidden": [4], "bn": "before", "norm": "renorm"}))
    with pytest.raises(ValueError, match="needs input_shape"):
        bnlab.to_torch(nn.Sequential(BatchNorm(3)))


# ---- model factories

def test_factory_spec_is_seeded_converted_and_checkpointed(tmp_path):
    spec = {"factory": RESNET, "kwargs": {"width": 4, "in_channels": 1}, "input_shape": [1, 8, 8],
            "num_classes": 10, "norm": "group:2"}
    state = torch.get_rng_state()
    a, b = build_model(spec, seed=3, trust_factory=True), build_model(spec, seed=3, trust_factory=True)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv1.weight, build_model(spec, seed=4, trust_factory=True).conv1.weight)
    assert isinstance(a.bn1, GroupNorm) and a.spec.kind == "factory"
    save_checkpoint(tmp_path / "ck", a.eval())
    ck = load_checkpoint(tmp_path / "ck", trust_factory=[RESNET])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ck.model.eval()(x), a(x))


@pytest.mark.parametrize("factory,match", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    (f"{RESNET.rsplit(':', 1)[0]}:nothing", "has no function 'nothing'"),
    ("/nope/model.py:f", "no file"),
])
def test_factory_errors_say_what_was_not_found(factory, match):
    with pytest.raises(ValueError, match=match):
        build_model({"factory": factory}, trust_factory=True)


def test_factory_ablation_through_the_experiment_runner(tmp_path):
    spec = parse_experiment({
        "name": "own-net", "seeds": 1, "data": {"dataset": "digits"},
        "model": {"factory": RESNET, "kwargs": {"width": 4, "in_channels": 1}},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}, "probes": {"every": 10, "probe_batch": 32},
        "variants": {"bn": {}, "gn": {"model": {"norm": "group:2"}}, "no-norm": {"model": {"norm": "none"}}}})
    prog = run_experiment(spec, tmp_path / "e", workers=1, trust_factory=True)
    assert (prog.done, prog.failed) == (3, 0)
    probed = {r["layer"] for r in load_probes(tmp_path / "e")}
    assert {"relu", "layer1.0.relu", "layer4.1.relu", "fc", "layer2.0.downsample.0"} <= probed  # inside the blocks
    _, runs, _ = load_results(tmp_path / "e")
    assert {r["variant"] for r in runs} == {"bn", "gn", "no-norm"} and all(r["status"] == "done" for r in runs)
    ck = load_checkpoint(tmp_path / "e" / "runs" / "gn" / "seed-0" / "checkpoint", trust_factory=True)
    assert isinstance(ck.model.bn1, GroupNorm)
    # the BN run's checkpoint is a torch BatchNorm2d ResNet that folds
    bn = load_checkpoint(tmp_path / "e" / "runs" / "bn" / "seed-0" / "checkpoint", trust_factory=True).model.eval()
    folded, rep = fold(bn)
    assert rep.folded == 20
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), bn(x), rtol=1e-4, atol=1e-5)


def test_bnlab_fold_cli_on_a_factory_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from bnlab.cli import app

    model = build_model({"factory": RESNET, "kwargs": {"width": 4}, "input_shape": [3, 16, 16]}, seed=0,
                        trust_factory=True)
    with torch.no_grad():
        for m in _norms(model):
            m.running_var.uniform_(0.5, 2)
            m.running_mean.normal_()
    save_checkpoint(tmp_path / "ck", model.eval())
    res = CliRunner().invoke(app, ["fold", str(tmp_path / "ck"), "--out", str(tmp_path / "folded"), "--trust-factory"])
    assert res.exit_code == 0, res.output
    assert "20 of 20 normalization layers folded (graph data flow)" in res.output
    ck = load_checkpoint(tmp_path / "folded", trust_factory=True)
    assert ck.model.spec.folded and not _norms(ck.model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ck.model(x), model(x), rtol=1e-4, atol=1e-5)
