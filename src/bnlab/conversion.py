"""``bnlab.convert``, ``bnlab.to_torch``, ``bnlab.from_torch``: swap the normalization layers of any nn.Module, and move bnlab's layers to torch's and back.

* ``convert(model, "group:32")`` replaces every normalization layer (torch's BatchNorm1d/2d/3d,
  SyncBatchNorm, GroupNorm, LayerNorm, InstanceNorm*d and bnlab's BatchNorm, BatchRenorm, GhostBatchNorm,
  GroupNorm, LayerNorm, InstanceNorm) by the layer a bnlab model spec's ``norm`` names: ``batch``,
  ``syncbatch``, ``renorm``, ``ghost:S``, ``group:G``, ``layer``, ``instance`` or ``none`` (an Identity), as
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for one kind. What transfers is kept: the
  affine parameters (gamma, beta) whenever both layers have one per channel, the running statistics
  and step count between batch-statistics norms (batch / syncbatch / renorm / ghost), eps unless given.
* ``to_torch(model)``: bnlab's BatchNorm / LayerNorm / GroupNorm / InstanceNorm become torch's
  ``BatchNorm1d/2d/3d`` / ``LayerNorm`` / ``GroupNorm``, so torch's own tools (which test
  ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)``) see them. A keras-convention BN gets torch's
  momentum 1 - m (Keras's momentum weighs the OLD statistic, torch's the NEW one); eval outputs are
  identical, and later training updates of the running variance follow torch's rule (unbiased) instead
  of Keras's (biased). ``from_torch(model, convention=...)`` goes the other way.

The input model is never modified: each function returns a converted deep copy, in the input's mode,
on its device, in its dtype.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from bnlab.models.build import make_norm
from bnlab.models.spec import NORM_PATTERN, NormSettings
from bnlab.nn import BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm

TORCH_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm)
BNLAB_NORMS = (BatchNorm, GroupNorm, LayerNorm)  # InstanceNorm is a GroupNorm; renorm and ghost are BatchNorms
NORM_LAYERS = TORCH_NORMS + BNLAB_NORMS


def is_norm_layer(m: nn.Module) -> bool:
    return isinstance(m, NORM_LAYERS)


def channels(m: nn.Module) -> int:
    """The channel (feature) count a normalization layer works on."""
    if isinstance(m, (nn.GroupNorm, GroupNorm)):
        return m.num_channels
    if isinstance(m, (nn.LayerNorm, LayerNorm)):
        return m.normalized_shape[0]
    return m.num_features


def _dense(m: nn.Module) -> bool:
    """Whether the layer normalises the LAST axis of (..., C) features (a LayerNorm over C), which a new
    LayerNorm keeps; every other layer works on axis 1 of (N, C) or (N, C, ...), where GroupNorm(1, C)
    (bnlab's "layer" for maps) is right for both ranks, so a BatchNorm1d over (N, C, L) stays correct."""
    return isinstance(m, (nn.LayerNorm, LayerNorm)) and len(m.normalized_shape) == 1


def _is_batch_stat(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, BatchNorm))


def _affine(m: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (w if isinstance(w, torch.Tensor) else None), (b if isinstance(b, torch.Tensor) else None)


def _copy_state(old: nn.Module, new: nn.Module) -> None:
    """Affine parameters (same shape only: a LayerNorm over [C, H, W] has no per-channel gamma) and,
    between batch-statistics norms, the running statistics and the step count."""
    with torch.no_grad():
        for a, b in zip(_affine(old), _affine(new)):
            if a is not None and b is not None and a.shape == b.shape:
                b.copy_(a)
        if _is_batch_stat(old) and _is_batch_stat(new) and old.running_mean is not None \
                and new.running_mean is not None:
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
            new.num_batches_tracked.copy_(old.num_batches_tracked)


def _placed(old: nn.Module, new: nn.Module) -> nn.Module:
    p = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
    if p is not None:
        new = new.to(device=p.device, dtype=p.dtype)
    return new.train(old.training)


def _swap(model: nn.Module, make) -> nn.Module:
    """A deep copy of ``model`` with each normalization layer m replaced by ``make(name, m)`` (None: kept)."""
    new = copy.deepcopy(model)
    if is_norm_layer(new):
        made = make("", new)
        return new if made is None else made
    for name, m in list(new.named_modules()):
        if name and is_norm_layer(m) and not _inside_replaced(name, new):
            made = make(name, m)
            if made is not None:
                parent, _, child = name.rpartition(".")
                setattr(new.get_submodule(parent) if parent else new, child, made)
    return new


def _inside_replaced(name: str, model: nn.Module) -> bool:
    """A submodule of a norm layer (none in practice) is not swapped on its own."""
    parts = name.split(".")
    return any(is_norm_layer(model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


def _class_spatial(m: nn.Module) -> bool | None:
    """Whether the layer's input has spatial axes after the channel axis, when its class says so; None when
    the class takes both (N, C) features and (N, C, ...) maps (BatchNorm1d, SyncBatchNorm, GroupNorm, bnlab's
    BatchNorm and GroupNorm)."""
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, _InstanceNorm, InstanceNorm)):
        return True  # (N, C, H, W), (N, C, D, H, W); instance norms need spatial axes themselves
    if isinstance(m, (nn.LayerNorm, LayerNorm)):
        return not _dense(m)  # over the last axis: (..., C) features; over [C, H, W]: maps
    return None


def _spatial_inputs(model: nn.Module, input_shape) -> tuple[dict[str, bool | None], tuple | None]:
    """{norm layer's name: whether its input has spatial axes (None: unknown)} and the input shape used:
    the layer's class when it tells (``_class_spatial``), else one eval forward of zeros of ``input_shape``
    (default: the model spec's), if there is one."""
    norms = [(n, m) for n, m in model.named_modules() if is_norm_layer(m) and not (n and _inside_replaced(n, model))]
    spatial = {n: _class_spatial(m) for n, m in norms}
    unknown = [m for n, m in norms if spatial[n] is None]
    shape = input_shape if input_shape is not None else getattr(getattr(model, "spec", None), "input_shape", None)
    if unknown and shape is not None:
        try:
            ranks = _input_ranks(model, tuple(shape), unknown)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot tell which layers see (N, C) features: the model does not take inputs of "
                             f"shape {tuple(shape)} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "give input_shape, one sample's shape as the model takes it") from None
        spatial.update({n: ranks[m] >= 3 for n, m in norms if spatial[n] is None and m in ranks})
    return spatial, (tuple(shape) if shape is not None else None)


def _instance_problem(name: str, m: nn.Module, spatial: bool | None, shape) -> str | None:
    """Why instance norm cannot replace ``m`` (None: it can)."""
    if spatial:
        return None
    what = f"{name or 'model'} ({type(m).__name__})"
    if spatial is False:
        return (f"{what}: instance norm needs spatial axes, expected (N, C, L) or (N, C, H, W) input, but this "
                "layer normalises (N, C) features; use layer, group:G or batch for them")
    if shape is None:
        return (f"{what}: instance norm needs spatial axes, and this layer takes (N, C) features as well as maps: "
                "give convert input_shape (one sample's shape) so it can tell which it sees")
    return f"{what}: instance norm needs spatial axes, and a forward of shape {shape} does not reach this layer"


def convert(model: nn.Module, norm: str, *, convention: str = "torch", eps: float | None = None,
            momentum: float | None | str = "default", options: NormSettings | None = None,
            input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Every normalization layer of ``model`` replaced by ``norm`` (a bnlab norm name: batch | syncbatch | renorm |
    ghost:S | group:G | layer | instance | none). ``convention`` / ``momentum`` apply to the new batch
    norms; ``eps`` defaults to each old layer's own. ``options``: a full ``NormSettings`` instead
    (renorm's r_max, d_max, warm-up).

    A conversion that cannot work is refused up front, one ValueError naming every layer: ``group:G`` on a
    channel count G does not divide; ``instance`` on a layer that sees (N, C) features (instance norm needs
    spatial axes). Which layers see features is told by the layer's class (BatchNorm2d: maps; a LayerNorm
    over the last axis: features) or, for the classes that take both (BatchNorm1d, GroupNorm, bnlab's
    BatchNorm), by one eval forward of zeros of ``input_shape`` (one sample's shape; default: the model
    spec's); without either, such a layer is refused for ``instance`` with a message asking for it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes a torch nn.Module (got {type(model).__name__})")
    if not isinstance(norm, str) or not re.fullmatch(NORM_PATTERN, norm) or norm == "weight":
        raise ValueError(f"norm must be batch | syncbatch | renorm | ghost:S | group:G | layer | instance | none "
                         f"(got {norm!r}; weight normalization wraps weight layers, not norm layers)")
    if options is None:
        options = NormSettings(convention=convention, eps=eps, momentum=momentum)
    if not any(is_norm_layer(m) for m in model.modules()):
        raise ValueError(f"the model ({type(model).__name__}) has no normalization layer to convert")
    problems = []
    spatial, shape = _spatial_inputs(model, input_shape) if norm == "instance" else ({}, None)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if norm == "none":
            return nn.Identity()
        if norm == "instance" and (why := _instance_problem(name, m, spatial.get(name), shape)):
            problems.append(why)
            return None
        c = channels(m)
        if norm.startswith("group:") and c % int(norm.split(":")[1]):
            problems.append(f"{name or 'model'}: {norm} needs a channel count divisible by "
                            f"{norm.split(':')[1]} (got {c} channels)")
            return None
        layer_opts = options if options.eps is not None else options.model_copy(update={"eps": m.eps})
        try:
            new = make_norm(norm, (c,) if _dense(m) else (c, 1, 1), layer_opts)
        except ValueError as e:
            problems.append(f"{name or 'model'}: {e}")
            return None
        _copy_state(m, new)
        return _placed(m, new)

    new = _swap(model, make)
    if problems:
        raise ValueError("cannot convert to " + norm + ":\n  " + "\n  ".join(problems))
    return new


_TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _input_ranks(model: nn.Module, input_shape, layers=None) -> dict[nn.Module, int]:
    """The rank of the input of each of ``layers`` (default: every bnlab BatchNorm), read off one eval forward
    of zeros of ``input_shape``; each module's mode is restored afterwards."""
    ranks, hooks = {}, []
    for m in (layers if layers is not None else [m for m in model.modules() if isinstance(m, BatchNorm)]):
        hooks.append(m.register_forward_pre_hook(lambda mod, inp: ranks.__setitem__(mod, inp[0].dim())))
    modes = {m: m.training for m in model.modules()}
    p = next(iter(model.parameters()), None)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((2, *input_shape), dtype=p.dtype if p is not None else torch.float32,
                                     device=p.device if p is not None else None))
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in hooks:
            h.remove()
    return ranks


def to_torch(model: nn.Module, *, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """bnlab's normalization layers as torch's. A BN's torch class (1d / 2d / 3d) follows the rank of
    its input, found by one forward of zeros of ``input_shape`` (default: the model spec's)."""
    unsupported = [n for n, m in model.named_modules() if isinstance(m, (BatchRenorm, GhostBatchNorm))]
    if unsupported:
        raise ValueError("torch has no Batch Renorm or Ghost BN layer; cannot convert: " + ", ".join(unsupported))
    channels_last = [n for n, m in model.named_modules() if isinstance(m, BatchNorm) and m.axis not in (1,)]
    if channels_last:
        raise ValueError("torch's batch norms normalise axis 1; these normalise another axis: "
                         + ", ".join(channels_last))
    ranks: dict[nn.Module, int] = {}
    if any(isinstance(m, BatchNorm) for m in model.modules()):
        shape = input_shape or getattr(getattr(model, "spec", None), "input_shape", None)
        if shape is None:
            raise ValueError("to_torch needs input_shape (one sample's shape) to tell BatchNorm1d from 2d / 3d")
        ranks = _input_ranks(model, tuple(shape))
    originals = {id(m): ranks.get(m) for m in model.modules()}

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, BatchNorm):
            rank = originals.get(id(model.get_submodule(name)) if name else id(model))
            if rank is None:
                raise ValueError(f"{name}: not reached by a forward pass of shape {input_shape}; its rank is unknown")
            keras = m.convention == "keras"
            mom = (1 - m.momentum) if keras and m.momentum is not None else m.momentum
            new = _TORCH_BN[rank](m.num_features, eps=m.eps, momentum=mom, affine=m.weight is not None
                                  and m.bias is not None, track_running_stats=m.running_mean is not None)
            if (m.weight is None) != (m.bias is None):
                raise ValueError(f"{name}: torch's BN has gamma and beta together or neither "
                                 "(this layer has only one: Keras center/scale)")
        elif isinstance(m, GroupNorm):  # bnlab InstanceNorm is GroupNorm(C, C): the same layer
            new = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.weight is not None)
        elif isinstance(m, LayerNorm):
            new = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None)
        else:
            return None
        _copy_state(m, new)
        return _placed(m, new)

    new = _swap(model, make)
    return new


def from_torch(model: nn.Module, *, convention: str = "torch") -> nn.Module:
    """torch's normalization layers as bnlab's (BatchNorm*d and SyncBatchNorm -> BatchNorm under
    ``convention``, momentum 1 - m for keras; GroupNorm, LayerNorm -> bnlab's; InstanceNorm*d with
    affine and no running statistics -> bnlab InstanceNorm)."""
    if convention not in ("torch", "keras"):
        raise ValueError(f"convention must be 'torch' or 'keras' (got {convention!r})")

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, _BatchNorm):
            if m.momentum is None and convention == "keras":
                raise ValueError(f"{name}: momentum=None (cumulative average) has no Keras equivalent")
            mom = (1 - m.momentum) if convention == "keras" else m.momentum
            new = BatchNorm(m.num_features, convention=convention, eps=m.eps, momentum=mom, affine=m.affine,
                            track_running_stats=m.track_running_stats)
        elif isinstance(m, _InstanceNorm):
            if m.track_running_stats:
                raise ValueError(f"{name}: an InstanceNorm with running statistics has no bnlab equivalent")
            new = InstanceNorm(m.num_features, eps=m.eps, affine=m.affine)
        elif isinstance(m, nn.GroupNorm):
            new = GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine)
        elif isinstance(m, nn.LayerNorm):
            new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)
        else:
            return None
        _copy_state(m, new)
        return _placed(m, new)

    return _swap(model, make)
