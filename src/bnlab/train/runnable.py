"""What stops a run's settings on this machine, checked before anything is written, stored or spawned:
``check_runnable``, which ``train_run`` (so ``bnlab train``) and the experiment runner (``bnlab run``, through
``bnlab.experiments.validate.check_models_fit``) both call."""

from __future__ import annotations

import torch
from torch import nn

from bnlab.train.config import TrainConfig


def _batch_stat_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that normalise with statistics over the batch in training (torch's BatchNorm*d and
    SyncBatchNorm, bnlab's BatchNorm, Batch Renorm and Ghost BN)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from bnlab.nn import BatchNorm

    return [(n or "(the model)", m) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, BatchNorm))]


def _one_value_per_channel(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The batch-statistics layers that see one value per channel when ``model`` gets ``x`` (a batch of
    one sample): (1, C) features, or 1x1 maps. Found in an eval-mode forward (which needs no batch), so
    every such layer is named, not only the first that would fail in training."""
    norms = dict((m, n) for n, m in _batch_stat_norms(model))
    if not norms:
        return []
    seen, hooks = [], []

    def hook(m, inputs):
        h = inputs[0]
        axis = getattr(m, "axis", 1) % max(h.dim(), 1)
        if h.dim() >= 1 and h.shape[axis] and h.numel() // h.shape[axis] < 2:
            seen.append(norms[m])

    for m in norms:
        hooks.append(m.register_forward_pre_hook(hook))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(seen))


def check_runnable(config: TrainConfig, model: nn.Module | None = None, x: torch.Tensor | None = None) -> list[str]:
    """What stops a run of ``config`` on this machine: one line per problem, ``<setting>: <what was expected,
    what arrived>``; empty: it can run. ``bnlab train`` and ``bnlab run`` call it before anything is
    written, stored or spawned, so a run that could only fail is refused rather than stored as failed.

    * ``device``: cuda (or cuda:N) on a machine without that CUDA device;
    * ``precision``: fp16-mixed anywhere but CUDA (``bnlab.train.precision.check_precision``);
    * ``devices``: more data-parallel processes than the batch can feed 2 samples each, or than GPUs;
    * ``batch_size``: 1 with a batch-statistics norm (batch, syncbatch, renorm, ghost) that would see one
      value per channel, which cannot be normalised in training; needs ``model`` (adapted to the data)
      and ``x`` (a sample of the data, or zeros of its shape). An epoch's last partial batch of one sample
      is dropped by the engine (``engine.batch_bounds``), so only the batch size itself can be 1."""
    from bnlab.train.distributed import check_devices
    from bnlab.train.engine import resolve_device
    from bnlab.train.precision import check_precision

    problems = []
    device = resolve_device("cpu" if config.device.startswith("cuda") else config.device)
    if config.device.startswith("cuda"):
        index = int(config.device.partition(":")[2] or 0)
        if index >= (count := torch.cuda.device_count() if torch.cuda.is_available() else 0):
            problems.append(f"device: expected a device this machine has (got {config.device!r}; it has "
                            + (f"{count} CUDA device(s)" if count else "no CUDA device: torch.cuda.is_available() "
                               "is False") + "); use auto or cpu")
            device = None
        else:
            device = resolve_device(config.device)
    if device is not None:
        try:
            check_precision(config.precision, device)
        except ValueError as e:
            problems.append(f"precision: {e}")
        if config.devices > 1:
            try:
                check_devices(config.devices, device, config.batch_size)
            except ValueError as e:
                problems.append(f"devices: {e}")
    if config.batch_size == 1 and model is not None and x is not None:
        if layers := _one_value_per_channel(model, x[:1]):
            problems.append(f"batch_size: expected at least 2 for this model (got 1): in training its batch-statistics "
                            f"norm layer(s) {', '.join(layers)} would see one value per channel, which cannot be "
                            "normalised; use batch_size >= 2, or a norm that needs no batch (layer, group:G, "
                            "instance)")
    return problems
