"""Precise BN statistics (bnlab.deploy.recalibrate) against direct computations over the whole dataset.

The references never merge batches: they run the layer's input for ALL samples at once (or concatenate
every batch's input) in float64 and take torch.var_mean over all values per channel.
"""

import copy
import json
import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnlab.checkpoint import load_checkpoint
from bnlab.cli import _checkpoint_data, app
from bnlab.deploy import recalibrate
from bnlab.deploy.precise import batch_indices
from bnlab.models import build_model
from bnlab.train import evaluate
from bnlab.nn import BatchNorm, BatchRenorm, GhostBatchNorm

TOL = 1e-5  # float32 model against a float64 reference; measured ~1e-7


class NHWC(nn.Module):
    """Runs a conv on channels-last data: (N, H, W, C) -> (N, H, W, C')."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def bns(model):
    return [m for m in model.modules() if isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm))]


def axis_of(m):
    return m.axis if isinstance(m, BatchNorm) else 1


def make(kind, convention="torch", affine=True, seed=0):
    """A small network with two BN layers and dropout, BN parameters and running statistics made non-trivial."""
    torch.manual_seed(seed)
    bn = lambda c, **kw: BatchNorm(c, convention=convention, affine=affine, **kw)  # noqa: E731
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), bn(16), nn.ReLU(), nn.Dropout(0.5),
                              nn.Linear(16, 8, bias=False), bn(8), nn.Tanh(), nn.Linear(8, 3))
        shape = (12,)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Dropout(0.5),
                              nn.Conv2d(4, 5, 3), bn(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
        shape = (3, 6, 6)
    elif kind == "cnn-nhwc":  # keras layout: channels last, BN axis=-1
        model = nn.Sequential(NHWC(nn.Conv2d(3, 4, 3, padding=1)), bn(4, axis=-1), nn.ReLU(),
                              NHWC(nn.Conv2d(4, 5, 3)), bn(5, axis=-1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 5, 3))
        shape = (6, 6, 3)
    elif kind == "torch-cnn":  # torch's own layers, as a user brings them
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine), nn.ReLU(),
                              nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, affine=affine), nn.ReLU(), nn.Flatten(),
                              nn.Linear(5 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        shape = (3, 6, 6)
    else:
        raise AssertionError(kind)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in bns(model):
            m.running_mean.normal_(0, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
            m.num_batches_tracked.fill_(123)
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
            if m.bias is not None:
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval(), shape


def data(shape, n, seed=0):
    """Non-centred data with a per-sample offset, so batch means spread more than iid values would."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * 3 + 2
    return x + torch.randn(n, *([1] * len(shape)), generator=g) * 2


def inputs_of(model, k, x):
    """The input of the k-th BN layer over all of x at once, float64, model in eval mode."""
    model = copy.deepcopy(model).double().eval()
    seen = []
    h = bns(model)[k].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    with torch.no_grad():
        model(x.double())
    h.remove()
    return seen[0]


def population(h, axis, convention):
    """Mean and stored variance over all values per channel: torch unbiased (n - 1), keras biased."""
    h = h.movedim(axis % h.dim(), -1).reshape(-1, h.shape[axis])
    var, mean = torch.var_mean(h, dim=0, correction=1 if convention == "torch" else 0)
    return mean, var


def conv_of(m):
    return m.convention if isinstance(m, BatchNorm) else "torch"


def rel(a, b):
    """Largest elementwise relative difference."""
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-300)).max())


def agree(layer, mean, var, tol=TOL):
    """The stored statistics against a reference: the mean within tol standard deviations (a mean can be ~0),
    the variance within tol relative."""
    mean_err = float(((layer.running_mean.double() - mean).abs() / var.sqrt()).max())
    return mean_err < tol and rel(layer.running_var, var) < tol


def same(la, lb, tol):
    """Two layers' statistics agree (``agree`` with lb's as the reference)."""
    return agree(la, lb.running_mean.double(), lb.running_var.double(), tol)


def first_bn_reference(model, x):
    first = bns(model)[0]
    return population(inputs_of(model, 0, x), axis_of(first), conv_of(first))


# ------------------------------------------------------------------ the first BN: exact population statistics

FIRST_CASES = [(kind, conv, affine, bs, n)
               for kind in ("mlp", "cnn", "cnn-nhwc") for conv in ("torch", "keras") for affine in (True, False)
               for bs, n in ((32, 200), (7, 50))]


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("kind,convention,affine,batch_size,n", FIRST_CASES,
                         ids=[f"{k}-{c}-{'affine' if a else 'noaffine'}-b{b}-n{n}" for k, c, a, b, n in FIRST_CASES])
def test_first_bn_is_the_population_over_all_values(kind, convention, affine, batch_size, n, mode):
    model, shape = make(kind, convention, affine)
    x = data(shape, n)
    new = recalibrate(model, x, batch_size=batch_size, mode=mode, seed=3)
    mean, var = first_bn_reference(model, x)
    assert agree(bns(new)[0], mean, var)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn-nhwc", "torch-cnn"])
def test_conv_count_is_n_h_w_not_images(kind):
    """torch / keras stored variances differ by exactly n/(n-1) with n = all values per channel (N·H·W for a
    conv): the old code's batch-images factor 32/31 makes a conv BN's variance 3.2 % too large."""
    model, shape = make(kind, "torch")
    x = data(shape, 96)
    values = 96 * (36 if kind != "mlp" else 1)
    torch_var = bns(recalibrate(model, x, batch_size=32, mode="train"))[0].running_var.double()
    for m in bns(model):
        if isinstance(m, BatchNorm):
            m.convention = "keras"
    if kind != "torch-cnn":
        keras_var = bns(recalibrate(model, x, batch_size=32, mode="train"))[0].running_var.double()
        assert rel(torch_var / keras_var, torch.full_like(torch_var, values / (values - 1))) < 1e-6
    h = inputs_of(model, 0, x)
    _, biased = population(h, axis_of(bns(model)[0]), "keras")
    assert rel(torch_var, biased * values / (values - 1)) < TOL
    assert rel(torch_var, biased * 32 / 31) > 0.02  # what m = 32 images would store


# ------------------------------------------------------------------ every layer, both modes

def train_mode_reference(model, x, batches):
    """Every BN layer's statistics in mode train, from the concatenation of its inputs over all batches: each
    batch runs a fresh float64 copy of the ORIGINAL model with BN in train mode and dropout off."""
    ref = copy.deepcopy(model).double().eval()
    seen = {i: [] for i in range(len(bns(ref)))}
    for idx in batches:
        m = copy.deepcopy(ref)  # fresh running statistics for every batch: renorm corrects toward the trained ones
        layers = bns(m)
        for layer in layers:
            layer.train()
        hs = [layer.register_forward_pre_hook(lambda mod, inp, i=i: seen[i].append(
            inp[0].movedim(axis_of(mod) % inp[0].dim(), -1).reshape(-1, inp[0].shape[axis_of(mod)])))
            for i, layer in enumerate(layers)]
        with torch.no_grad():
            m(x[idx].double())
        for h in hs:
            h.remove()
    return [population(torch.cat(seen[i]), -1, conv_of(layer)) for i, layer in enumerate(bns(ref))]


def inference_mode_reference(new, x):
    """The fixed point of mode inference: each layer's statistics are those of its input over all of x at
    once, with the RECALIBRATED model in eval mode (layers before it use their new statistics)."""
    return [population(inputs_of(new, k, x), axis_of(layer), conv_of(layer)) for k, layer in enumerate(bns(new))]


LAYER_CASES = [(k, c, a) for k in ("mlp", "cnn", "cnn-nhwc") for c in ("torch", "keras") for a in (True, False)]
LAYER_CASES += [("torch-cnn", "torch", True), ("torch-cnn", "torch", False)]


@pytest.mark.parametrize("kind,convention,affine", LAYER_CASES,
                         ids=[f"{k}-{c}-{'affine' if a else 'noaffine'}" for k, c, a in LAYER_CASES])
def test_every_layer_in_both_modes(kind, convention, affine):
    model, shape = make(kind, convention, affine)
    x = data(shape, 75)  # 75 = 2·32 + 11: a last partial batch
    batches = batch_indices(75, batch_size=32, seed=5)
    assert [len(b) for b in batches] == [32, 32, 11]
    new = recalibrate(model, x, batch_size=32, mode="train", seed=5)
    for layer, (mean, var) in zip(bns(new), train_mode_reference(model, x, batches)):
        assert agree(layer, mean, var)
    new = recalibrate(model, x, batch_size=32, mode="inference", seed=5)
    for layer, (mean, var) in zip(bns(new), inference_mode_reference(new, x)):
        assert agree(layer, mean, var)
    # the modes differ after the first layer (it sees batch-normalized vs moving-average-normalized input)
    train_new = recalibrate(model, x, batch_size=32, mode="train", seed=5)
    assert rel(bns(train_new)[0].running_var, bns(new)[0].running_var) < TOL
    assert rel(bns(train_new)[1].running_var, bns(new)[1].running_var) > 1e-4


def test_renorm_and_ghost_in_train_mode():
    """Ghost BN normalizes with its ghost batches; Batch Renorm with r, d against the running statistics it was
    trained with, held fixed over the pass (the reference re-copies the original model for every batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), BatchRenorm(10, r_max=1.5, d_max=0.5), nn.ReLU(),
                          nn.Linear(10, 8), GhostBatchNorm(8, ghost_size=8, convention="keras"), nn.ReLU(),
                          nn.Linear(8, 4), BatchNorm(4), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in bns(model):
            m.running_mean.normal_(0, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    x = data((6,), 100)
    batches = batch_indices(100, batch_size=32, seed=2)
    new = recalibrate(model, x, batch_size=32, seed=2, mode="train")
    for layer, (mean, var) in zip(bns(new), train_mode_reference(model, x, batches)):
        assert agree(layer, mean, var)
    # the renorm corrections matter: with r = 1, d = 0 (plain BN) the next layer sees something else
    plain = copy.deepcopy(model)
    plain[1].r_max, plain[1].d_max = 1.0, 0.0
    other = recalibrate(plain, x, batch_size=32, seed=2, mode="train")
    assert rel(bns(other)[1].running_var, bns(new)[1].running_var) > 1e-3


def test_order_matters_only_in_train_mode_and_only_after_the_first_layer():
    model, shape = make("cnn")
    x = data(shape, 90)
    a, b = (recalibrate(model, x, batch_size=16, seed=s, mode="train") for s in (0, 1))
    assert rel(bns(a)[0].running_var, bns(b)[0].running_var) < 1e-6
    assert rel(bns(a)[1].running_var, bns(b)[1].running_var) > 1e-5
    a, b = (recalibrate(model, x, batch_size=bs, mode="inference", seed=s) for s, bs in ((0, 16), (1, 1)))
    for la, lb in zip(bns(a), bns(b)):  # batches of one sample are fine in mode inference
        assert same(la, lb, 1e-6)


def test_a_last_batch_of_one_sample_joins_the_previous_batch():
    assert [len(b) for b in batch_indices(65, batch_size=32)] == [32, 33]
    assert [len(b) for b in batch_indices(65, batch_size=32, mode="inference")] == [32, 32, 1]
    assert sorted(torch.cat(batch_indices(65, batch_size=32)).tolist()) == list(range(65))
    model, shape = make("mlp")
    x = data(shape, 65)
    new = recalibrate(model, x, batch_size=32, mode="train")  # would fail if a batch of 1 ran BN in train mode
    mean, var = first_bn_reference(model, x)
    assert agree(bns(new)[0], mean, var)
    few = recalibrate(model, x, batch_size=32, max_batches=1, mode="train")
    idx = batch_indices(65, batch_size=32)[0]
    mean, var = first_bn_reference(model, x[idx])
    assert rel(bns(few)[0].running_var, var) < TOL


@pytest.mark.parametrize("spec", [
    {"hidden": [20, 12], "bn": "before", "input_bn": True, "dropout": 0.2, "input_shape": [1, 6, 6]},
    {"kind": "cnn", "input_shape": [3, 8, 8], "blocks": [4], "final_block": 6, "bn": "after", "dropout": 0.2,
     "norm_options": {"convention": "keras"}},
], ids=["bnlab-mlp", "bnlab-cnn-keras"])
def test_bnlab_models_float64_not_mutated(spec):
    model = build_model(spec, seed=0).double()
    shape = tuple(spec["input_shape"])
    x = data(shape, 70).double()
    before = copy.deepcopy(model.state_dict())
    model.train()
    new = recalibrate(model, x, batch_size=16, mode="train")
    assert model.training  # the input keeps its mode and its state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not new.training and all(p.dtype == torch.float64 for p in new.state_dict().values()
                                    if p.is_floating_point())
    assert all(int(m.num_batches_tracked) == int(o.num_batches_tracked) for m, o in zip(bns(new), bns(model)))
    mean, var = first_bn_reference(model, x)
    assert rel(bns(new)[0].running_var, var) < 1e-10


def test_dropout_stays_off():
    model, shape = make("mlp")
    no_drop = copy.deepcopy(model)
    no_drop[4].p = 0.0
    x = data(shape, 64)
    a, b = recalibrate(model, x, batch_size=16, mode="train"), recalibrate(no_drop, x, batch_size=16, mode="train")
    assert all(torch.equal(la.running_var, lb.running_var) for la, lb in zip(bns(a), bns(b)))


@pytest.mark.parametrize("offset,scale", [(1e6, 1e-3), (0.0, 1e-12), (0.0, 1e12)], ids=["huge-mean-tiny-var",
                                                                                      "tiny", "huge"])
def test_no_cancellation(offset, scale):
    """A mean of 1e6 with std 1e-3 (float64): Σx² - n·mean² would lose every digit; Chan's merge keeps them."""
    model = nn.Sequential(BatchNorm(3), nn.Linear(3, 2)).double()
    x = offset + scale * torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    new = recalibrate(model, x, batch_size=32, mode="train")
    var, mean = torch.var_mean(x, dim=0, correction=1)
    assert agree(bns(new)[0], mean, var, 1e-6)


# ------------------------------------------------------------------ torch.optim.swa_utils.update_bn


def _update_bn(model, x, batches):
    from torch.optim.swa_utils import update_bn
    m = copy.deepcopy(model)
    update_bn([x[idx] for idx in batches], m)
    return m


def test_agrees_with_update_bn_on_one_batch_holding_all_the_data():
    """One batch of everything: update_bn stores the unbiased variance over all values, as we do."""
    model, shape = make("torch-cnn")
    x = data(shape, 60)
    ours = recalibrate(model, x, batch_size=60, mode="train")
    theirs = _update_bn(model, x, batch_indices(60, batch_size=60))
    for a, b in zip(bns(ours), bns(theirs)):
        assert same(a, b, 1e-5)


def test_differs_from_update_bn_on_several_batches():
    """Equal batches: the means agree (every layer); update_bn's variance is the average of the per-batch
    unbiased variances, which misses the spread of the batch means; ours is the variance over all values."""
    model, shape = make("torch-cnn")
    x = data(shape, 128)
    batches = batch_indices(128, batch_size=16, seed=0)
    ours = recalibrate(model, x, batch_size=16, seed=0, mode="train")
    theirs = _update_bn(model, x, batches)
    for a, b in zip(bns(ours), bns(theirs)):
        assert float(((a.running_mean - b.running_mean).abs() / a.running_var.sqrt()).max()) < 1e-5
    h = inputs_of(model, 0, x)
    per_batch = torch.stack([population(h[idx], 1, "torch")[1] for idx in batches]).mean(0)
    assert rel(bns(theirs)[0].running_var, per_batch) < 1e-5  # what update_bn computes
    _, pooled = population(h, 1, "torch")
    assert rel(bns(ours)[0].running_var, pooled) < TOL
    assert rel(bns(theirs)[0].running_var, pooled) > 5e-3  # not the variance over all values (0.9 % off)
    # unequal batches: update_bn's mean is an equal-weight average of batch means, not the mean
    x = data(shape, 100)
    batches = batch_indices(100, batch_size=48, seed=0)  # 48, 48, 4
    theirs = _update_bn(model, x, batches)
    mean, var = population(inputs_of(model, 0, x), 1, "torch")
    assert agree(bns(recalibrate(model, x, batch_size=48, mode="train"))[0], mean, var)
    assert float(((bns(theirs)[0].running_mean - mean).abs() / var.sqrt()).max()) > 1e-3


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,x,match", [
    ({"batch_size": 1, "mode": "train"}, torch.randn(10, 12), "batch_size >= 2"),
    ({"batch_size": 0, "mode": "inference"}, torch.randn(10, 12), "positive integer"),
    ({}, torch.randn(0, 12), "no data"),
    ({"mode": "train"}, torch.randn(1, 12), "at least 2 samples"),
    ({}, torch.randn(12), "batch axis first"),
    ({}, torch.randn(10, 5), "could not run on the data"),
    ({}, torch.ones(10, 12, dtype=torch.long), "floating-point"),
    ({}, torch.full((10, 12), float("nan")), "NaN"),
    ({"mode": "eval"}, torch.randn(10, 12), "mode must be one of"),
    ({"max_batches": 0}, torch.randn(10, 12), "max_batches"),
], ids=["batch-1-train", "batch-0", "empty", "one-sample-train", "1d", "wrong-shape", "int", "nan", "bad-mode",
        "max-batches"])
def test_errors(kwargs, x, match):
    model, _ = make("mlp")
    with pytest.raises(ValueError, match=match):
        recalibrate(model, x, **kwargs)


def test_error_cases_for_models():
    with pytest.raises(ValueError, match="no batch-statistics normalization"):
        recalibrate(build_model({"input_shape": [4]}), torch.randn(64, 4), mode="train")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        recalibrate(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)), torch.randn(8, 4), mode="train")
    with pytest.raises(ValueError, match=r"expected data of shape \(N, 4\)"):
        recalibrate(build_model({"input_shape": [4], "bn": "before"}), torch.randn(8, 5), mode="train")
    # one sample after a Linear: a single value per channel has no unbiased variance (torch convention)
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        recalibrate(build_model({"input_shape": [4], "bn": "before"}), torch.randn(1, 4), mode="inference")


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = BatchNorm(3), BatchNorm(3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_a_layer_the_forward_never_reaches_is_left_alone_with_a_warning(mode):
    model = Unused()
    with pytest.warns(UserWarning, match="spare"):
        new = recalibrate(model, torch.randn(20, 3) + 5, batch_size=8, mode=mode)
    assert torch.equal(new.spare.running_mean, torch.zeros(3)) and float(new.used.running_mean.mean()) > 4


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = CliRunner().invoke(app, ["train", "fashion-mlp-bn-after", "--dataset", "mnist-5k", "--epochs", "1",
                                 "--max-steps", "30", "--lr", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / "checkpoint"


def test_cli_recalibrate(trained, tmp_path):
    r = CliRunner().invoke(app, ["recalibrate", str(trained), "--out", str(tmp_path / "p"), "--seed", "4",
                                 "--batch-size", "64", "--mode", "both"], terminal_width=200)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for label in ("moving averages", "precise, mode train (batch 64)", "precise, mode inference"):
        row = [ln for ln in lines if label in ln]
        assert len(row) == 1, r.output
        loss, acc = re.findall(r"\d+\.\d{4}", row[0])[-2:]
        assert 0 < float(loss) < 5 and 0 <= float(acc) <= 1
    assert f"wrote {tmp_path / 'p'} (precise statistics, mode inference" in r.output.replace("\n", "")
    ck, src = load_checkpoint(tmp_path / "p"), load_checkpoint(trained)
    assert ck.meta["recalibrated"]["mode"] == "inference" and ck.meta["recalibrated"]["seed"] == 4
    expect = recalibrate(src.model, _checkpoint_data(src, None, None).x_train, batch_size=64, mode="inference",
                         seed=4)
    assert all(torch.equal(a.running_var, b.running_var) for a, b in zip(bns(ck.model), bns(expect)))

    r = CliRunner().invoke(app, ["recalibrate", str(trained), "--out", str(tmp_path / "i"), "--mode", "inference"],
                           terminal_width=200)
    assert r.exit_code == 0 and "mode inference" in r.output and "mode train" not in r.output, r.output
    meta = json.loads((tmp_path / "i" / "config.json").read_text())["meta"]
    assert meta["recalibrated"]["mode"] == "inference"
    # numbers measured with the moving averages do not travel to the new weights; its own val accuracy does
    assert "test_accuracy" not in meta and "test_loss" not in meta
    new = load_checkpoint(tmp_path / "i")
    data = _checkpoint_data(new, None, None)
    assert meta["val_accuracy"] == pytest.approx(evaluate(new.model, data.x_val, data.y_val)[1])
    assert "model: best-validation model" in r.output


def test_cli_recalibrate_defaults_to_the_training_batch_size(trained, tmp_path):
    train_batch = load_checkpoint(trained).meta["train"]["batch_size"]
    r = CliRunner().invoke(app, ["recalibrate", str(trained.parent), "--out", str(tmp_path / "d"), "--mode", "train"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"precise, mode train (batch {train_batch})" in r.output
    assert load_checkpoint(tmp_path / "d").meta["recalibrated"]["batch_size"] == train_batch


@pytest.mark.parametrize("args,match", [
    (["--mode", "eval"], "--mode must be one of train, inference, both"),
    (["--mode", "train", "--batch-size", "1"], "batch_size >= 2"),
], ids=["bad-mode", "batch-1"])
def test_cli_recalibrate_errors(trained, tmp_path, args, match):
    r = CliRunner().invoke(app, ["recalibrate", str(trained), "--out", str(tmp_path / "x"), *args], terminal_width=200)
    assert r.exit_code == 2 and match in r.output.replace("\n", " "), r.output
    assert not (tmp_path / "x").exists()
