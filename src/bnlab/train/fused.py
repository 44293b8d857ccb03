"""A hand-written training step for a whole MLP: forward, explicit backward, no autograd graph.

Why: at batch 32 an MLP step on a CPU is dominated by per-operation overhead (autograd nodes,
module calls, small allocations), not arithmetic. This program runs the same maths as autograd
through the same layers with fewer, cheaper ops:

* BN through ATen's native batch-norm kernels (one op forward, one op backward; the same maths
  as ``bnlab.nn.BatchNorm``), and the running statistics of every BN layer updated by a few
  ``foreach`` ops with ``bnlab.conventions.running_update``;
* the aten backward kernels autograd itself uses for the activations;
* the loss gradient (softmax - onehot)/N by ATen's nll_loss / log_softmax backward kernels;
* gradients written straight into each parameter's ``.grad``, so any ``torch.optim`` optimizer
  steps as usual; or, for plain SGD, the update fused into the backward GEMM
  (``W.addmm_(dyᵀ, h, alpha=-lr)``: no dW tensor, no optimizer pass);
* no dx for the network's input.

``tests/test_train.py`` proves it matches the autograd path within float tolerance.
Supported: an ``nn.Sequential`` of Flatten, Linear, bnlab BatchNorm on (N, C), the activations of
the model specs, and Dropout, ending in Linear. Anything else takes the autograd path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.conventions import RunningUpdate, get_convention, running_update
from bnlab.nn import BatchNorm

aten = torch.ops.aten
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805


class _Update:
    """Where gradients go: into ``.grad`` (an optimizer steps later), or, for plain SGD, straight
    into the parameters: weight matrices inside the backward GEMM, vectors in one foreach op."""

    def __init__(self, sgd_lr: float | None):
        self.lr = sgd_lr
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def vector(self, p: torch.Tensor | None, g: torch.Tensor) -> None:
        if p is None or not p.requires_grad:
            return
        if self.lr is None:
            p.grad = g
        else:
            self.params.append(p)
            self.grads.append(g)

    def matmul(self, w: torch.Tensor, dy: torch.Tensor, h: torch.Tensor) -> None:
        """dW = dyᵀ h"""
        if not w.requires_grad:
            return
        if self.lr is None:
            w.grad = torch.mm(dy.t(), h)
        else:
            w.addmm_(dy.t(), h, alpha=-self.lr)

    def flush(self) -> None:
        if self.params:
            torch._foreach_add_(self.params, self.grads, alpha=-self.lr)
            self.params, self.grads = [], []


class _Flatten:
    def forward(self, h, training):
        self.shape = h.shape
        return h.reshape(h.shape[0], -1)

    def backward(self, dy, need_dx, upd):
        return dy.reshape(self.shape) if need_dx else None


class _Linear:
    def __init__(self, module: nn.Linear):
        self.w, self.b = module.weight, module.bias

    def forward(self, h, training):
        self.h = h  # (N, in)
        return F.linear(h, self.w, self.b)

    def backward(self, dy, need_dx, upd):  # dy: (N, out)
        dx = torch.mm(dy, self.w) if need_dx else None  # dx = dy W, with W before any update
        if self.b is not None:
            upd.vector(self.b, dy.sum(0))
        upd.matmul(self.w, dy, self.h)
        return dx


class _BatchNorm:
    """Training-mode BN through ATen's native kernels (one op forward, one op backward): the same
    maths as ``bnlab.nn.BatchNorm`` (biased batch variance, eps inside the root), fewer dispatches."""

    def __init__(self, module: BatchNorm):
        self.m = module
        self.conv = get_convention(module.convention)
        self.stats = None

    def forward(self, h, training):
        m = self.m
        if not (training or not m.track_running_stats):
            return m(h)  # eval: running statistics
        if h.shape[0] < 2:
            m(h)  # raises the layer's own clear error
        self.h = h
        y, self.mean, self.invstd = torch.native_batch_norm(h, m.weight, m.bias, None, None, True, 0.0, m.eps)
        self.stats = training and m.track_running_stats
        if self.stats:
            # the biased variance itself: rebuilt as invstd⁻² - eps it loses its digits when var << eps.
            # Corrected two-pass (mean(d²) - mean(d)², d = h - mean): as exact as torch.var, but torch.var
            # over dim 0 takes its slow strided path (~100 µs at (32, 300) against ~25 µs)
            hs = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
            d = torch.sub(hs, self.mean.to(hs.dtype))
            drift = d.mean(0)
            self.var = d.square_().mean(0).sub_(drift.square_())
        return y

    def running_update(self) -> RunningUpdate | None:
        """This step's factor and variance correction, if it updates running statistics."""
        if not self.stats:
            return None
        m = self.m
        n_tracked = int(m.num_batches_tracked) + 1 if m.momentum is None else 1  # counting this batch
        self.stats = None
        return running_update(self.conv, m.momentum, n_tracked, self.h.shape[0])

    def backward(self, dy, need_dx, upd):
        m = self.m
        dx, dgamma, dbeta = aten.native_batch_norm_backward(
            dy, self.h, m.weight, None, None, self.mean, self.invstd, True, m.eps,
            [need_dx, m.weight is not None, m.bias is not None])
        upd.vector(m.weight, dgamma)
        upd.vector(m.bias, dbeta)
        return dx


class _Activation:
    def __init__(self, module):
        self.kind, self.module = type(module), module

    def forward(self, h, training):
        k = self.kind
        if k is nn.ReLU:
            out = torch.relu(h)
        elif k is nn.LeakyReLU:
            self.saved = h
            return F.leaky_relu(h, self.module.negative_slope)
        elif k is nn.Identity:
            return h
        else:
            out = self.module(h)
        self.saved = out
        return out

    def backward(self, dy, need_dx, upd):
        k, s = self.kind, getattr(self, "saved", None)
        if k is nn.ReLU:
            return aten.threshold_backward(dy, s, 0)
        if k is nn.Sigmoid:
            return aten.sigmoid_backward(dy, s)
        if k is nn.Tanh:
            return aten.tanh_backward(dy, s)
        if k is nn.LeakyReLU:
            return aten.leaky_relu_backward(dy, s, self.module.negative_slope, False)
        if k is nn.ELU:
            return aten.elu_backward(dy, self.module.alpha, 1.0, 1.0, True, s)
        if k is nn.SELU:
            return aten.elu_backward(dy, _SELU_ALPHA, _SELU_SCALE, 1.0, True, s)
        return dy  # Identity


class _Dropout:
    def __init__(self, module: nn.Dropout, generator):
        self.p, self.generator, self.mask = module.p, generator, None

    def forward(self, h, training):
        if not training or self.p == 0:
            self.mask = None
            return h
        keep = torch.rand(h.shape, generator=self.generator).to(h.device) >= self.p
        self.mask = keep.to(h.dtype).div_(1 - self.p)
        return h * self.mask

    def backward(self, dy, need_dx, upd):
        return dy if self.mask is None else dy * self.mask


_ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Identity)


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot use the fused step (empty list: it can)."""
    if not isinstance(model, nn.Sequential):
        return [f"{type(model).__name__} is not an nn.Sequential"]
    bad = []
    children = list(model.named_children())
    for i, (name, mod) in enumerate(children):
        if isinstance(mod, nn.Flatten) and i == 0:
            continue
        if type(mod) in (nn.Linear, nn.Dropout, *_ACTIVATIONS):
            continue
        if type(mod) is BatchNorm and (mod.axis in (1, -1)):  # not renorm / ghost: their training differs
            continue
        bad.append(f"{name} ({type(mod).__name__})")
    if not children or not isinstance(children[-1][1], nn.Linear):
        bad.append("the last layer is not Linear")
    return bad


class FusedMLPStep:
    """One training step of an MLP with mean cross-entropy on logits.

    ``sgd_lr=None``: gradients land in ``.grad`` for an optimizer. ``sgd_lr=lr``: the step also
    applies plain SGD (no momentum, no weight decay) in place, and ``applies_update`` is True.
    """

    def __init__(self, model: nn.Sequential, generator: torch.Generator | None = None, *,
                 sgd_lr: float | None = None):
        bad = unsupported_layers(model)
        if bad:
            raise ValueError("the fused MLP step does not support: " + ", ".join(bad))
        self.model = model
        self.update = _Update(sgd_lr)
        self.applies_update = sgd_lr is not None
        self.ops, self.bns = [], []
        for mod in model.children():
            if isinstance(mod, nn.Flatten):
                self.ops.append(_Flatten())
            elif isinstance(mod, nn.Linear):
                self.ops.append(_Linear(mod))
            elif isinstance(mod, BatchNorm):
                self.ops.append(_BatchNorm(mod))
                self.bns.append(self.ops[-1])
            elif isinstance(mod, nn.Dropout):
                self.ops.append(_Dropout(mod, generator))
            else:
                self.ops.append(_Activation(mod))
        out = list(model.children())[-1]
        self.one = torch.ones((), dtype=out.weight.dtype, device=out.weight.device)

    def _update_running_stats(self) -> None:
        """All BN layers at once, in a few foreach ops, by ``running_update``: var ·= its correction,
        then running = (1 - f)·running + f·batch (exact at f = 0 and 1)."""
        active = [(bn, u) for bn in self.bns if (u := bn.running_update()) is not None]
        if not active:
            return
        torch._foreach_mul_([bn.var for bn, _ in active], [u.var_correction for _, u in active])
        counters = [bn.m.num_batches_tracked for bn, _ in active if bn.m.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        groups: dict[float, tuple[list, list]] = {}
        for bn, u in active:
            dst, src = groups.setdefault(u.factor, ([], []))
            dst += [bn.m.running_mean, bn.m.running_var]
            src += [bn.mean.to(bn.m.running_mean.dtype), bn.var.to(bn.m.running_var.dtype)]
        for f, (dst, src) in groups.items():
            torch._foreach_mul_(dst, 1.0 - f)
            torch._foreach_add_(dst, src, alpha=f)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward (+ SGD) on one batch. Returns (mean loss, number correct), 0-d tensors."""
        h = x
        for op in self.ops:
            h = op.forward(h, True)
        logp = torch.log_softmax(h, 1)  # (N, classes)
        loss, total = aten.nll_loss_forward(logp, y, None, 1, -100)  # mean reduction
        correct = (h.argmax(1) == y).sum()
        # d(mean CE)/d(logits) = (softmax - onehot) / N, by the kernels autograd itself runs
        dlogp = aten.nll_loss_backward(self.one, logp, y, None, 1, -100, total)
        dy = aten._log_softmax_backward_data(dlogp, logp, 1, logp.dtype)
        for i in range(len(self.ops) - 1, -1, -1):
            dy = self.ops[i].backward(dy, i > 0, self.update)
        self.update.flush()
        self._update_running_stats()
        return loss, correct
