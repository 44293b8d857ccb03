"""The result of one run: a typed record defined once.

The store's result columns, the statistics' metrics and the report's table all derive from
``RESULT_FIELDS``; adding a result means adding one ``ResultField`` here (and computing it in the
runner), nothing else.

Kinds:
  outcome         a number per finished run, compared between variants (accuracy, loss)
  time_to_target  when validation accuracy first reached the target; censored (None) for a run
                  that stopped before reaching it, at the time in ``censor_at`` (its budget, or where
                  it diverged)
  info            recorded and shown, never tested (seconds per epoch, the stopping reason)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["outcome", "time_to_target", "info"]


@dataclass(frozen=True)
class ResultField:
    name: str  # column name in the store, key in a run's result dict
    label: str  # what a reader sees
    sql: str  # SQLite column type
    kind: Kind
    higher_is_better: bool | None = None  # None: not compared
    censor_at: str | None = None  # time_to_target: the field holding where the run stopped
    digits: int = 4  # shown with this many decimals


RESULT_FIELDS: tuple[ResultField, ...] = (
    ResultField("final_val_accuracy", "final validation accuracy", "REAL", "outcome", True),
    ResultField("best_val_accuracy", "best validation accuracy", "REAL", "outcome", True),
    ResultField("final_val_loss", "final validation loss", "REAL", "outcome", False),
    ResultField("best_val_loss", "best validation loss", "REAL", "outcome", False),
    # the model at the end of training
    ResultField("test_accuracy", "test accuracy (final model)", "REAL", "outcome", True),
    ResultField("test_loss", "test loss (final model)", "REAL", "outcome", False),
    # the best-validation model: the one a run saves and predict / serve / export use by default
    ResultField("best_epoch", "best epoch", "INTEGER", "info", digits=0),
    ResultField("best_test_accuracy", "test accuracy (best model)", "REAL", "outcome", True),
    ResultField("best_test_loss", "test loss (best model)", "REAL", "outcome", False),
    # the final model with precise BN statistics (bnlab.deploy.recalibrate) instead of the moving
    # averages; None for models without batch-statistics normalization
    ResultField("precise_val_accuracy", "validation accuracy, precise BN statistics", "REAL", "outcome", True),
    ResultField("precise_test_accuracy", "test accuracy, precise BN statistics", "REAL", "outcome", True),
    ResultField("epochs_to_target", "epochs to target", "INTEGER", "time_to_target", False, "epochs_run", 1),
    ResultField("steps_to_target", "steps to target", "INTEGER", "time_to_target", False, "steps_run", 0),
    ResultField("seconds_to_target", "seconds to target", "REAL", "time_to_target", False, "train_seconds", 2),
    # where the run stopped (the censoring times of the time-to-target fields)
    ResultField("epochs_run", "epochs run", "INTEGER", "info", digits=0),
    ResultField("steps_run", "steps run", "INTEGER", "info", digits=0),
    ResultField("train_seconds", "training seconds", "REAL", "info", digits=1),
    ResultField("mean_epoch_seconds", "seconds per epoch", "REAL", "info", False, digits=2),
    ResultField("stopped", "stopped by", "TEXT", "info"),
)

FIELDS: dict[str, ResultField] = {f.name: f for f in RESULT_FIELDS}
RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS)
