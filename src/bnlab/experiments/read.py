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

Damaged runs (``bnlab.experiments.store.damage``) are marked, never raised on: each row has a
``damage`` key (None, or the reason in words). A run whose stored results cannot be used (a number
column holding text, a missing or non-finite primary result) reads with status ``"damaged"`` (its
stored status in ``stored_status``), so the statistics leave it out and count it as damaged; a run
whose folder or checkpoint is gone keeps its status and its stored values, and is reported. A value
that is not a number in a number column of a run or of its epochs reads as None (an epoch row whose
epoch is not a number is left out).
"""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.experiments.results import RESULT_FIELDS
from bnlab.experiments.spec import ExperimentSpec, SpecError
from bnlab.experiments.store import DAMAGED, EPOCH_NUMBERS, RunStore, StoreError, is_number, parse_config

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
        _check_version(out, store.get_meta("results_version"))
        runs, epochs = store.runs(), store.epochs()
        if not runs:
            raise StoreError(f"{out / STORE}: the store holds no runs (experiment {spec.name!r} stored, none of its "
                             "runs); 'bnlab run' with its spec and --out here plans and runs them")
        plan = {f"{v}/seed-{s}": (v, s) for v in spec.variants for s in spec.seed_list()}
        damaged = store.audit(spec.primary_metric, plan=plan)
    finally:
        store.close()
    _mark_damage(runs, epochs, damaged, spec, plan)
    _fill_stopping_points(runs, epochs)
    _fill_budgets(runs, epochs)
    return spec, runs, epochs


def _check_version(out: Path, version) -> None:
    """Refuse a store whose results version this bnlab does not know (a later bnlab's, or garbage); an
    earlier version's store is read (``bnlab run`` refuses to add runs to it, as its message says)."""
    from bnlab.experiments.runner import RESULTS_VERSION

    if version is None:  # a store from before results versions: version 1
        return
    if not (isinstance(version, str) and version.isdigit() and 1 <= int(version) <= RESULTS_VERSION):
        raise StoreError(f"{out / STORE}: its results version is {version[:40]!r}; this bnlab reads results "
                         f"versions 1 to {RESULTS_VERSION} (a store from a later bnlab, or damaged)")


def _planned_configs(spec: ExperimentSpec) -> dict[str, str]:
    """run id -> its planned config as stored (the spec's expansion); {} where the spec does not expand here."""
    try:
        from bnlab.experiments.spec import expand
        return {p.run_id: json.dumps({"model": p.model, "train": p.train}) for p in expand(spec)}
    except Exception:  # noqa: BLE001 - a reader falls back to the variant's other runs
        return {}


def _mark_damage(runs: list[dict], epochs: list[dict], damaged: dict, spec: ExperimentSpec | None = None,
                 plan: dict | None = None) -> None:
    """Rows as the module docstring says: ``damage`` set, unusable runs as DAMAGED, non-numbers None
    (an epoch row whose epoch is not a number is dropped: it has no place on a curve). A row whose
    identity is damaged (``store.identity_damage``) reads as the planned run its run id names (its
    variant, seed and planned config), DAMAGED; a row whose run id the spec does not plan is left out
    (no variant of the spec to count it in; ``bnlab run`` keeps it out of the experiment's runs)."""
    plan = plan or {}
    configs = None
    for r in runs:
        found = damaged.get(r["run_id"])
        r["damage"] = str(found) if found else None
        if found is not None and found.results:
            r["stored_status"], r["status"] = r["status"], DAMAGED
        if found is not None and r["run_id"] in plan and (
                (r["variant"], r["seed"]) != tuple(plan[r["run_id"]]) or parse_config(r.get("config"))[1]):
            r["variant"], r["seed"] = plan[r["run_id"]]
            if parse_config(r.get("config"))[1]:
                if configs is None:
                    configs = _planned_configs(spec) if spec is not None else {}
                sibling = next((x["config"] for x in runs if x["variant"] == r["variant"]
                                and not damaged.get(x["run_id"])), None)
                r["config"] = configs.get(r["run_id"]) or sibling or json.dumps({"model": {}, "train": {}})
        for f in RESULT_FIELDS:
            if f.numeric and r.get(f.name) is not None and (
                    not is_number(r[f.name]) or (r["status"] == DAMAGED and f.out_of_range(r[f.name]))):
                r[f.name] = None
    if plan:
        runs[:] = [r for r in runs if r["run_id"] in plan]
        epochs[:] = [e for e in epochs if e["run_id"] in plan]
    for e in list(epochs):
        for c in EPOCH_NUMBERS:
            if e.get(c) is not None and not is_number(e[c]):
                e[c] = None
    epochs[:] = [e for e in epochs if e["epoch"] is not None]


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


# what fixes the number of steps in an epoch (the training split's size and the batch), not the seed
_EPOCH_SHAPE = ("dataset", "dataset_options", "data_dir", "validation", "batch_size", "devices")


def _train_config(r: dict) -> dict:
    cfg = parse_config(r.get("config"))[0]
    train = cfg.get("train") if isinstance(cfg, dict) else None
    return train if isinstance(train, dict) else {}


def _fill_budgets(runs: list[dict], epochs: list[dict]) -> None:
    """Each diverged run's planned budget, ``budget`` = {censor field: value}: where its plan would
    have ended it, on the clock of each time-to-target field's censoring time. A diverged run never
    reaches the target, so it is censored there (not where it stopped: its last completed epoch, 0 if
    it diverged in its first). Epochs: the config's ``epochs`` (fewer where ``max_steps`` ends it
    sooner); steps: epochs x steps per epoch, or ``max_steps`` if fewer (steps per epoch from the
    first epoch of any run with the same data and batch, its own included); seconds: ``max_seconds``
    if set, else the longest training time of a run of the experiment (after every time observed).
    A value that cannot be known is left out (the statistics then censor after every observed time)."""
    first: dict[str, int] = {}
    for e in epochs:
        if e["epoch"] == 1 and is_number(e.get("steps")) and e["steps"] > 0:
            first[e["run_id"]] = int(e["steps"])
    per_epoch: dict[str, int] = {}
    for r in runs:
        key = json.dumps({k: _train_config(r).get(k) for k in _EPOCH_SHAPE}, sort_keys=True, default=str)
        r["_shape"] = key
        if r["run_id"] in first:
            per_epoch[key] = max(per_epoch.get(key, 0), first[r["run_id"]])
    longest = max((r["train_seconds"] for r in runs if r["status"] in ("done", "diverged")
                   and is_number(r.get("train_seconds"))), default=None)
    for r in runs:
        key = r.pop("_shape")
        if r["status"] != "diverged":
            continue
        train = _train_config(r)
        n_epochs, max_steps, max_seconds = train.get("epochs"), train.get("max_steps"), train.get("max_seconds")
        spe = per_epoch.get(key)
        budget: dict[str, float] = {}
        if is_number(n_epochs):
            steps = n_epochs * spe if spe else None
            if is_number(max_steps) and (steps is None or max_steps < steps):
                steps = max_steps
            budget["epochs_run"] = -(-steps // spe) if spe and steps else n_epochs
            if steps is not None and (spe or is_number(max_steps)):
                budget["steps_run"] = steps
        seconds = max_seconds if is_number(max_seconds) else longest
        if seconds is not None:
            budget["train_seconds"] = seconds
        r["budget"] = budget


__all__ = ["DAMAGED", "STORE", "load_probes", "load_results", "load_shift"]
