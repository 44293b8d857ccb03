"""Run an experiment: variants x seeds in worker processes, every result into the SQLite store.

Resumable: the spec is stored with the runs; running the same spec on the same folder skips
finished runs and redoes only runs that were pending or interrupted. A run that crashes or
diverges is recorded (with its error) and the others go on. One runner per folder at a time
(a lock file); the parent process is the only writer of the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from bnlab.experiments.spec import ExperimentSpec, RunPlan, apply_quick, expand
from bnlab.experiments.store import FINISHED, RunStore, StoreError

STORE = "runs.sqlite"
# bumped when runs of the same spec stop being comparable; a folder of another version is not resumed
RESULTS_VERSION = 2
RESULTS_VERSION_CHANGES = ("mnist-5k tests on the 10,000 real MNIST test digits, data order paired across "
                           "variants, final and best models both recorded")


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    skipped: int = 0
    started: float = 0.0

    def eta(self) -> float | None:
        finished = self.done + self.failed
        todo = self.total - self.skipped - finished
        if finished == 0:
            return None
        return (time.time() - self.started) / finished * todo


def plan_workers(n_runs: int, workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads per worker) so that workers x threads <= cores."""
    cores = cores or os.cpu_count() or 1
    w = max(1, min(n_runs, workers or cores, cores))
    return w, max(1, cores // w)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def execute_run(plan: dict, out_dir: str) -> dict:
    """One run, in a worker. Never raises: a crash becomes a 'failed' result with its traceback.

    The result carries every field of ``bnlab.experiments.results.RESULT_FIELDS`` (taken by name
    from ``RunResult.summary()``; a field without a value there fails the run loudly rather than
    being stored empty)."""
    import torch

    from bnlab.environment import environment
    from bnlab.experiments.results import RESULT_FIELDS
    from bnlab.train.config import TrainConfig
    from bnlab.train.single import train_run

    t0 = time.time()
    run_dir = Path(out_dir) / "runs" / plan["run_id"]
    try:
        res = train_run(plan["model"], TrainConfig(**plan["train"]), out=run_dir, progress=False)
        h = res.history
        summary = res.summary()
        missing = [f.name for f in RESULT_FIELDS if f.name not in summary]
        if missing:
            raise KeyError(f"the run computes no value for the result field(s) {missing}: add them to "
                           "RunResult.summary() in bnlab/train/single.py")
        return {
            "status": "diverged" if h.stopped == "diverged" else "done",
            "error": h.message if h.stopped == "diverged" else None,
            "seconds": time.time() - t0, "history": h.to_dict(),
            "environment": environment(device="cuda" if torch.cuda.is_available() and
                                       plan["train"].get("device") in ("auto", "cuda") else "cpu"),
            **{f.name: summary[f.name] for f in RESULT_FIELDS},
            "artefacts": {"folder": str(run_dir.relative_to(out_dir)), "history": "history.json",
                          # best: the best-validation model (predict / serve / export's default); final: the
                          # model at the end (absent when the run diverged)
                          "checkpoint": res.checkpoints.get("best"), "checkpoint_final": res.checkpoints.get("final")},
        }
    except Exception as e:  # recorded, so the other runs go on
        return {"status": "failed", "seconds": time.time() - t0,
                "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}


class FolderLock:
    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise StoreError(f"{self.path.parent}: another 'bnlab run' is using this folder; wait for it or "
                             "choose another --out") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        return False


def open_experiment(out: Path, spec: ExperimentSpec) -> RunStore:
    """Create or reopen the folder's store; refuse a folder holding a different experiment."""
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / STORE)
    spec_json = json.dumps(spec.model_dump(mode="json"))  # in order: variants keep the spec's order

    def canonical(text: str) -> str:
        """The spec with today's defaults filled in, so a field added since does not count as a change."""
        data = json.loads(text)
        try:
            data = ExperimentSpec(**data).model_dump(mode="json")
        except ValueError:
            pass  # compared as stored: it differs from any valid spec
        return json.dumps(data, sort_keys=True)

    stored = store.get_meta("spec")
    if stored is None:
        from bnlab import __version__
        store.set_meta(spec=spec_json, name=spec.name, created=str(time.time()), bnlab=__version__,
                       results_version=str(RESULTS_VERSION))
        (out / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    elif (version := store.get_meta("results_version")) != str(RESULTS_VERSION):
        store.close()
        raise StoreError(f"{out} holds runs made by an earlier bnlab whose results are not comparable with "
                         f"new ones (results version {version or 1}, now "
                         f"{RESULTS_VERSION}: {RESULTS_VERSION_CHANGES}); 'bnlab report' still reads it, but "
                         "to run use another --out folder")
    elif canonical(stored) != canonical(spec_json):
        store.close()
        raise StoreError(f"{out} holds experiment {json.loads(stored)['name']!r} with a different spec "
                         "(another preset, --quick or --seeds?); use another --out folder")
    return store


def run_experiment(spec: ExperimentSpec, out: str | Path, *, quick: bool = False, workers: int | None = None,
                   data_dir: str | None = None, seeds: int | None = None, retry_failed: bool = False,
                   on_progress: Callable[[Progress, str], None] | None = None) -> Progress:
    """Run every pending run of ``spec`` into ``out``; return the final progress counts."""
    if quick:
        spec = apply_quick(spec)
    if seeds is not None:
        spec = spec.model_copy(update={"seeds": seeds})
    if data_dir is not None:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"data_dir": data_dir})})
    plans = expand(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        store = open_experiment(out, spec)
        try:
            store.add_runs(plans)
            store.reset_interrupted(retry_failed)
            by_id = {p.run_id: p for p in plans}
            pending = [by_id[r["run_id"]] for r in store.runs(("pending",))]
            prog = Progress(total=len(plans), skipped=len(plans) - len(pending), started=time.time())
            notify = on_progress or (lambda p, msg: None)
            if not pending:
                notify(prog, "nothing to do: every run is finished")
                return prog
            _prefetch_data(spec)
            n_workers, threads = plan_workers(len(pending), workers)
            notify(prog, f"{len(pending)} runs to do ({prog.skipped} already finished), "
                         f"{n_workers} worker(s) x {threads} thread(s)")
            _run_pool(pending, out, store, n_workers, threads, prog, notify)
            return prog
        finally:
            store.close()


def _prefetch_data(spec: ExperimentSpec) -> None:
    """Load (download, parse, cache) the dataset once here, not once per worker."""
    from bnlab.data import load_dataset

    load_dataset(spec.data.dataset, data_dir=spec.data.data_dir, validation=spec.data.validation,
                 scaling=spec.data.scaling, **spec.data.options)


def _run_pool(pending: list[RunPlan], out: Path, store: RunStore, n_workers: int, threads: int,
              prog: Progress, notify) -> None:
    def finish(plan: RunPlan, result: dict) -> None:
        store.record(plan.run_id, result)
        prog.running -= 1
        if result["status"] == "failed":
            prog.failed += 1
            first = (result.get("error") or "").splitlines()[0]
            notify(prog, f"{plan.run_id} failed: {first}")
        else:
            prog.done += 1
            notify(prog, f"{plan.run_id} {result['status']}: val_acc {result.get('final_val_accuracy') or 0:.4f}")

    if n_workers == 1:  # in-process: simpler to debug, no spawn cost
        _init_worker(threads)
        for plan in pending:
            store.mark_running(plan.run_id)
            prog.running += 1
            notify(prog, f"{plan.run_id} started")
            finish(plan, execute_run(plan.__dict__, str(out)))
        return
    queue = list(pending)
    if any(plan.model.get("kind", "mlp") != "cnn" for plan in pending):  # a run that may take the native step
        from bnlab.train import native
        native.load()  # build it here, once, rather than in every worker at the same time
    with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {}
        try:
            while queue or futures:
                while queue and len(futures) < n_workers:
                    plan = queue.pop(0)
                    store.mark_running(plan.run_id)
                    prog.running += 1
                    futures[pool.submit(execute_run, plan.__dict__, str(out))] = plan
                    notify(prog, f"{plan.run_id} started")
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    plan = futures.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as e:  # the worker process itself died
                        result = {"status": "failed", "error": f"worker died: {type(e).__name__}: {e}"}
                    finish(plan, result)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


__all__ = ["FINISHED", "Progress", "plan_workers", "run_experiment"]
