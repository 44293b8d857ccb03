"""BN at inference: precise statistics, folding, export, predict and serving."""

from bnlab.deploy.describe import describe
from bnlab.deploy.fold import FoldEntry, FoldReport, fold
from bnlab.deploy.precise import recalibrate
from bnlab.deploy.predict import InputError, Prediction, as_batch, predict, read_input
from bnlab.deploy.testtime import BN_STATS, evaluate_bn, for_bn_stats, with_batch_statistics

__all__ = ["BN_STATS", "evaluate_bn", "for_bn_stats", "with_batch_statistics", "FoldEntry", "FoldReport", "InputError", "Prediction", "as_batch", "describe", "fold", "predict",
           "read_input", "recalibrate"]
