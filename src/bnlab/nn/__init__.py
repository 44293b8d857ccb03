"""Torch modules and autograd Functions with explicit, readable backward passes."""

from bnlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d
from bnlab.nn.functional import BatchNormFunction, batch_norm
from bnlab.nn.syncbn import SyncBatchNorm, SyncBatchNormFunction
from bnlab.nn.norms import (BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormalizeFunction,
                            WeightNorm, WeightNormFunction)

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNormFunction", "BatchRenorm", "GhostBatchNorm", "GroupNorm",
           "InstanceNorm", "LayerNorm", "NormalizeFunction", "SyncBatchNorm", "SyncBatchNormFunction", "WeightNorm", "WeightNormFunction", "batch_norm"]
