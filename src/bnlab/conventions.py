"""The BN conventions of each framework, as data (no torch import).

The table that trips people up (see docs/conventions.md):

=================  =======================  ========================
                   torch ``BatchNorm*d``    Keras 3 ``BatchNormalization``
=================  =======================  ========================
eps default        1e-5                     1e-3
momentum default   0.1                      0.99
momentum weighs    the NEW batch statistic  the OLD moving statistic
running var holds  unbiased, m/(m-1)·σ²_B   biased σ²_B
momentum=None      cumulative average       not allowed
=================  =======================  ========================

Both normalise the training batch with the *biased* batch variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConventionName = Literal["torch", "keras"]


@dataclass(frozen=True)
class Convention:
    name: str
    eps: float
    momentum: float
    momentum_weighs_new: bool  # torch: new = (1-m)·old + m·batch; keras: new = m·old + (1-m)·batch
    running_var_unbiased: bool  # torch stores m/(m-1)·σ²_B, keras stores σ²_B
    allows_cumulative: bool  # momentum=None -> cumulative moving average (torch only)


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention("torch", eps=1e-5, momentum=0.1, momentum_weighs_new=True,
                        running_var_unbiased=True, allows_cumulative=True),
    "keras": Convention("keras", eps=1e-3, momentum=0.99, momentum_weighs_new=False,
                        running_var_unbiased=False, allows_cumulative=False),
}


def get_convention(name: str) -> Convention:
    """Return the named convention or raise a ValueError that lists the allowed names."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown BN convention {name!r}: expected one of {sorted(CONVENTIONS)}"
        ) from None


def check_momentum(convention: Convention, momentum: float | None) -> None:
    """Reject momentum values the convention cannot represent."""
    if momentum is None:
        if not convention.allows_cumulative:
            raise ValueError(
                f"momentum=None (cumulative average) is a torch convention; the {convention.name} "
                f"convention needs a number in [0, 1] (default {convention.momentum})"
            )
        return
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None (got {momentum!r})")


@dataclass(frozen=True)
class RunningUpdate:
    """How one batch enters the running statistics (see ``running_update``)."""

    factor: float  # f, the weight of the NEW batch statistic: running = (1 - f)·running + f·batch
    var_correction: float  # multiplies the BIASED batch variance before blending: count/(count-1) or 1


def running_update(convention: Convention, momentum: float | None, num_batches_tracked: int,
                   count: int) -> RunningUpdate:
    """THE running-statistics rule of bnlab; every engine (reference, layers, fused, native, precise BN) uses it.

    convention, momentum: the layer's; momentum=None is torch's cumulative average (factor 1/n).
    num_batches_tracked: n, counting the current batch already (torch increments it first).
    count: values per channel in the batch: N after a Linear, N·H·W after a Conv (not the images!).

    The blend must be written ``(1 - f)·old + f·new``: with f exactly 1 (momentum=None's first batch,
    torch momentum 1, keras momentum 0) it stores ``new`` exactly, where ``old + f·(new - old)`` loses a
    tiny variance (1e-9) against an old value of 1 in float32.
    """
    check_momentum(convention, momentum)
    if momentum is None:  # torch: cumulative moving average
        if num_batches_tracked < 1:
            raise ValueError(f"num_batches_tracked counts the current batch: expected >= 1 (got {num_batches_tracked})")
        f = 1.0 / num_batches_tracked
    else:
        f = float(momentum) if convention.momentum_weighs_new else 1.0 - float(momentum)
    if convention.running_var_unbiased:
        if count < 2:
            raise ValueError(f"the unbiased variance needs at least 2 values per channel (got {count})")
        correction = count / (count - 1)
    else:
        correction = 1.0
    return RunningUpdate(f, correction)

