"""The Ray backend (``bnlab run --backend ray``): the same results and files as the local backend, failures
and divergence recorded, interruption and resume as with the local backend, the driver the only writer.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; the tests that need Ray skip when
it is not installed (``pip install 'bnlab[ray]'``). A ``bnlab run`` subprocess either joins that instance
(``--address``) or starts its own (no address) and must shut it down.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import load_results, parse_experiment, run_experiment
from bnlab.experiments.ray_backend import (TEMP_DIR, BackendError, FolderWatch, unit_task,
                                          write_tree)
from bnlab.experiments.results import RESULT_COLUMNS
from bnlab.train.resume import resume_point
from crashing_net import MESSAGE as CRASH_MESSAGE, crashing_variant
from tiny_specs import command_env, session_processes, TWO_VARIANTS, harness_toml, store_rows

TIMEOUT = 180  # seconds for one command, however loaded the machine
# wall-clock values differ between any two runs; everything else must be equal
COMPARED = [c for c in RESULT_COLUMNS if "seconds" not in c] + ["status", "error"]

TINY = {**TWO_VARIANTS, "train": {**TWO_VARIANTS["train"], "epochs": 3}}

# long enough that the driver holds a shipped state before the runs end: ~0.2 s per epoch on one thread; 12
# epochs leave a signal sent after the first shipped epoch seconds to arrive, even on a loaded machine
EPOCHS = 12
LONG = harness_toml("long", seeds=2, n_train=16000, hidden=256, batch_size=16, epochs=EPOCHS)
LONG_IDS = [f"{v}/seed-{s}" for v in ("no-bn", "bn") for s in range(2)]


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance for the module: (its address, the workers' temporary folder)."""
    ray = pytest.importorskip("ray")
    worker_tmp = tmp_path_factory.mktemp("ray-worker-tmp")
    env = {"BNLAB_DATA": str(tmp_path_factory.getbasetemp() / "bnlab-cache"), "TMPDIR": str(worker_tmp),
           "OMP_WAIT_POLICY": "PASSIVE"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        yield ray.get_runtime_context().gcs_address, worker_tmp
    finally:
        ray.shutdown()


def _rows(out: Path) -> dict[str, dict]:
    """run id -> the compared columns of its row and its epoch rows, read from the store directly."""
    return store_rows(out, COMPARED)


def _timeless(obj):
    """A JSON document without its wall-clock values (seconds, times of day)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if "second" not in k and k not in ("created", "time")}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _files(out: Path) -> dict[str, object]:
    """Every file under out/runs: bytes, or for JSON its content without wall-clock values."""
    files = {}
    for path in sorted((out / "runs").rglob("*")):
        if path.is_file():
            rel = path.relative_to(out).as_posix()
            files[rel] = _timeless(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return files


# ---------------------------------------------------------------- (a) the same results and files


@pytest.mark.timeout(TIMEOUT)
def test_ray_gives_the_local_backends_results_and_files(ray_instance, tmp_path):
    spec = parse_experiment(TINY)
    local = run_experiment(spec, tmp_path / "local", workers=2)
    messages = []
    remote = run_experiment(spec, tmp_path / "ray", backend="ray", on_progress=lambda p, m: messages.append(m))
    assert (local.done, local.failed) == (remote.done, remote.failed) == (4, 0)
    assert any("Ray tasks of 1 thread(s) on the Ray instance this process is connected to (2 CPUs)" in m
               for m in messages), messages
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    local_files, ray_files = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(ray_files) == sorted(local_files)
    assert any(f.endswith("checkpoint/model.safetensors") for f in ray_files)
    for rel in local_files:
        assert ray_files[rel] == local_files[rel], rel
    assert not any("/resume/" in f for f in ray_files)  # each finished run's state discarded, as locally
    # the workers' task folders are gone
    _, worker_tmp = ray_instance
    assert not list((worker_tmp / TEMP_DIR).glob("*/runs"))


# ---------------------------------------------------------------- (b) failures and divergence


@pytest.mark.timeout(TIMEOUT)
def test_a_failing_run_and_a_diverging_run_are_recorded_and_the_others_go_on(ray_instance, tmp_path):
    variants = {k: {"model": {**TINY["model"], **v["model"]}} for k, v in TINY["variants"].items()}
    bad = {**TINY, "seeds": 1, "model": {}, "variants": {
        **variants, "broken": crashing_variant(TINY["model"]["input_shape"], 2),  # its backward pass raises
        "wild": {"model": TINY["model"], "train": {"lr": 1e12}}}}
    prog = run_experiment(parse_experiment(bad), tmp_path / "e", backend="ray", trust_factory=True)
    assert (prog.done, prog.failed) == (3, 1)
    runs = {r["run_id"]: r for r in load_results(tmp_path / "e")[1]}
    assert runs["broken/seed-0"]["status"] == "failed" and CRASH_MESSAGE in runs["broken/seed-0"]["error"]
    assert runs["wild/seed-0"]["status"] == "diverged"
    assert runs["no-bn/seed-0"]["status"] == runs["bn/seed-0"]["status"] == "done"


@pytest.mark.timeout(TIMEOUT)
def test_a_killed_worker_fails_its_runs_and_the_others_go_on(ray_instance, tmp_path):
    """A Ray worker killed (SIGKILL) mid-run: its run is failed, as a dead worker process is locally."""
    spec_file = tmp_path / "long.toml"
    spec_file.write_text(LONG)
    from bnlab.experiments import load_experiment

    spec = load_experiment(str(spec_file))
    _, worker_tmp = ray_instance
    box = {}
    thread = threading.Thread(target=lambda: box.update(prog=run_experiment(spec, tmp_path / "e", backend="ray")))
    before = {d.name for d in (worker_tmp / TEMP_DIR).glob("*")}
    thread.start()
    victim, deadline = None, time.monotonic() + TIMEOUT
    while victim is None and time.monotonic() < deadline:  # a task folder appears: <pid>-<random>
        fresh = [d for d in (worker_tmp / TEMP_DIR).glob("*") if d.name not in before and (d / "runs").is_dir()]
        for d in fresh:
            runs = [p.relative_to(d / "runs").as_posix() for p in (d / "runs").glob("*/*")]
            if runs:
                victim = (int(d.name.split("-")[0]), runs[0])
                break
        time.sleep(0.05)
    assert victim is not None, "no task folder appeared"
    os.kill(victim[0], signal.SIGKILL)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    runs = {r["run_id"]: r for r in load_results(tmp_path / "e")[1]}
    assert runs[victim[1]]["status"] == "failed" and "the Ray task died" in runs[victim[1]]["error"], runs[victim[1]]
    assert box["prog"].failed == 1 and box["prog"].done == len(LONG_IDS) - 1
    assert not (tmp_path / "e" / "runs" / victim[1] / "resume").exists()  # a failed run keeps no state


# ---------------------------------------------------------------- (c) interruption and resume


def _bnlab_run(args: list[str], stop: signal.Signals | None = None, group: bool = False,
               at_epoch: int = 1, out: Path | None = None) -> tuple[int, str, list[int]]:
    """Run ``bnlab run ARGS``; with ``stop``, send it once a run folder in ``out`` holds a saved state of
    ``at_epoch`` or later (shipped there by the driver). (exit code, output, processes left.)"""
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=command_env(), start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while stop is not None and proc.poll() is None and time.monotonic() < deadline:
            if any((resume_point(out / "runs" / rid) or 0) >= at_epoch for rid in LONG_IDS):
                (os.killpg if group else os.kill)(proc.pid, stop)
                break
            time.sleep(0.02)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        reader.join(timeout=10)
        left, end = session_processes(proc.pid), time.monotonic() + 20
        while left and time.monotonic() < end:  # Ray's processes take a moment to go
            time.sleep(0.1)
            left = session_processes(proc.pid)
        return proc.returncode, "".join(lines), left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def long_reference(ray_instance, tmp_path_factory) -> tuple[Path, dict]:
    """The long spec run uninterrupted on the module's Ray instance: (spec file, its results)."""
    folder = tmp_path_factory.mktemp("long")
    spec_file = folder / "long.toml"
    spec_file.write_text(LONG)
    from bnlab.experiments import load_experiment

    run_experiment(load_experiment(str(spec_file)), folder / "reference", backend="ray")
    rows = _rows(folder / "reference")
    assert sorted(rows) == sorted(LONG_IDS) and all(len(r["epochs"]) == EPOCHS for r in rows.values())
    return spec_file, rows


@pytest.mark.timeout(2 * TIMEOUT)
@pytest.mark.parametrize("how", ["SIGINT-to-the-group-own-instance", "SIGTERM-to-the-parent-joining"])
def test_interrupted_then_resumed_equals_an_uninterrupted_run(ray_instance, long_reference, tmp_path, how):
    spec_file, reference = long_reference
    out = tmp_path / "e"
    stop = signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM
    args = [str(spec_file), "--out", str(out), "--backend", "ray"]
    if how.endswith("joining"):
        args += ["--address", ray_instance[0]]
    code, text, left = _bnlab_run(args, stop, group=stop == signal.SIGINT, out=out)
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[stop], text
    assert left == [], f"processes left: {left}\n{text}"
    assert f"interrupted by {stop.name}" in text and "Traceback" not in text, text
    assert f"to resume, run the same command: bnlab run {' '.join(args)}" in text, text
    rows = _rows(out)
    assert not [rid for rid, r in rows.items() if r["status"] == "running"], rows
    for rid, r in rows.items():  # nothing partial recorded as done
        if r["status"] == "done":
            assert r == reference[rid], rid
    said = {m[1]: int(m[2]) for m in re.finditer(  # (a run stopped in its evaluation says so instead)
        r"^(\S+) (?:will continue from epoch|finished training \(epoch) (\d+) of \d+", text, re.M)}
    on_disk = {rid: k for rid in LONG_IDS if rows[rid]["status"] != "done" and (k := resume_point(out / "runs" / rid))}
    assert said == on_disk and said, f"said {said}, on disk {on_disk}\n{text}"
    assert all(1 <= k <= EPOCHS for k in said.values()), said
    # the same command again continues each run from its shipped state and ends as if never interrupted
    code, text, left = _bnlab_run(args)
    assert code == 0 and left == [], text
    for rid, k in said.items():
        assert (f"] {rid}: continuing from epoch {k} of {EPOCHS} (" in text
                or f"] {rid}: training finished at epoch {k} of {EPOCHS}; redoing its evaluation (" in text), text
    assert _rows(out) == reference


# ---------------------------------------------------------------- (d) the driver alone writes the folder


@pytest.mark.timeout(TIMEOUT)
def test_a_task_never_sees_the_experiment_folder(ray_instance, tmp_path):
    """A task gets no path of the driver's (its signature has none), trains in a folder of the worker's
    own (under the worker's TMPDIR), sends everything back and leaves nothing behind; the driver writes
    the files."""
    import ray

    from bnlab.experiments import expand

    assert list(inspect.signature(unit_task).parameters) == ["plans", "folders", "threads", "poll"]
    _, worker_tmp = ray_instance
    plan = expand(parse_experiment({**TINY, "seeds": 1}))[0]
    items = [ray.get(ref) for ref in ray.remote(unit_task).remote([plan.__dict__], {}, 1)]
    done = items[-1]
    assert done["kind"] == "done" and done["results"][0]["status"] == "done"
    folder = Path(done["worker"]["folder"])
    assert folder.is_relative_to(worker_tmp / TEMP_DIR) and not folder.is_relative_to(tmp_path)
    assert not folder.exists()  # removed at the task's end
    files = done["runs"][plan.run_id]
    assert {"run.json", "history.json", "checkpoint/model.safetensors", "checkpoint/config.json"} <= set(files["files"])
    # what the driver writes from it is the run folder, whole
    write_tree(tmp_path / "runs" / plan.run_id, files["files"], files["present"])
    assert sorted(p.relative_to(tmp_path / "runs" / plan.run_id).as_posix()
                  for p in (tmp_path / "runs" / plan.run_id).rglob("*") if p.is_file()) == sorted(files["files"])


def test_folder_watch_ships_changes_whole_and_the_writer_mirrors_them(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "resume").mkdir(parents=True)
    (src / "run.json").write_text("{}")
    watch = FolderWatch(src)  # what is there when it starts, the driver has
    assert watch.changes() is None
    (src / "resume" / "tensors-a.safetensors").write_bytes(b"A" * 10)
    (src / "resume" / "state.json").write_text('{"t": "a"}')
    (src / "resume" / "state.json.123.tmp").write_text("half")  # being written: never shipped
    c = watch.changes()
    assert set(c["files"]) == {"resume/tensors-a.safetensors", "resume/state.json"}
    assert c["present"] == ["resume/state.json", "resume/tensors-a.safetensors", "run.json"]
    write_tree(dst, {"run.json": b"{}", **c["files"]}, c["present"])
    # the same size at once (a file time may not move): still seen, by its content
    (src / "resume" / "state.json").write_text('{"t": "b"}')
    (src / "resume" / "tensors-b.safetensors").write_bytes(b"B" * 10)
    (src / "resume" / "tensors-a.safetensors").unlink()
    c = watch.changes()
    assert set(c["files"]) == {"resume/state.json", "resume/tensors-b.safetensors"}
    write_tree(dst, c["files"], c["present"])
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == \
           ["resume/state.json", "resume/tensors-b.safetensors", "run.json"]
    assert (dst / "resume" / "state.json").read_text() == '{"t": "b"}'
    with pytest.raises(ValueError, match="outside its run folder"):
        write_tree(dst, {"../escape": b"x"})


# ---------------------------------------------------------------- (e) clear errors


def test_unknown_backend_and_missing_ray_are_clear_errors(tmp_path, monkeypatch):
    spec_file = tmp_path / "tiny.toml"
    import tomli_w

    spec_file.write_text(tomli_w.dumps(TINY))
    r = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "e"), "--backend", "bogus"])
    assert r.exit_code == 2 and "unknown backend 'bogus': expected local|ray" in r.output, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    r = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "e"), "--address", "auto"])
    assert r.exit_code == 2 and "--address auto is the address of a Ray cluster: it needs --backend ray" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: import ray fails
    r = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "e"), "--backend", "ray"])
    assert r.exit_code == 2 and "pip install 'bnlab[ray]'" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "e").exists()  # refused before anything was written
    with pytest.raises(BackendError, match="pip install 'bnlab\\[ray\\]'"):
        run_experiment(parse_experiment(TINY), tmp_path / "e", backend="ray")
    with pytest.raises(BackendError, match=re.escape("expected local|ray")):
        run_experiment(parse_experiment(TINY), tmp_path / "e", backend="bogus")
    assert not (tmp_path / "e").exists()


def test_an_address_where_no_cluster_answers_fails_at_once_and_stores_nothing(tmp_path, monkeypatch):
    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh process: this module's instance aside
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"no Ray cluster answers at 127\.0\.0\.1:1 .*ray start --head"):
        run_experiment(parse_experiment(TINY), tmp_path / "e", backend="ray", address="127.0.0.1:1")
    with pytest.raises(BackendError, match="expected auto or HOST:PORT"):
        run_experiment(parse_experiment(TINY), tmp_path / "f", backend="ray", address="nonsense")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "e" / "runs.sqlite").exists() and not (tmp_path / "e" / "spec.json").exists()
    assert not (tmp_path / "f").exists()
