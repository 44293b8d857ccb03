"""Many seeds as one model: K runs of one network that differ only in their seed, trained as one stacked model.

Why: on a GPU, a small network's step leaves most of the device idle; K members stacked share each
step's launches and fill it. The members run side by side, as one wider network: features
(B, K·F) and maps (B, K·C, H, W), member k's block after member k - 1's. On that layout the fused step's
own ops (``bnlab.train.fused.OpStep``, built from the same program) do the work: BN and the activation
after it, pooling, flattening and activations run once over every member's channels, convolutions as one
grouped convolution (member k's filters are group k); only a Linear layer (a batched product over the
members) and dropout (each member's mask) have stacked versions, and the loss is each member's own mean
cross-entropy. Forward and backward are explicit, as in the fused step; no autograd graph. What stays per
member, so that each member's History is its single run's (``fit(model_k, seed=seed_k)``; float64 within
1e-10, tested):

* its initial weights (the K models are built by the caller, one per seed, and stacked here);
* its data order (its own order generator, seeded by its seed) and its noise (dropout masks and
  augmentation drawn from its own noise generator, in the order a single run draws them);
* BN batch statistics and running statistics (its own channels of the side-by-side layout);
* optimizer state: SGD / RMSprop / Adam are elementwise, so one optimizer over the stacked tensors
  is K independent optimizers;
* divergence and early stopping: a member whose loss becomes non-finite, or whose patience runs out,
  leaves the stack (its tensors and optimizer state are sliced away) and the others go on;
* its best checkpoint and its History;
* its resumable state (``state_dirs``): the one a single run writes, so the group can continue
  together, or the member alone;
* its probes (``probes``): recorded on its own model, loaded with its tensors around each sampled step.

Each epoch's ``seconds`` is the member's share of the stacked epoch (its wall time over the members
trained in it). On a CPU stacking saves little (``benchmarks/stacked_seeds.py``): the single runs' native
step already has no per-step overhead to share, and K members' products cost K times one member's, which
is why the runner stacks on GPUs only unless asked (``stack="on"``). Supported: the networks of ``bnlab.train.fused`` (Conv2d, MaxPool2d, BN, activations and
Dropout on maps, Flatten, Linear, BN on (N, C), ending in Linear) in fp32 or bf16-mixed;
``stack_unsupported`` says why another model is not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.data.augment import RandomAffine
from bnlab.data.dataset import Dataset
from bnlab.train.callbacks import Monitor, TrainContext
from bnlab.train.fused import MIXED, OpStep, _low, _Update, aten, dropout_mask, native_kernels_for
from bnlab.train.program import program_of
from bnlab.train.history import EpochRecord, History
from bnlab.nn.norms import plan_run_length
from bnlab.train.optim import LRSchedule, make_optimizer, planned_updates
from bnlab.train.precision import check_precision


STACKED_PRECISIONS = ("fp32", "bf16-mixed")  # fp16-mixed needs a loss scale per member


def stack_unsupported(model: nn.Module) -> list[str]:
    """Why ``model`` cannot be trained stacked (empty: it can)."""
    return program_of(model).unsupported("stacked", model=model)


class _Layer:
    """One op of the K members: its kind, name and first member's module, and its tensors stacked along a
    leading member axis: a Linear's weight as (K, in, out) (each member's transposed: the batched
    product's operand), a convolution's as (K, out, in, kh, kw), BN's vectors as (K, C) and its step
    count (the same for every member) as one 0-d tensor."""

    PARAMETERS = ("weight", "bias")
    BUFFERS = ("running_mean", "running_var")

    def __init__(self, kind: str, name: str, mods: list[nn.Module]):
        self.kind, self.name, self.module = kind, name, mods[0]
        self.tensors: dict[str, torch.Tensor] = {}
        if kind not in ("linear", "conv2d", "batchnorm"):
            return
        for attr in self.PARAMETERS:
            if getattr(mods[0], attr, None) is not None:
                t = torch.stack([getattr(m, attr).detach() for m in mods])
                self.tensors[attr] = (t.transpose(1, 2).contiguous() if kind == "linear" and attr == "weight"
                                      else t).requires_grad_(True)
        if kind == "batchnorm" and mods[0].track_running_stats:
            for attr in self.BUFFERS:
                self.tensors[attr] = torch.stack([getattr(m, attr) for m in mods])
            self.tensors["num_batches_tracked"] = mods[0].num_batches_tracked.detach().clone()

    def parameters(self) -> list[torch.Tensor]:
        return [self.tensors[a] for a in self.PARAMETERS if a in self.tensors]

    def transposed(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is held transposed against the model's own parameter (a Linear weight)."""
        return self.kind == "linear" and t is self.tensors.get("weight")

    def member(self, k: int, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Member ``k``'s entries of ``tensors`` (default: the layer's) under the model's own names and shapes."""
        out = {}
        for attr, t in (self.tensors if tensors is None else tensors).items():
            if attr == "num_batches_tracked":
                out[attr] = t.clone()
            else:
                out[attr] = t[k].t() if self.transposed(self.tensors[attr]) else t[k]
        return out

    def keep(self, rows: torch.Tensor) -> None:
        for attr, t in self.tensors.items():
            if attr == "num_batches_tracked":
                continue
            kept = t.detach()[rows].clone().requires_grad_(t.requires_grad)
            if t.grad is not None:
                kept.grad = t.grad[rows]
            self.tensors[attr] = kept


class _ConvView:
    """What the fused step's convolution reads of its module, for K members' convolutions as one grouped
    convolution over their maps side by side (B, K·C, H, W): member k's filters are groups k."""

    def __init__(self, layer: _Layer, k: int):
        m = layer.module
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, k
        self.out_channels = k * m.out_channels
        w = layer.tensors["weight"]
        self.weight = w.view(-1, *w.shape[2:])  # views: their gradients go to the stacked tensors
        self.bias = layer.tensors["bias"].view(-1) if "bias" in layer.tensors else None


class _BatchNormView:
    """What the fused step's BN ops read of a BatchNorm module, for K members' BN over their channels side
    by side: every member's weight, bias and running statistics as one vector of K·C (views of the stacked
    tensors, so updates land in them), one step count."""

    def __init__(self, layer: _Layer):
        m, t = layer.module, layer.tensors
        self.eps, self.momentum, self.convention = m.eps, m.momentum, m.convention
        self.track_running_stats = m.track_running_stats
        self.weight, self.bias, self.running_mean, self.running_var = (
            t[a].view(-1) if a in t else None for a in (*_Layer.PARAMETERS, *_Layer.BUFFERS))
        self.num_batches_tracked = t.get("num_batches_tracked")

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # evaluation (ATen's kernels: no native library)
        return F.batch_norm(h, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _members(h: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K·F) side by side -> (K, B, F), a strided view: a batched product reads it in place."""
    return h.view(h.shape[0], k, -1).transpose(0, 1)


class _StackedLinear:
    """K Linear layers on the members' features side by side, (B, K·in) -> (B, K·out): one batched product
    reading strided views in place; its (K, B, ·) result copied side by side (a batched product writing
    a strided output took 1.4x as long at (8, 32, 784, 300), measured)."""

    def __init__(self, layer: _Layer, dtype: torch.dtype | None = None):
        self.w, self.b, self.dtype = layer.tensors["weight"], layer.tensors.get("bias"), dtype

    def forward(self, h, training):
        self.h, self.w_low = _low(h, self.dtype), _low(self.w, self.dtype)
        hk = _members(self.h, self.w.shape[0])
        y = torch.bmm(hk, self.w_low) if self.b is None else torch.baddbmm(_low(self.b, self.dtype).unsqueeze(1),
                                                                           hk, self.w_low)
        return _side_by_side(y)

    def backward(self, dy, need_dx, upd):
        k = self.w.shape[0]
        dy = _low(dy, self.dtype)
        dx = _side_by_side(torch.bmm(_members(dy, k), self.w_low.transpose(1, 2))) if need_dx else None  # W before
        if self.b is not None:                                                                          # its update
            upd.vector(self.b, dy.view(dy.shape[0], k, -1).sum(0))
        upd.batched_matmul(self.w, _members(self.h, k), _members(dy, k))
        return dx


def _side_by_side(y: torch.Tensor) -> torch.Tensor:
    """(K, B, F...) -> (B, K·F), member k's features (flattened) at k·F .. (k+1)·F - 1."""
    return y.transpose(0, 1).reshape(y.shape[1], -1)


class _StackedDropout:
    """Each member's mask from its own noise generator, drawn as its single run's fused step draws it, over
    its rows (B, C) or its channels_last maps, side by side; kept for the backward pass."""

    def __init__(self, module: nn.Dropout, generators: list, kernels):
        self.p, self.generators, self.kernels, self.mask = module.p, generators, kernels, None

    def forward(self, h, training):
        self.mask = None
        if not training or self.p == 0:
            return h
        k, maps = len(self.generators), h.dim() == 4
        one = (h.shape[0], h.shape[1] // k, *h.shape[2:])
        layout = torch.channels_last if maps else torch.contiguous_format
        self.mask = torch.cat([dropout_mask(one, layout, h.dtype, self.p, g, self.kernels)
                               for g in self.generators], 1).to(h.device)
        return h * self.mask

    def backward(self, dy, need_dx, upd):
        return dy if self.mask is None else dy * self.mask


class StackedStep(OpStep):
    """The fused step's ops on K members side by side (``OpStep``): BN, activations, pooling and
    convolutions run once over every member's channels, Linear layers as batched products, each member's
    loss its own mean cross-entropy. Built from a ``StackedNet`` (again after members leave it)."""

    _linear_types = (_StackedLinear,)

    def __init__(self, stack: "StackedNet", precision: str = "fp32", sgd_lr: float | None = None):
        self.stack, self.k = stack, stack.members
        # gradients into the stacked tensors' .grad for the optimizer, or plain SGD applied here (sgd_lr)
        self.update, self.applies_update = _Update(sgd_lr), sgd_lr is not None
        self.generators: list = []  # the members' noise generators, set for each step
        self._build(stack.program, native_kernels_for(stack.parameters()[0]), MIXED[precision])

    def _source(self, op):
        layer = self.stack.layer[op.name]
        if op.kind == "conv2d":
            return _ConvView(layer, self.k)
        if op.kind == "batchnorm":
            return _BatchNormView(layer)
        return layer if op.kind == "linear" else op.module

    def _linear(self, layer, low):
        return _StackedLinear(layer, low)

    def _dropout(self, module, kernels):
        return _StackedDropout(module, self.generators, kernels)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The members' batches (K, B, ...) side by side: maps (B, K·C, H, W), else rows (B, K·F)."""
        return members_side_by_side(x) if self.stack.maps else _side_by_side(x)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, generators: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of every member on its batch (x: (K, B, ...), y: (K, B)): forward, backward, gradients
        in ``.grad``. Returns each member's mean loss and number correct, (K,) tensors."""
        self.generators[:] = generators
        h, dtypes = self.forward(self._inputs(x), True)
        b = h.shape[0]
        logp = torch.log_softmax(h.view(b, self.k, -1), 2).view(b * self.k, -1)
        t = y.t().reshape(-1)  # (B·K), row b·K + k: member k's target
        nll, total = aten.nll_loss_forward(logp, t, None, 0, -100)  # no reduction: each member's mean below
        correct = (h.view(b, self.k, -1).argmax(2) == y.t()).sum(0)
        # d(member's mean CE)/d(logits) = (softmax - onehot) / B, by the kernels autograd runs
        dlogp = aten.nll_loss_backward(torch.full_like(nll, 1.0 / b), logp, t, None, 0, -100, total)
        self.backward(aten._log_softmax_backward_data(dlogp, logp, 1, logp.dtype).view(b, -1), dtypes)
        return nll.view(b, self.k).mean(0), correct

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits in eval mode on the same inputs x (B, ...): (K, B, classes)."""
        h, _ = self.forward(self._inputs(x.unsqueeze(0).expand(self.k, *x.shape)), False)
        return h.view(x.shape[0], self.k, -1).transpose(0, 1)


def members_side_by_side(x: torch.Tensor) -> torch.Tensor:
    """(K, B, C, H, W) -> (B, K·C, H, W) channels_last: member k's channels are k·C .. (k+1)·C - 1."""
    k, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)


def _network(model: nn.Module) -> list[str]:
    """What must be equal for two models to stack: each layer as printed (sizes, eps, momentum, convention,
    rates, slopes...), and each tensor's name, shape, type and device."""
    return ([f"layer {name}: {mod!r}" for name, mod in model.named_children()]
            + [f"tensor {name}: {tuple(t.shape)} {t.dtype} on {t.device}"
               for name, t in (*model.named_parameters(), *model.named_buffers())])


class StackedNet:
    """K copies of one ``nn.Sequential`` network (an MLP or a CNN) as tensors with a leading member axis."""

    def __init__(self, models: list[nn.Sequential]):
        for k, m in enumerate(models):
            bad = stack_unsupported(m)
            if bad:
                raise ValueError(f"stacked training does not support (member {k}): " + ", ".join(bad))
        first = _network(models[0])
        for k, m in enumerate(models[1:], 1):  # every member runs the first one's layers: they must be one network
            diff = next((f"{a} against {b}" for a, b in zip(_network(m), first) if a != b), None)
            if diff is not None:
                raise ValueError(f"stacked members must be one network that differs only in its weights: member {k} "
                                 f"has {diff} in member 0")
        prog = program_of(models[0])
        self.program, self.maps, self.members = prog.ops, not prog.is_mlp, len(models)
        self.layer = {step[0].name: _Layer(step[0].kind, step[0].name, [op.module for op in step])
                      for step in zip(*(program_of(m).ops for m in models))}

    def parameters(self) -> list[torch.Tensor]:
        """The stacked tensors, in the single model's ``parameters()`` order."""
        return [t for layer in self.layer.values() for t in layer.parameters()]

    def _transposed(self) -> list[bool]:
        return [layer.transposed(t) for layer in self.layer.values() for t in layer.parameters()]

    def member_optimizer_state(self, opt: torch.optim.Optimizer, k: int) -> dict:
        """Member ``k``'s optimizer state as a single model's ``optimizer.state_dict()["state"]``."""
        out = {}
        for i, (p, t) in enumerate(zip(self.parameters(), self._transposed())):
            st = opt.state.get(p)
            if st:
                out[i] = {key: (v[k].transpose(0, 1) if t else v[k]).clone().contiguous()
                          if isinstance(v, torch.Tensor) and v.dim() == p.dim() else
                          (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in st.items()}
        return out

    def load_optimizer_states(self, opt: torch.optim.Optimizer, states: list[dict]) -> None:
        """Stack the members' single-model optimizer states (``member_optimizer_state``'s form) into ``opt``."""
        for i, (p, t) in enumerate(zip(self.parameters(), self._transposed())):
            per = [s.get(i) or s.get(str(i)) for s in states]
            if not per[0]:
                continue
            opt.state[p] = {key: torch.stack([(d[key].transpose(0, 1) if t else d[key]) for d in per]).to(p.device)
                            if isinstance(per[0][key], torch.Tensor) and per[0][key].dim() == p.dim() - 1 else
                            (per[0][key].clone() if isinstance(per[0][key], torch.Tensor) else per[0][key])
                            for key in per[0]}

    def keep(self, rows: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Keep only the members ``rows``: a leaving member's tensors, gradients and optimizer state go."""
        old = self.parameters()
        for layer in self.layer.values():
            layer.keep(rows)
        self.members = len(rows)
        new = self.parameters()
        opt.param_groups[0]["params"] = new
        state = {}
        for p_old, p_new in zip(old, new):
            state[p_new] = {k: (v[rows].clone() if isinstance(v, torch.Tensor) and v.dim() == p_old.dim()
                                and v.dim() > 0 else v) for k, v in opt.state.get(p_old, {}).items()}
        opt.state.clear()
        opt.state.update(state)

    def member_grads(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s gradients under the single model's parameter names."""
        return {f"{name}.{attr}": g for name, layer in self.layer.items()
                for attr, g in layer.member(k, {a: t.grad for a, t in layer.tensors.items()
                                                if a in _Layer.PARAMETERS}).items()}

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s tensors under the single model's state-dict keys."""
        return {f"{name}.{attr}": v.detach().clone() for name, layer in self.layer.items()
                for attr, v in layer.member(k).items()}


@dataclass(eq=False)  # identity: members are compared and looked up as themselves
class _Member:
    seed: int
    index: int  # its position in the caller's list
    order: torch.Generator
    noise: torch.Generator
    history: History
    monitor: Monitor
    probes: object | None = None  # its bnlab.probes.Probes, on its own model
    losses: list = field(default_factory=list)
    corrects: list = field(default_factory=list)


def fit_stacked(models: list[nn.Sequential], data: Dataset, seeds: list[int], *, optimizer: str = "sgd",
                lr: float = 1e-3, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                batch_size: int = 32, epochs: int = 10, target_accuracy: float | None = None,
                augment: RandomAffine | None = None, checkpoint_dirs: list[str | Path | None] | None = None,
                monitor: str = "val_accuracy", patience: int | None = None, max_steps: int | None = None,
                eval_batch_size: int = 1024, keras_defaults: bool = True, checkpoint_meta: list[dict] | None = None,
                device: str | None = "cpu", state_dirs: list[str | Path] | None = None,
                state_settings: list[dict] | None = None, resume_from: list | None = None,
                probes=None, lr_schedule: str = "constant", precision: str = "fp32") -> list[History]:
    """Train ``models[k]`` (built for ``seeds[k]``) as one stacked model; return each member's History,
    the History ``fit(models[k], data, seed=seeds[k], ...)`` gives with the same arguments. The models
    get their final weights back. See the module's docstring for what is per member.

    ``state_dirs`` / ``state_settings``: each member writes the resumable state a single run would
    (``bnlab.train.resume``) at every epoch's end, so it can continue stacked with the same group or
    alone. ``resume_from``: every member's state, all of one unfinished epoch, to continue from.
    ``probes``: a ``bnlab.probes.ProbeConfig``; each member records what its single run records, on its
    own model (loaded with the member's tensors around each sampled step).
    ``precision``: fp32 or bf16-mixed (matrix products and convolutions in bfloat16 as the fused step runs
    them, BN statistics, weights and optimizer state float32: each member within bfloat16's rounding of
    its single bf16-mixed run; evaluation in float32, as a single run's)."""
    from bnlab.train.engine import batch_bounds, epoch_order, resolve_device, stream_seed
    from bnlab.train.resume import TrainState, rng_states, save_state

    if len(models) != len(seeds) or not models:
        raise ValueError(f"need one seed per model (got {len(models)} models and {len(seeds)} seeds)")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1 (got batch_size={batch_size}, epochs={epochs})")
    dev = resolve_device(device)
    if precision not in STACKED_PRECISIONS:
        raise ValueError(f"stacked training runs precision {' or '.join(STACKED_PRECISIONS)} (got {precision!r})")
    check_precision(precision, dev)
    if resume_from is not None:
        if len({(st.epoch, st.steps, st.finished) for st in resume_from}) != 1 or resume_from[0].finished:
            raise ValueError("stacked members continue together only from unfinished states of one epoch")
        for m, st in zip(models, resume_from):
            m.load_state_dict(st.model)
    for m in models:
        m.to(dev).train()
    data = data.to(dev)
    stack = StackedNet(models)
    # plain SGD at a constant rate inside the backward products, as fit's fused steps apply it (the probes
    # read each member's gradients, so they take the optimizer)
    plain_sgd = (optimizer == "sgd" and momentum == 0 and weight_decay == 0 and lr_schedule == "constant"
                 and precision == "fp32" and probes is None)
    steps = _Steps(stack, precision, lr if plain_sgd else None)
    dirs = checkpoint_dirs or [None] * len(models)
    metas = checkpoint_meta or [None] * len(models)
    members = [_Member(s, k, torch.Generator().manual_seed(s), torch.Generator().manual_seed(stream_seed(s, "noise")),
                       History(target_accuracy=target_accuracy, engine=f"stacked:{len(models)}",
                               precision=precision),
                       Monitor(monitor, patience, dirs[k], metas[k]))
               for k, s in enumerate(seeds)]
    opt = make_optimizer(optimizer, stack.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, keras_defaults=keras_defaults)
    if probes is not None:
        from bnlab.probes import Probes, probe_test_set, select_probe_batch

        batch, from_val = select_probe_batch(data, probes)
        test = probe_test_set(data, probes)
        for mem in members:
            mem.probes = Probes(models[mem.index], probes, lr=lr, batch=batch, from_validation=from_val, test=test)
    first_epoch, steps_done, elapsed = 1, 0, 0.0
    if resume_from is not None:
        first_epoch, steps_done, elapsed = resume_from[0].epoch + 1, resume_from[0].steps, resume_from[0].elapsed
        stack.load_optimizer_states(opt, [st.optimizer or {} for st in resume_from])
        for mem, st in zip(members, resume_from):
            mem.order.set_state(st.rng["order"])
            mem.noise.set_state(st.rng["noise"])
            mem.history, mem.history.engine = st.history, f"stacked:{len(models)}"
            mem.monitor.best_value, mem.monitor.best_epoch, mem.monitor.since_best = (
                st.best_value, st.best_epoch, st.since_best)
            if mem.probes is not None and st.probes is not None:
                mem.probes.load_state(st.probes)
    n = len(data.y_train)
    batches = batch_bounds(n, batch_size)
    planned = planned_updates(epochs, len(batches), max_steps)
    schedule = LRSchedule(opt, lr, lr_schedule, planned)
    for m in models:
        plan_run_length(m, planned)
    alive = list(members)
    start = time.perf_counter() - elapsed
    dtype = stack.parameters()[0].dtype
    if data.x_train.is_floating_point() and data.x_train.dtype != dtype:
        raise ValueError(f"the inputs are {data.x_train.dtype} but the models are {dtype}: convert one to the other")

    def leave(gone: list[_Member]) -> None:
        nonlocal alive
        for mem in gone:  # the leaving member's final weights go back to its model
            models[mem.index].load_state_dict(stack.member_state_dict(alive.index(mem)))
        rows = torch.tensor([i for i, mem in enumerate(alive) if mem not in gone], dtype=torch.long, device=dev)
        alive = [mem for mem in alive if mem not in gone]
        if alive:
            stack.keep(rows, opt)
            steps.build()  # the ops hold the stacked tensors: rebuilt over the members left

    for epoch in range(first_epoch, epochs + 1):
        if not alive:
            break
        t0 = time.perf_counter()
        perms = torch.stack([epoch_order(n, mem.order) for mem in alive]).to(dev)  # (K, n)
        for mem in alive:
            mem.losses, mem.corrects = [], []
        seen = 0
        for i, j in batches:
            idx = perms[:, i:j]
            xb, yb = data.x_train[idx], data.y_train[idx]
            if augment is not None and augment.active:
                xb = torch.stack([augment(xb[k], mem.noise) for k, mem in enumerate(alive)])
            for p in stack.parameters():
                p.grad = None
            step = steps_done + 1
            sampled = probes is not None and any(mem.probes.wants(step) or mem.probes.wants_landscape(step)
                                                 for mem in alive)
            if sampled:  # each member's probes see its own model at the weights this step starts from
                for k, mem in enumerate(alive):
                    models[mem.index].load_state_dict(stack.member_state_dict(k))
                    mem.probes.before_step(step)
            loss, correct = steps.train(xb, yb, [mem.noise for mem in alive])
            values = loss.tolist()  # one read per step: the divergence check needs it anyway
            counts = correct.tolist()
            bad = [mem for mem, v in zip(alive, values) if not math.isfinite(v)]
            for mem in bad:
                mem.history.stopped = "diverged"
                mem.history.message = (f"loss became {values[alive.index(mem)]} at epoch {epoch}, step "
                                       f"{steps_done + 1}: the run diverged (lower the learning rate?)")
            members_then = list(alive)
            if bad:
                keep = [k for k, mem in enumerate(alive) if mem not in bad]
                perms = perms[keep]
                leave(bad)
                if not alive:
                    break
            if not steps.train.applies_update:
                schedule(steps_done)
                opt.step()
            steps_done += 1
            if sampled:  # weights after the update, this step's gradients and batch
                rows = {mem: k for k, mem in enumerate(members_then)}
                for k, mem in enumerate(alive):
                    model = models[mem.index]
                    model.load_state_dict(stack.member_state_dict(k))
                    grads = stack.member_grads(k)
                    for name, p in model.named_parameters():
                        p.grad = grads[name].clone()
                    mem.probes.after_step(step, xb[rows[mem]], yb[rows[mem]])
            for mem, v, c in zip(members_then, values, counts):
                if mem not in bad:
                    mem.losses.append(v)
                    mem.corrects.append(c)
            seen += j - i
            if max_steps is not None and steps_done >= max_steps:
                break
        if not alive:
            break
        share = (time.perf_counter() - t0) / len(alive)
        val = _evaluate(steps.eval, data.x_val, data.y_val, eval_batch_size)
        stopping = []
        for k, mem in enumerate(alive):
            done = torch.tensor(mem.losses, dtype=dtype)  # the losses' own type: the mean a single run takes
            mem.history.step_loss.extend(done.tolist())
            vl, va = val[k] if val is not None else (None, None)
            rec = EpochRecord(epoch, float(done.mean()), sum(mem.corrects) / seen, vl, va, share,
                              steps_done)
            mem.history.record(rec, time.perf_counter() - start)
            if mem.monitor.checkpoint_dir is not None:
                models[mem.index].load_state_dict(stack.member_state_dict(k))
            mem.monitor.on_epoch_end(TrainContext(models[mem.index], data, mem.history, epochs, len(batches), dev,
                                                  lr, None, 0), rec)
            if mem.monitor.stopped:
                mem.history.stopped = "early_stopping"
                mem.history.message = f"no improvement of {monitor} for {patience} epochs"
                stopping.append(mem)
            elif max_steps is not None and steps_done >= max_steps:
                mem.history.stopped, mem.history.message = "budget", f"step budget of {max_steps} used"
        if state_dirs is not None:  # what a single run saves at this epoch's end, member by member
            for k, mem in enumerate(alive):
                finished = mem.history.stopped != "completed" or epoch == epochs
                save_state(state_dirs[mem.index], TrainState(
                    epoch, steps_done, time.perf_counter() - start, finished, mem.history, mem.monitor.best_value,
                    mem.monitor.best_epoch, mem.monitor.since_best, f"stacked:{len(models)}",
                    stack.member_state_dict(k), stack.member_optimizer_state(opt, k),
                    {**rng_states({"order": mem.order, "noise": mem.noise}, dev)},
                    None if mem.probes is None else mem.probes.state()),
                    state_settings[mem.index])
        if stopping:
            leave(stopping)
        if max_steps is not None and steps_done >= max_steps:
            break
    for k, mem in enumerate(alive):
        models[mem.index].load_state_dict(stack.member_state_dict(k))
    for mem in members:
        mem.history.best_epoch = mem.monitor.best_epoch
        if mem.probes is not None:
            mem.history.probes = [list(r) for r in mem.probes.records]
            mem.probes.close()
    return [mem.history for mem in members]


class _Steps:
    """The stacked step in the run's precision (applying plain SGD itself where ``sgd_lr`` is given, as a
    single run's fused steps do), and in float32 for evaluation (as a single run's)."""

    def __init__(self, stack: StackedNet, precision: str, sgd_lr: float | None):
        self.stack, self.precision, self.sgd_lr = stack, precision, sgd_lr
        self.build()

    def build(self) -> None:
        self.train = StackedStep(self.stack, self.precision, self.sgd_lr)
        self.eval = self.train if self.precision == "fp32" else StackedStep(self.stack)


def _evaluate(step: StackedStep, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Each member's (mean cross-entropy, accuracy) in eval mode; None without validation data."""
    if len(y) == 0:
        return None
    k = step.k
    loss = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        out = step.logits(xb)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.repeat(k), reduction="none").view(k, -1)
        loss += ce.sum(1).double().cpu()
        correct += (out.argmax(2) == yb).sum(1).cpu()
    return [(float(loss[j]) / len(y), int(correct[j]) / len(y)) for j in range(k)]
