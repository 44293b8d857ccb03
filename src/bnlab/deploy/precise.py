r"""Precise BN statistics: replace the moving averages of every batch-statistics normalization layer by
its population statistics over the training data, with the weights fixed.

For each BN layer and each channel c, over ALL values the layer sees across the data — N values per
feature after a Linear, N·H·W per channel after a Conv (the channel axis is the layer's ``axis``) —

    mean_c = (1/n) Σ x                      n = total values per channel over every batch
    M2_c   = Σ (x - mean_c)²                merged exactly across batches (Chan et al.'s parallel
                                            update, float64): n = n_a + n_b, δ = mean_b - mean_a,
                                            mean = mean_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n
    running_mean = mean_c
    running_var  = M2_c / n · k,   k = running_update(conv, conv.momentum, 1, count=n).var_correction

so the stored variance follows the layer's convention with bnlab's one rule (``bnlab.conventions.running_update``
as for a single batch of all n values; k does not depend on the momentum): torch stores the unbiased variance
over all values, M2/(n-1); keras stores the biased one, M2/n. Each sample is used once.

Two modes decide what each layer's input is:

* ``"train"`` (this function's default, kept for its callers; fvcore's PreciseBN): the model runs as in training, in mini-batches of
  ``batch_size`` (seeded shuffle), every BN layer normalizing with its batch statistics (Ghost BN with
  its ghost batches; Batch Renorm with its r, d corrections against the running statistics it was
  trained with, which are held fixed during the pass), dropout off. A later layer therefore sees what
  it saw in training, and the batch order matters. A last batch of a single sample cannot run BN in
  train mode, so it is FOLDED into the previous batch (every sample counts, none is dropped).
* ``"inference"``: layer by layer in the order the forward pass reaches them; the statistics of layer k
  are computed with layers < k already in eval mode using their NEW statistics, so each layer sees the
  input it will see at inference. One (partial) pass per BN layer; batch size and order change nothing
  but the float64 rounding; batches of one sample are fine. This is the mode of the "precise statistics"
  that ``bnlab train``, experiment runs and the reports measure, and what ``bnlab recalibrate`` writes by default.

How it differs from the usual recipes:

* ``torch.optim.swa_utils.update_bn`` runs the batches with momentum=None: its running_mean is the
  equal-weight average of the batch means (the exact mean only if the batches are equal) and its
  running_var the average of the per-batch UNBIASED variances, Σ_b n_b/(n_b-1)·σ²_b / B, which misses
  the spread of the batch means. With one batch holding all the data it equals ours (torch convention).
* Ioffe & Szegedy 2015, Algorithm 2, step 10: Var[x] = m/(m-1)·E_B[σ²_B], an estimator of the
  population variance from batches of m values, not the variance over all values (and with m taken as
  the images per batch, its factor m/(m-1) is ×1.032 too large for a conv BN at batch 32, whose batches
  hold m·H·W values per channel).

Layers recalibrated: ``bnlab.nn.BatchNorm`` and its subclasses (BatchRenorm, GhostBatchNorm) under
their own convention and ``axis``, and ``torch.nn`` batch norms (``_BatchNorm``: BatchNorm1d/2d/3d,
SyncBatchNorm; torch convention, axis 1), each with track_running_stats=True. ``num_batches_tracked``
keeps its trained value (it counts training steps, which renorm's warm-up and momentum=None use).
The input model is never modified: the result is a deep copy in eval mode with the same dtypes.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.conventions import get_convention, running_update
from bnlab.nn import BatchNorm
from bnlab.nn.layout import for_inference

MODES = ("train", "inference")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has seen its input."""


def _is_batch_stat_norm(m: nn.Module) -> bool:
    return isinstance(m, (BatchNorm, _BatchNorm))


def _recalibrated(m: nn.Module) -> bool:
    """A batch-statistics norm with running statistics to replace."""
    return _is_batch_stat_norm(m) and getattr(m, "running_mean", None) is not None


def can_recalibrate(model: nn.Module) -> bool:
    """Whether ``model`` has batch-statistics normalization with running statistics that
    ``recalibrate`` can replace (bnlab BN, renorm, ghost; torch's BatchNorm*d)."""
    return any(_recalibrated(m) for m in model.modules())


def _axis(m: nn.Module) -> int:
    return m.axis if isinstance(m, BatchNorm) else 1  # torch's BatchNorm*d: channels on axis 1


def _convention(m: nn.Module):
    return get_convention(m.convention if isinstance(m, BatchNorm) else "torch")


class _Moments:
    """Per-channel count, mean and M2 = Σ(x - mean)², merged exactly across batches in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, h: torch.Tensor, axis: int) -> None:
        h = h.detach().to(torch.float64)  # e.g. (N, C, H, W) or (N, H, W, C) with axis=-1
        ax = axis % h.dim()
        nb = h.numel() // h.shape[ax]  # values per channel in this batch: N, or N·H·W after a conv
        if nb == 0:
            return
        var_b, mean_b = torch.var_mean(h, dim=tuple(d for d in range(h.dim()) if d != ax), correction=0)  # (C,)
        m2_b = var_b * nb  # torch's var_mean does not cancel (no Σx² - n·mean²)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean  # Chan et al. 1979: the exact merge of two (count, mean, M2)
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * nb / n)
        self.n = n


def _batches(n: int, batch_size: int, mode: str, order: torch.Tensor,
             max_batches: int | None) -> list[torch.Tensor]:
    """Index tensors of the mini-batches: consecutive slices of ``order``; in mode train a last batch of
    one sample joins the previous batch."""
    bounds = list(range(0, n, batch_size)) + [n]
    if mode == "train" and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]  # a single sample cannot run BN in train mode: fold it into the previous batch
    idx = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return idx if max_batches is None else idx[:max_batches]


def batch_indices(n: int, *, batch_size: int = 32, mode: str = "train", seed: int = 0,
                  max_batches: int | None = None, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The sample indices of each mini-batch ``recalibrate`` runs, in order (for reproducing its batches,
    e.g. to feed the same batches to ``torch.optim.swa_utils.update_bn``)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    return _batches(n, batch_size, mode, torch.randperm(n, generator=gen), max_batches)


def _check_args(model: nn.Module, x, batch_size: int, mode: str, max_batches: int | None) -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} (got {mode!r})")
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"expected the data as a tensor of shape (N, ...) (got {type(x).__name__}: {e})") from None
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size!r})")
    if mode == "train" and batch_size < 2:
        raise ValueError(f"mode 'train' normalizes each batch with its own statistics, which needs batch_size >= 2 "
                         f"(got {batch_size}); use mode='inference' for batches of one sample")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None (got {max_batches!r})")
    if x.dim() < 2:
        raise ValueError(f"expected the data as (N, ...) with a batch axis first (got {x.dim()}D data of shape "
                         f"{tuple(x.shape)})")
    if len(x) == 0:
        raise ValueError("no data: the statistics need at least one sample (got 0)")
    if mode == "train" and len(x) < 2:
        raise ValueError(f"mode 'train' needs at least 2 samples to form a batch (got {len(x)}); "
                         "use mode='inference'")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point data, scaled as for training (got dtype {x.dtype})")
    shape = getattr(getattr(model, "spec", None), "input_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected data of shape (N, {', '.join(map(str, shape))}) for this model "
                         f"(got {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the data contains NaN or inf")
    return x


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, *, batch_size: int = 32, mode: str = "inference", seed: int = 0,
                max_batches: int | None = None, generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model``, in eval mode, whose BN running statistics are the population statistics over ``x``.

    Per channel: running_mean = the mean over all values the layer sees across ``x`` (N per feature after
    a Linear, N·H·W per channel after a Conv); running_var = their variance, merged exactly across batches
    in float64, stored per convention by ``running_update(conv, conv.momentum, 1, count=n).var_correction``
    (torch: unbiased, M2/(n-1); keras: biased, M2/n). See the module docstring for the formulas and how
    this differs from ``torch.optim.swa_utils.update_bn`` and Ioffe & Szegedy's Algorithm 2.

    Args:
        model: any module holding ``bnlab.nn.BatchNorm`` layers (and subclasses) or ``torch.nn`` batch norms;
            not modified.
        x: the training data (N, ...), preprocessed as in training (on the CPU or the model's device).
        batch_size: samples per forward pass; in mode "train" also the batch whose statistics earlier BN
            layers normalize with (>= 2); a last batch of one sample joins the previous one.
        mode: "inference" (the default, what runs, reports and ``bnlab recalibrate`` call precise statistics:
            layer by layer, earlier layers in eval mode with their new statistics, as the model will predict) or
            "train" (earlier BN layers use batch statistics, as fvcore's PreciseBN).
        seed: seeds the shuffle of the samples into batches (only mode "train" depends on it).
        max_batches: use only the first this many (shuffled) batches.
        generator: a torch.Generator to shuffle with instead of ``seed`` (kept for older callers).
    """
    x = _check_args(model, x, batch_size, mode, max_batches)
    if not can_recalibrate(model):
        if any(_is_batch_stat_norm(m) for m in model.modules()):
            raise ValueError("the model's batch norm layers keep no running statistics (track_running_stats=False): "
                             "they always use batch statistics and there is nothing to recalibrate")
        raise ValueError("the model has no batch-statistics normalization (batch, renorm, ghost) to recalibrate; "
                         "layer, group and instance norm use each sample's own statistics and have none")
    new = for_inference(model) if x.dim() == 4 else model
    new = copy.deepcopy(model) if new is model else new
    names = {m: name or type(m).__name__ for name, m in new.named_modules()}
    layers = [m for m in new.modules() if _recalibrated(m)]
    params = next(new.parameters(), None)
    device = params.device if params is not None else x.device
    batches = batch_indices(len(x), batch_size=batch_size, mode=mode, seed=seed, max_batches=max_batches,
                            generator=generator)

    def run(idx: torch.Tensor) -> None:
        try:
            new(x[idx.to(x.device)].to(device))
        except _Stop:
            pass
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"the model could not run on the data (batch shape "
                             f"{(len(idx),) + tuple(x.shape[1:])}, dtype {x.dtype}): {e}") from e

    new.eval()  # dropout off; BN layers switched per mode below
    moments = {m: _Moments() for m in layers}
    if mode == "train":
        for m in new.modules():
            if _is_batch_stat_norm(m):
                m.train()
        saved = {m: [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
                 for m in layers}
        hooks = [m.register_forward_pre_hook(lambda mod, inp: moments[mod].add(inp[0], _axis(mod))) for m in layers]
        try:
            for idx in batches:
                run(idx)
                for m, kept in saved.items():  # undo the moving-average update: renorm's r, d use the trained ones
                    for t, k in zip((m.running_mean, m.running_var, m.num_batches_tracked), kept):
                        t.copy_(k)
        finally:
            for h in hooks:
                h.remove()
        for m in layers:
            _store(m, moments[m], names[m])
    else:
        order, calls = _call_order(layers, lambda: run(batches[0]))
        for m in layers:
            if m not in calls:
                warnings.warn(f"BN layer {names[m]} is not reached by the forward pass; its statistics are unchanged",
                              stacklevel=2)
        for m in order:  # layer k sees layers < k in eval mode with their new statistics
            seen = [0]

            def hook(mod, inp, m=m, seen=seen):
                moments[m].add(inp[0], _axis(m))
                seen[0] += 1
                if seen[0] == calls[m]:  # it has seen all it sees in one forward pass: skip the rest
                    raise _Stop

            handle = m.register_forward_pre_hook(hook)
            try:
                for idx in batches:
                    seen[0] = 0
                    run(idx)
            finally:
                handle.remove()
            _store(m, moments[m], names[m])
    return new.eval()


def _call_order(layers: list[nn.Module], forward) -> tuple[list[nn.Module], dict[nn.Module, int]]:
    """The BN layers in the order one forward pass first reaches them, and how often each is called."""
    calls: dict[nn.Module, int] = {}

    def hook(mod, inp):
        calls[mod] = calls.get(mod, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return list(calls), calls  # dicts keep insertion order: first call first


def _store(m: nn.Module, mom: _Moments, name: str) -> None:
    """Write the population statistics into the layer, per its convention."""
    if mom.n == 0:
        warnings.warn(f"BN layer {name} saw no data; its statistics are unchanged", stacklevel=3)
        return
    var = mom.m2 / mom.n  # biased variance over all values
    try:
        conv = _convention(m)  # the correction of one batch holding all n values (independent of the momentum)
        var = var * running_update(conv, conv.momentum, 1, count=mom.n).var_correction
    except ValueError as e:
        raise ValueError(f"BN layer {name}: {e} (use more data)") from None
    if not (bool(torch.isfinite(mom.mean).all()) and bool(torch.isfinite(var).all())):
        raise FloatingPointError(f"BN layer {name}: its input has NaN or inf values on this data; "
                                 "the statistics would not be finite")
    m.running_mean.copy_(mom.mean.to(m.running_mean.dtype))
    m.running_var.copy_(var.to(m.running_var.dtype))
