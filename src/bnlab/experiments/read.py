"""Reading an experiment folder's results (for statistics, reports and notebooks); never writes a result.

    from bnlab.experiments.read import load_results
    spec, runs, epochs = load_results("runs/demo")

``runs`` are the store's rows as dicts: the run's identity and status, and one key per
``bnlab.experiments.results.RESULT_FIELDS`` entry (None where a run has no such value). The store
is opened read-only (SQLite ``mode=ro``): reading never creates or changes anything, works while
a runner writes, and a damaged store (a table missing, garbage, locked) is a StoreError with the
reason. A store written by an older bnlab opens too: its missing result columns read as None, and
where it lacks where a run stopped (``epochs_run``, ``steps_run``, ``train_seconds``), that is read
from the run's epochs, so its time-to-target stays censored data.
"""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.experiments.spec import ExperimentSpec, SpecError
from bnlab.experiments.store import RunStore, StoreError

STORE = "runs.sqlite"
READ_TIMEOUT = 10.0  # seconds to wait for a store another process holds locked


def _open(out: Path) -> RunStore:
    if not (out / STORE).is_file():
        what = "a folder" if (out / STORE).is_dir() else "no file"
        raise StoreError(f"{out}: no experiment here ({what} {STORE}; run 'bnlab run' first)")
    return RunStore(out / STORE, readonly=True, timeout=READ_TIMEOUT)


def load_probes(out: str | Path) -> list[dict]:
    """Every probe row (run_id, step, layer, metric, value) of an experiment folder."""
    store = _open(Path(out))
    try:
        return store.probes()
    finally:
        store.close()


def load_shift(out: str | Path) -> list[dict]:
    """Every distribution-shift row (run_id, corruption, severity, bn_stats, test_batch, accuracy, loss,
    note) of an experiment folder; [] for a store from before them."""
    store = _open(Path(out))
    try:
        return store.shift_rows()
    finally:
        store.close()


def load_results(out: str | Path) -> tuple[ExperimentSpec, list[dict], list[dict]]:
    """(spec, runs, epochs) of an experiment folder, for statistics and reports."""
    out = Path(out)
    store = _open(out)
    try:
        spec_json = store.get_meta("spec")
        if spec_json is None:
            raise StoreError(f"{out / STORE}: no experiment spec stored")
        try:
            spec = ExperimentSpec(**json.loads(spec_json))
        except (ValueError, TypeError, SpecError) as e:
            raise StoreError(f"{out / STORE}: the stored spec does not validate: {e}") from e
        runs, epochs = store.runs(), store.epochs()
    finally:
        store.close()
    _fill_stopping_points(runs, epochs)
    return spec, runs, epochs


def _fill_stopping_points(runs: list[dict], epochs: list[dict]) -> None:
    """Older stores lack epochs_run / steps_run / train_seconds: take them from the run's epochs."""
    last: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for e in epochs:
        if e["run_id"] not in last or e["epoch"] > last[e["run_id"]]["epoch"]:
            last[e["run_id"]] = e
        seconds[e["run_id"]] = seconds.get(e["run_id"], 0.0) + (e.get("seconds") or 0.0)
    for r in runs:
        e = last.get(r["run_id"])
        if e is None or r["status"] not in ("done", "diverged"):
            continue
        if r.get("epochs_run") is None:
            r["epochs_run"] = e["epoch"]
        if r.get("steps_run") is None and e.get("steps") is not None:
            r["steps_run"] = e["steps"]
        if r.get("train_seconds") is None:
            r["train_seconds"] = seconds[r["run_id"]]


__all__ = ["STORE", "load_probes", "load_results", "load_shift"]
