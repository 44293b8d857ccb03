"""SyncBatchNorm on CPU and data-parallel training, checked with real process groups (2 CPU processes, gloo).

The oracle: P processes with batch b each and SyncBN must give what ONE process with the whole batch
and plain BN gives (outputs, input and parameter gradients, running statistics); with plain BN each
rank's statistics are those of its own local batch. Each ``run_ranks`` call starts fresh interpreters
(seconds), so one call checks many cases.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from bnlab.nn import BatchNorm, GhostBatchNorm, SyncBatchNorm
from bnlab.nn.syncbn import merge_moments
from bnlab.train.distributed import RankFailed, run_ranks
from tiny_specs import command_env

pytestmark = pytest.mark.timeout(240)

# (name, global shape, each rank's share of the batch, dtype, convention, value tolerance)
CASES = [
    ("dense-f64-torch", (7, 5), (3, 4), torch.float64, "torch", 1e-10),
    ("dense-f64-keras", (7, 5), (3, 4), torch.float64, "keras", 1e-10),
    ("conv-f64-torch", (5, 3, 4, 4), (2, 3), torch.float64, "torch", 1e-10),
    ("conv-f64-keras", (5, 3, 4, 4), (2, 3), torch.float64, "keras", 1e-10),
    ("dense-f32-torch", (16, 6), (8, 8), torch.float32, "torch", 1e-5),
    ("conv-f32-keras", (6, 4, 5, 5), (1, 5), torch.float32, "keras", 1e-5),
    ("dense-empty-rank", (6, 3), (0, 6), torch.float64, "torch", 1e-10),
    ("dense-tiny-variance", (8, 3), (4, 4), torch.float64, "torch", 1e-10),
    ("dense-momentum-1", (8, 3), (5, 3), torch.float64, "torch", 1e-10),
    ("conv-momentum-0-keras", (4, 2, 3, 3), (2, 2), torch.float64, "keras", 1e-10),
    # bfloat16 activations (bf16-mixed): statistics in float32 on every rank, outputs in bfloat16
    ("conv-bf16-torch", (6, 4, 5, 5), (3, 3), torch.bfloat16, "torch", 2e-2),
]


def _case_data(i: int, shape, dtype):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    if "tiny-variance" in CASES[i][0]:
        x = 1e3 + 1e-4 * x  # mean far from zero, variance near eps: cancellation in a naive sum of squares
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    return x.to(dtype), up.to(dtype), w.to(dtype), b.to(dtype)


def _layer(cls, i, c, conv, dtype, w, b):
    momentum = {"dense-momentum-1": 1.0, "conv-momentum-0-keras": 0.0}.get(CASES[i][0], "default")
    m = cls(c, convention=conv, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        m.running_mean.fill_(0.25)
        m.running_var.fill_(2.0)
    return m


def _layers_on_rank(ranks):
    """Each case: SyncBN on this rank's share, two training steps (running statistics accumulate), and plain
    BN on the same share."""
    out = []
    for i, (_, shape, shares, dtype, conv, _) in enumerate(CASES):
        x, up, w, b = _case_data(i, shape, dtype)
        lo = sum(shares[:ranks.rank])
        part, up_part = x[lo:lo + shares[ranks.rank]].clone().requires_grad_(), up[lo:lo + shares[ranks.rank]]
        sync = _layer(SyncBatchNorm, i, shape[1], conv, dtype, w, b).train()
        y = sync(part)
        (y * up_part).sum().backward()
        sync(part.detach() * 0.5 + 1)  # a second step: the running update compounds
        plain = _layer(BatchNorm, i, shape[1], conv, dtype, w, b).train()
        if shares[ranks.rank] > 1:
            plain(part.detach())
        out.append({"y": y.detach(), "dx": part.grad, "dw": sync.weight.grad, "db": sync.bias.grad,
                    "rm": sync.running_mean.clone(), "rv": sync.running_var.clone(),
                    "n": int(sync.num_batches_tracked), "plain_rm": plain.running_mean, "plain_rv": plain.running_var})
    return out


@pytest.fixture(scope="module")
def per_rank():
    return run_ranks(_layers_on_rank, 2)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_sync_bn_on_two_processes_equals_one_process_with_the_whole_batch(per_rank, i):
    name, shape, shares, dtype, conv, tol = CASES[i]
    x, up, w, b = _case_data(i, shape, dtype)
    ref = _layer(BatchNorm, i, shape[1], conv, dtype, w, b).train()
    xr = x.clone().requires_grad_()
    y = ref(xr)
    (y * up).sum().backward()
    ref(x * 0.5 + 1)
    r0, r1 = per_rank[0][i], per_rank[1][i]
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), xr.grad, atol=tol, rtol=tol)
    # parameter gradients stay local (DDP reduces them): their sum over ranks is the whole batch's
    torch.testing.assert_close(r0["dw"] + r1["dw"], ref.weight.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(r0["db"] + r1["db"], ref.bias.grad, atol=tol, rtol=tol)
    for r in (r0, r1):  # every rank holds the global running statistics, per the convention
        torch.testing.assert_close(r["rm"], ref.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(r["rv"], ref.running_var, atol=tol, rtol=tol)
        assert r["n"] == int(ref.num_batches_tracked) == 2


@pytest.mark.parametrize("i", [0, 2, 5], ids=[CASES[i][0] for i in (0, 2, 5)])
def test_plain_bn_on_each_rank_keeps_its_local_statistics(per_rank, i):
    name, shape, shares, dtype, conv, tol = CASES[i]
    x, _, w, b = _case_data(i, shape, dtype)
    lo = 0
    for rank, share in enumerate(shares):
        local = _layer(BatchNorm, i, shape[1], conv, dtype, w, b).train()
        if share > 1:
            local(x[lo:lo + share])
        torch.testing.assert_close(per_rank[rank][i]["plain_rm"], local.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(per_rank[rank][i]["plain_rv"], local.running_var, atol=tol, rtol=tol)
        lo += share
    # and they are not the global batch's (the difference SyncBN exists for)
    assert not torch.allclose(per_rank[0][i]["plain_rm"], per_rank[0][i]["rm"])


def test_merge_moments_is_exact_against_the_whole_data():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, generator=g, dtype=torch.float64) * 5 + 7 for n in (1, 9, 0, 30)]
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                       for p in parts])
    n, mean, m2 = merge_moments(counts, means, m2s)
    whole = torch.cat(parts)
    assert int(n) == 40
    torch.testing.assert_close(mean, whole.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m2 / n, whole.var(0, correction=0), atol=1e-12, rtol=1e-12)


def test_sync_bn_in_one_process_is_batch_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 4, generator=g)
    a, b = SyncBatchNorm(3).train(), BatchNorm(3).train()
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    torch.testing.assert_close(a.running_var, b.running_var, atol=0, rtol=0)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


# ---------------------------------------------------------------- failures end the job, never hang

def _one_rank_killed(ranks):
    import torch.distributed as dist
    if ranks.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 would wait here forever without the watcher


def _one_rank_raises(ranks):
    import torch.distributed as dist
    if ranks.rank == 1:
        raise ValueError("a planted failure on rank 1")
    dist.barrier()


def test_a_killed_rank_ends_the_job_with_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 of 2 died \(killed by SIGKILL\)"):
        run_ranks(_one_rank_killed, 2)
    assert time.monotonic() - t0 < 60


def test_a_rank_that_raises_stops_the_others_and_names_the_error():
    with pytest.raises(RankFailed, match=r"^rank 1 of 2 failed: ValueError: a planted failure on rank 1$") as e:
        run_ranks(_one_rank_raises, 2)
    assert "Traceback" in e.value.details and "_one_rank_raises" in e.value.details


# ---------------------------------------------------------------- fit(devices=N)

def _tiny_data(n=96, seed=0, shape=(1, 6, 6)):
    from bnlab.data.dataset import Dataset
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1)[:, :3].sum(1) > 0).long() + (x.flatten(1)[:, 3] > 1).long()
    return Dataset("tiny", x[:64], y[:64], x[64:], y[64:], x[64:], y[64:], num_classes=3)


def _model(norm: str, kind: str = "mlp", seed: int = 0):
    from bnlab.models import build_model
    spec = ({"kind": "mlp", "hidden": [12, 8]} if kind == "mlp" else
            {"kind": "cnn", "blocks": [4], "final_block": None, "convs_per_block": 1, "dense": [8]})
    return build_model({**spec, "input_shape": [1, 6, 6], "num_classes": 3, "bn": "before", "norm": norm}, seed=seed)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fit_on_two_processes_with_sync_bn_equals_one_process(kind):
    from bnlab.train.engine import fit
    data = _tiny_data()
    kw = dict(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=10, epochs=2, seed=3, progress=False,
              engine="autograd")
    one, two = _model("syncbatch", kind), _model("syncbatch", kind)
    h1 = fit(one, data, **kw)
    h2 = fit(two, data, devices=2, **kw)  # batches of 10 split 5 + 5; the last (4) 2 + 2
    torch.testing.assert_close(torch.tensor(h2.step_loss), torch.tensor(h1.step_loss), atol=2e-5, rtol=2e-5)
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=k)
    assert [e.val_accuracy for e in h2.epochs] == pytest.approx([e.val_accuracy for e in h1.epochs], abs=1e-9)


def test_fit_on_two_processes_with_plain_bn_equals_ghost_bn_of_the_per_device_batch():
    """Per-device BN on P ranks of batch b normalises like Ghost BN with ghost size b on the P·b batch:
    the training losses agree step by step (running statistics differ: each rank updates its own)."""
    from bnlab.train.engine import fit
    data = _tiny_data()
    kw = dict(optimizer="sgd", lr=0.1, batch_size=16, epochs=2, seed=5, progress=False, engine="autograd")
    ghost, ddp = _model("ghost:8"), _model("batch")
    ddp.load_state_dict(dict(zip(ddp.state_dict(), ghost.state_dict().values())))  # the same layers, other names
    hg = fit(ghost, data, **kw)
    hd = fit(ddp, data, devices=2, **kw)
    torch.testing.assert_close(torch.tensor(hd.step_loss), torch.tensor(hg.step_loss), atol=2e-5, rtol=2e-5)
    plain = _model("batch")
    hp = fit(plain, data, **kw)
    assert max(abs(a - b) for a, b in zip(hp.step_loss, hd.step_loss)) > 1e-3  # the ghost batches matter


def test_a_last_batch_too_small_to_share_is_dropped_and_per_device_bn_trains():
    from bnlab.train.distributed import shared_batches
    from bnlab.train.engine import batch_bounds, fit
    assert shared_batches(batch_bounds(64, 31), 2) == [(0, 31), (31, 62)]  # the last 2 cannot give 2 each
    assert shared_batches(batch_bounds(64, 10), 2) == batch_bounds(64, 10)  # the last 4 can
    assert shared_batches(batch_bounds(64, 31), 1) == batch_bounds(64, 31)
    h = fit(_model("batch"), _tiny_data(), batch_size=31, devices=2, epochs=1, progress=False, lr=0.05)
    assert h.stopped == "completed" and h.epochs[-1].steps == 2


def _torch_sync_model():
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.SyncBatchNorm(8), nn.ReLU(), nn.Linear(8, 3))


def test_fit_devices_refuses_what_cannot_run():
    from bnlab.train.engine import fit
    data = _tiny_data()
    with pytest.raises(ValueError, match=r"a global batch of 3 cannot give each of 2 processes 2 samples .* "
                                         r"use batch_size >= 4"):
        fit(_model("batch"), data, batch_size=3, devices=2, progress=False)
    with pytest.raises(ValueError, match="devices must be an integer from 1 to 64"):
        fit(_model("batch"), data, devices=0, progress=False)
    with pytest.raises(ValueError, match="torch.nn.SyncBatchNorm works on GPUs only; on CPU use bnlab's"):
        fit(_torch_sync_model(), data, devices=2, progress=False)
    with pytest.raises(ValueError, match="engine='native' runs in one process"):
        fit(_model("batch"), data, engine="native", devices=2, progress=False)


def test_convert_to_syncbatch_keeps_the_state_and_trains_on_two_processes():
    from torch import nn

    import bnlab
    from bnlab.train.engine import fit
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
        net[1].weight.fill_(2.0)
    sync = bnlab.convert(net, "syncbatch")
    assert isinstance(sync[1], SyncBatchNorm) and isinstance(net[1], nn.BatchNorm2d)  # the input is untouched
    assert float(sync[1].running_mean[0]) == 0.5 and float(sync[1].weight.detach()[0]) == 2.0
    data = _tiny_data()
    one, two = bnlab.convert(net, "syncbatch"), bnlab.convert(net, "syncbatch")
    kw = dict(optimizer="sgd", lr=0.05, batch_size=8, epochs=1, seed=1, progress=False)
    h1, h2 = fit(one, data, **kw), fit(two, data, devices=2, **kw)
    torch.testing.assert_close(torch.tensor(h2.step_loss), torch.tensor(h1.step_loss), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(two[1].running_var, one[1].running_var, atol=1e-5, rtol=1e-5)
    assert h2.devices == 2 and h1.devices == 1


# ---------------------------------------------------------------- bnlab train --devices, as a user runs it

def _train_cmd(out, epochs: int, *extra: str) -> list[str]:
    import sys
    return [sys.executable, "-m", "bnlab", "train", "fashion-mlp-bn-before", "--dataset", "mnist-5k",
            "--epochs", str(epochs), "--batch-size", "64", "--devices", "2", "--out", str(out), *extra]


def _children(pid: int) -> list[int]:
    try:
        text = open(f"/proc/{pid}/task/{pid}/children").read()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _ranks_of(pid: int) -> list[int]:
    """The rank processes a command started (multiprocessing's spawn children, not its resource tracker)."""
    out = []
    for c in _children(pid):
        try:
            cmd = open(f"/proc/{c}/cmdline").read()
        except OSError:
            continue
        if "spawn_main" in cmd:
            out.append(c)
    return out


def _wait_for_epoch(proc, out, epoch: int, timeout: float = 120) -> None:
    from bnlab.train.resume import resume_point
    deadline = time.monotonic() + timeout
    while (resume_point(out) or 0) < epoch:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no epoch saved in time"
        time.sleep(0.1)


def _started(out, epochs: int):
    """``bnlab train --devices 2`` running into ``out`` once its first epoch is saved: (process, its ranks)."""
    import subprocess
    proc = subprocess.Popen(_train_cmd(out, epochs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=command_env())
    try:
        _wait_for_epoch(proc, out, 1)
        ranks = _ranks_of(proc.pid)
        assert len(ranks) == 2
    except BaseException:
        proc.kill()
        raise
    return proc, ranks


def _history(out) -> list[tuple]:
    import json
    h = json.loads((out / "history.json").read_text())
    return [(e["epoch"], e["train_loss"], e["val_accuracy"]) for e in h["epochs"]], h["step_loss"], h["devices"]


def test_bnlab_train_devices_stops_on_sigterm_and_resumes_to_the_uninterrupted_result(tmp_path):
    import subprocess
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = subprocess.run(_train_cmd(whole, 3), capture_output=True, text=True, env=command_env(), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes" in done.stdout
    proc, ranks = _started(cut, 3)
    try:
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, text
    assert "run the same command again to continue from epoch" in text
    time.sleep(0.5)
    assert not [r for r in ranks if os.path.exists(f"/proc/{r}") and "Z" not in open(f"/proc/{r}/stat").read().split()[2]]
    again = subprocess.run(_train_cmd(cut, 3), capture_output=True, text=True, env=command_env(), timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continued from epoch 1 of 3" in again.stdout
    a, b = _history(whole), _history(cut)
    assert b[2] == a[2] == 2
    assert [e[0] for e in b[0]] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(b[1]), torch.tensor(a[1]), atol=1e-6, rtol=1e-6)
    assert [e[2] for e in b[0]] == pytest.approx([e[2] for e in a[0]], abs=1e-9)


def test_bnlab_train_devices_ends_cleanly_when_a_rank_is_killed(tmp_path):
    proc, ranks = _started(tmp_path / "killed", 50)
    try:
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        text = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, text
    assert "data-parallel training failed: rank 1 of 2 died (killed by SIGKILL)" in text
    assert "Traceback" not in text


# ---------------------------------------------------------------- the bn-across-devices study, reduced

def test_bn_across_devices_study_runs_and_reports_trends_per_method(tmp_path):
    """The preset's design (methods x processes x images per process, lr scaled with the global batch),
    and a reduced run of it on the 8x8 digits: the figure's x axis is the images per device, the ghost
    arm sits at its ghost size, and every method gets a trend line."""
    from bnlab.experiments import load_experiment, parse_experiment, run_experiment
    from bnlab.report import build_report
    full = load_experiment("bn-across-devices")
    assert full.seeds >= 5
    groups = {v.group for v in full.variants.values()}
    assert groups == {f"{m}, P={p}" for m in ("per-device BN", "SyncBN", "GroupNorm (4 groups)",
                                               "Ghost BN in one process") for p in (2, 4)}
    for name, v in full.variants.items():
        p, b = (int(part[1:]) for part in name.split("-")[1:])
        assert v.train["batch_size"] == p * b and v.train["lr"] == pytest.approx(0.05 * p * b / 32)
        assert v.train.get("devices", 1) == (1 if name.startswith("ghost") else p)
        assert v.model["norm"] == {"bn": "batch", "sync": "syncbatch", "gn": "group:4",
                                   "ghost": f"ghost:{b}"}[name.split("-")[0]]
    keep = ["bn-p2-b2", "bn-p2-b4", "sync-p2-b2", "sync-p2-b4", "ghost-p2-b2", "ghost-p2-b4"]
    data = full.model_dump()
    data["variants"] = {k: v for k, v in data["variants"].items() if k in keep}
    data.update(seeds=2, data={"dataset": "digits"}, model={**data["model"], "input_shape": [1, 8, 8]},
                train={**data["train"], "epochs": 1, "max_steps": 6})
    run_experiment(parse_experiment(data), tmp_path / "study", workers=1)
    report = build_report(tmp_path / "study")
    assert (tmp_path / "study" / "figures" / "error_vs_batch_size.png").is_file()
    md = report.markdown.read_text()
    trend_rows = [line for line in md.splitlines() if line.startswith("| ") and ", P=2 |" in line]
    assert len(trend_rows) == 3 * 2  # 3 methods x (test error with moving averages, with precise statistics)
    assert all("| 2, 4 |" in row for row in trend_rows)  # images per device, the ghost arm included
    assert all("points per doubling" in row for row in trend_rows)
    assert "data-parallel over 1 to 2 processes" in md


@pytest.mark.parametrize("norm", ["batch", "syncbatch"])
def test_non_finite_statistics_on_one_rank_make_every_rank_diverge_together(norm):
    """A NaN image in rank 1's share: per-device BN raises on rank 1 only, SyncBN on both; either way every
    rank records the divergence at the same step and the job ends (no rank waits on the others)."""
    from bnlab.train.engine import fit
    data = _tiny_data()
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(4))
    data.x_train[order[7]] = float("nan")  # the first batch of 10 is order[0:10]: rank 1 holds 5..9
    h = fit(_model(norm), data, devices=2, batch_size=10, epochs=1, seed=4, progress=False, lr=0.1)
    assert h.stopped == "diverged"
    assert len(h.step_loss) == 0 and "non-finite" in h.message
    if norm == "batch":  # rank 0's own batch was fine: it says the other process's statistics failed
        assert "non-finite BN statistics on 1 of 2 processes" in h.message
