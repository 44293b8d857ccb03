"""BN statistics at test time (running / test-batch / recalibrated), each against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.deploy.testtime import evaluate_bn, for_bn_stats, with_batch_statistics
from bnlab.nn import BatchNorm
from bnlab.train.engine import evaluate


def _mlp(convention="torch"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), BatchNorm(8, convention=convention), nn.ReLU(), nn.Linear(8, 3))
    m.train()
    with torch.no_grad():
        for _ in range(5):  # running statistics that differ from any test batch's
            m(torch.randn(16, 6) * 2 + 1)
    return m.eval()


def _cnn():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
        m[1].running_mean.fill_(0.3)
    return m.eval()


def _data(n=40, shape=(6,), seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * 1.5 - 0.5, torch.randint(0, 3, (n,), generator=g)


def test_running_is_plain_eval_mode():
    model, (x, y) = _mlp(), _data()
    assert evaluate_bn(model, x, y, stats="running", batch_size=7) == pytest.approx(evaluate(model, x, y), rel=1e-6)


def test_batch_statistics_are_each_test_batchs_own_and_change_nothing():
    model, (x, y) = _mlp(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, acc = evaluate_bn(model, x, y, stats="batch", batch_size=10, seed=5)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    ref = _mlp()  # the oracle: training-mode BN forward, batch by batch
    ref.train()
    with torch.no_grad():
        outs = [ref(x[order[i:i + 10]]) for i in range(0, 40, 10)]
    ys = torch.cat([y[order[i:i + 10]] for i in range(0, 40, 10)])
    out = torch.cat(outs)
    assert loss == pytest.approx(float(F.cross_entropy(out, ys)), rel=1e-6)
    assert acc == pytest.approx(float((out.argmax(1) == ys).float().mean()))
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    assert model.training is False


def test_recalibrated_on_the_test_inputs_equals_their_batch_statistics_under_keras():
    """Keras stores the biased variance: population statistics over x, in eval mode, are then exactly the
    statistics one batch of all of x computes."""
    model, (x, y) = _mlp("keras"), _data()
    rec = evaluate_bn(model, x, y, stats="recalibrated", batch_size=40)
    batch = evaluate_bn(model, x, y, stats="batch", batch_size=40)
    assert rec == pytest.approx(batch, rel=1e-5)
    assert rec != pytest.approx(evaluate_bn(model, x, y, stats="running"), rel=1e-3)


def test_a_batch_of_one_is_an_error_for_dense_bn_and_instance_statistics_for_conv_bn():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(ValueError, match="cannot normalise a batch of 1 sample"):
        evaluate_bn(model, x, y, stats="batch", batch_size=1)
    cnn = _cnn()
    xc, yc = _data(6, (1, 8, 8))
    out = with_batch_statistics(cnn)(xc[:1])
    h = cnn[0](xc[:1])  # the oracle: per-sample normalisation over H·W, then BN's affine
    bn = cnn[1]
    z = F.instance_norm(h, eps=bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, cnn[4](cnn[3](cnn[2](z))), atol=1e-5, rtol=1e-5)
    loss, acc = evaluate_bn(cnn, xc, yc, stats="batch", batch_size=1)
    assert 0 <= acc <= 1 and loss == loss


def test_bad_options_say_what_was_expected():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(ValueError, match="unknown BN statistics 'moving': expected one of running, batch, recalibrated"):
        evaluate_bn(model, x, y, stats="moving")
    with pytest.raises(ValueError, match="needs unlabeled inputs"):
        for_bn_stats(model, "recalibrated")
    with pytest.raises(ValueError, match="no batch norm"):
        with_batch_statistics(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------- bnlab predict / serve --bn-stats

def _npy(tmp_path, name, n, seed=0):
    import numpy as np

    from bnlab.data import load_dataset
    raw = load_dataset("digits").x_test[seed:seed + n].numpy() * 16  # the digits' raw pixel values 0..16
    path = tmp_path / name
    np.save(path, raw)
    return path


def test_predict_bn_stats_batch_and_recalibrated_match_the_library(digits_checkpoint, tmp_path):
    import json

    from typer.testing import CliRunner

    from bnlab.checkpoint import load_checkpoint
    from bnlab.cli import app
    from bnlab.deploy.predict import read_inputs
    batch = _npy(tmp_path, "batch.npy", 8)
    runner = CliRunner()
    ck = load_checkpoint(digits_checkpoint)
    x = read_inputs([batch], ck)
    for stats, model in (("batch", with_batch_statistics(ck.model)),
                         ("recalibrated", for_bn_stats(ck.model, "recalibrated", x))):
        extra = ["--recalibrate-on", str(batch)] if stats == "recalibrated" else []
        res = runner.invoke(app, ["predict", str(digits_checkpoint), str(batch), "--json", "--bn-stats", stats, *extra])
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        with torch.no_grad():
            want = torch.softmax(model(x), 1)
        assert [r["bn_stats"] for r in got] == [stats] * 8
        torch.testing.assert_close(torch.tensor([r["probabilities"] for r in got]), want, atol=2e-6, rtol=0)
    running = runner.invoke(app, ["predict", str(digits_checkpoint), str(batch), "--json"])
    plain = json.loads(running.stdout)
    assert "bn_stats" not in plain[0] and plain[0]["probabilities"] != got[0]["probabilities"]


def test_predict_and_serve_bn_stats_errors_are_clear(digits_checkpoint, tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from bnlab.cli import app
    from bnlab.deploy.serve import create_app
    one = _npy(tmp_path, "one.npy", 1)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(digits_checkpoint), str(one), "--bn-stats", "batch"])
    assert res.exit_code == 2 and "cannot normalise a batch of 1 sample" in res.output
    res = runner.invoke(app, ["predict", str(digits_checkpoint), str(one), "--bn-stats", "recalibrated"])
    assert res.exit_code == 2 and "need unlabeled inputs of the test domain" in res.output
    res = runner.invoke(app, ["predict", str(digits_checkpoint), str(one), "--bn-stats", "moving"])
    assert res.exit_code == 2 and "expected one of running, batch, recalibrated" in res.output
    with TestClient(create_app(digits_checkpoint, bn_stats="batch")) as client:
        assert client.get("/model").json()["bn_stats"] == "batch"
        import numpy as np
        rows = (np.load(_npy(tmp_path, "two.npy", 2))).tolist()
        single = client.post("/predict", json={"inputs": rows[0]})
        assert single.status_code == 422 and "cannot normalise a batch of 1 sample" in single.text
        assert client.post("/predict", json={"inputs": rows}).status_code == 200


def test_serve_refuses_bad_bn_stats_before_starting(digits_checkpoint):
    pytest.importorskip("fastapi")
    from typer.testing import CliRunner

    from bnlab.cli import app
    res = CliRunner().invoke(app, ["serve", str(digits_checkpoint), "--bn-stats", "moving"])
    assert res.exit_code == 2 and "expected one of running, batch, recalibrated" in res.output
    res = CliRunner().invoke(app, ["serve", str(digits_checkpoint), "--bn-stats", "recalibrated"])
    assert res.exit_code == 2 and "--recalibrate-on FILE" in res.output
