"""The runner's Ray backend (``bnlab run SPEC --backend ray [--address auto|HOST:PORT]``).

Each unit of work (one run, or a stacked group: ``runner.stack_groups``) is a Ray task with explicit
resources: ``num_cpus`` = the torch threads of a run (``runner.plan_workers`` over the Ray instance's
CPUs), ``num_gpus`` = the run's devices when it trains on CUDA, else 0. The driver (the process running
``bnlab run``) alone writes the store and the experiment folder, so the workers need no shared file
system:

- a task trains with ``runner.execute_unit`` into a temporary folder of its own (never the experiment
  folder), after writing into it the files of the run folders the driver sent along (a saved resume
  state: the task continues from the saved epoch exactly as the local backend does);
- while it trains, the task looks at its run folders every ``POLL_SECONDS`` and streams the files that
  changed (a streaming-generator task: the driver reads the items in order). A snapshot is shipped only
  if no file changed while it was read, so it holds one complete resume state (``bnlab.train.resume``
  replaces its files atomically, the tensors before the ``state.json`` naming them);
- the driver writes each snapshot under ``out/runs/<run_id>/`` (every file atomically, a ``state.json``
  or ``history.json`` last, then removes what the task no longer has), and, from the task's last item,
  the run folders whole, then records the results (``_Runs.finish``: the result is committed, then the
  resume state discarded). So Ctrl-C, SIGTERM, even SIGKILL of the driver, lose at most the epochs in
  progress, as with the local backend.

A run that raises is the 'failed' result ``execute_run`` produces; a task that dies (worker killed,
node lost) is a 'failed' result for each of its runs, like ``pool.WorkerDied``. On SIGINT / SIGTERM the
driver records the results that had fully arrived, cancels the other tasks (``ray.cancel(force=True)``),
leaves their runs pending with the state they shipped, and shuts down the Ray instance if it started it.
A local instance's processes are started by Ray, so they cannot follow bnlab's rule for its children
(``bnlab.lifeline``): Ray ties its GCS server and raylet to the driver, but the raylet's agents would wait
a minute for the dead GCS after a SIGKILL of the driver; a ``lifeline.Sentinel``, started before the
instance, kills what is left of it then.

Ray is an optional extra (``pip install 'bnlab[ray]'``) imported only when this backend is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnlab.lifeline import Sentinel
from bnlab.signals import STOP_SIGNALS
from bnlab.train.resume import STATE_JSON, write_atomic

if TYPE_CHECKING:
    from bnlab.experiments.spec import RunPlan
    from bnlab.signals import StopSignals

BACKENDS = ("local", "ray")
RAY_MISSING = "--backend ray needs Ray, an optional extra: pip install 'bnlab[ray]'"
POLL_SECONDS = 0.5  # how often a task looks for changed files, and the driver's longest wait
TEMP_DIR = "bnlab-ray"  # under the worker's temporary folder: <pid>-<random>/runs/<run_id>/
CRASH_GRACE = 1.0  # seconds: a worker death this close to a stop signal is the stop's, not the run's
_RACY_NS = 2_000_000_000  # a file modified this recently may have changed without its stat showing it


class BackendError(ValueError):
    """A backend that cannot be used: unknown, Ray not installed, no Ray cluster at the address."""


def check_backend(backend: str, address: str | None = None) -> None:
    """Refuse an unknown backend, or an address without the Ray backend, before anything is written."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: expected {'|'.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise BackendError(f"--address {address} is the address of a Ray cluster: it needs --backend ray")
    if address not in (None, "auto") and "://" not in address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise BackendError(f"--address {address!r}: expected auto or HOST:PORT (the head node's GCS address, "
                               "port 6379 by default)")


def import_ray():
    """The ``ray`` module, or a BackendError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise BackendError(f"{RAY_MISSING} (import ray: {e})") from None
    return ray


# ---------------------------------------------------------------- run folders as data


def _stats(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Relative path -> (size, mtime_ns, inode) of every file under ``folder``, temporary files aside
    (``*.tmp``: a file being written, renamed into place when complete)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".tmp"):
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced or removed meanwhile
                continue
            out[path.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def read_tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (none if it does not exist), by relative path."""
    return {rel: (folder / rel).read_bytes() for rel in _stats(folder)} if folder.is_dir() else {}


def _order(rel: str) -> tuple:
    # data before the JSON that names or digests it (a checkpoint's config.json holds its weights'
    # SHA-256, resume/state.json names its tensor file); history.json (the run ended) and state.json last
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(".json"), name in (STATE_JSON, "history.json"), rel


def _inside(folder: Path, rel: str) -> Path:
    path = folder / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not rel:
        raise ValueError(f"a Ray task sent a file outside its run folder: {rel!r}")
    return path


def write_tree(folder: Path, files: dict[str, bytes], present: list[str] | None = None) -> None:
    """Write ``files`` (relative path -> bytes) under ``folder``, each atomically, in an order that
    keeps the folder valid whenever the process stops; then remove every file not in ``present`` (the
    files the sender has; None: keep the others) and the folders left empty."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in sorted(files, key=_order):
        path = _inside(folder, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, files[rel])
    if present is None:
        return
    keep = set(present)
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # deepest first
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif path.relative_to(folder).as_posix() not in keep:
            path.unlink(missing_ok=True)


class FolderWatch:
    """The files of a run folder that changed since the last shipment (in the task)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shipped: dict[str, tuple] = {}  # rel -> (size, mtime_ns, inode, sha1) as last shipped
        self.changes()  # what is there now (sent by the driver) the driver has

    def changes(self) -> dict | None:
        """``{"files": {rel: bytes}, "present": [rel, ...]}`` for what changed, or None when nothing did or
        the folder changed while it was read (the next call tries again). A file whose size, time and
        inode are as shipped is read anyway when it was modified in the last 2 s, as git does with
        "racily clean" files: the clock behind file times ticks in milliseconds."""
        before = _stats(self.folder)
        now = time.time_ns()
        files, marks = {}, {}
        for rel, st in before.items():
            old = self.shipped.get(rel)
            if old is not None and old[:3] == st and now - st[1] > _RACY_NS:
                marks[rel] = old
                continue
            try:
                data = (self.folder / rel).read_bytes()
            except OSError:  # replaced or removed while read: try again later
                return None
            digest = hashlib.sha1(data).hexdigest()
            marks[rel] = (*st, digest)
            if old is None or old[3] != digest:
                files[rel] = data
        if _stats(self.folder) != before:  # written to meanwhile: the snapshot may mix two states
            return None
        if not files and marks.keys() == self.shipped.keys():
            self.shipped = marks
            return None
        self.shipped = marks
        return {"files": files, "present": sorted(marks)}

    def everything(self) -> dict:
        """The folder whole (the task's last word on it)."""
        files = read_tree(self.folder)
        return {"files": files, "present": sorted(files)}


# ---------------------------------------------------------------- in the worker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp(base: Path | None = None) -> None:
    """Remove the task folders whose worker process is gone (a task cancelled with force, a killed
    worker: they cannot clean up after themselves)."""
    base = base or Path(tempfile.gettempdir()) / TEMP_DIR
    if not base.is_dir():
        return
    for d in base.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _work(plans: list[dict], root: Path, threads: int, box: dict) -> None:
    import torch

    from bnlab.experiments.runner import execute_unit

    torch.set_num_threads(threads)
    try:
        box["results"] = execute_unit(plans, str(root))
    except BaseException as e:  # noqa: BLE001 - handed to the task, which raises it
        box["error"] = e


def unit_task(plans: list[dict], folders: dict[str, dict[str, bytes]], threads: int, poll: float = POLL_SECONDS):
    """One unit of work in a Ray worker, as a generator (Ray streams each item to the driver in order):
    ``{"kind": "files", "runs": {run_id: changes}}`` while it trains, then
    ``{"kind": "done", "results": [...], "runs": {run_id: the folder whole}}``. ``folders``: the files
    of each run folder the driver has (a saved resume state to continue from). It never sees the
    experiment folder: it trains in a temporary folder of its own, removed at the end."""
    base = Path(tempfile.gettempdir()) / TEMP_DIR
    base.mkdir(parents=True, exist_ok=True)
    sweep_temp(base)
    root = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    try:
        watches = {}
        for p in plans:
            write_tree(root / "runs" / p["run_id"], folders.get(p["run_id"], {}))
            watches[p["run_id"]] = FolderWatch(root / "runs" / p["run_id"])
        box: dict[str, Any] = {}
        worker = threading.Thread(target=_work, args=(plans, root, threads, box), name="bnlab-unit", daemon=True)
        worker.start()
        while True:
            worker.join(poll)
            if not worker.is_alive():
                break
            changed = {rid: c for rid, w in watches.items() if (c := w.changes()) is not None}
            if changed:
                yield {"kind": "files", "runs": changed}
        if "error" in box:
            raise box["error"]
        done = {"kind": "done", "results": box["results"], "runs": {rid: w.everything() for rid, w in watches.items()},
                "worker": {"host": socket.gethostname(), "pid": os.getpid(), "folder": str(root)}}
    finally:  # before the last item: a generator's code after its last yield runs only when it is resumed
        shutil.rmtree(root, ignore_errors=True)
    yield done


# ---------------------------------------------------------------- in the driver


def _check_reachable(address: str) -> None:
    """A HOST:PORT where nothing listens fails here in seconds (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")  # its form was checked by check_backend
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise BackendError(f"no Ray cluster answers at {address} ({e.strerror or e}): start one with "
                           f"'ray start --head --port {port}' on the head node, or check the address") from None


@contextmanager
def _ray_keeps_the_sigterm_handler(ray):
    """While ray.init runs: leave the process's SIGTERM handler alone (Ray's own calls sys.exit)."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None:  # another Ray: the handlers are put back after ray.init anyway
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


class RayBackend:
    """The Ray instance of one ``bnlab run`` and the loop that feeds it. A context manager: on exit it
    shuts down the instance if it started it (and removes the task folders its killed workers left).
    ``connect()`` starts (no address: a local instance sized to this machine) or joins one (``auto``, or
    HOST:PORT); a process already connected to Ray (a notebook, the tests) keeps its connection."""

    def __init__(self, address: str | None = None):
        self.address = address
        self.ray = None
        self.started = False
        self.sentinel: Sentinel | None = None  # kills a local instance's processes should this one be killed
        self.cpus = self.gpus = self.node_cpus = 0
        self.where = ""

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> bool:
        if self.started:
            self.ray.shutdown()
            sweep_temp()  # this machine's workers are gone: so are the folders they could not remove
        if self.sentinel is not None:
            self.sentinel.close()
            self.sentinel = None
        return False

    def connect(self, signals: StopSignals | None = None) -> int:
        """Start or join the Ray instance; return its CPUs."""
        ray = self.ray = import_ray()
        if ray.is_initialized():
            self.where = "the Ray instance this process is connected to"
        else:
            if self.address not in (None, "auto") and "://" not in self.address:
                _check_reachable(self.address)
            logging.getLogger("ray").setLevel(logging.ERROR)
            kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            local = self.started = self.address is None  # from here on: a half-started instance is shut down too
            if local:  # Ray starts its processes itself: they cannot follow bnlab's rule (bnlab.lifeline)
                self.sentinel = Sentinel()
            # Starting a local instance takes seconds; a signal then waits for its end (``held``), since an
            # instance interrupted half-way leaves processes behind (Ray's agents outlive their raylet)
            # and ray.init would put in its own SIGTERM handler (sys.exit) meanwhile
            try:
                with (signals.held() if signals is not None and local else nullcontext()), \
                        (_ray_keeps_the_sigterm_handler(ray) if local else nullcontext()):
                    if local:
                        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs)
                    else:
                        ray.init(address=self.address, **kwargs)
            except SystemExit as e:  # Ray's SIGTERM handler, in place while ray.init joins a cluster
                if signals is None or e.code != signal.SIGTERM:
                    raise
                signals.stop(signal.SIGTERM)  # stops as bnlab does: KeyboardInterrupt, runs left pending
                raise
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                if self.address is None:
                    raise BackendError(f"could not start a local Ray instance: {e}") from None
                raise BackendError(f"could not join the Ray cluster at {self.address}: {e} (start a cluster with "
                                   "'ray start --head' on one node and 'ray start --address HEAD:6379' on the "
                                   "others; bnlab must be installed on every node; a cluster with token "
                                   "authentication joined by HOST:PORT also needs RAY_AUTH_MODE=token and its "
                                   "token in ~/.ray/auth_token here)") from None
            finally:  # ray.init puts in its own SIGTERM handler (sys.exit): bnlab's stops cleanly
                for s, h in handlers.items():
                    if h is not None:
                        signal.signal(s, h)
            self.where = ("a local Ray instance" if local else "the Ray cluster found by --address auto"
                          if self.address == "auto" else f"the Ray cluster at {self.address}")
        res = ray.cluster_resources()
        self.cpus, self.gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        self.node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
                             default=self.cpus)
        if self.cpus < 1:
            raise BackendError(f"{self.where} has no CPUs to run tasks on")
        self.where += f" ({self.cpus} CPUs" + (f", {self.gpus} GPUs)" if self.gpus else ")")
        return self.cpus

    def _gpus(self, unit: list[RunPlan]) -> int:
        """GPUs a unit asks for: its runs' devices when they train on CUDA ('auto' does where the cluster
        has GPUs). A cluster without GPUs gives none: such a run fails by itself, as it does locally,
        rather than waiting forever for a GPU."""
        train = unit[0].train
        device = str(train.get("device", "auto"))
        cuda = device.startswith("cuda") or (device == "auto" and self.gpus > 0)
        return min(int(train.get("devices", 1) or 1), self.gpus) if cuda and self.gpus else 0

    def run(self, units: list[list[RunPlan]], out: Path, runs, threads: int, signals: StopSignals) -> None:
        """Run ``units`` as Ray tasks of ``threads`` CPUs each; ``runs``: the runner's bookkeeping
        (``_Runs``: start and finish)."""
        ray = self.ray
        slots = max(1, self.cpus // threads)  # tasks in flight: the runs said to be running are running
        task = ray.remote(max_retries=0)(unit_task)  # a task that dies is a failed run, as locally
        queue, live = list(units), {}
        try:
            while queue or live:
                while queue and len(live) < slots:
                    unit = queue.pop(0)
                    with signals.held():  # a task started is always known, so a stop cancels it
                        for plan in unit:
                            runs.start(plan)
                        folders = {p.run_id: read_tree(out / "runs" / p.run_id) for p in unit}
                        gen = task.options(num_cpus=threads, num_gpus=self._gpus(unit)).remote(
                            [p.__dict__ for p in unit], folders, threads)
                        live[gen] = unit
                ready, _ = ray.wait(list(live), num_returns=1, timeout=POLL_SECONDS)
                with signals.held():  # what arrived is written and recorded before a signal may stop the loop
                    for gen in ready:
                        self._take(gen, live, out, runs, signals)
        except KeyboardInterrupt:
            try:
                for gen in list(live):  # what had fully arrived counts: the newest states, finished results
                    for _ in range(100):
                        if gen not in live or not ray.wait([gen], num_returns=1, timeout=0)[0]:
                            break
                        self._take(gen, live, out, runs, signals)
            except Exception:  # noqa: BLE001 - the cluster is going too: what was not taken stays pending
                pass
            for gen in live:
                try:
                    ray.cancel(gen, force=True)
                except Exception:  # noqa: BLE001 - gone already (a lost node): nothing to stop
                    pass
            raise

    def _take(self, gen, live: dict, out: Path, runs, signals: StopSignals) -> None:
        """Read the next item of a task that has one and act on it."""
        ray, unit = self.ray, live[gen]
        try:
            msg = ray.get(next(gen))
        except StopIteration:
            msg = RuntimeError("the Ray task ended without its results")
        except Exception as e:  # noqa: BLE001 - the task died (worker killed, node lost) or raised
            msg = e
        if isinstance(msg, Exception):
            del live[gen]
            # a worker that died (rather than a task that raised) may have been stopped by the shutdown
            # that is stopping bnlab too (docker stop and systemd signal every process): Ray does not
            # say which signal killed it, so a stop signal reaching bnlab within CRASH_GRACE of the
            # death counts it as stopped (its runs back to pending, with the states they shipped),
            # as the local backend counts a worker killed by SIGINT / SIGTERM / SIGHUP
            if not isinstance(msg, ray.exceptions.RayTaskError):
                deadline = time.monotonic() + CRASH_GRACE
                while signals.received is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if signals.received is not None:
                    return
            first = (str(msg).strip().splitlines() or [""])[0]
            error = f"the Ray task died ({type(msg).__name__}: {first})"
            for plan in unit:
                runs.finish(plan, {"status": "failed", "error": error})
            return
        for rid, files in msg["runs"].items():
            write_tree(out / "runs" / rid, files["files"], files["present"])
        if msg["kind"] == "done":
            del live[gen]
            for plan, result in zip(unit, msg["results"]):
                runs.finish(plan, result)
