"""NumPy reference implementations with explicit backward passes (no torch import)."""

from bnlab.reference.batchnorm import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_backward_staged,
    batch_norm_forward,
    batch_norm_inference,
    update_running_stats,
)
from bnlab.reference.gradcheck import check_batch_norm_gradients, numerical_gradient, relative_error

__all__ = [
    "BatchNormCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_staged",
    "batch_norm_inference",
    "update_running_stats",
    "numerical_gradient",
    "relative_error",
    "check_batch_norm_gradients",
]
