"""The result of one run: a typed record defined once.

The store's result columns, the statistics' metrics and the report's tables all derive from
``RESULT_FIELDS``; adding a result means adding one ``ResultField`` here (and computing it in the
runner), nothing else. The order of ``RESULT_FIELDS`` is the order of the report's columns.

Kinds:
  outcome         a number per finished run, compared between variants (accuracy, loss)
  time_to_target  when validation accuracy first reached the target; censored (None) for a run
                  that stopped before reaching it, at the time in ``censor_at`` (its budget, or where
                  it diverged)
  info            recorded and shown, never tested (seconds per epoch, the stopping reason)
"""

from __future__ import annotations

import math
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
    table: bool = False  # a column of the report's statistics table
    compact: bool = False  # also a column of the terminal's table (bnlab run / compare)
    explored: bool = False  # compared between variants as an exploratory metric (when not the primary)
    moving_average: str | None = None  # precise-statistics fields: the moving-average field they replace
    short: str = ""  # a column header where space is short (the terminal); default: label
    # the valid range of a stored value (bnlab.experiments.store.damage: out of range is damage)
    low: float | None = None  # at least this
    high: float | None = None  # at most this
    whole: bool = False  # a whole number (a count: epochs, steps)
    finite: bool = False  # a finite number (no inf / nan)
    budget: str | None = None  # at most the run's planned budget: this key of its config's train section
    at_most: str | None = None  # at most this other result field of the same run (where both are numbers)

    @property
    def header(self) -> str:
        return self.short or self.label

    @property
    def comparable(self) -> bool:
        """Can be a spec's primary metric and a comparison between variants."""
        return self.kind in ("outcome", "time_to_target") and self.higher_is_better is not None

    @property
    def numeric(self) -> bool:
        return self.sql in ("REAL", "INTEGER")

    def out_of_range(self, value: float) -> str | None:
        """Why a stored number is not a valid value of this field (None: it is); ``value`` is a number."""
        if self.finite and not math.isfinite(value):
            return "not a finite number"
        if self.whole and not (math.isfinite(value) and float(value).is_integer()):
            return "not a whole number"
        if self.low is not None and not value >= self.low:
            return f"below {self.low:g}"
        if self.high is not None and not value <= self.high:
            return f"above {self.high:g}"
        return None


def _f(name, label, sql, kind, higher=None, censor_at=None, digits=4, **show) -> ResultField:
    return ResultField(name, label, sql, kind, higher, censor_at, digits, **show)


# valid ranges: accuracies are fractions, losses non-negative, counts whole and within the planned budget,
# seconds non-negative and finite
_ACC = dict(low=0.0, high=1.0, finite=True)
_LOSS = dict(low=0.0)
_SECONDS = dict(low=0.0, finite=True)
_EPOCHS = dict(low=0.0, whole=True, budget="epochs")
_STEPS = dict(low=0.0, whole=True, budget="max_steps")

RESULT_FIELDS: tuple[ResultField, ...] = (
    _f("final_val_accuracy", "final validation accuracy", "REAL", "outcome", True,
       short="val acc", table=True, compact=True, explored=True, **_ACC),
    # the final model with precise BN statistics (bnlab.deploy.recalibrate) instead of the moving
    # averages; None for models without batch-statistics normalization
    _f("precise_val_accuracy", "validation accuracy, precise BN statistics", "REAL", "outcome", True,
       short="val acc, precise BN", table=True, compact=True, explored=True, moving_average="final_val_accuracy",
       **_ACC),
    _f("best_val_accuracy", "best validation accuracy", "REAL", "outcome", True, short="best val acc", table=True,
       **_ACC),
    _f("final_val_loss", "final validation loss", "REAL", "outcome", False,
       short="val loss", table=True, compact=True, explored=True, **_LOSS),
    _f("best_val_loss", "best validation loss", "REAL", "outcome", False, short="best val loss", **_LOSS),
    # the model at the end of training
    _f("test_accuracy", "test accuracy (final model)", "REAL", "outcome", True,
       short="test acc", table=True, explored=True, **_ACC),
    _f("precise_test_accuracy", "test accuracy, precise BN statistics", "REAL", "outcome", True,
       short="test acc, precise BN", table=True, explored=True, moving_average="test_accuracy", **_ACC),
    _f("test_loss", "test loss (final model)", "REAL", "outcome", False, short="test loss", **_LOSS),
    # the best-validation model: the one a run saves and predict / serve / export use by default
    _f("best_epoch", "best epoch", "INTEGER", "info", digits=1, **_EPOCHS, at_most="epochs_run"),
    _f("best_test_accuracy", "test accuracy (best model)", "REAL", "outcome", True,
       short="test acc, best model", table=True, explored=True, **_ACC),
    _f("best_test_loss", "test loss (best model)", "REAL", "outcome", False, short="test loss, best model",
       **_LOSS),
    _f("epochs_to_target", "epochs to target", "INTEGER", "time_to_target", False, "epochs_run", 0, table=True,
       **_EPOCHS, at_most="epochs_run"),
    _f("steps_to_target", "steps to target", "INTEGER", "time_to_target", False, "steps_run", 0,
       table=True, compact=True, explored=True, **_STEPS, at_most="steps_run"),
    _f("seconds_to_target", "seconds to target", "REAL", "time_to_target", False, "train_seconds", 1,
       table=True, explored=True, **_SECONDS),
    # where the run stopped (the censoring times of the time-to-target fields)
    _f("epochs_run", "epochs run", "INTEGER", "info", digits=1, short="epochs", **_EPOCHS),
    _f("steps_run", "steps run", "INTEGER", "info", digits=0, short="steps", **_STEPS),
    _f("train_seconds", "training seconds", "REAL", "info", digits=1, short="train s", **_SECONDS),
    _f("mean_epoch_seconds", "seconds per epoch", "REAL", "info", False, digits=2,
       short="s/epoch", table=True, compact=True, **_SECONDS),
    _f("stopped", "stopped by", "TEXT", "info"),
)

FIELDS: dict[str, ResultField] = {f.name: f for f in RESULT_FIELDS}
RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS)
TABLE_FIELDS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS if f.table)
COMPACT_FIELDS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS if f.compact)
EXPLORED_FIELDS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS if f.explored)
COMPARABLE_FIELDS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS if f.comparable)
DEFAULT_PRIMARY = "final_val_accuracy"

