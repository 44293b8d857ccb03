"""The training engine: ``fit`` with a fused MLP step, optimisers, History, progress."""

from bnlab.train.engine import ENGINES, Diverged, evaluate, fit, resolve_device
from bnlab.train.fused import FusedMLPStep, unsupported_layers
from bnlab.train.history import EpochRecord, History
from bnlab.train.optim import OPTIMIZERS, make_optimizer

__all__ = ["ENGINES", "OPTIMIZERS", "Diverged", "EpochRecord", "FusedMLPStep", "History", "evaluate", "fit",
           "make_optimizer", "resolve_device", "unsupported_layers"]
