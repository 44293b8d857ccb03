"""The interruption harness: `bnlab run` killed (SIGKILL), interrupted (SIGINT, as a terminal sends it to
the whole process group) or terminated (SIGTERM, to the parent alone) at pseudo-random points, then
rerun, until the experiment is complete.

After every interruption: the exit code is 130 / 143 / -9; no process of the command is left; the
folder lock is free; every run the store holds as done has its full number of epochs, equal to an
uninterrupted run's; runs finished before were neither redone nor duplicated (their ``finished``
time and epoch rows unchanged); a clean shutdown leaves no run 'running' and names each run that will
continue and from which epoch, as the resume states on disk say; a rerun says "continuing from epoch
k" for exactly those. At the end the results equal an uninterrupted run's with the same worker plan
(every result column but wall-clock times; the per-epoch histories and the per-step losses exactly).

Kills are timed on observable progress (progress lines printed, resume states written), counted as
"ticks"; the tick and a small jitter come from a seeded generator, so a failure names its trial.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bnlab.experiments.results import RESULT_COLUMNS
from bnlab.train.resume import STATE_DIR, resume_point, saved_progress
from tiny_specs import command_env, session_processes, harness_toml, store_rows

EPOCHS = 8
SPEC = harness_toml("harness", seeds=3, n_train=6000, hidden=128, batch_size=32, epochs=EPOCHS)
RUN_IDS = [f"{v}/seed-{s}" for v in ("no-bn", "bn") for s in range(3)]
# wall-clock values differ between any two runs; everything else must be equal
COMPARED = [c for c in RESULT_COLUMNS if "seconds" not in c] + ["status", "step_loss"]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}
TIMEOUT = 240  # seconds for one command, however loaded the machine


def _cmd(spec: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "bnlab", "run", str(spec), "--out", str(out), "--workers", str(workers)]


# ---------------------------------------------------------------- observing the command


def _lock_is_free(out: Path) -> bool:
    with open(out / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _state_marks(out: Path) -> dict[Path, int]:
    marks = {}
    for path in (out / "runs").glob(f"*/*/{STATE_DIR}/state.json"):
        try:
            marks[path] = path.stat().st_mtime_ns
        except OSError:  # discarded meanwhile
            pass
    return marks


@dataclass
class Trial:
    signal: signal.Signals | None  # None: run to completion
    group: bool = False  # to the process group (as a terminal does) rather than the parent alone
    tick: int = 0  # send it once this many ticks (progress lines, resume states written) are seen
    jitter: float = 0.0  # ... and this many seconds more
    state_epoch: int | None = None  # or once a run's saved state reaches this epoch

    def __str__(self) -> str:
        if self.signal is None:
            return "run to completion"
        when = (f"a saved epoch {self.state_epoch}" if self.state_epoch else f"tick {self.tick}")
        return f"{self.signal.name} to the {'group' if self.group else 'parent'} at {when} + {self.jitter:.3f}s"


@dataclass
class Outcome:
    returncode: int
    lines: list[str]
    sent: bool
    ticks: int
    leftovers: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _due(trial: Trial, ticks: int, out: Path, changed: list[Path]) -> bool:
    if trial.state_epoch is not None:
        return any((resume_point(p.parent.parent) or 0) >= trial.state_epoch for p in changed)
    return ticks >= trial.tick


def _run(cmd: list[str], out: Path, trial: Trial) -> Outcome:
    """Run ``cmd``, send the trial's signal when it is due, wait for the end; count the ticks seen."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=command_env(),
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    sent, states_written, seen, ticks = False, 0, _state_marks(out), 0  # states already there are no progress
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            marks = _state_marks(out)
            changed = [p for p, m in marks.items() if seen.get(p) != m]
            states_written += len(changed)
            seen.update(marks)
            ticks = states_written + sum(1 for line in list(lines) if line.startswith("["))  # progress lines
            if trial.signal is not None and not sent and _due(trial, ticks, out, changed):
                time.sleep(trial.jitter)
                if proc.poll() is None:
                    (os.killpg if trial.group else os.kill)(proc.pid, trial.signal)
                    sent = True
            time.sleep(0.005)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        reader.join(timeout=10)
        leftovers = session_processes(proc.pid)
        end = time.monotonic() + 20
        while leftovers and trial.signal == signal.SIGKILL and time.monotonic() < end:
            time.sleep(0.05)  # the workers of a SIGKILLed parent die with it: give the kernel a moment
            leftovers = session_processes(proc.pid)
        return Outcome(proc.returncode, lines, sent, ticks, leftovers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in session_processes(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- reading the store (directly, not through bnlab)


def _store(out: Path) -> dict[str, dict]:
    """run id -> its row (the compared columns, status, finished) and its epoch rows."""
    return store_rows(out, COMPARED + ["finished"])


def _results(runs: dict[str, dict]) -> dict[str, dict]:
    return {rid: {k: v for k, v in r.items() if k != "finished"} for rid, r in runs.items()}


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "harness.toml"
    path.write_text(SPEC)
    return path


@dataclass
class Reference:
    results: dict[str, dict]
    ticks: int  # the ticks an uninterrupted run shows


_REFERENCES: dict[int, Reference] = {}


def _reference(spec_file: Path, workers: int) -> Reference:
    """An uninterrupted run with this worker plan (once per module)."""
    if workers not in _REFERENCES:
        out = spec_file.parent / f"reference-{workers}"
        o = _run(_cmd(spec_file, out, workers), out, Trial(None))
        assert o.returncode == 0, o.text
        runs = _store(out)
        assert sorted(runs) == sorted(RUN_IDS) and all(r["status"] == "done" for r in runs.values())
        assert all(len(r["epochs"]) == EPOCHS for r in runs.values())
        _REFERENCES[workers] = Reference(_results(runs), o.ticks)
    return _REFERENCES[workers]


# ---------------------------------------------------------------- the harness


def _check_interrupted(trial: Trial, o: Outcome, out: Path, before: dict, reference: dict, what: str) -> None:
    assert o.returncode == EXIT[trial.signal], f"{what}: exit {o.returncode}\n{o.text}"
    assert o.leftovers == [], f"{what}: processes left: {o.leftovers}"
    assert _lock_is_free(out), f"{what}: the folder lock is still held"
    if not (out / "runs.sqlite").exists():
        return  # stopped before the store existed
    runs = _store(out)
    for rid, r in runs.items():
        if r["status"] == "done":  # nothing partial recorded as done: the full run, as uninterrupted
            assert r["epochs"] == reference[rid]["epochs"], f"{what}: {rid} recorded with other epochs"
            assert _results({rid: r}) == {rid: reference[rid]}, f"{what}: {rid} has other results"
    for rid, r in before.items():  # finished before: neither redone nor duplicated
        if r["status"] == "done":
            assert runs[rid]["finished"] == r["finished"] and runs[rid]["epochs"] == r["epochs"], \
                f"{what}: {rid}, finished before, was redone"
    if trial.signal != signal.SIGKILL:
        assert not [rid for rid, r in runs.items() if r["status"] == "running"], f"{what}: runs left running"
        said = {m[1]: (int(m[2]), int(m[3]), False)
                for m in re.finditer(r"^(\S+) will continue from epoch (\d+) of (\d+)$", o.text, re.M)}
        said |= {m[1]: (int(m[2]), int(m[3]), True) for m in re.finditer(
            r"^(\S+) finished training \(epoch (\d+) of (\d+)\); its evaluation will be redone$", o.text, re.M)}
        on_disk = {rid: (at[0], EPOCHS, at[1]) for rid in RUN_IDS if runs.get(rid, {}).get("status") != "done"
                   and (at := saved_progress(out / "runs" / rid)) and at[0]}
        assert said == on_disk, f"{what}: said {said}, the states on disk say {on_disk}\n{o.text}"


def _check_rerun_said(o: Outcome, expected: dict[str, int], what: str) -> None:
    """Each run the rerun started with a saved state said 'continuing from epoch k', k as saved."""
    said = {m[1]: int(m[2]) for m in re.finditer(
        r"\] (\S+): (?:continuing from|training finished at) epoch (\d+) of \d+[ ;]", o.text)}
    started = set(re.findall(r"\] (\S+) started \(", o.text))
    for rid, k in said.items():
        assert expected.get(rid) == k, f"{what}: {rid} continued from epoch {k}, the state said {expected.get(rid)}"
    assert not started & set(expected), f"{what}: {sorted(started & set(expected))} started from zero despite a state"


def _draw(rng: random.Random, reference: Reference, saved: dict[str, int], unfinished: list[str]) -> Trial:
    sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
    # the ticks still to come, from the reference's per epoch; their last quarter often comes too late
    per_epoch = reference.ticks / (len(RUN_IDS) * (EPOCHS + 2))
    left = sum(EPOCHS + 2 - saved.get(rid, 0) for rid in unfinished)
    ticks = max(2 * len(unfinished) + 1, int(0.75 * per_epoch * left))  # at least each run's start and end lines
    return Trial(sig, group=sig == signal.SIGINT or (sig == signal.SIGKILL and rng.random() < 0.5),
                 tick=rng.randint(1, ticks), jitter=rng.uniform(0, 0.1))


def _harness(spec_file: Path, tmp_path: Path, workers: int, kills: int, seed: int,
             first: Trial | None = None) -> list[tuple[str, Outcome, dict[str, int]]]:
    """``kills`` interruptions (``first``, then drawn from ``seed``) and reruns, until the experiment is
    complete after the last one; returns each trial (its description), its outcome and the saved
    epochs of the runs it found unfinished."""
    reference = _reference(spec_file, workers)
    rng = random.Random(seed)
    out, folders, trials = tmp_path / "e0", 0, []
    durations = []
    while True:
        before = _store(out) if (out / "runs.sqlite").exists() else {}
        unfinished = [rid for rid in RUN_IDS if before.get(rid, {}).get("status") != "done"]
        expected = {rid: k for rid in unfinished if (k := resume_point(out / "runs" / rid))}
        killed = sum(1 for _, o, _ in trials if o.sent)
        if killed < kills:
            trial = first if first is not None and not trials else _draw(rng, reference, expected, unfinished)
        else:
            trial = Trial(None)
        what = f"seed {seed}, workers {workers}, trial {len(trials) + 1} ({trial}) in {out.name}"
        t0 = time.monotonic()
        o = _run(_cmd(spec_file, out, workers), out, trial)
        durations.append(time.monotonic() - t0)
        trials.append((what, o, expected))
        _check_rerun_said(o, expected, what)
        if o.sent:
            _check_interrupted(trial, o, out, before, reference.results, what)
            if trial.signal != signal.SIGKILL and "interrupted while writing the report" in o.text:
                # the signal came after the last run was recorded: nothing to resume, the report is redone
                assert all(r["status"] == "done" for r in _store(out).values()), what
                assert f"'bnlab report {out}' writes it" in o.text, what
            elif trial.signal != signal.SIGKILL:
                assert f"to resume, run the same command: bnlab run {spec_file} --out {out} --workers {workers}" \
                       in o.text, what
            continue
        assert o.returncode == 0, f"{what}: exit {o.returncode}\n{o.text}"
        assert o.leftovers == [] and _lock_is_free(out), what
        runs = _store(out)
        assert _results(runs) == reference.results, f"{what}: the results differ from an uninterrupted run's"
        for rid, r in before.items():
            if r["status"] == "done":
                assert runs[rid]["finished"] == r["finished"], f"{what}: {rid} was redone"
        if killed >= kills:
            print("\n".join(f"{w}: {'sent' if o.sent else 'not sent'}, exit {o.returncode}, {d:.1f} s"
                            for (w, o, _), d in zip(trials, durations)))  # shown by pytest on failure / with -s
            return trials
        folders += 1  # complete before every kill was used: go on in a fresh folder
        out = tmp_path / f"e{folders}"


def test_kill_9_at_60_percent_continues_from_a_saved_epoch(spec_file, tmp_path):
    """The issue's acceptance case, in the in-process path: kill -9 once a run has saved epoch 5 of 8;
    the rerun continues that run from a completed epoch >= 5 and says so; then four random trials."""
    trials = _harness(spec_file, tmp_path, 1, kills=5, seed=13, first=Trial(signal.SIGKILL, state_epoch=5))
    saved = trials[1][2]  # what the first rerun found
    assert trials[0][1].returncode == -9 and saved and max(saved.values()) >= 5, saved
    later = "".join(o.text for _, o, _ in trials[1:])
    for rid, k in saved.items():  # each continued (from k or a later epoch saved by a rerun) and said so
        said = [int(m) for m in re.findall(rf"\] {re.escape(rid)}: continuing from epoch (\d+) of 8", later)]
        assert said and said[0] >= k, (rid, k, said)


def test_interruptions_of_two_workers_lose_nothing_and_leave_nothing(spec_file, tmp_path):
    """The worker pool: SIGTERM while both workers are mid-run (a saved epoch 3), then four random trials."""
    trials = _harness(spec_file, tmp_path, 2, kills=5, seed=14, first=Trial(signal.SIGTERM, state_epoch=3))
    first = trials[0][1]
    assert first.returncode == 143 and re.search(r"will continue from epoch [3-8] of 8", first.text), first.text


@pytest.mark.slow
@pytest.mark.parametrize("seed", [101, 202, 303])
@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
def test_interruptions_many_trials(spec_file, tmp_path, workers, seed):
    _harness(spec_file, tmp_path, workers, kills=10, seed=seed)


# ---------------------------------------------------------------- the worker pool's rules, one by one

POOL_PARENT = """
import signal, sys, time
from bnlab.experiments.pool import WorkerPool
pool = WorkerPool(1, 1, "time:sleep").__enter__()
pool.submit(pool.workers[0], "nap", (600,))  # a task that would keep the worker busy for 10 minutes
print(pool.workers[0].proc.pid, flush=True)
if sys.argv[1] == "stop":
    sys.stdin.readline()
    t0 = time.monotonic()
    pool.stop()
    print(f"stopped {time.monotonic() - t0:.3f}", flush=True)
time.sleep(600)
"""


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _gone(pid: int) -> bool:
    try:
        return _status(pid)["State"].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_booted(pid: int) -> None:
    """Until the worker has imported torch: its rules are in force and it is at its task."""
    deadline = time.monotonic() + TIMEOUT
    while "libtorch" not in Path(f"/proc/{pid}/maps").read_text():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["kill-9-parent", "stop"])
def test_a_worker_ignores_sigint_and_never_outlives_its_parent(how):
    proc = subprocess.Popen([sys.executable, "-c", POOL_PARENT, "stop" if how == "stop" else "-"], env=command_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker = int(proc.stdout.readline())
        _wait_booted(worker)
        status = _status(worker)
        assert int(status["SigIgn"], 16) & (1 << (signal.SIGINT - 1)), "the worker does not ignore SIGINT"
        assert not int(status["SigBlk"], 16) & (1 << (signal.SIGTERM - 1)), "the worker blocks SIGTERM"
        if how == "stop":
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line.startswith("stopped") and float(line.split()[1]) < 4, line  # SIGTERM: no grace needed
            assert _gone(worker)
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            deadline = time.monotonic() + 10  # it dies with its parent, not 10 minutes later
            while not _gone(worker):
                assert time.monotonic() < deadline, "the worker outlived its parent"
                time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
