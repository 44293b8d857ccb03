"""Run an experiment: variants x seeds in worker processes, every result into the SQLite store.

Resumable: the spec is stored with the runs; running the same spec on the same folder skips
finished runs and does the others, each continuing from its saved resume state
(``bnlab.train.resume``: written at every epoch's end) where it has one. A run that crashes or
diverges is recorded (with its error) and the others go on. One runner per folder at a time (a
lock file); the parent process is the only writer of the store. A folder grows: a spec that only
adds seeds or variants adds only their runs (``bnlab.experiments.grow``).

Interruption. SIGINT (Ctrl-C: a terminal sends it to the whole process group) and SIGTERM (sent to
the parent alone) stop the experiment: the parent stops and reaps its workers
(``bnlab.experiments.pool``: they ignore SIGINT and leave the decision to it), records every result
that had fully arrived, puts the runs in progress back to pending (their resume state kept: nothing
partial is ever recorded as finished), releases the folder lock only when no worker is left, and
raises ExperimentInterrupted. A parent killed by SIGKILL takes its workers with it (they die with
their parent) and its lock (the kernel drops it); the runs it left "running" go back to pending on
the next start. A run's resume state is discarded only once the store has committed its result,
so a run killed after its training ended but before its result was stored is not trained again.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from bnlab.experiments.grow import Growth, SpecChanged, grow
from bnlab.experiments.pool import WorkerDied, WorkerPool
from bnlab.experiments.ray_backend import RayBackend, check_backend, import_ray
from bnlab.experiments.spec import (DataChoice, ExperimentSpec, RunPlan, SpecError, apply_quick, choose_data, expand,
                                    parse_experiment)
from bnlab.experiments.validate import check_models_fit
from bnlab.experiments.store import FINISHED, RunStore, StoreError
from bnlab.models.factory import UntrustedFactory, factory_names, require_trusted_specs, trusting
from bnlab.signals import StopSignals
from bnlab.train.resume import discard_state, resume_point, saved_progress

STORE = "runs.sqlite"
# bumped when runs of the same spec stop being comparable; a folder of another version is not resumed
RESULTS_VERSION = 2
RESULTS_VERSION_CHANGES = ("mnist-5k tests on the 10,000 real MNIST test digits, data order paired across "
                           "variants, final and best models both recorded")
# a worker killed by one of these was stopped by whoever is shutting the experiment down (systemd
# and docker signal every process), not by its run: the experiment stops, the run stays pending
_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


class ExperimentInterrupted(KeyboardInterrupt):
    """The experiment was stopped by ``signal`` (SIGINT or SIGTERM). Raised once every worker is gone
    and the folder's lock is released. ``unfinished``: the runs asked for that have no result;
    ``continue_from``: those of them with a saved state, run id -> (last saved epoch, epochs, whether
    training is over and only its evaluation is left); the others start from the beginning. Running the
    same command again resumes."""

    def __init__(self, signum: int, folder: str | Path, unfinished: list[str] | None = None,
                 continue_from: dict[str, tuple[int, int, bool]] | None = None):
        self.signal = signal.Signals(signum)
        self.folder = Path(folder)
        self.unfinished = list(unfinished or [])
        self.continue_from = dict(continue_from or {})
        super().__init__(self.lines()[0])

    def lines(self) -> list[str]:
        """What to tell the user, one line each."""
        out = [f"interrupted by {self.signal.name}: finished runs are saved in {self.folder}"
               + (f"; {len(self.unfinished)} run(s) unfinished, none recorded as finished" if self.unfinished else "")]
        out += [f"{rid} finished training (epoch {k} of {n}); its evaluation will be redone" if over else
                f"{rid} will continue from epoch {k} of {n}" for rid, (k, n, over) in self.continue_from.items()]
        fresh = [rid for rid in self.unfinished if rid not in self.continue_from]
        if fresh:
            out.append(f"{len(fresh)} run(s) will start from the beginning: {', '.join(fresh)}")
        return out


def continuing(run_id: str, epoch: int, epochs: int, over: bool = False) -> str:
    """The line that says a run continues from a saved state (printed before it starts); ``over``:
    its training is over and only the evaluation after it is redone."""
    if over:
        return f"{run_id}: training finished at epoch {epoch} of {epochs}; redoing its evaluation"
    return f"{run_id}: continuing from epoch {epoch} of {epochs}"


def plan_workers(n_runs: int, workers: int | None = None, cores: int | None = None,
                 processes_per_run: int = 1) -> tuple[int, int]:
    """(worker processes, torch threads per worker) so that workers x threads <= cores. A data-parallel run
    (``devices`` = P) is P processes sharing its worker's threads, so at most cores / P runs go at once."""
    cores = cores or os.cpu_count() or 1
    slots = max(1, cores // processes_per_run)
    w = max(1, min(n_runs, workers or slots, slots))
    return w, max(1, cores // w)


def execute_run(plan: dict, out_dir: str) -> dict:
    """One run (in a worker, or in-process). Raises only KeyboardInterrupt (interrupted: there is no
    result); a crash becomes a 'failed' result with its traceback.

    The result carries every field of ``bnlab.experiments.results.RESULT_FIELDS`` (taken by name
    from ``RunResult.summary()``; a field without a value there fails the run loudly rather than
    being stored empty)."""
    from bnlab.train.config import TrainConfig
    from bnlab.train.single import train_run

    t0 = time.time()
    try:
        res = train_run(plan["model"], TrainConfig(**plan["train"]), out=_run_dir(plan, out_dir), progress=False)
        return _result(plan, res, time.time() - t0, out_dir)
    except Exception as e:  # recorded, so the other runs go on
        return _failed(e, time.time() - t0)


def execute_unit(plans: list[dict], out_dir: str) -> list[dict]:
    """A unit of work: one run, or runs that differ only in their seed trained as one stacked model
    (``train_runs_stacked``; each run's result as ``execute_run`` gives it, its seconds its share of the
    group's). A stacked group that fails as a whole is run again run by run, so a run fails only for
    a reason of its own. The factories the plans name are run: the runner gives a worker only plans whose
    factories the user trusted (``run_experiment``)."""
    with trusting(factory_names(p["model"] for p in plans)):
        return _execute_unit(plans, out_dir)


def _execute_unit(plans: list[dict], out_dir: str) -> list[dict]:
    if len(plans) == 1:
        return [execute_run(plans[0], out_dir)]
    from bnlab.train.config import TrainConfig
    from bnlab.train.single import train_runs_stacked

    t0 = time.time()
    try:
        results = train_runs_stacked(plans[0]["model"], [TrainConfig(**p["train"]) for p in plans],
                                     [_run_dir(p, out_dir) for p in plans])
        share = (time.time() - t0) / len(plans)
        return [_result(p, r, share, out_dir) for p, r in zip(plans, results)]
    except KeyboardInterrupt:
        raise
    except Exception:
        return [execute_run(p, out_dir) for p in plans]


def _run_dir(plan: dict, out_dir: str) -> Path:
    return Path(out_dir) / "runs" / plan["run_id"]


def _result(plan: dict, res, seconds: float, out_dir: str) -> dict:
    import torch

    from bnlab.environment import environment
    from bnlab.experiments.results import RESULT_FIELDS

    h = res.history
    if h.stopped == "interrupted":  # train_run raises instead; this keeps the rule whatever it does
        raise KeyboardInterrupt(f"{plan['run_id']} was interrupted")
    summary = res.summary()
    missing = [f.name for f in RESULT_FIELDS if f.name not in summary]
    if missing:
        raise KeyError(f"the run computes no value for the result field(s) {missing}: add them to "
                       "RunResult.summary() in bnlab/train/single.py")
    return {
        "status": "diverged" if h.stopped == "diverged" else "done",
        "error": h.message if h.stopped == "diverged" else None,
        "seconds": seconds, "history": h.to_dict(), "shift": res.shift,
        "environment": environment(device="cuda" if torch.cuda.is_available() and
                                   plan["train"].get("device") in ("auto", "cuda") else "cpu"),
        **{f.name: summary[f.name] for f in RESULT_FIELDS},
        "artefacts": {"folder": str(_run_dir(plan, out_dir).relative_to(out_dir)), "history": "history.json",
                      # best: the best-validation model (predict / serve / export's default); final: the
                      # model at the end (absent when the run diverged)
                      "checkpoint": res.checkpoints.get("best"), "checkpoint_final": res.checkpoints.get("final")},
    }


def _failed(e: Exception, seconds: float) -> dict:
    return {"status": "failed", "seconds": seconds, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}


STACK_MODES = ("auto", "on", "off")


def check_stack_mode(stack: str) -> None:
    if stack not in STACK_MODES:
        raise ValueError(f"unknown stack mode {stack!r}: expected one of {STACK_MODES}")


def stack_groups(pending: list[RunPlan], out: Path, stack: str,
                 refused: dict[str, str] | None = None) -> list[list[RunPlan]]:
    """The units of work. Stacking (``"on"``): the pending runs of one variant that differ only in their
    seed, can train stacked and stand at the same saved epoch (or none) form one group (in the spec's
    order); every other run is a unit of its own. ``"auto"`` stacks the runs that train on a GPU, where
    it pays; on a CPU each run goes alone, because there it buys nothing measurable (docs/results.md:
    0.9-1.6x the time of separate runs, the batch-32 MLP steps being bound by their matrix products).
    ``"off"``: every run alone. ``refused`` collects, per variant, why its runs could not stack."""
    check_stack_mode(stack)
    if stack == "off":
        return [[p] for p in pending]
    from bnlab.train.config import TrainConfig
    from bnlab.train.engine import resolve_device
    from bnlab.train.single import stack_refusal

    groups: dict[str, list[RunPlan]] = {}
    units: list[list[RunPlan]] = []
    for p in pending:
        key = json.dumps({"model": p.model, "train": {k: v for k, v in p.train.items() if k != "seed"}},
                         sort_keys=True, default=str)
        config = TrainConfig(**p.train)
        try:
            on_gpu = resolve_device(config.device).type == "cuda"
        except ValueError:  # a GPU that is not there: the run alone says so
            on_gpu = False
        why = "auto stacks on a GPU only" if stack == "auto" and not on_gpu else stack_refusal(p.model, config)
        if why:
            if refused is not None and stack == "on":
                refused.setdefault(p.variant, why)
            units.append([p])
            continue
        # runs stack with those at the same saved epoch (none: from zero), so a group continues together
        key += f"@{resume_point(out / 'runs' / p.run_id)}"
        if key in groups:
            groups[key].append(p)
        else:
            groups[key] = [p]
            units.append(groups[key])
    return units


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


def _stored_data_choice(out: Path) -> DataChoice | None:
    """The data choice a folder's experiment was started with (None: a new folder, or no [data] fallback)."""
    if not (out / STORE).is_file():
        return None
    store = RunStore(out / STORE, readonly=True)
    try:
        text = store.get_meta("data_choice")
    finally:
        store.close()
    return None if text is None else DataChoice.from_json(text)


def open_experiment(out: Path, spec: ExperimentSpec,
                    data_choice: DataChoice | None = None) -> tuple[RunStore, Growth | None]:
    """Create or reopen the folder's store. A folder holding this experiment, or one this spec only adds
    seeds or variants to, is reopened and its stored spec becomes the union (``Growth``; None for a new
    folder); any other difference is refused with the settings that differ. ``data_choice`` (a spec with a
    ``[data] fallback``) is stored as meta ``data_choice`` when the folder is made."""
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / STORE)
    stored = store.get_meta("spec")
    try:
        if stored is None:
            from bnlab import __version__
            _store_spec(store, out, spec, name=spec.name, created=str(time.time()), bnlab=__version__,
                        results_version=str(RESULTS_VERSION),
                        **({"data_choice": data_choice.to_json()} if data_choice is not None else {}))
            return store, None
        if (version := store.get_meta("results_version")) != str(RESULTS_VERSION):
            raise StoreError(f"{out} holds runs made by an earlier bnlab whose results are not comparable with "
                             f"new ones (results version {version or 1}, now "
                             f"{RESULTS_VERSION}: {RESULTS_VERSION_CHANGES}); 'bnlab report' still reads it, but "
                             "to run use another --out folder")
        try:
            growth = grow(json.loads(stored), spec)
        except SpecChanged as e:
            raise StoreError(f"{out} holds experiment {json.loads(stored).get('name')!r} with other settings; only "
                             "more seeds or added variants can join an experiment folder, and this spec changes "
                             "(stored -> now):\n" + "\n".join(f"  {d}" for d in e.differences)
                             + "\nuse another --out folder for these settings") from None
        except ValueError as e:
            raise StoreError(f"{out / STORE}: {e}") from None
        if growth.grew:
            _store_spec(store, out, growth.union)
        return store, growth
    except BaseException:
        store.close()
        raise


def _store_spec(store: RunStore, out: Path, spec: ExperimentSpec, **meta: str) -> None:
    data = spec.model_dump(mode="json")  # in order: variants keep the spec's order
    store.set_meta(spec=json.dumps(data), **meta)  # one transaction
    (out / "spec.json").write_text(json.dumps(data, indent=2))


def run_experiment(spec: ExperimentSpec, out: str | Path, *, quick: bool = False, workers: int | None = None,
                   data_dir: str | None = None, seeds: int | None = None, retry_failed: bool = False,
                   on_progress: Callable[[Progress, str], None] | None = None, stack: str = "auto",
                   backend: str = "local", address: str | None = None,
                   trust_factory: bool | Iterable[str] = False) -> Progress:
    """Run every pending run of ``spec`` into ``out``; return the final progress counts.

    Raises ExperimentInterrupted (after the workers are gone and the lock released) on SIGINT or
    SIGTERM, or on a KeyboardInterrupt; see the module's docstring. ``stack``: "on" trains the runs of
    a variant that differ only in their seed as one stacked model where they can, "auto" does so on a
    GPU only, "off" runs each alone (``stack_groups``). ``backend``: "local" (worker processes on this
    machine) or "ray" (each unit a Ray task; ``address``: None starts a local Ray instance, "auto" or
    "HOST:PORT" joins a cluster; ``bnlab.experiments.ray_backend``). A variant whose model names a factory
    (code) is refused before anything is written unless the factory is registered or ``trust_factory``
    (``bnlab.models.factory``); the worker processes then run the factories of the plans they are given."""
    check_stack_mode(stack)  # before anything is written
    check_backend(backend, address)
    if backend == "ray":
        import_ray()  # not installed: say so now
    if quick:
        spec = apply_quick(spec)
    if seeds is not None or data_dir is not None:  # validated like the spec itself (--seeds 0 is refused)
        data = {**spec.data.model_dump(), **({"data_dir": data_dir} if data_dir is not None else {})}
        spec = parse_experiment({**spec.model_dump(), "data": data, **({"seeds": seeds} if seeds is not None else {})},
                                "the spec with the command's options")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out}: expected a folder for the experiment, but it is a file")
    # the data, chosen once: a [data] fallback when the dataset is not here, or what the folder was started on
    runs_spec, data_choice = choose_data(spec, _stored_data_choice(out), str(out))
    plans = expand(runs_spec)
    with trusting(trust_factory):  # a factory is code: refused unless trusted, before anything is stored
        try:
            require_trusted_specs([p.model for p in plans], f"experiment {spec.name!r}")
        except UntrustedFactory as e:
            raise SpecError(str(e)) from None
    with trusting(factory_names(p.model for p in plans)):  # trusted: the rest of the run may build them
        # before anything is stored or spawned; on a Ray cluster this machine's devices decide nothing
        check_models_fit(plans, _prefetch_data(runs_spec), here=backend != "ray" or address is None)
    notify = on_progress or (lambda p, msg: None)
    if data_choice is not None:
        notify(Progress(total=len(plans)), data_choice.note())
    left: tuple[list[str], dict[str, tuple[int, int]]] = ([], {})
    with StopSignals() as signals, trusting(factory_names(p.model for p in plans)):
        try:
            out.mkdir(parents=True, exist_ok=True)
            # leaving: Ray shut down (if started here), then the lock released
            with FolderLock(out), (RayBackend(address) if backend == "ray" else nullcontext()) as ray_backend:
                if ray_backend:  # a cluster that cannot be reached is refused before anything is stored
                    ray_backend.connect(signals)
                store = None
                try:
                    with signals.held():
                        store, growth = open_experiment(out, spec, data_choice)
                    return _run(spec, plans, out, store, growth, workers, retry_failed, notify, signals, stack,
                                ray_backend)
                except KeyboardInterrupt:
                    if store is not None:
                        left = _after_interrupt(store, plans, out)
                    raise
                finally:
                    if store is not None:
                        store.close()
        except ExperimentInterrupted:
            raise
        except KeyboardInterrupt:
            raise ExperimentInterrupted(signals.received or signal.SIGINT, out, *left) from None


def _after_interrupt(store: RunStore, plans: list[RunPlan],
                     out: Path) -> tuple[list[str], dict[str, tuple[int, int, bool]]]:
    """Runs left in progress go back to pending; (the runs asked for without a result, those of them
    that will continue from a saved state)."""
    store.reset_interrupted()
    finished = {r["run_id"] for r in store.runs(FINISHED)}
    unfinished = [p for p in plans if p.run_id not in finished]
    resumable = {p.run_id: (at[0], p.train["epochs"], at[1]) for p in unfinished
                 if (at := saved_progress(out / "runs" / p.run_id)) and at[0]}
    return [p.run_id for p in unfinished], resumable


def _run(spec: ExperimentSpec, plans: list[RunPlan], out: Path, store: RunStore, growth: Growth | None,
         workers: int | None, retry_failed: bool, notify, signals: StopSignals, stack: str = "auto",
         ray_backend: RayBackend | None = None) -> Progress:
    with signals.held():
        store.add_runs(plans)
        store.reset_interrupted(retry_failed)
        for r in store.runs(FINISHED):  # a state left by a runner killed between commit and discard
            discard_state(out / "runs" / r["run_id"])
        # a finished run whose row or files are damaged (bnlab.experiments.store.damage) is done again
        damaged = store.audit(spec.primary_metric, [p.run_id for p in plans],
                              plan={p.run_id: (p.variant, p.seed) for p in plans})
        store.reset_damaged(damaged, {p.run_id: p for p in plans})
    pending_ids = {r["run_id"] for r in store.runs(("pending",))}
    pending = [p for p in plans if p.run_id in pending_ids]  # in the spec's order
    prog = Progress(total=len(plans), skipped=len(plans) - len(pending), started=time.time())
    for note in growth.notes() if growth else []:
        notify(prog, note)
    if damaged:
        notify(prog, damaged_note(damaged))
    if not pending:
        notify(prog, "nothing to do: every run is finished")
        return prog
    # threads per run as if no run had finished yet: a resumed or continued run computes with the thread
    # count an uninterrupted experiment gives it (results can depend on it in the last bits); on Ray, the
    # cores are the Ray instance's (a local one: this machine's, so the same plan as the local backend)
    cores = ray_backend.cpus if ray_backend else None
    n_workers, threads = plan_workers(len(plans), workers, cores,
                                      processes_per_run=max(p.train.get("devices", 1) for p in plans))
    if ray_backend:  # a task runs on one node
        threads = max(1, min(threads, ray_backend.node_cpus))
    refused: dict[str, str] = {}
    units = stack_groups(pending, out, stack, refused)
    n_workers = min(n_workers, len(units))
    stacked = [u for u in units if len(u) > 1]
    notify(prog, f"{len(pending)} runs to do ({prog.skipped} already finished), "
                 + (f"Ray tasks of {threads} thread(s) on {ray_backend.where}" if ray_backend
                    else f"{n_workers} worker(s) x {threads} thread(s)")
                 + (f"; {sum(map(len, stacked))} of them in {len(stacked)} stacked group(s)" if stacked else ""))
    if stack == "on":  # asked for stacking: say which variants could not
        for variant, why in refused.items():
            notify(prog, f"{variant}: not stacked ({why})")
    runs = _Runs(out, store, prog, notify, signals)
    if n_workers == 1 and not ray_backend:  # in-process: simpler to debug, no spawn cost
        import torch

        torch.set_num_threads(threads)
        for unit in units:
            for plan in unit:
                runs.start(plan)
            for plan, result in zip(unit, execute_unit([p.__dict__ for p in unit], str(out))):
                runs.finish(plan, result)
        return prog
    if any(plan.model.get("kind", "mlp") != "cnn" for plan in pending):  # a run that may take the native step
        from bnlab.train import native
        native.load()  # build it here, once, rather than in every worker at the same time
    if ray_backend:
        ray_backend.run(units, out, runs, threads, signals)
    else:
        _run_pool(units, out, runs, n_workers, threads, signals)
    return prog


def damaged_note(damaged: dict) -> str:
    """What ``bnlab run`` says about the damaged runs it redoes (run id -> ``store.Damage``)."""
    return (f"{len(damaged)} stored run(s) damaged, redoing them (the other runs are kept): "
            + "; ".join(f"{rid}: {why}" for rid, why in damaged.items()))


def _prefetch_data(spec: ExperimentSpec):
    """Load (download, parse, cache) the dataset once here, not once per worker; return it."""
    from bnlab.data import load_dataset

    return load_dataset(spec.data.dataset, data_dir=spec.data.data_dir, validation=spec.data.validation,
                 scaling=spec.data.scaling, **spec.data.options)


class _Runs:
    """The parent's bookkeeping of runs starting and finishing (store writes held against signals)."""

    def __init__(self, out: Path, store: RunStore, prog: Progress, notify, signals: StopSignals):
        self.out, self.store, self.prog, self.notify, self.signals = out, store, prog, notify, signals

    def start(self, plan: RunPlan) -> None:
        with self.signals.held():
            self.store.mark_running(plan.run_id)
            self.prog.running += 1
            at = saved_progress(self.out / "runs" / plan.run_id)
            self.notify(self.prog, continuing(plan.run_id, at[0], plan.train["epochs"], at[1]) if at and at[0]
                        else f"{plan.run_id} started")

    def finish(self, plan: RunPlan, result: dict) -> None:
        with self.signals.held():
            self.store.record(plan.run_id, result)
            discard_state(self.out / "runs" / plan.run_id)  # only now: the result is committed
            self.prog.running -= 1
            if result["status"] == "failed":
                self.prog.failed += 1
                first = (result.get("error") or "").splitlines()[0]
                self.notify(self.prog, f"{plan.run_id} failed: {first}")
            else:
                self.prog.done += 1
                self.notify(self.prog, f"{plan.run_id} {result['status']}: "
                                       f"val_acc {result.get('final_val_accuracy') or 0:.4f}")


def _run_pool(units: list[list[RunPlan]], out: Path, runs: _Runs, n_workers: int, threads: int,
              signals: StopSignals) -> None:
    queue = list(units)
    with WorkerPool(n_workers, threads, "bnlab.experiments.runner:execute_unit", guard=signals.held) as pool:
        try:
            while queue or pool.busy():
                for worker in pool.idle():
                    if not queue:
                        break
                    unit = queue.pop(0)
                    for plan in unit:
                        runs.start(plan)
                    pool.submit(worker, unit, ([p.__dict__ for p in unit], str(out)))
                ready = pool.ready()
                with signals.held():  # answers read are recorded before a signal may stop the loop
                    for unit, answer in pool.collect(ready):
                        if isinstance(answer, WorkerDied) and answer.signal in _SHUTDOWN_SIGNALS:
                            signals.stop(answer.signal)  # the runs are not failed: they go back to pending
                            continue
                        if isinstance(answer, WorkerDied):
                            answer = [{"status": "failed", "error": str(answer)} for _ in unit]
                        for plan, result in zip(unit, answer):
                            runs.finish(plan, result)
        except KeyboardInterrupt:
            for unit, answer in pool.stop(hurry=lambda: signals.hurry):  # results that had fully arrived count
                for plan, result in zip(unit, answer):
                    runs.finish(plan, result)
            raise


__all__ = ["FINISHED", "STACK_MODES", "ExperimentInterrupted", "Progress", "continuing", "plan_workers",
           "run_experiment", "stack_groups"]
