"""``bnlab.nn.BatchNorm``: one BN module for (N, C), (N, C, L) and (N, C, H, W) inputs,
under the torch or the keras convention, with our own explicit backward.

State-dict keys are those of ``torch.nn.BatchNorm*d`` (weight, bias, running_mean,
running_var, num_batches_tracked) under both conventions, so weights move both ways.
Trainable parameters (weight = gamma, bias = beta) are ``nn.Parameter``; running statistics
are buffers, which is how a Keras-style summary tells trainable from non-trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.nn.functional import batch_norm, resolve_defaults

_RANK_NAMES = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


class BatchNorm(nn.Module):
    r"""Batch normalization over the channel axis.

    Training:  y = γ·(x - μ_B)/sqrt(σ²_B + eps) + β  with the batch mean μ_B and the BIASED
    batch variance σ²_B; the running statistics are then updated.
    Eval:      y = γ·(x - running_mean)/sqrt(running_var + eps) + β.

    Conventions (the part that trips people up):

    * ``convention="torch"`` (default): eps=1e-5, momentum=0.1 is the weight of the NEW batch
      statistic, running_var stores the UNBIASED variance m/(m-1)·σ²_B, momentum=None gives
      the cumulative average. Identical to ``torch.nn.BatchNorm1d/2d``.
    * ``convention="keras"``: eps=1e-3, momentum=0.99 is the weight of the OLD moving
      statistic, running_var (Keras's moving_variance) stores the BIASED σ²_B. Identical to
      Keras 3 ``BatchNormalization``; ``center``/``scale`` switch β/γ off. Keras puts channels
      last: pass ``axis=-1`` for NHWC data.

    Args:
        num_features: C, the size of the channel axis.
        eps, momentum: default to the convention's values.
        affine: learnable γ and β (torch's switch; sets both ``scale`` and ``center``).
        center, scale: learnable β / γ individually (Keras's switches).
        track_running_stats: keep running statistics; without them eval uses batch statistics.
        axis: the channel axis (1 for NC..., -1 for channels-last).
        check_finite: raise on NaN/inf batch statistics instead of silently training on them.

    float16/bfloat16 inputs: statistics are accumulated in float32 (as Keras does), the output has the
    input's dtype, running statistics keep the layer's dtype. The running-statistics update is
    ``bnlab.conventions.running_update``, as in every bnlab engine.
    """

    _allowed_ranks: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, *, convention: str = "torch", eps: float | None = None,
                 momentum: float | None | str = "default", affine: bool = True,
                 center: bool | None = None, scale: bool | None = None,
                 track_running_stats: bool = True, axis: int = 1, check_finite: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int (got {num_features!r})")
        conv, eps, momentum = resolve_defaults(convention, eps, momentum)
        self.num_features = num_features
        self.convention = conv.name
        self.eps = eps
        self.momentum = momentum
        self.axis = axis
        self.check_finite = check_finite
        self.track_running_stats = track_running_stats
        self.scale = affine if scale is None else scale
        self.center = affine if center is None else center
        self.affine = self.scale and self.center
        factory = {"device": device, "dtype": dtype}
        # absent gamma/beta are registered as None, as torch does, so state_dict keys match
        self.register_parameter(
            "weight", nn.Parameter(torch.ones(num_features, **factory)) if self.scale else None)
        self.register_parameter(
            "bias", nn.Parameter(torch.zeros(num_features, **factory)) if self.center else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    # Keras names for the same tensors
    @property
    def gamma(self) -> torch.Tensor | None:
        return self.weight

    @property
    def beta(self) -> torch.Tensor | None:
        return self.bias

    @property
    def moving_mean(self) -> torch.Tensor | None:
        return self.running_mean

    @property
    def moving_variance(self) -> torch.Tensor | None:
        return self.running_var

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in self._allowed_ranks:
            allowed = " or ".join(f"{r}D {_RANK_NAMES[r]}" for r in self._allowed_ranks)
            raise ValueError(f"expected {allowed} input (got {x.dim()}D input of shape {tuple(x.shape)})")
        c = x.shape[self.axis]
        if c != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis {self.axis} "
                f"(got {c}, input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input (got dtype {x.dtype})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            training=self.training or not self.track_running_stats,
            momentum=self.momentum, eps=self.eps, axis=self.axis, convention=self.convention,
            num_batches_tracked=self.num_batches_tracked if self.training else None,
            check_finite=self.check_finite,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # state dicts saved before num_batches_tracked existed (torch < 0.4.1) lack it: as torch does,
        # start it at 0 instead of failing a strict load
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        mom = "None (cumulative)" if self.momentum is None else self.momentum
        return (f"{self.num_features}, convention={self.convention}, eps={self.eps}, momentum={mom}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, axis={self.axis}")


class BatchNorm1d(BatchNorm):
    """``BatchNorm`` that accepts only (N, C) or (N, C, L), like ``torch.nn.BatchNorm1d``."""

    _allowed_ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """``BatchNorm`` that accepts only (N, C, H, W), like ``torch.nn.BatchNorm2d``."""

    _allowed_ranks = (4,)
