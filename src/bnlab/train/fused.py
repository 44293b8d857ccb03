"""A hand-written training step for a whole MLP: forward, explicit backward, no autograd graph.

Why: at batch 32 an MLP step on a CPU is dominated by per-operation overhead (autograd nodes,
module calls, small allocations), not arithmetic. This program runs the same maths as autograd
through the same layers with fewer, cheaper ops:

* BN's compact backward (``bnlab.reference``), sums instead of ``mean`` (which dispatches three
  ops), and the running statistics of every BN layer updated by one ``foreach`` lerp;
* the aten backward kernels autograd itself uses for the activations;
* the loss gradient (softmax - onehot)/N with the one-hot rows gathered from an identity matrix;
* gradients written straight into each parameter's ``.grad``, so any ``torch.optim`` optimizer
  steps as usual; or, for plain SGD, the update fused into the backward GEMM
  (``W.addmm_(dyᵀ, h, alpha=-lr)``: no dW tensor, no optimizer pass);
* no dx for the network's input.

``tests/test_train_fused.py`` proves it matches the autograd path within float tolerance.
Supported: an ``nn.Sequential`` of Flatten, Linear, bnlab BatchNorm on (N, C), the activations of
the model specs, and Dropout, ending in Linear. Anything else takes the autograd path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.conventions import get_convention, running_update_factor
from bnlab.nn import BatchNorm

aten = torch.ops.aten
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805


class _Update:
    """Where a gradient goes: into ``.grad`` (an optimizer steps later) or straight into the
    parameter as a plain SGD step."""

    def __init__(self, sgd_lr: float | None):
        self.lr = sgd_lr

    def vector(self, p: torch.Tensor | None, g: torch.Tensor) -> None:
        if p is None or not p.requires_grad:
            return
        if self.lr is None:
            p.grad = g
        else:
            p.add_(g, alpha=-self.lr)

    def matmul(self, w: torch.Tensor, dy: torch.Tensor, h: torch.Tensor) -> None:
        """dW = dyᵀ h"""
        if not w.requires_grad:
            return
        if self.lr is None:
            w.grad = torch.mm(dy.t(), h)
        else:
            w.addmm_(dy.t(), h, alpha=-self.lr)


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
    def __init__(self, module: BatchNorm):
        self.m = module
        self.conv = get_convention(module.convention)
        self.stats = None

    def forward(self, h, training):
        m = self.m
        if not (training or not m.track_running_stats):
            return m(h)  # eval: running statistics
        n = h.shape[0]
        if n < 2:
            m(h)  # raises the layer's own clear error
        mean = h.sum(0).mul_(1.0 / n)  # (C,)
        xc = h - mean
        sq = (xc * xc).sum(0)  # (C,) n·biased variance
        inv = sq.mul(1.0 / n).add_(m.eps).rsqrt_()  # eps inside the root
        self.xh = xc.mul_(inv)  # x_hat (N, C), in xc's buffer
        self.inv, self.n = inv, n
        if m.track_running_stats and training:
            stored_var = sq.mul_(1.0 / (n - 1) if self.conv.running_var_unbiased else 1.0 / n)
            self.stats = (mean, stored_var)
        if m.weight is None:
            return self.xh if m.bias is None else self.xh + m.bias
        return torch.addcmul(m.bias, self.xh, m.weight) if m.bias is not None else self.xh * m.weight

    def backward(self, dy, need_dx, upd):
        m, xh = self.m, self.xh
        sum_dy = dy.sum(0)  # dbeta
        sum_dy_xh = (dy * xh).sum(0)  # dgamma
        dx = None
        if need_dx:
            # dx = k·dy - (k/n)·Σdy - (k/n)·x_hat·Σ(dy·x_hat), k = gamma·inv_std
            k = self.inv if m.weight is None else m.weight * self.inv
            k_n = k * (-1.0 / self.n)
            dx = torch.addcmul(k_n * sum_dy, xh, k_n * sum_dy_xh).addcmul_(dy, k)
        upd.vector(m.weight, sum_dy_xh)
        upd.vector(m.bias, sum_dy)
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
        if isinstance(mod, BatchNorm) and (mod.axis in (1, -1)):
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
                 num_classes: int | None = None, sgd_lr: float | None = None):
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
        c = num_classes or out.out_features
        self.eye = torch.eye(c, dtype=out.weight.dtype, device=out.weight.device)

    def _update_running_stats(self) -> None:
        """All BN layers at once: running += f·(batch - running), one foreach lerp per factor."""
        groups: dict[float, tuple[list, list]] = {}
        counters = []
        for bn in self.bns:
            if bn.stats is None:
                continue
            m = bn.m
            if m.num_batches_tracked is not None:
                counters.append(m.num_batches_tracked)
            n_tracked = int(m.num_batches_tracked) + 1 if m.momentum is None else 1
            f = running_update_factor(bn.conv, m.momentum, n_tracked)
            dst, src = groups.setdefault(f, ([], []))
            dst += [m.running_mean, m.running_var]
            src += list(bn.stats)
            bn.stats = None
        if counters:
            torch._foreach_add_(counters, 1)
        for f, (dst, src) in groups.items():
            torch._foreach_lerp_(dst, src, f)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward (+ SGD) on one batch. Returns (mean loss, number correct), 0-d tensors."""
        h = x
        for op in self.ops:
            h = op.forward(h, True)
        logp = torch.log_softmax(h, 1)  # (N, classes)
        loss = F.nll_loss(logp, y)
        correct = (h.argmax(1) == y).sum()
        # d(mean CE)/d(logits) = (softmax - onehot) / N
        dy = logp.exp_().sub_(self.eye.index_select(0, y)).mul_(1.0 / len(y))
        for i in range(len(self.ops) - 1, -1, -1):
            dy = self.ops[i].backward(dy, i > 0, self.update)
        self._update_running_stats()
        return loss, correct
