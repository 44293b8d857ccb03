"""``fit``: train a model on a prepared Dataset and return its History.

Data stays in tensors on the training device; each epoch draws one seeded permutation and slices
it (no DataLoader, no per-sample Python). MLPs take the C++ step of ``bnlab.train.native`` where it
applies (CPU, no dropout, the library built), else the Python fused step of
``bnlab.train.fused``; everything else the ordinary autograd step. Same seed, same history on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.data.augment import RandomAffine
from bnlab.data.dataset import Dataset
from bnlab.train.fused import MIXED, FusedMLPStep, unsupported_layers
from bnlab.train.history import EpochRecord, History
from bnlab.nn.layout import for_inference
from bnlab.nn.norms import plan_run_length
from bnlab.train.optim import LRSchedule, make_optimizer, planned_updates
from bnlab.train.precision import OptimizerStep, autocast, check_precision
from bnlab.train.distributed import SOLO, DistributedStep, Ranks, shared_batches
from bnlab.train.callbacks import Monitor, ProbeRecorder, ProgressBar, TrainContext, overrides
from bnlab.train.resume import RunInterrupted, TrainState, read_state, rng_states, save_state, set_rng_states

ENGINES = ("auto", "native", "fused", "autograd")


class Diverged(FloatingPointError):
    """The loss became NaN or inf."""


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             precision: str = "fp32") -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (the model's mode is restored), the forward pass
    in ``precision``."""
    if len(y) == 0:
        return float("nan"), float("nan")
    if x.dim() == 4:  # image batches: a channels_last copy, in chunks that stay in cache (2x faster measured)
        model, batch_size = for_inference(model), min(batch_size, 256)
    was = model.training
    model.eval()
    loss, correct = torch.zeros((), dtype=torch.float64), 0
    try:
        for i in range(0, len(y), batch_size):
            with autocast(precision, x.device):
                out = model(x[i:i + batch_size])
            if out.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in float32
                out = out.float()
            loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").double().cpu()
            correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return float(loss) / len(y), correct / len(y)


class AutogradStep:
    """The ordinary path: forward (under the precision's autocast), cross-entropy, backward."""

    applies_update = False

    def __init__(self, model: nn.Module, precision: str = "fp32", backward=None):
        self.model, self.precision = model, precision
        self.backward = backward or torch.Tensor.backward  # fp16: the loss scaler's backward
        self.device = next(model.parameters()).device

    def __call__(self, x, y):
        for p in self.model.parameters():
            p.grad = None
        with autocast(self.precision, self.device):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        self.backward(loss)
        return loss.detach(), (out.detach().argmax(1) == y).sum()


def make_step(model: nn.Module, engine: str, generator: torch.Generator | None, *, sgd_lr: float | None = None,
              precision: str = "fp32", backward=None):
    """The step function for ``engine`` and the name of the engine used; ``sgd_lr`` lets the fused
    steps apply plain SGD themselves. Mixed precision takes the autograd step under autocast
    (``backward``: how the loss is back-propagated, the fp16 loss scaler's way)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES}")
    bad = unsupported_layers(model)
    if engine in ("fused", "native") and bad:
        raise ValueError(f"engine={engine!r} needs an MLP; unsupported: " + ", ".join(bad))
    if engine == "native" and precision != "fp32" or engine == "fused" and precision not in MIXED:
        raise ValueError(f"engine={engine!r} does not run precision {precision!r}; use engine='auto' or 'autograd'")
    if engine == "autograd" or bad or precision not in MIXED:
        return AutogradStep(model, precision, backward), "autograd"
    if precision != "fp32":
        return FusedMLPStep(model, generator, precision=precision), "fused"
    if engine in ("auto", "native"):
        from bnlab.train import native
        w = next(model.parameters())
        why = native.native_unsupported(model, w.device, w.dtype)
        if not why and native.load() is None:
            why = [f"the native library is unavailable ({native.unavailable_reason()})"]
        if not why:
            return native.NativeMLPStep(model, sgd_lr=sgd_lr), "native"
        if engine == "native":
            raise ValueError("engine='native' cannot run this model: " + ", ".join(why))
    return FusedMLPStep(model, generator, sgd_lr=sgd_lr), "fused"


def stream_seed(seed: int, stream: str) -> int:
    """A seed for the random stream ``stream`` of run ``seed``: independent streams for independent
    uses (numpy's SeedSequence over the seed and the stream's bytes; never ``hash()``)."""
    import numpy as np

    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF] + list(stream.encode())
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The (start, end) of each batch of an epoch over ``n`` examples. A last batch of one sample
    cannot train BN (and gives a noisy step): it is dropped."""
    if n < 2:
        raise ValueError(f"need at least 2 training examples (got {n})")
    batches = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] == 1:
        batches.pop()
    return batches


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """The order of the ``n`` training examples in one epoch: a permutation drawn from the run's
    data-order generator (seeded by the run seed alone)."""
    return torch.randperm(n, generator=generator)


def _own_settings(model: nn.Module, data: Dataset, hyper: dict) -> dict:
    """What a state saved by ``fit`` is keyed by when its caller gives no settings: the model's spec
    (else its tensors' names, shapes and dtypes), the data's name and sizes, and fit's arguments."""
    spec = getattr(model, "spec", None)
    arch = (spec.model_dump(mode="json") if hasattr(spec, "model_dump") else
            [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()])
    return {"model": arch, "fit": hyper,
            "data": {"name": data.name, "input_shape": list(data.input_shape), "train": len(data.y_train),
                     "validation": len(data.y_val)}}


def fit(model: nn.Module, data: Dataset, *, optimizer: str = "sgd", lr: float = 1e-3, momentum: float = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0, batch_size: int = 32, epochs: int = 10,
        seed: int = 0, target_accuracy: float | None = None, augment: RandomAffine | None = None,
        engine: str = "auto", device: str | None = "auto", checkpoint_dir: str | Path | None = None,
        monitor: str = "val_accuracy", patience: int | None = None, max_steps: int | None = None,
        max_seconds: float | None = None, probes=None,
        progress: bool = True, eval_batch_size: int = 1024, keras_defaults: bool = True,
        checkpoint_meta: dict | None = None, state_dir: str | Path | None = None,
        state_settings: dict | None = None, resume_from: TrainState | None = None,
        callbacks: list | None = None, precision: str = "fp32", devices: int = 1,
        lr_schedule: str = "constant", _ranks: Ranks | None = None) -> History:
    """Train ``model`` on ``data`` and return the History.

    optimizer: sgd (momentum, nesterov) | rmsprop | adam; cross-entropy on logits.
    target_accuracy: record the steps / epochs / seconds at which validation accuracy first reaches it.
    checkpoint_dir: keep the best model by ``monitor`` (val_accuracy or val_loss) there (safetensors + JSON;
    meta ``kind="best"`` and its ``epoch``).
    patience: stop after this many epochs without improvement of ``monitor``.
    max_steps / max_seconds: budgets; the run ends (after evaluating) once either is used up.
    probes: a ``bnlab.probes.ProbeConfig`` (or ``Probes``) to record what happens inside the network.
    lr_schedule: constant | cosine | step over the run's budget of updates (``optim.scheduled_lr``).
    A NaN/inf loss stops the run (history kept, ``stopped="diverged"``).
    precision: fp32 (default: exact numerics) | bf16-mixed | fp16-mixed (CUDA only, with loss scaling);
    ``bnlab.train.precision`` says what runs in which type.
    devices: data-parallel training over this many processes (DistributedDataParallel; gloo on CPU, nccl on
    CUDA), the global batch split among them: ``bnlab.train.distributed`` says how; rank 0's History and
    weights come back. A model's ``syncbatch`` norms then normalise with the global batch's statistics.
    The processes are started with ``spawn``, which re-imports the calling script: call ``fit(devices=N)``
    under ``if __name__ == "__main__":`` (as with any torch multiprocessing).
    callbacks: ``bnlab.train.callbacks.Callback`` objects (TensorBoard, CSVLogger, your own): the protocol
    is in that module; a callback's ``ctx.request_stop`` ends training after the epoch (``stopped="callback"``).

    state_dir: write the resumable state (``bnlab.train.resume``) there at the end of every epoch, and
    continue from the valid state of the same settings found there (a state that is corrupt or of
    other settings is ignored; the first epoch saved replaces it). ``state_settings``: what the state
    is keyed by (``train_run``: the run's model spec and TrainConfig; default: fit's own arguments, the
    model's spec and the data's name and sizes). ``resume_from``: a state already read
    (``resume.read_state``) to continue from instead of reading ``state_dir``. A state of a finished
    training (all epochs, early stopping, a budget) gives back its model and History at once.
    Continuing gives what an uninterrupted run gives, bit for bit on a CPU with the same thread count
    (History, weights, the best checkpoint), except wall-clock values (each epoch's ``seconds``,
    ``seconds_to_target``) and runs with a ``max_seconds`` budget, whose stopping point follows the
    clock (the training seconds before the interruption count towards the budget).

    Ctrl-C (any KeyboardInterrupt) ends training: without ``state_dir`` the History so far comes back
    with ``stopped="interrupted"`` (never a finished run); with one, ``RunInterrupted`` is raised,
    carrying the last epoch whose state is saved.
    """
    args = {k: v for k, v in locals().items() if k not in ("model", "data", "_ranks")}
    ranks = _ranks or SOLO
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1 (got batch_size={batch_size}, epochs={epochs})")
    if monitor not in ("val_accuracy", "val_loss"):
        raise ValueError(f"monitor must be val_accuracy or val_loss (got {monitor!r})")
    if tuple(data.input_shape) != tuple(getattr(getattr(model, "spec", None), "input_shape", data.input_shape)):
        raise ValueError(f"the model expects inputs of shape {tuple(model.spec.input_shape)} but dataset "
                         f"{data.name!r} has {data.input_shape}")
    if state_dir is not None and state_settings is None:
        state_settings = _own_settings(model, data, {
            "optimizer": optimizer, "lr": lr, "momentum": momentum, "nesterov": nesterov,
            "weight_decay": weight_decay, "batch_size": batch_size, "epochs": epochs, "seed": seed,
            "target_accuracy": target_accuracy, "augment": None if augment is None else asdict(augment),
            "engine": engine, "device": device, **({} if precision == "fp32" else {"precision": precision}),
            **({} if devices == 1 else {"devices": devices}),
            **({} if lr_schedule == "constant" else {"lr_schedule": lr_schedule}),
            "monitor": monitor, "patience": patience, "max_steps": max_steps,
            "max_seconds": max_seconds, "eval_batch_size": eval_batch_size, "keras_defaults": keras_defaults,
            "probes": None if probes is None else getattr(probes, "config", probes).model_dump(mode="json")})
    if devices != 1 and _ranks is None:  # this process starts the ranks and waits for them
        from bnlab.train.distributed import fit_on_ranks
        return fit_on_ranks(model, data, devices, {**args, "state_settings": state_settings})
    if ranks.world > 1 and not ranks.writes:  # rank 0 alone writes files and talks to the user
        checkpoint_dir, callbacks, progress = None, None, False
    not_resumed = None  # why a state found in state_dir is not continued from
    if state_dir is not None and resume_from is None:
        resume_from, not_resumed = read_state(state_dir, state_settings)
    dev = resolve_device(device)
    check_precision(precision, dev)
    # nn.Dropout in the autograd path draws from the global RNG (each rank its own masks)
    torch.manual_seed(seed if ranks.rank == 0 else stream_seed(seed, f"rank {ranks.rank}"))
    # paired design: the data order has a generator of its own, seeded by the run seed only, so runs
    # of different variants with one seed see the same batches in the same order, whatever dropout
    # or augmentation the variants draw from ``gen``; different seeds give different orders
    order_gen = torch.Generator().manual_seed(seed)
    gen = torch.Generator().manual_seed(stream_seed(seed, "noise"))  # dropout masks, augmentation
    generators = {"order": order_gen, "noise": gen}
    model.to(dev).train()
    data = data.to(dev)
    # the fused steps apply a constant-rate plain SGD themselves; a schedule goes through torch.optim
    plain_sgd = optimizer == "sgd" and momentum == 0 and weight_decay == 0 and lr_schedule == "constant"
    if ranks.world > 1:
        step, engine_used = DistributedStep(model, ranks, precision), "autograd"
    else:
        step, engine_used = make_step(model, engine, gen, sgd_lr=lr if plain_sgd and precision == "fp32" else None,
                                      precision=precision)
    # the fused step applies plain SGD itself; building a torch.optim optimizer would also cost the
    # ~2 s first-time import of torch._dynamo that torch.optim.Optimizer triggers
    opt = None if step.applies_update else make_optimizer(
        optimizer, list(model.parameters()), lr=lr, momentum=momentum, nesterov=nesterov,
        weight_decay=weight_decay, keras_defaults=keras_defaults)
    opt_step = OptimizerStep(opt, precision, dev)
    if opt_step.scaler is not None:
        step.backward = opt_step.backward
    n = len(data.y_train)
    batches = shared_batches(batch_bounds(n, batch_size), ranks.world)
    planned = planned_updates(epochs, len(batches), max_steps)
    schedule = LRSchedule(opt, lr, lr_schedule, planned)
    plan_run_length(model, planned)
    hist = History(target_accuracy=target_accuracy, engine=engine_used, precision=precision, devices=ranks.world)
    if probes is not None:
        from bnlab.probes import ProbeConfig, Probes, probe_test_set, select_probe_batch
        probes = Probes(model, probes, lr=lr) if isinstance(probes, ProbeConfig) else probes
        if probes.batch is None:  # the fixed held-out probe batch: the same images at every sampled step
            probes.batch, probes.from_validation = select_probe_batch(data, probes.config)
        if probes.test is None:
            probes.test = probe_test_set(data, probes.config)
    monitor_cb = Monitor(monitor, patience, checkpoint_dir, checkpoint_meta)
    steps_done = 0
    done_before, elapsed_before, finished = 0, 0.0, False
    if resume_from is not None:
        _restore(resume_from, model, opt, generators, dev, probes)
        hist, hist.engine, hist.precision, hist.devices = resume_from.history, engine_used, precision, ranks.world
        monitor_cb.best_value, monitor_cb.best_epoch = resume_from.best_value, resume_from.best_epoch
        monitor_cb.since_best = resume_from.since_best
        steps_done, done_before = resume_from.steps, resume_from.epoch
        elapsed_before, finished = resume_from.elapsed, resume_from.finished
    bar = progress if isinstance(progress, ProgressBar) else ProgressBar(bool(progress))
    # fit's own callbacks first (the best checkpoint is written before any user callback sees the epoch)
    cbs = [bar, monitor_cb] + ([ProbeRecorder(probes)] if probes is not None else []) + list(callbacks or [])
    step_begin = [c for c in cbs if overrides(c, "on_step_begin")]
    step_end = [c for c in cbs if overrides(c, "on_step_end")]
    ctx = TrainContext(model, data, hist, epochs, len(batches), dev, lr, probes, done_before)
    saved_epoch = done_before  # the last epoch whose state is on disk
    check_every = 1 if dev.type == "cpu" else 25  # a finiteness check syncs a GPU
    start = time.perf_counter() - elapsed_before  # a time budget goes on where it stopped
    for c in cbs:
        c.on_train_begin(ctx)
    if resume_from is not None:
        where = f" (state in {state_dir})" if state_dir is not None else ""
        bar.say(f"training had already finished at epoch {done_before} of {epochs}{where}" if finished
                else f"continuing from epoch {done_before} of {epochs}{where}")
    elif not_resumed:
        bar.say(f"not resumed: {not_resumed}; starting from zero")
    try:
        for epoch in range(done_before + 1, (done_before if finished else epochs) + 1):
            t0 = time.perf_counter()
            perm = epoch_order(n, order_gen).to(dev)
            losses, corrects = [], []  # 0-d tensors, stacked once per epoch
            seen = 0
            for b, (i, j) in enumerate(batches):
                idx = perm[i:j]
                xb, yb = data.x_train.index_select(0, idx), data.y_train.index_select(0, idx)
                if augment is not None and augment.active:
                    xb = augment(xb, gen)
                for c in step_begin:
                    c.on_step_begin(ctx, steps_done + 1)
                try:
                    loss, corr = step(xb, yb)
                except FloatingPointError as e:  # BN's non-finite statistics
                    raise Diverged(str(e)) from e
                if b % check_every == 0 and not math.isfinite(float(loss)):
                    raise Diverged(f"loss became {float(loss)} at epoch {epoch}, step {steps_done + 1}: "
                                   "the run diverged (lower the learning rate?)")
                schedule(steps_done)
                opt_step()
                steps_done += 1
                for c in step_end:
                    c.on_step_end(ctx, steps_done, loss, corr, xb, yb)
                losses.append(loss)
                corrects.append(corr)
                seen += j - i
                if max_steps is not None and steps_done >= max_steps:
                    break
                if max_seconds is not None and b % 10 == 9 and ranks.agree(time.perf_counter() - start >= max_seconds):
                    break
            done = torch.stack(losses)
            correct = int(torch.stack(corrects).sum())
            hist.step_loss.extend(done.tolist())
            if not math.isfinite(float(done.sum())):
                raise Diverged(f"loss became non-finite during epoch {epoch}: the run diverged")
            ranks.share_buffers(model)  # every rank evaluates rank 0's model, and so decides alike
            val_loss, val_acc = evaluate(model, data.x_val, data.y_val, batch_size=eval_batch_size)
            rec = EpochRecord(epoch, float(done.mean()), correct / seen,
                              None if math.isnan(val_loss) else val_loss,
                              None if math.isnan(val_acc) else val_acc, time.perf_counter() - t0, steps_done)
            hist.record(rec, time.perf_counter() - start)
            for c in cbs:
                c.on_epoch_end(ctx, rec)
            if monitor_cb.stopped:
                hist.stopped = "early_stopping"
                hist.message = f"no improvement of {monitor} for {patience} epochs"
            elif max_steps is not None and steps_done >= max_steps:
                hist.stopped, hist.message = "budget", f"step budget of {max_steps} used"
            elif max_seconds is not None and ranks.agree(time.perf_counter() - start >= max_seconds):
                hist.stopped, hist.message = "budget", f"time budget of {max_seconds} s used"
            elif ranks.agree(ctx.stop_message is not None):
                hist.stopped, hist.message = "callback", ctx.stop_message or "stopped by a callback on rank 0"
            finished = hist.stopped != "completed" or epoch == epochs
            if state_dir is not None and ranks.writes:  # after the best checkpoint, so the state never runs ahead of it
                save_state(state_dir, TrainState(
                    epoch, steps_done, time.perf_counter() - start, finished, hist, monitor_cb.best_value,
                    monitor_cb.best_epoch, monitor_cb.since_best, engine_used, model.state_dict(),
                    None if opt is None else opt.state_dict()["state"], rng_states(generators, dev),
                    None if probes is None else probes.state()), state_settings)
                saved_epoch = epoch
            if finished:
                break
    except Diverged as e:
        hist.stopped, hist.message = "diverged", str(e)
        bar.say(f"[diverged] {e}")
    except KeyboardInterrupt as e:
        if state_dir is not None:
            raise RunInterrupted(saved_epoch) from e
        hist.stopped, hist.message = "interrupted", "stopped by the user (Ctrl-C)"
    finally:
        hist.best_epoch = monitor_cb.best_epoch
        if probes is not None:
            hist.probes = [list(r) for r in probes.records]
            probes.close()
        for c in cbs:
            c.on_train_end(ctx)
    return hist


def _restore(state: TrainState, model: nn.Module, opt, generators: dict[str, torch.Generator],
             dev: torch.device, probes) -> None:
    """Put a saved state back into the objects ``fit`` trains with, in place (the steps hold the
    model's tensors and the generators)."""
    model.load_state_dict(state.model)  # copies into the existing tensors
    if opt is not None and state.optimizer is not None:
        saved = opt.state_dict()
        saved["state"] = state.optimizer  # this optimizer's own param_groups: the same settings
        opt.load_state_dict(saved)
    set_rng_states(state.rng, generators, dev)
    if probes is not None and state.probes is not None:
        probes.load_state(state.probes)
