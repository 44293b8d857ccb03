"""Torch modules and autograd Functions with explicit, readable backward passes."""

from bnlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d
from bnlab.nn.functional import BatchNormFunction, batch_norm

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNormFunction", "batch_norm"]
