"""bnlab's inference tools and probes on any torch nn.Module: a ResNet-18-shaped network with torch's own
BatchNorm2d (tests/resnet.py), models fx cannot trace, layers used twice, every kind of norm layer.
Oracles: the unfolded model's own eval outputs, direct float64 statistics of each BN's input, numpy
percentiles of hooked pre-activations, parameter counts from the parameters themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.deploy import fold, recalibrate
from bnlab.models import summary
from bnlab.nn import BatchNorm
from bnlab.probes import ProbeConfig, Probes
from resnet import ResNet18


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm)) for m in model.modules())


# ---- fold

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
def test_resnet_folds_every_bn_and_matches_eval_outputs(dtype, tol):
    torch.manual_seed(0)
    model = _randomise_bn(ResNet18(num_classes=10, width=8)).to(dtype)
    n_bn = _bn_count(model)
    assert n_bn == 20  # stem + 2 per block x 8 + 3 downsample shortcuts
    folded, rep = fold(model)
    assert rep.method == "graph" and rep.folded == n_bn == len(rep.entries)
    assert _bn_count(folded) == 0 and isinstance(folded, torch.fx.GraphModule)
    # the shortcut BNs fold into their own 1x1 convs, not into a neighbour in registration order
    assert {e.bn: e.folded_into for e in rep.entries}["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= tol
    assert all(p.dtype == dtype for p in folded.parameters())


class SharedConv(nn.Module):
    """pytorch issue 197539: the conv feeding the BN also feeds a second branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.bn(h) + self.other(h)


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


@pytest.mark.parametrize("model_cls,reason", [(SharedConv, "also feeds"), (ConvCalledTwice, "called more than once")],
                         ids=["output-also-used-elsewhere", "conv-called-twice"])
def test_fold_refuses_a_shared_layer_with_the_reason(model_cls, reason):
    torch.manual_seed(0)
    model = _randomise_bn(model_cls())
    folded, rep = fold(model)
    (entry,) = rep.entries
    assert entry.folded_into is None and reason in entry.how and "197539" in entry.how
    x = torch.randn(2, model.conv.in_channels, 6, 6)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-6  # nothing silently changed


class RegisteredOutOfOrder(nn.Module):
    """Registration order is not data flow: the BN is registered next to ``a`` but normalises ``b``'s output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return self.bn(self.b(torch.relu(self.a(x))))


def test_fold_follows_data_flow_not_registration_order():
    torch.manual_seed(0)
    model = _randomise_bn(RegisteredOutOfOrder())
    folded, rep = fold(model, example_input=torch.randn(2, 5))
    assert rep.entries[0].folded_into == "b" and rep.entries[0].how == "output side"
    x = torch.randn(7, 5)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-6


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; the Sequential inside still folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.loose_bn = nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.body(x)
        return self.loose_bn(h) if bool(h.sum() > -1e9) else h


def test_untraceable_model_falls_back_to_sequential_order():
    torch.manual_seed(0)
    model = _randomise_bn(Untraceable())
    folded, rep = fold(model, example_input=torch.randn(2, 4))
    entries = {e.bn: e for e in rep.entries}
    assert rep.method == "sequential"
    assert entries["body.1"].folded_into == "body.0"
    assert entries["loose_bn"].folded_into is None and "not inside an nn.Sequential" in entries["loose_bn"].how
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-6


@pytest.mark.parametrize("bn_factory", [
    lambda c: nn.BatchNorm1d(c), lambda c: nn.SyncBatchNorm(c),
    lambda c: BatchNorm(c, convention="keras"), lambda c: BatchNorm(c, convention="torch")],
    ids=["torch-bn1d", "torch-syncbn", "bnlab-keras", "bnlab-torch"])
def test_input_and_output_side_for_every_batch_norm_kind(bn_factory):
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(bn_factory(5), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3),
                                        nn.Dropout(0.5), bn_factory(3)))
    folded, rep = fold(model, example_input=torch.randn(2, 5))
    assert [(e.folded_into, e.how) for e in rep.entries] == [("1", "input side"), ("3", "output side")]
    assert isinstance(folded, nn.Sequential) and _bn_count(folded) == 0
    x = torch.randn(9, 5)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-6


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 4), nn.LayerNorm([4, 5, 5]), nn.InstanceNorm2d(4, affine=True)],
                         ids=["group", "layer", "instance"])
def test_per_sample_norms_stay_with_a_reason(norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.ReLU()).eval()
    folded, rep = fold(model)
    assert rep.folded == 0 and "its own statistics" in rep.entries[0].how
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_fold_refuses_training_mode_of_any_model():
    with pytest.raises(ValueError, match="eval mode"):
        fold(ResNet18(width=4).train())
    with pytest.raises(TypeError, match="nn.Module"):
        fold("resnet")


# ---- recalibrate (precise statistics)

def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each BN's input over ``x`` in one forward pass (the model's current modes)."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: seen.__setitem__(name, inp[0])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _direct(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance over all N·H·W values, in float64."""
    v = h.double().transpose(0, 1).reshape(h.shape[1], -1)
    return v.mean(1), v.var(1, unbiased=True)


def test_recalibrated_resnet_is_its_own_population_statistics_inference_mode():
    torch.manual_seed(1)
    model = _randomise_bn(ResNet18(width=4)).double()
    x = torch.randn(40, 3, 16, 16, dtype=torch.float64) * 2 + 0.5
    new = recalibrate(model, x, batch_size=7, mode="inference")
    # fixed point: in eval mode, each BN's input over the data has exactly the stored statistics
    for name, h in _bn_inputs(new.eval(), x).items():
        bn = new.get_submodule(name)
        mean, var = _direct(h)
        assert torch.allclose(bn.running_mean, mean, rtol=1e-10, atol=1e-12), name
        assert torch.allclose(bn.running_var, var, rtol=1e-10, atol=1e-12), name
    assert not torch.equal(new.bn1.running_mean, model.bn1.running_mean)  # the input model is untouched


def test_recalibrated_resnet_train_mode_one_batch_matches_a_train_forward():
    torch.manual_seed(2)
    model = _randomise_bn(ResNet18(width=4)).double()
    x = torch.randn(24, 3, 16, 16, dtype=torch.float64)
    new = recalibrate(model, x, batch_size=len(x), mode="train")
    probe = _randomise_bn(ResNet18(width=4)).double()
    probe.load_state_dict(model.state_dict())
    probe.train()  # every BN normalises with the batch's statistics, as in training
    for name, h in _bn_inputs(probe, x).items():
        mean, var = _direct(h)
        bn = new.get_submodule(name)
        assert torch.allclose(bn.running_mean, mean, rtol=1e-9, atol=1e-12), name
        assert torch.allclose(bn.running_var, var, rtol=1e-9, atol=1e-12), name


# ---- probes

def test_probes_reach_activations_inside_blocks_and_match_numpy():
    torch.manual_seed(3)
    model = ResNet18(width=4).train()
    x = torch.randn(16, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = Probes(model, ProbeConfig(every=1, tracked_units=1), batch=x)
    probes.before_step(1)
    names = {layer for _, layer, _, _ in probes.records}
    assert {"relu", "layer1.0.relu", "layer4.1.relu"} <= names
    got = {(layer, metric): v for _, layer, metric, v in probes.records}
    # independent: the stem ReLU's input is BN (batch statistics) of conv1's output
    with torch.no_grad():
        h = F.batch_norm(model.conv1(x), None, None, model.bn1.weight, model.bn1.bias, training=True,
                         eps=model.bn1.eps)
    expect = np.percentile(h.double().numpy().ravel(), [15, 50, 85])
    assert np.allclose([got[("relu", f"p{q}")] for q in (15, 50, 85)], expect, rtol=1e-5, atol=1e-6)
    # a block's ReLU is called twice; both calls (same shape) are probed together: 2 x 16 images
    assert got[("layer1.0.relu", "width")] == 4
    for k, v in model.state_dict().items():  # probing never changes the model
        assert torch.equal(v, before[k]), k


# ---- summary

def test_summary_of_any_module_counts_like_keras():
    model = ResNet18(width=8)
    s = summary(model, input_shape=(3, 32, 32), name="resnet")
    assert s.trainable == sum(p.numel() for p in model.parameters())
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert s.non_trainable == 2 * bn_channels  # moving mean + variance; num_batches_tracked not counted
    assert [r.name for r in s.rows][:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert s.rows[-1].output_shape == (10,)
    with pytest.raises(ValueError, match="needs input_shape"):
        summary(model)


class LinearOnSequence(nn.Module):
    """A Linear on the last axis of (N, C, L) followed by BatchNorm1d over axis 1: with C == L == features
    the sizes agree, but the BN scales another axis than the Linear's outputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_fold_with_an_example_input_refuses_a_bn_on_another_axis():
    torch.manual_seed(0)
    model = _randomise_bn(LinearOnSequence())
    (blind,) = fold(model)[1].entries  # no example: the rank is unknown, so nothing is risked
    assert blind.folded_into is None and "pass example_input" in blind.how
    x = torch.randn(3, 6, 6)
    folded, rep = fold(model, example_input=x)
    (entry,) = rep.entries
    assert entry.folded_into is None and "acts on the last axis of the 3-D input, the BN on axis 1" in entry.how
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-6
    two_d = _randomise_bn(RegisteredOutOfOrder())
    assert fold(two_d, example_input=torch.randn(4, 5))[1].folded == 1  # (N, C): the same axis, folded
    with pytest.raises(ValueError, match="cannot run on example_input"):
        fold(two_d, example_input=torch.randn(4, 7))
