"""Probes of what happens inside a network during training (off by default; sampled every k steps).

Activation probes, on ONE FIXED PROBE BATCH (``select_probe_batch``): ``probe_batch`` held-out
images (validation set; the training set only if there is none), drawn by a generator seeded with
``probe_seed`` alone, so every sampled step, every seed and every variant sees the same images. At
each sampled step s, before that step's update (step 1: the initial weights), the probe runs its own
no-grad forward of that batch with hooks on each activation layer (at any depth of any nn.Module;
names are dotted module paths; a module called at several places, as the ReLU of a torchvision block,
is probed on the inputs of all its calls of the first call's shape together) and records, on the layer's INPUT
(the pre-activation):
  ``p15 / p50 / p85`` percentiles (linear interpolation, as ``np.percentile``), ``mean``, ``std``
  over the whole layer (all units x all probe images, x H x W for a conv layer); the same three
  percentiles for ``tracked_units`` units (``unit<i>.p15`` ...; the same unit indices in every run,
  drawn with ``probe_seed``), as Ioffe & Szegedy 2015, Figure 1 plots for one unit of the last
  hidden layer; for sigmoid / tanh the fraction of ``saturated`` values, whose derivative is below
  5 % of its maximum (sigmoid' < 0.0125, tanh' < 0.05). At the first sampled step also ``width``
  (the layer's width) and, under the layer name ``probe_batch``, ``images`` (the batch size) and
  ``from_validation`` (1: validation images, 0: training images).

Mode of the probe forward: TRAINING mode, i.e. batch normalization with the probe batch's own
statistics, which is what the training network computes (Ioffe & Szegedy's "input distribution
during training"), while every buffer (running mean / variance, ``num_batches_tracked``) is put back
bit-exactly afterwards, so probing never changes the model. Eval mode was not chosen: it would
normalise with the running averages, which lag the weights early in training (Keras momentum 0.99
needs hundreds of steps), so the panel would show the lag of the averages rather than the
distribution the next layer is trained on. Dropout is switched off for the probe forward (it
would make the probe random and draw from the training's random stream); augmentation is not applied.

Test accuracy (``test_accuracy = true``; Ioffe & Szegedy 2015, Fig. 1(a)): at each sampled step, before
its update, the model's accuracy on the whole test set in EVAL mode (BN with its moving averages, as the
model would be deployed; no gradient, forwards of ``TEST_BATCH`` images; no buffer changes, each module's
mode restored), recorded as (step, "model", "test_accuracy", value).

Per Linear / Conv (1d, 2d, 3d) weight at any depth, on the training step's batch: ``grad_norm`` and ``update_ratio`` =
||W_after - W_before|| / ||W_before||.

Landscape probes (Santurkar et al. 2018, "How does batch normalization help optimization?"), at
steps 1, 1 + landscape_every, ...: from the weights W before the step, g = grad L(W) on the step's
own batch (the cross-entropy the training minimises, without weight decay), in the same mode as the
training forward (train mode, the buffers the step saw, dropout off). Then, for the step sizes
eta_i = lr x landscape_scales[i] (scale 1 is the step plain SGD takes; with momentum or Adam the
optimizer's update points elsewhere, which is why it is NOT used as the direction):
  ``loss_range``       max - min of L(W - eta g) over eta in {0, eta_1, ...}   (loss Lipschitzness)
  ``grad_change``      max_i ||grad L(W - eta_i g) - g||                      (gradient predictiveness)
  ``beta_smoothness``  max_i ||grad L(W - eta_i g) - g|| / ||eta_i g||         (effective beta-smoothness)
Norms over all trainable parameters, in float64. Parameters and buffers are restored bit-exactly
(``.grad`` is not touched). A point where BN meets non-finite input is left out of grad_change and
beta; loss_range is recorded only when every loss on the line is finite.

Records are (step, layer, metric, value) rows, kept in History.probes and in the run store.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from bnlab.nn.activations import PROBED

ACTIVATIONS = PROBED  # the nonlinearities whose inputs are probed (bnlab.nn.activations)
PROBE_LAYER = "probe_batch"  # the layer name of the probe batch's own rows (images, from_validation)


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a boolean is not a count, a string not a number
    every: int = Field(50, ge=1, description="sample every k optimizer steps (and the first step)")
    tracked_units: int = Field(3, ge=0, description="units per activation layer whose own percentiles are kept")
    probe_batch: int = Field(256, ge=2, description="images in the fixed held-out probe batch")
    probe_seed: int = Field(0, description="seeds the choice of probe images and tracked units (not the run's seed)")
    test_accuracy: bool = Field(False, description="at every sampled step, the model's accuracy on the test set "
                                "in eval mode (Ioffe & Szegedy 2015, Fig. 1(a))")
    landscape: bool = False
    landscape_every: int = Field(500, ge=1)
    landscape_scales: list[float] = Field([0.5, 1.0, 2.0, 4.0], min_length=1,
                                          description="step sizes along -gradient, in units of the learning rate")

    @field_validator("landscape_scales")
    @classmethod
    def _positive(cls, v):
        if any(not (s > 0 and math.isfinite(s)) for s in v):
            raise ValueError(f"landscape_scales must be positive and finite (got {v})")
        return v


def select_probe_batch(data, config: ProbeConfig) -> tuple[torch.Tensor, bool]:
    """The fixed probe batch of ``data`` (a bnlab Dataset): ``min(probe_batch, n)`` images of the
    validation set (the training set if there is none), indices ``randperm(n, seed=probe_seed)[:k]``
    in ascending order. Depends on the data and the config only, never on the run's seed.
    Returns (images, from_validation)."""
    from_val = len(data.y_val) > 0
    x = data.x_val if from_val else data.x_train
    k = min(config.probe_batch, len(x))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.probe_seed))[:k].sort().values
    return x.index_select(0, idx.to(x.device)), from_val


def probe_test_set(data, config: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The test images and labels the ``test_accuracy`` probe measures on (None: not asked for, or no test set)."""
    if not config.test_accuracy or len(data.y_test) == 0:
        return None
    return data.x_test, data.y_test


TEST_BATCH = 2048  # images per forward of the test-accuracy probe (the result does not depend on it)


@torch.no_grad()
def eval_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = TEST_BATCH) -> float:
    """Accuracy of ``model`` on (x, y) in eval mode: BN with its moving averages, dropout off. Eval mode
    changes no buffer; every module's mode is put back."""
    from bnlab.train.engine import evaluate

    modes = [(m, m.training) for m in model.modules()]  # evaluate restores the top module's mode only
    try:
        return evaluate(model, x, y, batch_size=batch_size)[1]
    finally:
        for m, t in modes:
            m.training = t


def saturated_fraction(kind: type, h) -> float | None:
    """Share of pre-activations where the activation's derivative is < 5 % of its maximum."""
    a = h.detach().cpu().double().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, np.float64)
    if kind is nn.Sigmoid:
        s = 1.0 / (1.0 + np.exp(-a))
        return float(np.mean(s * (1 - s) < 0.05 * 0.25))
    if kind is nn.Tanh:
        t = np.tanh(a)
        return float(np.mean(1 - t * t < 0.05))
    return None


def percentiles(x, q=(0.15, 0.50, 0.85)) -> np.ndarray:
    """Percentiles along the last axis with linear interpolation (torch.quantile's and np.percentile's
    default), from one ``np.partition`` at the interpolation indices."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    n = a.shape[-1]
    pos = np.asarray(q) * (n - 1)
    lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
    part = np.partition(a, np.unique(np.concatenate([lo, hi])), axis=-1)
    return part[..., lo] + (part[..., hi] - part[..., lo]) * (pos - lo)


def _units_view(a: np.ndarray) -> np.ndarray:
    """(N, F) -> (F, N); (N, C, H, W) -> (C, N·H·W): one row per unit / channel."""
    return np.swapaxes(a, 0, 1).reshape(a.shape[1], -1)


@contextmanager
def probe_mode(model: nn.Module):
    """Train mode (BN normalises with the batch's own statistics, as in training) with dropout off;
    on exit every buffer (running statistics, num_batches_tracked) is restored bit-exactly, in place
    (the native step holds these very tensors), and each module's mode is put back."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)
        for m, t in modes:
            m.training = t


class Probes:
    """Sampled measurements; ``batch``: the fixed probe images (``select_probe_batch``), without
    which no activation probes are taken. ``lr`` scales the landscape's step sizes."""

    def __init__(self, model: nn.Module, config: ProbeConfig | None = None, *, lr: float = 1.0,
                 batch: torch.Tensor | None = None, from_validation: bool = True,
                 test: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.config = config or ProbeConfig()
        self.lr = lr
        self.model = model
        self.batch, self.from_validation = batch, from_validation
        self.test = test  # (images, labels) of the test_accuracy probe (``probe_test_set``)
        # every activation / weight layer at any depth (a ResNet's are inside blocks); names are dotted paths
        self.activations = {m: name for name, m in model.named_modules() if isinstance(m, ACTIVATIONS)}
        self.weights = [(name, m.weight) for name, m in model.named_modules()
                        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        self.records: list[tuple[int, str, str, float]] = []
        self.armed = False
        self._before: dict[str, torch.Tensor] = {}
        self._land: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (params, buffers) before
        self._units: dict[nn.Module, list[int]] = {}
        self.last_inputs: tuple[int, dict[str, torch.Tensor]] | None = None

    def close(self) -> None:
        """Nothing is left registered on the model (hooks live only during a probe forward)."""

    def state(self) -> dict:
        """What a resumed run needs to go on recording as if it had never stopped (JSON-able): the
        records so far and each layer's tracked units (chosen at the first sampled step)."""
        return {"records": [list(r) for r in self.records],
                "units": {self.activations[m]: units for m, units in self._units.items()}}

    def load_state(self, state: dict) -> None:
        """Put back what ``state()`` gave."""
        by_name = {name: m for m, name in self.activations.items()}
        self.records = [tuple(r) for r in state["records"]]
        self._units = {by_name[name]: list(units) for name, units in state["units"].items()}

    # ---- per step
    def wants(self, step: int) -> bool:
        return (step - 1) % self.config.every == 0

    def wants_landscape(self, step: int) -> bool:
        return self.config.landscape and (step - 1) % self.config.landscape_every == 0

    def before_step(self, step: int) -> None:
        """Called before step ``step``'s update: activation probes see the weights the step starts from."""
        self.armed = self.wants(step)
        if self.armed:
            self._before = {n: w.detach().clone() for n, w in self.weights}
            if self.batch is not None:
                with torch.no_grad():
                    captured = self._activation_inputs(self.batch)
                    self._record_activations(step, captured)
                # the raw pre-activations of the latest sampled step, for histograms (TensorBoard)
                self.last_inputs = (step, {self.activations[m]: h for m, h in captured.items()})
            if self.test is not None and self.config.test_accuracy:
                self._add(step, "model", "test_accuracy", eval_accuracy(self.model, *self.test))
        self._land = (([p.detach().clone() for p in self.model.parameters()],
                       [b.detach().clone() for b in self.model.buffers()])
                      if self.wants_landscape(step) else None)

    def after_step(self, step: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        # called every step: return at once unless this step is sampled (no decorator cost either)
        if self.armed:
            with torch.no_grad():
                self._record_weights(step)
            self.armed = False
        if self._land is not None and x is not None:
            with torch.no_grad():
                self._record_landscape(step, x, y)
            self._land = None

    def _add(self, step: int, layer: str, metric: str, value: float) -> None:
        if value is not None and math.isfinite(value):
            self.records.append((step, layer, metric, float(value)))

    # ---- activations
    def _activation_inputs(self, x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """Each activation layer's input for the probe batch (hooks registered for this forward only)."""
        captured: dict[nn.Module, torch.Tensor] = {}

        def hook(module, inputs):
            # an activation called at several places (torchvision's blocks reuse one ReLU) is probed on
            # all its inputs together; inplace activations overwrite their input, so keep a copy
            h = inputs[0].detach().clone() if getattr(module, "inplace", False) else inputs[0].detach()
            prev = captured.get(module)
            if prev is None or prev.shape[1:] == h.shape[1:]:  # calls of other shapes: the first one only
                captured[module] = h if prev is None else torch.cat([prev, h])

        hooks = [m.register_forward_pre_hook(hook) for m in self.activations]
        try:
            with probe_mode(self.model):
                self.model(x)
        except FloatingPointError:  # BN's non-finite check: the training step reports the divergence
            return {}
        finally:
            for h in hooks:
                h.remove()
        return captured

    def _record_activations(self, step: int, captured: dict[nn.Module, torch.Tensor]) -> None:
        first = not self._units
        if first and captured:
            self._add(step, PROBE_LAYER, "images", float(self.batch.shape[0]))
            self._add(step, PROBE_LAYER, "from_validation", float(self.from_validation))
        for module, h in captured.items():
            name = self.activations[module]
            a = h.cpu().double().numpy()
            rows = _units_view(a)  # (units, values per unit)
            if module not in self._units:
                k = min(self.config.tracked_units, rows.shape[0])
                gen = torch.Generator().manual_seed(self.config.probe_seed)
                self._units[module] = sorted(torch.randperm(rows.shape[0], generator=gen)[:k].tolist())
                self._add(step, name, "width", float(rows.shape[0]))
            units = self._units[module]
            flat = a.ravel()
            values = [*percentiles(flat).tolist(), float(flat.mean()), float(flat.std(ddof=1)) if flat.size > 1 else 0.0]
            for k, v in zip(("p15", "p50", "p85", "mean", "std"), values):
                self._add(step, name, k, v)
            if units:
                for u, (p15, p50, p85) in zip(units, percentiles(rows[units]).tolist()):
                    self._add(step, name, f"unit{u}.p15", p15)
                    self._add(step, name, f"unit{u}.p50", p50)
                    self._add(step, name, f"unit{u}.p85", p85)
            sat = saturated_fraction(type(module), a)
            if sat is not None:
                self._add(step, name, "saturated", sat)

    # ---- weights
    def _record_weights(self, step: int) -> None:
        stats = []
        norm = lambda t: torch.linalg.vector_norm(t, dtype=torch.float64)  # noqa: E731 - float64 sums, no copy
        for name, w in self.weights:
            before = self._before[name]
            delta = norm(w.detach() - before)
            grad = norm(w.grad) if w.grad is not None else delta / self.lr
            stats.append(torch.stack([delta, norm(before), grad]))
        for (name, _), (d, b, g) in zip(self.weights, torch.stack(stats).tolist() if stats else []):
            self._add(step, name, "update_ratio", d / b if b > 0 else None)
            # the fused plain-SGD step applies the update without keeping .grad: then g = -ΔW / lr
            self._add(step, name, "grad_norm", g)

    # ---- landscape
    def _loss_and_grad(self, x, y, trainable) -> tuple[float, list[torch.Tensor]]:
        with torch.enable_grad():
            loss = F.cross_entropy(self.model(x), y)
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        return float(loss.detach()), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable)]

    def _record_landscape(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Loss and gradient along -g, g = grad L(W_before) on this step's batch (not the optimizer's update)."""
        params = list(self.model.parameters())
        buffers = list(self.model.buffers())
        p_before, b_before = self._land
        p_after = [p.detach().clone() for p in params]
        b_after = [b.detach().clone() for b in buffers]
        train_idx = [i for i, p in enumerate(params) if p.requires_grad]
        trainable = [params[i] for i in train_idx]
        flat = lambda ts: torch.cat([t.detach().reshape(-1).double() for t in ts])  # noqa: E731
        losses, changes, ratios = [], [], []
        try:
            with probe_mode(self.model):
                g0 = None
                for eta in [0.0] + [self.lr * s for s in self.config.landscape_scales]:
                    for p, w in zip(params, p_before):
                        p.copy_(w)
                    if eta:
                        for p, g in zip(trainable, g0):
                            p.copy_(p - eta * g)
                    for b, v in zip(buffers, b_before):  # each forward sees the buffers the step saw
                        b.copy_(v)
                    try:
                        loss, grads = self._loss_and_grad(x, y, trainable)
                    except FloatingPointError:  # non-finite BN input at this point of the line
                        loss, grads = float("nan"), None
                    if g0 is None:
                        if grads is None or not math.isfinite(loss):
                            return
                        g0, g0_flat = grads, flat(grads)
                        g0_norm = float(g0_flat.norm())
                    elif grads is not None:
                        d = float((flat(grads) - g0_flat).norm())
                        changes.append(d)
                        if g0_norm > 0:
                            ratios.append(d / (eta * g0_norm))
                    losses.append(loss)
        finally:
            for p, w in zip(params, p_after):
                p.copy_(w)
            for b, v in zip(buffers, b_after):
                b.copy_(v)
        if len(losses) > 1 and all(math.isfinite(v) for v in losses):
            self._add(step, "model", "loss_range", max(losses) - min(losses))
        if changes:
            self._add(step, "model", "grad_change", max(changes))
        if ratios:
            self._add(step, "model", "beta_smoothness", max(ratios))
