"""The SQLite run store of one experiment folder.

Durability: WAL journal with synchronous=FULL, and each run's results (its row, its epochs)
written in one transaction, so Ctrl-C, kill -9 or power loss can lose only runs still in
progress, never a committed one, and never leave half a run. Readers (report, compare) may read
while a runner writes; a busy timeout makes concurrent writers wait instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from bnlab.experiments.results import RESULT_COLUMNS, RESULT_FIELDS

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
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL,
    train_loss REAL, train_accuracy REAL, val_loss REAL, val_accuracy REAL, seconds REAL, steps INTEGER,
    PRIMARY KEY (run_id, epoch)
);
"""

FINISHED = ("done", "diverged", "failed")


class StoreError(RuntimeError):
    """A run store that is corrupt or belongs to another experiment."""


class RunStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 60000")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"{self.path}: the run store is corrupt ({ok})")
            self.db.executescript(SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a readable bnlab run store ({e})") from e

    def _add_missing_columns(self) -> None:
        """A store written by an older bnlab lacks the newer result columns: add them (NULL for its runs)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for f in RESULT_FIELDS:
            if f.name not in have:
                try:
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {f.name} {f.sql}")
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
        """A finished run's row and epochs, atomically."""
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
            db.executemany(
                "INSERT INTO epochs (run_id, epoch, train_loss, train_accuracy, val_loss, val_accuracy, seconds, steps) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, e["epoch"], e["train_loss"], e["train_accuracy"], e["val_loss"], e["val_accuracy"],
                  e["seconds"], e["steps"]) for e in epochs])

    def runs(self, status: tuple[str, ...] | None = None) -> list[dict]:
        q = "SELECT * FROM runs"
        args: tuple = ()
        if status:
            q += f" WHERE status IN ({','.join('?' * len(status))})"
            args = status
        return [dict(r) for r in self.db.execute(q + " ORDER BY variant, seed", args)]

    def epochs(self, run_id: str | None = None) -> list[dict]:
        if run_id is None:
            return [dict(r) for r in self.db.execute("SELECT * FROM epochs ORDER BY run_id, epoch")]
        return [dict(r) for r in self.db.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))]

    def probes(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM probes ORDER BY run_id, step")]
