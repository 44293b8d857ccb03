"""The tiny experiment specs several test files run (a few seconds on synthetic data)."""

# an experiment as TOML text: one variant, one seed, one epoch
TINY_TOML = '''name = "tiny"
seeds = 1
[data]
dataset = "synthetic"
options = { n_train = 60, n_test = 20, features = 4 }
[train]
epochs = 1
[variants.a]
model = { kind = "mlp", hidden = [8], bn = "before" }
'''

# an experiment as a dict, for parse_experiment / run_experiment
TINY = {"name": "tiny", "seeds": 1,
        "data": {"dataset": "synthetic", "validation": 0.25,
                 "options": {"n_train": 60, "n_test": 20, "features": 4, "classes": 2}},
        "model": {"kind": "mlp", "input_shape": [4], "num_classes": 2, "hidden": [4], "bn": "before"},
        "train": {"lr": 0.05, "epochs": 1, "batch_size": 16},
        "variants": {"bn": {}}}

# two variants x two seeds, a few epochs: runs that test comparisons, resumption and backends
TWO_VARIANTS = {
    "name": "tiny", "seeds": 2, "target_accuracy": 0.5,
    "data": {"dataset": "synthetic", "validation": 0.25,
             "options": {"n_train": 120, "n_test": 40, "features": 6, "classes": 2}},
    "model": {"kind": "mlp", "input_shape": [6], "num_classes": 2, "hidden": [8]},
    "train": {"lr": 0.05, "epochs": 2, "batch_size": 16},
    "variants": {"no-bn": {"model": {"bn": "none"}}, "bn": {"model": {"bn": "before"}}},
}


def harness_toml(name: str, *, seeds: int, n_train: int, hidden: int, batch_size: int, epochs: int) -> str:
    """A no-BN / BN experiment on synthetic data sized to take seconds per epoch (interrupt tests)."""
    return f"""
name = "{name}"
seeds = {seeds}
[data]
dataset = "synthetic"
validation = 0.2
options = {{ n_train = {n_train}, n_test = 200, features = 32, classes = 4 }}
[model]
kind = "mlp"
input_shape = [32]
num_classes = 4
hidden = [{hidden}, {hidden}]
[train]
lr = 0.05
batch_size = {batch_size}
epochs = {epochs}
[variants.no-bn]
model = {{ bn = "none" }}
[variants.bn]
model = {{ bn = "before" }}
"""


EPOCH_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "steps"]


def store_rows(out, columns) -> dict[str, dict]:
    """run id -> ``columns`` of its row and its epoch rows, read from the store directly (read-only)."""
    import sqlite3

    con = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        runs = {r["run_id"]: {**{c: r[c] for c in columns}, "epochs": []} for r in con.execute("SELECT * FROM runs")}
        for e in con.execute(f"SELECT run_id, {', '.join(EPOCH_COLUMNS)} FROM epochs ORDER BY run_id, epoch"):
            runs[e["run_id"]]["epochs"].append(tuple(e[c] for c in EPOCH_COLUMNS))
    finally:
        con.close()
    return runs


def command_env() -> dict:
    """The environment of a bnlab command a test runs as a user would. OMP_WAIT_POLICY: on a busy 2-core
    machine, OpenMP's spin-waiting makes 2-thread runs ~20x slower (measured); passive waiting changes
    no result."""
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_WAIT_POLICY": "PASSIVE"}


def session_processes(sid: int) -> list[int]:
    """Live processes (zombies are dead) of session ``sid``, from /proc."""
    from pathlib import Path

    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids
