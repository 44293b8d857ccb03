"""Many seeds as one model: K runs of one network that differ only in their seed, trained as one stacked model.

Why: a seed MLP step at batch 32 is dominated by per-step overhead and small matrix products; K
members stacked along a leading axis share that overhead and turn K small products into one batched
product (``torch.baddbmm``); a small CNN's K convolutions become one grouped convolution over the
members' feature maps side by side, (B, K·C, H, W). What stays per member, so that each member's History is its single run's
(``fit(model_k, seed=seed_k)``; float64 within 1e-10, tested):

* its initial weights (the K models are built by the caller, one per seed, and stacked here);
* its data order (its own order generator, seeded by its seed) and its noise (dropout masks and
  augmentation drawn from its own noise generator, in the order a single run draws them);
* BN batch statistics and running statistics (per member along the leading axis);
* optimizer state: SGD / RMSprop / Adam are elementwise, so one optimizer over the stacked tensors
  is K independent optimizers;
* divergence and early stopping: a member whose loss becomes non-finite, or whose patience runs out,
  leaves the stack (its tensors and optimizer state are sliced away) and the others go on;
* its best checkpoint and its History;
* its resumable state (``state_dirs``): the one a single run writes, so the group can continue
  together, or the member alone;
* its probes (``probes``): recorded on its own model, loaded with its tensors around each sampled step.

Each epoch's ``seconds`` is the member's share of the stacked epoch (its wall time over the members
trained in it). Supported: the networks of ``bnlab.train.fused`` (Conv2d, MaxPool2d, BN, activations and
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

from bnlab.conventions import get_convention, running_update
from bnlab.data.augment import RandomAffine
from bnlab.data.dataset import Dataset
from bnlab.nn import BatchNorm
from bnlab.nn.functional import BatchNormFunction
from bnlab.train.callbacks import Monitor, TrainContext
from bnlab.train import native
from bnlab.train.fused import dropout_mask
from bnlab.train.program import program_of
from bnlab.train.history import EpochRecord, History
from bnlab.nn.norms import plan_run_length
from bnlab.train.optim import LRSchedule, make_optimizer, planned_updates
from bnlab.train.precision import autocast, check_precision


STACKED_PRECISIONS = ("fp32", "bf16-mixed")  # fp16-mixed needs a loss scale per member


def stack_unsupported(model: nn.Module) -> list[str]:
    """Why ``model`` cannot be trained stacked (empty: it can)."""
    return program_of(model).unsupported("stacked", model=model)


class _Linear:
    def __init__(self, mods: list[nn.Linear]):
        self.w = torch.stack([m.weight.detach() for m in mods]).transpose(1, 2).contiguous()  # (K, in, out)
        self.b = None if mods[0].bias is None else torch.stack([m.bias.detach() for m in mods])

    def tensors(self):
        return [t for t in (self.w, self.b) if t is not None]

    def forward(self, h, training, gens):
        if self.b is None:
            return torch.bmm(h, self.w)
        return torch.baddbmm(self.b.unsqueeze(1), h, self.w)

    def state(self, k):
        out = {"weight": self.w[k].t()}
        if self.b is not None:
            out["bias"] = self.b[k]
        return out


class _Conv2d:
    """K convolutions as one grouped convolution over the members' channels side by side, (B, K·C, H, W)."""

    def __init__(self, mods: list[nn.Conv2d]):
        self.m = mods[0]
        self.w = torch.stack([c.weight.detach() for c in mods])  # (K, out, in, kh, kw): members lead
        self.b = None if self.m.bias is None else torch.stack([c.bias.detach() for c in mods])

    def tensors(self):
        return [t for t in (self.w, self.b) if t is not None]

    def forward(self, h, training, gens):
        m, k = self.m, self.w.shape[0]
        return F.conv2d(h, self.w.reshape(-1, *self.w.shape[2:]), None if self.b is None else self.b.reshape(-1),
                        m.stride, m.padding, m.dilation, groups=k)

    def state(self, k):
        out = {"weight": self.w[k]}
        if self.b is not None:
            out["bias"] = self.b[k]
        return out


class _Flatten:
    """From the members' maps side by side, (B, K·C, H, W), to each member's rows, (K, B, C·H·W), each
    flattened in its single model's (C, H, W) order."""

    def __init__(self, channels: int):
        self.c = channels

    def forward(self, h, training, gens):
        b, kc = h.shape[:2]
        k = kc // self.c
        return h.reshape(b, k, -1).transpose(0, 1)


def members_side_by_side(x: torch.Tensor) -> torch.Tensor:
    """(K, B, C, H, W) -> (B, K·C, H, W) channels_last: member k's channels are k·C .. (k+1)·C - 1."""
    k, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)


class _BatchNorm:
    def __init__(self, mods: list[BatchNorm]):
        m = self.m = mods[0]
        self.conv = get_convention(m.convention)
        self.weight = None if m.weight is None else torch.stack([b.weight.detach() for b in mods])
        self.bias = None if m.bias is None else torch.stack([b.bias.detach() for b in mods])
        self.tracked = m.track_running_stats
        if self.tracked:
            self.running_mean = torch.stack([b.running_mean for b in mods])
            self.running_var = torch.stack([b.running_var for b in mods])
            self.count = int(m.num_batches_tracked)

    def tensors(self):
        return [t for t in (self.weight, self.bias) if t is not None]

    def buffers(self):
        return [self.running_mean, self.running_var] if self.tracked else []

    def forward(self, h, training, gens):  # h: (K, B, C), or maps side by side (B, K·C, H, W)
        m = self.m
        maps = h.dim() == 4
        if training or not self.tracked:
            # every member's channels side by side, (B, K·C[, H, W]): one batch-norm op forward and one
            # backward for all members, bnlab's own (ATen's channels_last kernels sum a float32 variance
            # naively: 2e-4 relative on a CNN's first maps, measured, against 1e-7 here and in the single run)
            if maps:
                c = m.num_features
                k, b = h.shape[1] // c, h.shape[0] * h.shape[2] * h.shape[3]  # b: values per channel
                flat = h
            else:
                k, b, c = h.shape
                flat = h.transpose(0, 1).reshape(b, k * c)
            w = None if self.weight is None else self.weight.reshape(-1)
            bias = None if self.bias is None else self.bias.reshape(-1)
            y, mean, var = BatchNormFunction.apply(flat, w, bias, m.eps, 1)
            if training and self.tracked:
                with torch.no_grad():
                    n_tracked = self.count + 1 if m.momentum is None else 1
                    u = running_update(self.conv, m.momentum, n_tracked, b)
                    self.running_mean.mul_(1.0 - u.factor).add_(mean.view(k, c), alpha=u.factor)
                    self.running_var.mul_(1.0 - u.factor).add_(var.view(k, c) * u.var_correction, alpha=u.factor)
                    self.count += 1
            return y if maps else y.view(b, k, c).transpose(0, 1)
        # evaluation: each member's running statistics, broadcast over its rows or its maps
        shape = (1, -1, 1, 1) if maps else (self.running_mean.shape[0], 1, -1)
        y = (h - self.running_mean.reshape(shape)) * torch.rsqrt(self.running_var.reshape(shape) + m.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def state(self, k):
        out = {}
        if self.weight is not None:
            out["weight"] = self.weight[k]
        if self.bias is not None:
            out["bias"] = self.bias[k]
        if self.tracked:
            out.update(running_mean=self.running_mean[k], running_var=self.running_var[k],
                       num_batches_tracked=torch.tensor(self.count, dtype=torch.long))
        return out


class _Elementwise:
    def __init__(self, module: nn.Module):
        self.module = module

    def forward(self, h, training, gens):
        return self.module(h)


class _Dropout:
    def __init__(self, module: nn.Dropout):
        self.p = module.p

    def forward(self, h, training, gens):
        if not training or self.p == 0:
            return h
        # each member's mask from its own noise generator, drawn as the fused single-run step draws it:
        # over its rows (K, B, C), or over its channels_last maps, side by side in (B, K·C, H, W)
        maps = h.dim() == 4
        one = (h.shape[0], h.shape[1] // len(gens), *h.shape[2:]) if maps else h.shape[1:]
        layout = torch.channels_last if maps else torch.contiguous_format
        kernels = native.kernels() if h.device.type == "cpu" else None
        masks = [dropout_mask(one, layout, h.dtype, self.p, g, kernels) for g in gens]
        return h * (torch.cat(masks, 1) if maps else torch.stack(masks)).to(h.device)


class StackedNet:
    """K copies of one ``nn.Sequential`` network (an MLP or a CNN) as tensors with a leading member axis."""

    def __init__(self, models: list[nn.Sequential]):
        bad = stack_unsupported(models[0])
        if bad:
            raise ValueError("stacked training does not support: " + ", ".join(bad))
        self.template = models[0]
        self.names, self.ops = [], []
        programs = [program_of(m).ops for m in models]
        self.maps = not program_of(models[0]).is_mlp  # a CNN: maps side by side until its Flatten
        channels = None  # of the maps reaching each op
        for step in zip(*programs):
            first = step[0]
            mods = [op.module for op in step]
            if first.kind == "flatten" and not self.maps:
                continue  # forward flattens an MLP's input
            if first.kind == "flatten":
                op = _Flatten(channels)
            elif first.kind == "conv2d":
                op, channels = _Conv2d(mods), first.module.out_channels
            elif first.kind in ("linear", "batchnorm"):
                op = {"linear": _Linear, "batchnorm": _BatchNorm}[first.kind](mods)
            else:
                op = _Dropout(first.module) if first.kind == "dropout" else _Elementwise(first.module)
            self.names.append(first.name)
            self.ops.append(op)
        for t in self.parameters():
            t.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked tensors, in the single model's ``parameters()`` order."""
        return [t for op in self.ops if hasattr(op, "tensors") for t in op.tensors()]

    def _transposed(self) -> list[bool]:
        """Per parameter: stored transposed (a Linear weight is (K, in, out), the model's (out, in))."""
        return [isinstance(op, _Linear) and t is op.w for op in self.ops if hasattr(op, "tensors")
                for t in op.tensors()]

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

    def forward(self, x: torch.Tensor, training: bool, gens=()) -> torch.Tensor:
        """x: (K, B, ...) -> logits (K, B, classes)."""
        h = members_side_by_side(x) if self.maps else x.reshape(x.shape[0], x.shape[1], -1)
        for op in self.ops:
            h = op.forward(h, training, gens)
        return h

    def keep(self, rows: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Keep only the members ``rows``: a leaving member's tensors, gradients and optimizer state go."""
        old = self.parameters()
        for op in self.ops:
            for attr in ("w", "b", "weight", "bias", "running_mean", "running_var"):
                t = getattr(op, attr, None)
                if isinstance(t, torch.Tensor):
                    kept = t.detach()[rows].clone().requires_grad_(t.requires_grad)
                    if t.grad is not None:
                        kept.grad = t.grad[rows]
                    setattr(op, attr, kept)
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
        out = {}
        for name, op in zip(self.names, self.ops):
            if isinstance(op, (_Linear, _Conv2d)):
                out[f"{name}.weight"] = op.w.grad[k].t() if isinstance(op, _Linear) else op.w.grad[k]
                if op.b is not None:
                    out[f"{name}.bias"] = op.b.grad[k]
            elif isinstance(op, _BatchNorm):
                for attr in ("weight", "bias"):
                    t = getattr(op, attr)
                    if t is not None:
                        out[f"{name}.{attr}"] = t.grad[k]
        return out

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s tensors under the single model's state-dict keys."""
        out = {}
        for name, op in zip(self.names, self.ops):
            if hasattr(op, "state"):
                out.update({f"{name}.{key}": v.detach().clone() for key, v in op.state(k).items()})
        return out


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
    ``precision``: fp32 or bf16-mixed (matrix products in bfloat16 under autocast, BN statistics, weights
    and optimizer state float32: each member within bfloat16's rounding of its single bf16-mixed run)."""
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

    def leave(gone: list[_Member]) -> None:
        nonlocal alive
        for mem in gone:  # the leaving member's final weights go back to its model
            models[mem.index].load_state_dict(stack.member_state_dict(alive.index(mem)))
        rows = torch.tensor([i for i, mem in enumerate(alive) if mem not in gone], dtype=torch.long, device=dev)
        alive = [mem for mem in alive if mem not in gone]
        if alive:
            stack.keep(rows, opt)

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
            with autocast(precision, dev):
                logits = stack.forward(xb, True, [mem.noise for mem in alive])
            if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32, as the fused step takes it
                logits = logits.float()
            k_, b_ = yb.shape
            loss = F.cross_entropy(logits.reshape(k_ * b_, -1), yb.reshape(-1), reduction="none").view(k_, b_).mean(1)
            loss.sum().backward()
            correct = (logits.detach().argmax(2) == yb).sum(1)
            values = loss.detach().tolist()  # one read per step: the divergence check needs it anyway
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
        val = _evaluate(stack, data.x_val, data.y_val, eval_batch_size)
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


@torch.no_grad()
def _evaluate(stack: StackedNet, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Each member's (mean cross-entropy, accuracy) in eval mode; None without validation data."""
    if len(y) == 0:
        return None
    k = stack.parameters()[0].shape[0]
    loss = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        out = stack.forward(xb.unsqueeze(0).expand(k, *xb.shape), False)
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.repeat(k), reduction="none").view(k, -1)
        loss += ce.sum(1).double().cpu()
        correct += (out.argmax(2) == yb).sum(1).cpu()
    return [(float(loss[j]) / len(y), int(correct[j]) / len(y)) for j in range(k)]
