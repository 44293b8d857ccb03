"""Probes of what happens inside a network during training (off by default; sampled every k steps).

Per activation layer, on its INPUT (the pre-activation):
  ``p15 / p50 / p85`` percentiles, ``mean``, ``std`` over the whole layer (batch x units), and the
  same three percentiles for a few tracked units (``unit<i>.p15`` ...), as Ioffe & Szegedy's Figure 1
  plots for one unit of the last hidden layer; for sigmoid / tanh the fraction of ``saturated``
  values, whose derivative is below 5 % of its maximum (sigmoid' < 0.0125, tanh' < 0.05).
Per Linear / Conv weight: ``grad_norm`` and ``update_ratio`` = ||W_after - W_before|| / ||W_before||.
Optional landscape probes (Santurkar et al. 2018), at sparser steps: move along the gradient with
step sizes lr x scales and record ``loss_range`` (max - min loss over the scales: loss Lipschitzness)
and ``grad_change`` (max ||g(W - s·lr·g) - g(W)||: gradient predictiveness).

Records are (step, layer, metric, value) rows, kept in History.probes and in the run store.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

ACTIVATIONS = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU)


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(50, ge=1, description="sample every k optimizer steps (and the first step)")
    tracked_units: int = Field(3, ge=0)
    landscape: bool = False
    landscape_every: int = Field(500, ge=1)
    landscape_scales: list[float] = [0.5, 1.0, 2.0, 4.0]


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
    """Percentiles along the last axis with linear interpolation (torch.quantile's default), from
    one ``np.partition`` at the interpolation indices: torch.quantile / sort / np.percentile cost
    0.1-0.2 ms a call at probe sizes, which the default sampling cannot afford a dozen times."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    n = a.shape[-1]
    pos = np.asarray(q) * (n - 1)
    lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
    part = np.partition(a, np.unique(np.concatenate([lo, hi])), axis=-1)
    return part[..., lo] + (part[..., hi] - part[..., lo]) * (pos - lo)


def _units_view(a: np.ndarray) -> np.ndarray:
    """(N, F) -> (F, N); (N, C, H, W) -> (C, N·H·W): one row per unit / channel."""
    return np.swapaxes(a, 0, 1).reshape(a.shape[1], -1)


class Probes:
    def __init__(self, model: nn.Module, config: ProbeConfig | None = None, *, lr: float = 1.0, seed: int = 0):
        self.config = config or ProbeConfig()
        self.lr = lr
        self.model = model
        self.activations = {m: name for name, m in model.named_children() if isinstance(m, ACTIVATIONS)}
        self.weights = [(name, m.weight) for name, m in model.named_children()
                        if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.records: list[tuple[int, str, str, float]] = []
        self.armed = False
        self._captured: dict[nn.Module, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._all_before: list[torch.Tensor] | None = None
        self._units: dict[nn.Module, list[int]] = {}
        g = torch.Generator().manual_seed(seed)
        self._gen = g
        self._hooks = [m.register_forward_pre_hook(self._hook) for m in self.activations]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- capture
    def _hook(self, module, inputs):
        self.observe(module, inputs[0])

    def observe(self, module: nn.Module, h: torch.Tensor) -> None:
        """Called with each activation's input (by hooks, or by the fused step, which calls no modules)."""
        if self.armed and module in self.activations:
            self._captured[module] = h.detach()

    # ---- per step
    def wants(self, step: int) -> bool:
        return (step - 1) % self.config.every == 0

    def wants_landscape(self, step: int) -> bool:
        return self.config.landscape and (step - 1) % self.config.landscape_every == 0

    def before_step(self, step: int) -> None:
        self.armed = self.wants(step)
        if self.armed:
            self._captured.clear()
            self._before = {n: w.detach().clone() for n, w in self.weights}
        self._all_before = ([p.detach().clone() for p in self.model.parameters()]
                            if self.wants_landscape(step) else None)

    def after_step(self, step: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        # called every step: return at once unless this step is sampled (no decorator cost either)
        if self.armed:
            with torch.no_grad():
                self._record_activations(step)
                self._record_weights(step)
            self.armed = False
            self._captured.clear()
        if self._all_before is not None and x is not None:
            with torch.no_grad():
                self._record_landscape(step, x, y)
            self._all_before = None

    def _add(self, step: int, layer: str, metric: str, value: float) -> None:
        if value is not None and math.isfinite(value):
            self.records.append((step, layer, metric, float(value)))

    def _record_activations(self, step: int) -> None:
        for module, h in self._captured.items():
            name = self.activations[module]
            a = h.detach().cpu().double().numpy()
            rows = _units_view(a)  # (units, values per unit)
            if module not in self._units:
                k = min(self.config.tracked_units, rows.shape[0])
                self._units[module] = sorted(torch.randperm(rows.shape[0], generator=self._gen)[:k].tolist())
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

    def _record_landscape(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Loss and gradient along the step direction, from the weights before this step."""
        params = list(self.model.parameters())
        after = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        # the step direction g: -(W_after - W_before) / lr (the gradient itself for plain SGD)
        direction = [(b - a) / self.lr for a, b in zip(after, self._all_before)]
        g0 = None
        losses, changes = [], []
        was = self.model.training
        self.model.train()
        try:
            for s in [0.0] + list(self.config.landscape_scales):
                for p, b, d in zip(params, self._all_before, direction):
                    p.copy_(b - s * self.lr * d)
                with torch.enable_grad():
                    for p in params:
                        p.grad = None
                    loss = F.cross_entropy(self.model(x), y)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                  for g, p in zip(grads, params)]).double()
                losses.append(float(loss))
                if g0 is None:
                    g0 = flat
                else:
                    changes.append(float((flat - g0).norm()))
        finally:
            for p, a in zip(params, after):
                p.copy_(a)
                p.grad = None
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
            self.model.train(was)
        if changes:
            self._add(step, "model", "loss_range", max(losses) - min(losses))
            self._add(step, "model", "grad_change", max(changes))
