"""A hand-written training step for a whole Sequential network: forward, explicit backward, no autograd graph.

Why: at batch 32 an MLP step on a CPU is dominated by per-operation overhead (autograd nodes,
module calls, small allocations), not arithmetic; a CNN step by memory passes over its feature maps.
This program runs the same maths as autograd through the same layers with fewer, cheaper ops:

* BN through ATen's native batch-norm kernels (one op forward, one op backward; the same maths
  as ``bnlab.nn.BatchNorm``), and the running statistics of every BN layer updated by a few
  ``foreach`` ops with ``bnlab.conventions.running_update``;
* convolutions and max-pooling through the ATen kernels autograd runs, channels_last end to end;
* a ReLU after BN / Linear / Conv applied in place (nothing else holds that tensor);
* the aten backward kernels autograd itself uses for the activations;
* the loss gradient (softmax - onehot)/N by ATen's nll_loss / log_softmax backward kernels;
* gradients written straight into each parameter's ``.grad``, so any ``torch.optim`` optimizer
  steps as usual; or, for plain SGD, the update fused into the backward GEMM
  (``W.addmm_(dyᵀ, h, alpha=-lr)``: no dW tensor, no optimizer pass);
* no dx for the network's input;
* ``precision="bf16-mixed"``: convolutions and matrix products in bfloat16 (weights cast each step),
  BN statistics float32 (ATen's mixed-type kernels), the loss in float32, float32 gradients: what
  ``torch.autocast`` does, without its dispatch.

``tests/test_train.py`` and ``tests/test_fused_cnn.py`` prove it matches the autograd path (float64,
1e-10); ``tests/test_precision.py`` that its bf16-mixed step matches autocast's within bfloat16's rounding.
What it supports is ``bnlab.train.program``'s to say (one support check for every engine); anything
else takes the autograd path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.conventions import RunningUpdate, get_convention, running_update
from bnlab.nn import BatchNorm
from bnlab.nn.activations import BY_MODULE, activation_parameter
from bnlab.train.program import program_of

aten = torch.ops.aten
KERNEL_TYPES = (torch.bfloat16, torch.float32, torch.float64)  # what the native kernels take


class _Update:
    """Where gradients go: into ``.grad`` (an optimizer steps later), or, for plain SGD, straight
    into the parameters: weight matrices inside the backward GEMM, vectors in one foreach op."""

    def __init__(self, sgd_lr: float | None):
        self.lr = sgd_lr
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def vector(self, p: torch.Tensor | None, g: torch.Tensor) -> None:
        if p is not None and p._base is not None:  # a view of a parameter (stacked members side by side):
            p, g = p._base, g.reshape(p._base.shape)  # the gradient is the parameter's, in its shape
        if p is None or not p.requires_grad:
            return
        # mixed precision: float32 gradients, in the layout autograd gives .grad (its layout contract): a
        # channels_last conv-weight gradient under a contiguous weight made torch's fused Adam update the
        # wrong elements (measured)
        g = in_layout_of(_low(g, p.dtype), p)
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
            w.grad = _low(torch.mm(dy.t(), h), w.dtype)
        else:
            w.addmm_(dy.t(), h, alpha=-self.lr)

    def batched_matmul(self, w: torch.Tensor, h: torch.Tensor, dy: torch.Tensor) -> None:
        """dW = hᵀ dy for each member: w (K, in, out), h (K, B, in), dy (K, B, out)."""
        if not w.requires_grad:
            return
        if self.lr is None:
            w.grad = _low(torch.bmm(h.transpose(1, 2), dy), w.dtype)
        else:
            w.baddbmm_(h.transpose(1, 2), dy, alpha=-self.lr)

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


def in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s strides (a copy only where they differ)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _low(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` in ``dtype`` (the compute type of mixed precision, or back in a parameter's); itself when
    ``dtype`` is None or already its type."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


class _Linear:
    def __init__(self, module: nn.Linear, dtype: torch.dtype | None = None):
        self.w, self.b, self.dtype = module.weight, module.bias, dtype

    def forward(self, h, training):
        self.h = _low(h, self.dtype)  # (N, in)
        self.w_low = _low(self.w, self.dtype)
        return F.linear(self.h, self.w_low, _low(self.b, self.dtype))

    def backward(self, dy, need_dx, upd):  # dy: (N, out)
        dy = _low(dy, self.dtype)
        dx = torch.mm(dy, self.w_low) if need_dx else None  # dx = dy W, with W before any update
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
        if h.numel() // h.shape[1] < 2:
            raise ValueError(f"BatchNorm needs more than one value per channel in training (got input of size "
                             f"{list(h.shape)})")
        self.h = h
        y, self.mean, self.invstd = torch.native_batch_norm(h, m.weight, m.bias, None, None, True, 0.0, m.eps)
        self.stats = training and m.track_running_stats
        if self.stats and h.dim() > 2:
            # feature maps: the variance from invstd (float64: var = invstd⁻² - eps), whose relative error
            # is that of invstd's type times (1 + eps/var), at most 2.4e-7 in float32 while var >= eps;
            # the exact passes below cost ~40% of a bf16 CNN step, so they run only where var < eps
            var = self.invstd.double().pow(-2).sub_(m.eps)
            if not bool((var < m.eps).any()):
                self.var = var.to(self.mean.dtype)
                return y
        if self.stats:
            # the biased variance itself: rebuilt as invstd⁻² - eps it loses its digits when var << eps
            self.var = exact_biased_var(h, self.mean)
        return y

    def running_update(self) -> RunningUpdate | None:
        """This step's factor and variance correction, if it updates running statistics."""
        if not self.stats:
            return None
        m = self.m
        n_tracked = int(m.num_batches_tracked) + 1 if m.momentum is None else 1  # counting this batch
        self.stats = None
        return running_update(self.conv, m.momentum, n_tracked, self.h.numel() // self.h.shape[1])

    def backward(self, dy, need_dx, upd):
        m = self.m
        dx, dgamma, dbeta = aten.native_batch_norm_backward(
            dy, self.h, m.weight, None, None, self.mean, self.invstd, True, m.eps,
            [need_dx, m.weight is not None, m.bias is not None])
        upd.vector(m.weight, dgamma)
        upd.vector(m.bias, dbeta)
        return dx


def exact_biased_var(h: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Each channel's (axis 1) biased variance of ``h`` around its batch ``mean``, by the corrected
    two-pass formula mean(d²) - mean(d)², d = h - mean: as exact as torch.var, which over dim 0 takes
    its slow strided path (~100 µs at (32, 300) against ~25 µs). Half inputs are taken in float32."""
    hs = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    dims = [0] + list(range(2, h.dim()))
    d = torch.sub(hs, mean.to(hs.dtype).view([1, -1] + [1] * (h.dim() - 2)))
    drift = d.mean(dims)
    return d.square_().mean(dims).sub_(drift.square_())


class _BatchNormAct(_BatchNorm):
    """Training-mode BN and the activation after it (or none) in the native fused kernels
    (``native/bn_act.cpp``): two passes forward and two backward over rows of channels, where ATen's
    BN kernels on channels_last maps take several times as long and the activation two passes more.
    Only the BN input is kept: the backward recomputes the normalised value from it."""

    def __init__(self, module: BatchNorm, act: nn.Module | None, kernels):
        super().__init__(module)
        self.code = BY_MODULE[type(act) if act is not None else nn.Identity].native
        self.param = activation_parameter(act)
        self.kernels = kernels

    def forward(self, h, training):
        m = self.m
        if h.dim() == 4 and not h.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)  # the kernels walk rows of channels
        self.h = h
        batch = training or not m.track_running_stats  # else the running statistics (evaluation)
        y, self.mean, self.invstd, self.var = self.kernels.bn_act_forward(
            h, m.weight, m.bias, m.running_mean, m.running_var, batch, m.eps, self.code, self.param)
        self.stats = training and m.track_running_stats
        return y

    def backward(self, dy, need_dx, upd):
        m = self.m
        dx, dgamma, dbeta = self.kernels.bn_act_backward(
            dy, self.h, m.weight, m.bias, self.mean, self.invstd, self.code, self.param, need_dx)
        upd.vector(m.weight, dgamma)
        upd.vector(m.bias, dbeta)
        return dx


class _Activation:
    def __init__(self, module, in_place: bool = False):
        # in_place: the op before it keeps no reference to its output (BN, Linear, Conv), so ReLU
        # may overwrite it and save a pass over memory
        self.kind, self.module, self.in_place = type(module), module, in_place

    def forward(self, h, training):
        spec = BY_MODULE[self.kind]
        if self.kind is nn.ReLU and self.in_place:
            out = torch.relu_(h)
        else:
            out = self.module(h)
        self.saved = h if spec.saves_input else out
        return out

    def backward(self, dy, need_dx, upd):
        return BY_MODULE[self.kind].backward(dy, self.module, self.saved)


class _Conv2d:
    def __init__(self, module: nn.Conv2d, dtype: torch.dtype | None = None):
        self.m, self.dtype = module, dtype

    def forward(self, h, training):
        m = self.m
        self.h, self.w = _low(h, self.dtype), _low(m.weight, self.dtype)
        return F.conv2d(self.h, self.w, _low(m.bias, self.dtype), m.stride, m.padding, m.dilation, m.groups)

    def backward(self, dy, need_dx, upd):
        m = self.m
        need_b = m.bias is not None and m.bias.requires_grad
        dx, dw, db = aten.convolution_backward(
            _low(dy, self.dtype), self.h, self.w, [m.out_channels] if m.bias is not None else None, m.stride, m.padding,
            m.dilation, False, [0, 0], m.groups, [need_dx, m.weight.requires_grad, need_b])
        if m.weight.requires_grad:
            upd.vector(m.weight, dw)
        if need_b:
            upd.vector(m.bias, db)
        return dx


class _MaxPool2d:
    def __init__(self, module: nn.MaxPool2d, kernels=None):
        m = module
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        self.args = (pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size),
                     pair(m.padding), pair(m.dilation), m.ceil_mode)
        k, stride, padding, dilation, ceil = self.args
        # the native kernel: square windows side by side (stride = window, no padding / dilation, floor)
        tiles = k[0] == k[1] and stride == k and padding == [0, 0] and dilation == [1, 1] and not ceil
        self.kernels = kernels if tiles and k[0] <= 15 else None
        self.native = False

    def forward(self, h, training):
        self.h = h
        self.native = native_takes(self.kernels, h) and h.is_contiguous(memory_format=torch.channels_last)
        if self.native:
            y, self.idx = self.kernels.max_pool_forward(h, self.args[0][0])
            return y
        y, self.idx = aten.max_pool2d_with_indices(h, *self.args)
        return y

    def backward(self, dy, need_dx, upd):
        if not need_dx:
            return None
        if self.native:
            dy = dy if dy.is_contiguous(memory_format=torch.channels_last) else in_layout_of(dy, self.idx)
            return self.kernels.max_pool_backward(dy, self.idx, list(self.h.shape), self.args[0][0])
        return aten.max_pool2d_with_indices_backward(dy, self.h, *self.args, self.idx)


def native_takes(kernels, h: torch.Tensor) -> bool:
    """Whether the native kernels (None: not built) can run on ``h``: a CPU tensor of a type they take."""
    return kernels is not None and h.device.type == "cpu" and h.dtype in KERNEL_TYPES


def dropout_seed(generator: torch.Generator | None) -> int:
    """The seed of one layer's hashed mask for one step: one draw from the run's noise generator."""
    return int(torch.randint(2**62, (), generator=generator))


def dropout_mask(shape, layout: torch.memory_format, dtype: torch.dtype, p: float, generator, kernels) -> torch.Tensor:
    """The multiplier (0 or 1 / (1 - p)) a dropout over a tensor of ``shape`` in ``layout`` applies, drawn
    from ``generator`` as the fused step draws it: hashed from one seed (``kernels`` given: the native
    kernels, CPU types they take) or a uniform float per value in memory order. On the CPU."""
    if kernels is not None and dtype in KERNEL_TYPES:
        ones = torch.ones(shape, dtype=dtype).contiguous(memory_format=layout)
        return kernels.hashed_dropout(ones, p, dropout_seed(generator))
    keep = torch.empty(shape, memory_format=layout).uniform_(generator=generator) >= p
    return keep.to(dtype).div_(1 - p)


class _Dropout:
    """With the native kernels: a mask hashed from a seed drawn from the run's generator (one per
    layer and step) and the position, recomputed in the backward pass (``native/dropout.cpp``);
    without them: a uniform float per element from the generator, kept for the backward pass."""

    def __init__(self, module: nn.Dropout, generator, kernels=None):
        self.p, self.generator, self.mask, self.seed = module.p, generator, None, None
        self.kernels = kernels

    def forward(self, h, training):
        self.mask = self.seed = None
        if not training or self.p == 0:
            return h
        if native_takes(self.kernels, h):  # the mask is not stored: the backward pass hashes it again
            self.seed, self.h = dropout_seed(self.generator), h
            return self.kernels.hashed_dropout(h, self.p, self.seed)
        # drawn in the tensor's own memory order, so a channels_last tensor stays channels_last
        layout = torch.channels_last if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        self.mask = dropout_mask(h.shape, layout, h.dtype, self.p, self.generator, None).to(h.device)
        return h * self.mask

    def backward(self, dy, need_dx, upd):
        if self.seed is not None:  # the mask follows memory order: the forward input's
            return self.kernels.hashed_dropout(in_layout_of(dy, self.h), self.p, self.seed)
        return dy if self.mask is None else dy * self.mask


# precision -> the type matrix products and convolutions run in (None: the parameters' own); fp16 needs
# loss scaling and takes the autograd path
MIXED = {"fp32": None, "bf16-mixed": torch.bfloat16}


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot use the fused step (empty list: it can); ``bnlab.train.program`` decides."""
    return program_of(model).reasons


def native_kernels_for(w: torch.Tensor | None):
    """The native kernels (BN + activation, dropout, max-pool) where they can run a model whose parameters
    are like ``w`` (on a CPU, of a float type they take), else None (ATen's kernels then)."""
    if w is None or w.device.type != "cpu" or w.dtype not in KERNEL_TYPES:
        return None
    from bnlab.train import native
    return native.kernels()


class OpStep:
    """A network's ops with an explicit backward pass, built from its program (``bnlab.train.program``):
    what the fused step of one model and the stacked step of K members side by side
    (``bnlab.train.stacked``) share. Subclasses say where each op's tensors come from (``_source``) and
    how a Linear and a Dropout run (``_linear``, ``_dropout``); BN with the activation after it, convolutions,
    pooling, flattening and activations are the same ops for both."""

    def _build(self, prog_ops, kernels, low) -> None:
        self.ops, self.bns = [], []
        fused_into_bn = set()  # activations run inside the BN kernel before them
        for i, op in enumerate(prog_ops):
            if i in fused_into_bn:
                continue
            src = self._source(op)
            if op.kind == "batchnorm" and kernels is not None:
                act = prog_ops[i + 1] if i + 1 < len(prog_ops) and prog_ops[i + 1].kind == "activation" else None
                if act is not None and not BY_MODULE[type(act.module)].fuses_with_bn:
                    act = None  # runs as its own op, after the BN kernel
                if act is not None:
                    fused_into_bn.add(i + 1)
                self.ops.append(_BatchNormAct(src, act.module if act else None, kernels))
                self.bns.append(self.ops[-1])
            elif op.kind == "flatten":
                self.ops.append(_Flatten())
            elif op.kind == "linear":
                self.ops.append(self._linear(src, low))
            elif op.kind == "conv2d":
                self.ops.append(_Conv2d(src, low))
            elif op.kind == "maxpool2d":
                self.ops.append(_MaxPool2d(op.module, kernels))
            elif op.kind == "batchnorm":
                self.ops.append(_BatchNorm(src))
                self.bns.append(self.ops[-1])
            elif op.kind == "dropout":
                self.ops.append(self._dropout(op.module, kernels))
            else:
                prev = self.ops[-1] if self.ops else None
                self.ops.append(_Activation(op.module, in_place=isinstance(prev, (_BatchNorm, _Conv2d,
                                                                                  *self._linear_types))))

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

    def forward(self, h: torch.Tensor, training: bool) -> tuple[torch.Tensor, list[torch.dtype]]:
        """The logits (float32 under mixed precision, as autocast gives the loss) and each op's output type."""
        dtypes = []  # each op's output type: its gradient comes back in it (fp32 ops get fp32 gradients)
        for op in self.ops:
            h = op.forward(h, training)
            dtypes.append(h.dtype)
        return (h.float() if h.dtype in (torch.float16, torch.bfloat16) else h), dtypes

    def backward(self, dy: torch.Tensor, dtypes: list[torch.dtype]) -> None:
        """From the logits' gradient back through every op (the first computes no input gradient), then the
        parameter update (plain SGD) or nothing more (gradients in ``.grad``), then the running statistics."""
        for i in range(len(self.ops) - 1, -1, -1):
            dy = self.ops[i].backward(dy if dy.dtype == dtypes[i] else dy.to(dtypes[i]), i > 0, self.update)
        self.update.flush()
        self._update_running_stats()


class FusedMLPStep(OpStep):
    """One training step of an MLP or CNN with mean cross-entropy on logits.

    ``sgd_lr=None``: gradients land in ``.grad`` for an optimizer. ``sgd_lr=lr``: the step also
    applies plain SGD (no momentum, no weight decay) in place, and ``applies_update`` is True.
    """

    _linear_types = (_Linear,)

    def __init__(self, model: nn.Sequential, generator: torch.Generator | None = None, *,
                 sgd_lr: float | None = None, precision: str = "fp32"):
        bad = unsupported_layers(model)
        if bad:
            raise ValueError("the fused MLP step does not support: " + ", ".join(bad))
        self.model = model
        self.update = _Update(sgd_lr)
        self.applies_update = sgd_lr is not None
        if precision not in MIXED:
            raise ValueError(f"the fused step runs in {sorted(MIXED)} (got precision {precision!r})")
        if precision != "fp32" and sgd_lr is not None:
            raise ValueError("mixed precision keeps float32 weights: the update goes through an optimizer")
        self.generator = generator
        prog = program_of(model)
        self.channels_last = not prog.is_mlp
        self._build(prog.ops, native_kernels_for(next(model.parameters(), None)), MIXED[precision])
        out = list(model.children())[-1]
        self.one = torch.ones((), dtype=out.weight.dtype, device=out.weight.device)

    def _source(self, op):
        return op.module

    def _linear(self, module, low):
        return _Linear(module, low)

    def _dropout(self, module, kernels):
        return _Dropout(module, self.generator, kernels)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward (+ SGD) on one batch. Returns (mean loss, number correct), 0-d tensors."""
        # a CNN runs channels_last end to end: oneDNN's convolutions and ATen's BN / pooling kernels
        # are fastest on it, and every op here keeps the layout of its input
        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
        h, dtypes = self.forward(h, True)
        logp = torch.log_softmax(h, 1)  # (N, classes)
        loss, total = aten.nll_loss_forward(logp, y, None, 1, -100)  # mean reduction
        correct = (h.argmax(1) == y).sum()
        # d(mean CE)/d(logits) = (softmax - onehot) / N, by the kernels autograd itself runs
        dlogp = aten.nll_loss_backward(self.one, logp, y, None, 1, -100, total)
        self.backward(aten._log_softmax_backward_data(dlogp, logp, 1, logp.dtype), dtypes)
        return loss, correct
