"""NumPy reference implementations with explicit backward passes (no torch import)."""

from bnlab.reference.batchnorm import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_backward_staged,
    batch_norm_forward,
    batch_norm_inference,
    update_running_stats,
)
from bnlab.reference.gradcheck import (check_batch_norm_gradients, check_gradients, numerical_gradient,
                                      relative_error)
from bnlab.reference.norms import (batch_renorm_backward, batch_renorm_forward, ghost_batch_norm_backward,
                                   ghost_batch_norm_forward, group_norm_backward, group_norm_forward,
                                   instance_norm_backward, instance_norm_forward, layer_norm_backward,
                                   layer_norm_forward, normalize_backward, normalize_forward, weight_norm_backward,
                                   weight_norm_forward)

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
    "check_gradients",
    "layer_norm_forward", "layer_norm_backward", "group_norm_forward", "group_norm_backward",
    "instance_norm_forward", "instance_norm_backward", "batch_renorm_forward", "batch_renorm_backward",
    "ghost_batch_norm_forward", "ghost_batch_norm_backward", "weight_norm_forward", "weight_norm_backward",
    "normalize_forward", "normalize_backward",
]
