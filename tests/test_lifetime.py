"""No process outlives its parent (``bnlab.lifeline``), in every process model bnlab has: the rule itself,
then the parent of each kind of child killed with SIGKILL (which gives it no time to stop anything) at
several points of its children's lives: the data-parallel ranks of ``bnlab train --devices 2`` (while
they start, during an epoch, while rank 0 saves), the experiment workers of ``bnlab run``, the server's
decoders. After each kill: every process below the killed one is gone within seconds, nothing in the
run folder changes afterwards, and the same command run again continues as it would have.

How the processes are found: the killed command is stopped (SIGSTOP) just before the kill, so it starts
nothing more, and every live process below it is recorded then (pid and start time, against pid reuse).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bnlab.train.resume import STATE_DIR, resume_point
from tiny_specs import command_env, harness_toml

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

GONE_SECONDS = 10.0  # after the kill, however loaded the machine (they die in milliseconds)
QUIET_SECONDS = 1.0  # how long the folder is watched for changes once every process is gone
START_SECONDS = 180.0  # for a command to reach the point where it is killed


# ---------------------------------------------------------------- processes and folders, from /proc

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime (22nd)
    return fields[0], int(fields[1]), int(fields[19])


def _live() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every live process (zombies are dead)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] != "Z":
                out[int(entry.name)] = st[1:]
    return out


def _below(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root``."""
    live, found, frontier = _live(), {}, {root}
    while frontier:
        frontier = {p for p, (ppid, _) in live.items() if ppid in frontier and p not in found}
        found.update({p: live[p][1] for p in frontier})
    return found


def _alive(procs: dict[int, int]) -> list[int]:
    """Those of ``procs`` (pid -> start time) still alive."""
    out = []
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and st[2] == start:
            out.append(pid)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children_running(root: int, marker: str) -> list[int]:
    return [p for p in _below(root) if marker in _cmdline(p)]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file and folder under ``folder``."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:  # removed meanwhile
                continue
            out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = START_SECONDS, every: float = 0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended ({proc.returncode}) before {what}: {_output(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _output(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log", None)
    return log.read_text(errors="replace") if log is not None else ""


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=command_env())
    proc.log = log
    return proc


def _kill(proc: subprocess.Popen, folder: Path | None) -> dict[int, int]:
    """SIGKILL ``proc``; assert that every process below it is gone within ``GONE_SECONDS`` and that nothing
    under ``folder`` changes afterwards. Returns the processes that were below it."""
    os.kill(proc.pid, signal.SIGSTOP)  # it starts nothing more: what is below it now is all there is
    below = _below(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + GONE_SECONDS
    try:
        while _alive(below) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = {p: _cmdline(p)[:150] for p in _alive(below)}
        assert not left, f"{len(left)} of {len(below)} processes outlived their killed parent: {left}"
        if folder is not None:
            before = _files(folder)
            time.sleep(QUIET_SECONDS)
            assert _files(folder) == before, "the folder changed after every process was gone"
    finally:
        for pid in _alive(below):  # whatever the outcome, no test leaves a process behind
            os.kill(pid, signal.SIGKILL)
    return below


# ---------------------------------------------------------------- the rule itself

def _grandchild(tmp: Path, child_code: str) -> tuple[subprocess.Popen, int]:
    """A parent process (returned) that starts a child running ``child_code`` (``PARENT`` is the parent's
    pid) and prints the child's pid; returns once the child has written ``tmp/ready``."""
    child = "PARENT = {parent}\n" + textwrap.dedent(child_code)
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        code = {child!r}.format(parent=os.getpid())
        p = subprocess.Popen([sys.executable, "-c", code])
        print(p.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=command_env())
    pid = int(proc.stdout.readline())
    _wait(lambda: (tmp / "ready").exists(), proc, "the child to start", timeout=60)
    return proc, pid


@pytest.mark.parametrize("prctl", [True, False], ids=["prctl", "watcher-alone"])
def test_a_child_dies_with_its_killed_parent(tmp_path, prctl):
    """PR_SET_PDEATHSIG kills the child with its parent; where prctl is missing, the watcher thread does."""
    proc, child = _grandchild(tmp_path, f"""
        import ctypes, pathlib, time
        from bnlab import lifeline
        if not {prctl}:  # as on a system without prctl
            def refuse(*args, **kwargs):
                raise OSError("no prctl here")
            ctypes.CDLL = refuse
        else:  # only the kernel can end it in time
            lifeline.WATCH_SECONDS = 3600
        lifeline.die_with_parent(PARENT)
        pathlib.Path({str(tmp_path / 'ready')!r}).touch()
        time.sleep(600)
    """)
    st = _stat(child)
    below = _kill(proc, None)
    assert child in below and st is not None


def test_a_child_whose_parent_died_first_runs_no_further(tmp_path):
    """A parent gone before ``die_with_parent`` runs (prctl then arms nothing): the child ends in the call,
    by its look at its parent (the watcher thread is kept from starting, to see that look alone)."""
    after = tmp_path / "after"
    proc, child = _grandchild(tmp_path, f"""
        import os, pathlib, threading, time
        from bnlab import lifeline
        class NoThread:
            def __init__(self, *args, **kwargs):
                pass
            def start(self):
                pass
        threading.Thread = NoThread
        pathlib.Path({str(tmp_path / 'ready')!r}).touch()
        while os.getppid() == PARENT:  # the test kills the parent now
            time.sleep(0.01)
        lifeline.die_with_parent(PARENT)
        pathlib.Path({str(after)!r}).touch()
        time.sleep(600)
    """)
    start = _stat(child)[2]
    _kill(proc, tmp_path)
    assert not _alive({child: start}) and not after.exists()


class _Witness:
    """Unpickled in a spawn child, it writes down the child's state at that moment: its parent, and whether
    SIGINT is ignored (by the standard library alone: importing this test module would import torch)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return exec, (f"import os, signal; open({self.path!r}, 'w').write("
                      "f'{os.getppid()} {signal.getsignal(signal.SIGINT) == signal.SIG_IGN}')",)


def test_a_spawn_child_is_tied_before_it_unpickles_its_work(tmp_path):
    """``spawn_process``: SIGINT is ignored and the parent checked before the target's arguments (and so
    the modules they import, torch among them) are unpickled."""
    import multiprocessing

    from bnlab import lifeline

    witness = tmp_path / "witness"
    p = lifeline.spawn_process(multiprocessing.get_context("spawn"), print, (_Witness(str(witness)),))
    with lifeline.held_signals():
        p.start()
    p.join(60)
    assert p.exitcode == 0
    assert witness.read_text() == f"{os.getpid()} True"


def test_the_rule_imports_nothing_heavy():
    """A child's first lines import ``bnlab.lifeline``: the standard library alone, milliseconds."""
    code = ("import sys; import bnlab.lifeline; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'bnlab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bnlab', 'bnlab.lifeline']"


# ---------------------------------------------------------------- bnlab train --devices 2: the ranks

DIGITS_MLP = """kind = "mlp"
input_shape = [1, 8, 8]
num_classes = 10
hidden = [32]
bn = "before"
"""


def _train_cmd(out: Path, epochs: int) -> list[str]:
    spec = out.parent / "digits-mlp.toml"
    spec.write_text(DIGITS_MLP)
    return [sys.executable, "-m", "bnlab", "train", str(spec), "--dataset", "digits", "--epochs", str(epochs),
            "--batch-size", "32", "--devices", "2", "--out", str(out)]


def _ranks(proc: subprocess.Popen) -> list[int]:
    return _children_running(proc.pid, "spawn_main")


def _saving(out: Path, after: dict):
    """A condition: a file under the run's checkpoint/ or resume/ is new or changed since ``after``."""
    def saving():
        now = {k: v for k, v in _files(out).items() if k.startswith(("checkpoint", STATE_DIR))}
        return any(after.get(k) != v for k, v in now.items())
    return saving


def _killed_train(out: Path, epochs: int, log: Path, point: str) -> None:
    """``bnlab train --devices 2`` into ``out``, SIGKILLed at ``point`` (see ``_kill`` for what is checked)."""
    saved = _files(out) if out.exists() else {}
    start_epoch = resume_point(out) or 0
    proc = _start(_train_cmd(out, epochs), log)
    try:
        if point == "starting":  # both ranks exist, and are still importing torch
            _wait(lambda: len(_ranks(proc)) == 2, proc, "the ranks to start", every=0.005)
        elif point == "epoch":  # an epoch ended (saved) and the next one is under way
            _wait(lambda: (resume_point(out) or 0) > start_epoch, proc, "an epoch to be saved", every=0.02)
        else:  # an epoch of this command saved, rank 0 has begun writing the next one's checkpoint / state
            _wait(lambda: (resume_point(out) or 0) > start_epoch, proc, "an epoch to be saved", every=0.01)
            _wait(_saving(out, _files(out)), proc, "rank 0 to save", every=0.001)
        below = _kill(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(below) >= 2, below  # the ranks (and multiprocessing's resource tracker)


def _finish_train(out: Path, epochs: int) -> str:
    """Run the command again to its end: its output."""
    saved = resume_point(out)
    done = subprocess.run(_train_cmd(out, epochs), capture_output=True, text=True, env=command_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    if saved:
        assert f"continued from epoch {saved} of {epochs}" in done.stdout, done.stdout
    assert not (out / STATE_DIR).exists() and (out / "history.json").exists()
    return done.stdout


def test_train_killed_while_its_ranks_start_leaves_none(tmp_path):
    """The ranks are importing torch when the parent dies (the case the rule's order is for: before, both
    ranks went on to train every epoch and write the run folder): none outlives it and nothing is written
    after. (Killed at each point and run again to the uninterrupted result: the slow test below.)"""
    _killed_train(tmp_path / "run", 2, tmp_path / "killed.log", "starting")


def _history(out: Path):
    import json
    h = json.loads((out / "history.json").read_text())
    return [(e["epoch"], e["train_loss"], e["val_accuracy"]) for e in h["epochs"]], h["step_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["starting", "epoch", "saving"])
def test_train_killed_at_each_point_continues_to_the_uninterrupted_result(tmp_path, point):
    epochs = 4
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = subprocess.run(_train_cmd(whole, epochs), capture_output=True, text=True, env=command_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for i in range(2):  # twice at the same point: a continued run killed too
        _killed_train(cut, epochs, tmp_path / f"{i}.log", point)
    assert point == "starting" or (resume_point(cut) or 0) >= 1  # the last run is one that continues
    _finish_train(cut, epochs)
    (a_epochs, a_steps), (b_epochs, b_steps) = _history(whole), _history(cut)
    assert [e[0] for e in b_epochs] == list(range(1, epochs + 1))
    assert b_steps == pytest.approx(a_steps, abs=1e-6, rel=1e-6)
    assert [e[2] for e in b_epochs] == pytest.approx([e[2] for e in a_epochs], abs=1e-9)


# ---------------------------------------------------------------- bnlab run: the experiment workers

def _run_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bnlab", "run", str(spec), "--out", str(out), "--workers", "2"]


@pytest.mark.parametrize("point", ["starting", pytest.param("training", marks=pytest.mark.slow)])
def test_run_killed_leaves_no_worker(tmp_path, point):
    """The workers are starting (importing torch), or training (then the rerun completes the experiment)."""
    spec = tmp_path / "spec.toml"
    spec.write_text(harness_toml("lifetime", seeds=1, n_train=4000, hidden=64, batch_size=32, epochs=8))
    out = tmp_path / "exp"
    proc = _start(_run_cmd(spec, out), tmp_path / "killed.log")
    try:
        if point == "starting":
            _wait(lambda: len(_children_running(proc.pid, "bnlab.experiments.pool")) == 2, proc,
                  "the workers to start", every=0.005)
        else:
            _wait(lambda: any((out / "runs").glob(f"*/*/{STATE_DIR}/state.json")), proc, "a saved epoch", every=0.02)
        below = _kill(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(below) >= 2, below
    if point != "starting":
        done = subprocess.run(_run_cmd(spec, out), capture_output=True, text=True, env=command_env(), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        # (a run that had trained every epoch only redoes its evaluation)
        assert re.search(r": (continuing from|training finished at) epoch [1-8] of 8", done.stdout), done.stdout


# ---------------------------------------------------------------- bnlab serve: the decoders

_DECODERS = """
import asyncio, time
from bnlab.deploy.serve import Decoders
decoders = Decoders(2, 10_000)
asyncio.run(decoders.start())
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("point", ["starting", pytest.param("ready", marks=pytest.mark.slow)])
def test_decoders_die_with_their_killed_server(tmp_path, point):
    """The server's decoding processes (``bnlab.deploy.serve.Decoders``, as ``bnlab serve`` starts them)."""
    log = tmp_path / "server.log"
    proc = _start([sys.executable, "-c", _DECODERS], log)
    try:
        if point == "starting":
            _wait(lambda: len(_children_running(proc.pid, "spawn_main")) == 2, proc, "the decoders to start",
                  every=0.005)
        else:
            _wait(lambda: "ready" in log.read_text(), proc, "the decoders to be ready", every=0.05)
        below = _kill(proc, None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(below) >= 2


# ---------------------------------------------------------------- processes others start: the sentinel, Ray

_WITH_SENTINEL = """
import subprocess, sys, time
from bnlab.lifeline import Sentinel
sentinel = Sentinel()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # follows no rule of ours
time.sleep(1.0)  # the sentinel has recorded it
print(child.pid, sentinel.proc.pid, flush=True)
if sys.argv[1] == "close":
    sentinel.close()
    print("closed, the child alive:", child.poll() is None, flush=True)
    child.kill()
    child.wait()
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["killed", "closed"])
def test_the_sentinel_kills_what_is_left_below_a_killed_parent(tmp_path, how):
    """What bnlab does not start itself (Ray's processes) cannot follow the rule: the sentinel kills it
    when the parent dies. Closed by a parent that lives on, it ends doing nothing."""
    proc = subprocess.Popen([sys.executable, "-c", _WITH_SENTINEL, {"killed": "kill", "closed": "close"}[how]],
                            stdout=subprocess.PIPE, text=True, env=command_env())
    try:
        child, sentinel = map(int, proc.stdout.readline().split())
        if how == "closed":
            assert proc.stdout.readline().strip() == "closed, the child alive: True"
            assert _stat(sentinel) is None or _stat(sentinel)[0] == "Z"  # exited (reaped by its parent)
            assert proc.poll() is None
            return
        below = _kill(proc, None)
        assert {child, sentinel} <= set(below)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_run_on_its_own_ray_instance_killed_leaves_no_process(tmp_path):
    """``bnlab run --backend ray`` with the local Ray instance it starts, killed once the driver holds a
    shipped epoch: Ray's processes go too (its agents, left alone, live a minute more), the folder stays
    as it was, and the same command continues."""
    pytest.importorskip("ray")
    spec = tmp_path / "spec.toml"
    spec.write_text(harness_toml("lifetime", seeds=1, n_train=16000, hidden=256, batch_size=16, epochs=8))
    out = tmp_path / "exp"
    cmd = _run_cmd(spec, out)[:-2] + ["--backend", "ray"]
    proc = _start(cmd, tmp_path / "killed.log")
    try:
        _wait(lambda: any((out / "runs").glob(f"*/*/{STATE_DIR}/state.json")), proc, "a shipped epoch", every=0.05)
        below = _kill(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(below) >= 5, below  # GCS, raylet, agents, workers, the sentinel
    done = subprocess.run(cmd, capture_output=True, text=True, env=command_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r": (continuing from|training finished at) epoch [1-8] of 8", done.stdout), done.stdout
