"""The SQLite run store of one experiment folder.

Durability: WAL journal with synchronous=FULL, and each run's results (its row, its epochs)
written in one transaction, so Ctrl-C, kill -9 or power loss can lose only runs still in
progress, never a committed one, and never leave half a run. Readers (report, compare) open it
read-only and may read while a runner writes; a busy timeout makes concurrent writers wait
instead of failing. A damaged store is refused with the reason, never repaired by recreating
what is missing (see RunStore).

A store that opens can still hold damaged runs: a finished row whose results cannot be used (a
number column holding text, a missing or non-finite primary result) or whose files are gone (its
run folder, or a checkpoint its row says it saved). ``damage`` is the one rule that says so and
why; ``bnlab run`` redoes such runs (``RunStore.reset_damaged``), and the readers
(``bnlab.experiments.read``: compare, report) report them and keep unusable values out of the
statistics, never raising on them (SQLite is dynamically typed: 'abc' can sit in a REAL column).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bnlab.checkpoint import CONFIG, RUN_CHECKPOINTS, WEIGHTS
from bnlab.experiments.results import DEFAULT_PRIMARY, FIELDS, RESULT_COLUMNS, RESULT_FIELDS

# the run's identity and bookkeeping; its results are the columns of bnlab.experiments.results
_RUN_COLUMNS = """
    run_id TEXT PRIMARY KEY,
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    started REAL, finished REAL, seconds REAL,
    error TEXT, environment TEXT, engine TEXT,
    step_loss TEXT, artefacts TEXT"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs ({_RUN_COLUMNS},
    {", ".join(f"{f.name} {f.sql}" for f in RESULT_FIELDS)}
);
CREATE TABLE IF NOT EXISTS probes (
    run_id TEXT NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL, layer TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS probes_run ON probes (run_id);
CREATE TABLE IF NOT EXISTS shift (
    run_id TEXT NOT NULL REFERENCES runs(run_id), corruption TEXT NOT NULL, severity INTEGER NOT NULL,
    bn_stats TEXT NOT NULL, test_batch INTEGER, accuracy REAL, loss REAL, note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS shift_run ON shift (run_id);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL,
    train_loss REAL, train_accuracy REAL, val_loss REAL, val_accuracy REAL, seconds REAL, steps INTEGER,
    PRIMARY KEY (run_id, epoch)
);
"""

FINISHED = ("done", "diverged", "failed")
RESULT_FIELD_SQL = {f.name: f.sql for f in RESULT_FIELDS}
BUSY_TIMEOUT = 60.0  # seconds a writer waits for a store another process holds locked
REQUIRED_TABLES = {"meta": ("key", "value"),
                   "runs": ("run_id", "variant", "seed", "config_hash", "config", "status"),
                   "epochs": ("run_id", "epoch")}
# added by a later bnlab: older stores lack them (no probes, no shift rows); writers create them
LATER_TABLES = ("probes", "shift")
SHIFT_COLUMNS = ("corruption", "severity", "bn_stats", "test_batch", "accuracy", "loss", "note")
# an epoch row's numbers (all but run_id): what record writes and the audit checks
EPOCH_NUMBERS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "steps")


class StoreError(RuntimeError):
    """A run store that is corrupt, damaged, locked, or belongs to another experiment."""


RUNS_DIR = "runs"  # an experiment folder's run folders: RUNS_DIR/<run_id>
# the status a damaged run whose stored results cannot be used reads with (bnlab.experiments.read; never stored)
DAMAGED = "damaged"
# the row's artefacts key naming each checkpoint a run saved (None: it saved none, e.g. a diverged run)
ARTEFACT_CHECKPOINTS = {"checkpoint": RUN_CHECKPOINTS["best"], "checkpoint_final": RUN_CHECKPOINTS["final"]}


def is_number(value) -> bool:
    """An int or a float as SQLite returns them (text, bytes and bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Damage:
    """Why a finished run's row cannot be trusted. ``results``: its stored values cannot be used
    (the readers leave the run out of the statistics); ``files``: its run folder or a checkpoint
    it saved is gone (its stored values still stand). ``bnlab run`` redoes the run either way."""
    results: str | None = None
    files: str | None = None

    def __str__(self) -> str:
        return "; ".join(x for x in (self.results, self.files) if x)


MAX_CONFIG_CHARS = 1_000_000  # a stored run config longer than this is damage (a real one is a few KB)
MAX_CONFIG_DEPTH = 64  # and so is one nested deeper (a real one nests a few levels; json.loads recurses)


def parse_config(text) -> tuple[dict | None, str | None]:
    """(the run's config, None) or (None, why it is not a usable config): a JSON object with a ``model`` and a
    ``train`` object, at most MAX_CONFIG_CHARS long and MAX_CONFIG_DEPTH deep (checked before parsing, so a
    deeply nested text never reaches the recursive parser)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            return None, f"its config ({_shown(text)}) is not JSON text"
    if not isinstance(text, str):
        return None, f"its config ({_shown(text)}) is not JSON text"
    if len(text) > MAX_CONFIG_CHARS:
        return None, f"its config is {len(text)} characters long (at most {MAX_CONFIG_CHARS})"
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_CONFIG_DEPTH:
                    return None, f"its config nests deeper than {MAX_CONFIG_DEPTH} levels"
        elif ch in "]}":
            depth -= 1
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        return None, f"its config ({_shown(text)}) is not JSON"
    if not isinstance(config, dict):
        return None, f"its config ({_shown(text)}) is not a JSON object"
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("train"), dict):
        return None, f"its config ({_shown(text)}) has no model and train objects"
    return config, None


def identity_damage(row: dict, plan: dict | None = None) -> list[str]:
    """Why a run's row does not say which planned run it is (any status): its seed is not a whole number, its
    variant not text, its run id not "<variant>/seed-<seed>", its config not a usable config (``parse_config``);
    with the spec's ``plan`` (run id -> (variant, seed)), a run id the spec does not plan, or a variant or seed
    other than the plan's."""
    why = []
    run_id, variant, seed = row.get("run_id"), row.get("variant"), row.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        why.append(f"its seed is {_shown(seed)}, not a whole number")
    if not isinstance(variant, str):
        why.append(f"its variant is {_shown(variant)}, not text")
    planned = None if plan is None else plan.get(run_id)
    if plan is not None and planned is None:
        why.append(f"its variant {_shown(variant)} (run id {_shown(run_id)}) is not a run the spec plans")
    elif planned is not None and (variant, seed) != tuple(planned):
        why.append(f"its variant {_shown(variant)} and seed {_shown(seed)} are not those of its run id "
                   f"{_shown(run_id)} (variant {planned[0]!r}, seed {planned[1]!r})")
    elif plan is None and not why and run_id != f"{variant}/seed-{seed}":
        why.append(f"its run id {_shown(run_id)} is not that of its variant {_shown(variant)} and seed {seed}")
    if "config" in row:
        reason = parse_config(row["config"])[1]
        if reason:
            why.append(reason)
    return why


def damage(row: dict, run_dir: str | Path, primary: str = DEFAULT_PRIMARY, *, recorded: bool = True,
           epoch_text: tuple[str, ...] = (), plan: dict | None = None) -> Damage | None:
    """The damage of one stored run (None: none, or the run has not finished normally).

    Identity (any status, ``identity_damage``): the row says which planned run it is (with ``plan``, the
    spec's run id -> (variant, seed): one the spec plans); its config is a usable JSON object.
    Audited otherwise: rows with status 'done' or 'diverged' ('failed' and unfinished runs have no results
    by design). Results: every numeric result field holds a number or NULL, within the field's valid range
    (``ResultField.out_of_range``: accuracies in [0, 1], losses and seconds non-negative, counts whole, at
    most the run's planned budget (its config's ``epochs`` / ``max_steps``) and at most where the run
    stopped); the ``primary`` result
    is finite where present, and present in a 'done' row when every such run records it (an
    outcome that is not a precise-statistics field: those are absent for models without BN; a time
    to target is absent when censored; a diverged run has no final results); the run's epoch rows
    hold numbers or NULL (``epoch_text``: the columns that do not, as ``RunStore.audit`` finds
    them). ``recorded``: False for a store from an older bnlab whose runs table lacks the primary's
    column. Files: the run folder ``run_dir`` exists, and so does each checkpoint the row's
    ``artefacts`` names, with its config.json and weights (a diverged run saved no final model, and
    its artefacts say so; a store from before artefacts names none). Identity and result damage are
    ``Damage.results`` (the readers leave the run out of the statistics)."""
    results = identity_damage(row, plan)
    if row.get("status") not in ("done", "diverged"):
        return Damage("; ".join(results)) if results else None
    f = FIELDS[primary]
    value = row.get(f.name)
    train = (parse_config(row["config"])[0] or {}).get("train", {}) if "config" in row else {}
    for g in RESULT_FIELDS:
        v = row.get(g.name)
        if v is None or not g.numeric:
            continue
        if not is_number(v):
            results.append(f"{g.name} holds {_shown(v)}, not a number")
            continue
        if g.name == primary and not math.isfinite(v):
            continue  # said below
        if why := g.out_of_range(v):
            results.append(f"{g.name} is {_shown(v)}: {why}")
        elif g.budget and is_number(cap := train.get(g.budget)) and v > cap:
            results.append(f"{g.name} is {_shown(v)}: beyond its planned {g.budget} ({cap})")
        elif g.at_most and is_number(cap := row.get(g.at_most)) and v > cap:
            results.append(f"{g.name} is {_shown(v)}: beyond its {g.at_most} ({cap})")
    if is_number(value) and not math.isfinite(value):
        results.append(f"its primary result ({f.name}) is {value}, not a finite number")
    elif (value is None and recorded and row["status"] == "done" and f.kind == "outcome"
          and f.moving_average is None):
        results.append(f"its primary result ({f.name}) is missing")
    if epoch_text:
        results.append(f"its epoch rows hold text in number column(s) {', '.join(epoch_text)}")
    found = Damage("; ".join(results) or None, _file_damage(row, Path(run_dir)))
    return found if found.results or found.files else None


def _file_damage(row: dict, run_dir: Path) -> str | None:
    where = f"{RUNS_DIR}/{row.get('run_id')}"
    if not run_dir.is_dir():
        return f"its run folder {where} is gone"
    text = row.get("artefacts")
    if text is None:  # a store from before artefacts: nothing names a checkpoint
        return None
    try:
        artefacts = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError:
        artefacts = None
    if not isinstance(artefacts, dict):
        return f"its stored artefacts ({_shown(text)}) are not a JSON object naming its checkpoints"
    for key, sub in ARTEFACT_CHECKPOINTS.items():
        if not artefacts.get(key):
            continue
        folder = run_dir / sub
        if not folder.is_dir():
            return f"its checkpoint folder {where}/{sub} is gone"
        absent = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
        if absent:
            return f"its checkpoint {where}/{sub} has no {' and no '.join(absent)}"
    return None


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RunStore:
    """One experiment's store. ``readonly=True`` (report, compare, notebooks) opens the file with
    SQLite's ``mode=ro``: it never creates, alters or writes anything, and reads while a runner
    writes (WAL). A writer creates the schema only in a new, empty database; a store missing one
    of its tables is refused by both, never recreated (an empty ``runs`` would make ``bnlab run``
    redo every finished run). Every failure to open is a StoreError with the reason."""

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout: float | None = None):
        self.path = Path(path)
        timeout = BUSY_TIMEOUT if timeout is None else timeout
        self.readonly = readonly
        self._absent_columns: list[str] = []  # result columns an older store lacks (readers: None)
        self._has_probes = True
        self._has_shift = True
        try:
            if readonly:
                self.db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout,
                                          isolation_level=None)
            else:
                self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the run store ({e})") from e
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if not readonly:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = FULL")
            ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"{self.path}: the run store is corrupt (SQLite's quick_check: {ok})")
            self._check_schema()
        except sqlite3.Error as e:
            self.db.close()
            if "locked" in str(e) or "busy" in str(e):
                raise StoreError(f"{self.path}: the run store is locked by another process (waited {timeout:g} s; "
                                 f"{e}); try again when it is done") from e
            raise StoreError(f"{self.path}: not a readable bnlab run store ({e})") from e
        except StoreError:
            self.db.close()
            raise

    def _check_schema(self) -> None:
        """Refuse a damaged or foreign schema; create it in a new database (writers only)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            if self.readonly:
                raise StoreError(f"{self.path}: an empty database, not a bnlab run store (it has no tables)")
            self.db.executescript(SCHEMA)
            return
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing and not tables & {*REQUIRED_TABLES, *LATER_TABLES}:
            raise StoreError(f"{self.path}: not a bnlab run store (its tables: {', '.join(sorted(tables))})")
        if missing:
            raise StoreError(f"{self.path}: the run store is damaged: table(s) {', '.join(missing)} missing. bnlab "
                             "does not recreate them (an empty 'runs' would make 'bnlab run' redo every finished "
                             "run); restore the file from a backup, or run the experiment into a new folder (--out)")
        for table, needed in REQUIRED_TABLES.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if absent := [c for c in needed if c not in have]:
                raise StoreError(f"{self.path}: not the schema of a bnlab run store: table {table} has no column(s) "
                                 f"{', '.join(absent)}")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        self._absent_columns = [f.name for f in RESULT_FIELDS if f.name not in have]
        self._has_probes = "probes" in tables
        self._has_shift = "shift" in tables
        if not self.readonly:
            self.db.executescript(SCHEMA)  # IF NOT EXISTS: only the tables of later versions
            self._add_missing_columns()
            self._absent_columns, self._has_probes, self._has_shift = [], True, True

    def _add_missing_columns(self) -> None:
        """A store written by an older bnlab lacks the newer result columns: add them (NULL for its runs)."""
        for name in self._absent_columns:
            try:
                self.db.execute(f"ALTER TABLE runs ADD COLUMN {name} {RESULT_FIELD_SQL[name]}")
            except sqlite3.OperationalError as e:  # another process added it just now
                if "duplicate column" not in str(e):
                    raise

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # ---- experiment identity
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    # ---- runs
    def add_runs(self, plans) -> int:
        """Insert plans not yet stored; return how many were new."""
        with self.transaction() as db:
            before = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO runs (run_id, variant, seed, config_hash, config, status) "
                "VALUES (?, ?, ?, ?, ?, 'pending')",
                [(p.run_id, p.variant, p.seed, p.config_hash, json.dumps({"model": p.model, "train": p.train}))
                 for p in plans])
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] - before

    def reset_interrupted(self, retry_failed: bool = False) -> int:
        """Runs left 'running' by a killed runner (and failed ones, if asked) go back to pending."""
        states = ("running", "failed") if retry_failed else ("running",)
        with self.transaction() as db:
            cur = db.execute(f"UPDATE runs SET status = 'pending', started = NULL, error = NULL "
                             f"WHERE status IN ({','.join('?' * len(states))})", states)
            return cur.rowcount

    def mark_running(self, run_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET status = 'running', started = ? WHERE run_id = ?", (time.time(), run_id))

    def record(self, run_id: str, result: dict) -> None:
        """A finished run's row, epochs, probes and shift rows, atomically."""
        hist = result.get("history") or {}
        epochs = hist.get("epochs", [])
        values = {k: result.get(k) for k in RESULT_COLUMNS}
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, seconds = ?, error = ?, environment = ?, engine = ?, "
                + ", ".join(f"{k} = ?" for k in RESULT_COLUMNS) + ", step_loss = ?, artefacts = ? WHERE run_id = ?",
                (result["status"], time.time(), result.get("seconds"), result.get("error"),
                 json.dumps(result.get("environment", {})), hist.get("engine"), *values.values(),
                 json.dumps(hist.get("step_loss", [])), json.dumps(result.get("artefacts", {})), run_id))
            db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM probes WHERE run_id = ?", (run_id,))
            db.executemany("INSERT INTO probes (run_id, step, layer, metric, value) VALUES (?, ?, ?, ?, ?)",
                           [(run_id, *row) for row in hist.get("probes", [])])
            db.execute("DELETE FROM shift WHERE run_id = ?", (run_id,))
            db.executemany(f"INSERT INTO shift (run_id, {', '.join(SHIFT_COLUMNS)}) VALUES (?{', ?' * len(SHIFT_COLUMNS)})",
                           [(run_id, *(r.get(c) for c in SHIFT_COLUMNS[:-1]), r.get("note") or "")
                            for r in result.get("shift", [])])
            db.executemany(f"INSERT INTO epochs (run_id, {', '.join(EPOCH_NUMBERS)}) VALUES (?{', ?' * len(EPOCH_NUMBERS)})",
                           [(run_id, *(e[c] for c in EPOCH_NUMBERS)) for e in epochs])

    def audit(self, primary: str = DEFAULT_PRIMARY, run_ids=None, plan: dict | None = None) -> dict[str, Damage]:
        """run id -> its ``damage``, for every damaged run (of ``run_ids``, if given; ``plan``: the spec's run
        id -> (variant, seed), see ``identity_damage``); the run folders are those of the folder holding this
        store."""
        wanted = None if run_ids is None else set(run_ids)
        recorded = primary not in self._absent_columns
        text = {}  # run id -> its epoch columns holding text (SQLite is dynamically typed)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(epochs)")}
        columns = [c for c in EPOCH_NUMBERS if c in have]
        for r in self.db.execute("SELECT run_id, " + ", ".join(
                f"SUM(typeof({c}) NOT IN ('integer', 'real', 'null'))" for c in columns)
                + " FROM epochs GROUP BY run_id"):
            if bad := tuple(c for c, k in zip(columns, tuple(r)[1:]) if k):
                text[r[0]] = bad
        out = {}
        for row in self.runs():
            if wanted is not None and row["run_id"] not in wanted:
                continue
            found = damage(row, self.path.parent / RUNS_DIR / str(row["run_id"]), primary, recorded=recorded,
                           epoch_text=text.get(row["run_id"], ()), plan=plan)
            if found is not None:
                out[row["run_id"]] = found
        return out

    def reset_damaged(self, run_ids, plans: dict | None = None) -> int:
        """Damaged runs go back to pending, atomically: their results, artefacts and dependent rows
        (epochs, probes, shift) are removed, so nothing of the damaged attempt is left to read; the
        other runs' rows are untouched. ``plans`` (run id -> its ``RunPlan``): a run's identity (variant,
        seed, config) is set back to its plan's, so a row damaged there is redone as the run it stands for. Their run folders are made ready by the rerun itself
        (``bnlab.train.single``: a run without a resume state starts from zero, removing the old
        checkpoints and history)."""
        ids = list(run_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        cleared = ["started", "finished", "seconds", "error", "environment", "engine", "step_loss", "artefacts",
                   *RESULT_COLUMNS]
        with self.transaction() as db:
            n = db.execute(f"UPDATE runs SET status = 'pending', {', '.join(f'{c} = NULL' for c in cleared)} "
                           f"WHERE run_id IN ({marks})", ids).rowcount
            for p in (plans[i] for i in ids if plans and i in plans):
                db.execute("UPDATE runs SET variant = ?, seed = ?, config_hash = ?, config = ? WHERE run_id = ?",
                           (p.variant, p.seed, p.config_hash, json.dumps({"model": p.model, "train": p.train}),
                            p.run_id))
            for table in ("epochs", "probes", "shift"):
                db.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", ids)
            return n

    def runs(self, status: tuple[str, ...] | None = None) -> list[dict]:
        q = "SELECT * FROM runs"
        args: tuple = ()
        if status:
            q += f" WHERE status IN ({','.join('?' * len(status))})"
            args = status
        rows = [dict(r) for r in self.db.execute(q + " ORDER BY variant, seed", args)]
        for r in rows:  # an older store read as it is: its missing result columns are None
            r.update({c: None for c in self._absent_columns})
        return rows

    def epochs(self, run_id: str | None = None) -> list[dict]:
        if run_id is None:
            return [dict(r) for r in self.db.execute("SELECT * FROM epochs ORDER BY run_id, epoch")]
        return [dict(r) for r in self.db.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))]

    def probes(self) -> list[dict]:
        if not self._has_probes:
            return []
        return [dict(r) for r in self.db.execute("SELECT * FROM probes ORDER BY run_id, step")]

    def shift_rows(self) -> list[dict]:
        """Every run's distribution-shift rows (run_id and ``SHIFT_COLUMNS``); [] for a store from before them."""
        if not self._has_shift:
            return []
        return [dict(r) for r in self.db.execute(f"SELECT run_id, {', '.join(SHIFT_COLUMNS)} FROM shift ORDER BY rowid")]
