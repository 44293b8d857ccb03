"""Data-parallel training: ``fit(..., devices=N)`` as N processes under DistributedDataParallel.

What each process (rank) does, so that N ranks train what one process trains with the same global
batch (and, with ``norm = "syncbatch"``, the same BN statistics):

- Every rank draws the same data order (the run's order generator) and the same augmentation of the
  global batch, then keeps its own contiguous share of it (``torch.tensor_split``: sizes differ by at
  most one sample, so a batch of 10 on 4 ranks is 3, 3, 2, 2).
- Its loss is the SUM of its samples' cross-entropies times N / (global batch size): DDP averages the
  gradients over the N ranks, which then equal the gradient of the global batch's mean loss even when
  the shares are uneven.
- Loss and accuracy are summed over ranks (one all-reduce per step), so every rank sees the global
  numbers and takes the same decisions (divergence, budgets, early stopping); before each evaluation
  rank 0's buffers (BN running statistics, which plain per-device BN updates from its local batch
  only, as DDP does) are broadcast, so every rank holds rank 0's model.
- Rank 0 alone writes: the best checkpoint, the resume state, callbacks, the progress bar; its History
  and final weights come back to the caller, whose model is updated in place as with one process.

Processes: started with the ``spawn`` method (a fresh interpreter each; CPU: gloo, the parent's torch
threads shared among them; CUDA: nccl, rank r on ``cuda:r``). A rank ignores SIGINT and dies with its
parent, even one killed with SIGKILL (``bnlab.lifeline``: set up before the rank unpickles its work, so
before it imports torch; a rank whose parent died while it started ends there), and rank 0 looks at its
parent once more before it saves a resume state; the parent alone decides when to stop. If a rank dies
or raises, the others are terminated at once (no rank waits forever on a collective) and the parent
raises ``RankFailed`` naming it. Ctrl-C in the parent terminates every rank; with a state folder the run
continues later from the last epoch rank 0 saved (``RunInterrupted``).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bnlab import lifeline
from bnlab.train.precision import autocast

MAX_DEVICES = 64
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


class RankFailed(RuntimeError):
    """A rank of a data-parallel run raised or died; the other ranks were stopped. The message is one line;
    ``details``: the failing rank's traceback, when it raised."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details

    def __reduce__(self):
        return type(self), (str(self), self.details)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a data-parallel run (the default: a single process)."""

    rank: int = 0
    world: int = 1
    parent: int | None = None  # the process that started this rank (None: this process is the run)

    @property
    def writes(self) -> bool:
        """Whether this process writes files and talks to the user (rank 0). A rank whose parent is gone
        ends here: nothing is written for a run nobody waits for (``bnlab.lifeline``)."""
        if self.parent is not None:
            lifeline.check_parent(self.parent)
        return self.rank == 0

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision taken by the clock or a callback)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.broadcast(t, 0)
        return bool(t.item())

    def share_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics, step counts) on every rank."""
        if self.world > 1:
            for b in model.buffers():
                dist.broadcast(b, 0)


SOLO = Ranks()


def check_devices(devices: int, device: torch.device, batch_size: int) -> str:
    """The collective backend for ``devices`` processes on ``device``; a clear error when they cannot run."""
    if not isinstance(devices, int) or isinstance(devices, bool) or not 1 <= devices <= MAX_DEVICES:
        raise ValueError(f"devices must be an integer from 1 to {MAX_DEVICES} (got {devices!r})")
    if batch_size < 2 * devices:
        raise ValueError(f"a global batch of {batch_size} cannot give each of {devices} processes 2 samples (a batch "
                         f"norm over features cannot normalise one): use batch_size >= {2 * devices}")
    if device.type == "cuda":
        if devices > torch.cuda.device_count():
            raise ValueError(f"devices={devices} on CUDA needs {devices} GPUs; {torch.cuda.device_count()} visible")
        return "nccl"
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: data-parallel training is unavailable")
    return "gloo"


def shared_batches(batches: list[tuple[int, int]], world: int) -> list[tuple[int, int]]:
    """An epoch's batches for ``world`` processes: a last batch that cannot give every process 2 samples
    is dropped (as one process drops a last batch of one sample: ``engine.batch_bounds``)."""
    if world > 1 and len(batches) > 1 and batches[-1][1] - batches[-1][0] < 2 * world:
        return batches[:-1]
    return batches


class DistributedStep:
    """One data-parallel training step on this rank (the autograd path under DistributedDataParallel)."""

    applies_update = False

    def __init__(self, model: nn.Module, ranks: Ranks, precision: str = "fp32", backward=None):
        from torch.nn.parallel import DistributedDataParallel

        self.model, self.ranks, self.precision = model, ranks, precision
        self.device = next(model.parameters()).device
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=cuda)
        self.backward = backward or torch.Tensor.backward

    def __call__(self, x, y):
        for p in self.model.parameters():
            p.grad = None
        n = len(y)
        xs, ys = torch.tensor_split(x, self.ranks.world)[self.ranks.rank], torch.tensor_split(y, self.ranks.world)[self.ranks.rank]
        why = None
        try:
            with autocast(self.precision, self.device):
                out = self.ddp(xs)
                loss_sum = F.cross_entropy(out.float(), ys, reduction="sum")
            # (loss, correct, failed) summed over ranks BEFORE the backward, so that all ranks know whether any
            # failed and either all or none enter DDP's gradient all-reduce
            totals = torch.stack([loss_sum.detach().double(), (out.detach().argmax(1) == ys).sum().double(),
                                  torch.zeros((), dtype=torch.float64, device=self.device)])
        except FloatingPointError as e:  # this rank's BN statistics are not finite (per-device BN: this rank only)
            totals = torch.tensor([float("nan"), 0.0, 1.0], dtype=torch.float64, device=self.device)
            why = str(e)
        dist.all_reduce(totals)
        if totals[2] > 0:  # every rank stops here: fit records the divergence and trains no further
            raise FloatingPointError(why or f"non-finite BN statistics on {int(totals[2])} of {self.ranks.world} "
                                            "processes (their own batches)")
        self.backward(loss_sum * (self.ranks.world / n))  # DDP averages: the global batch's mean loss
        return (totals[0] / n).float(), totals[1].long()


# ---------------------------------------------------------------- starting and watching the ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, parent: int, port: int, backend: str, threads: int, out: str,
               fn: Callable, args: tuple) -> None:
    """A rank's life, once ``lifeline.start_child`` has run (SIGINT ignored, dying with its parent)."""
    try:
        torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        result = fn(Ranks(rank, world, parent), *args)
        torch.save(result, Path(out) / f"rank{rank}.pt.tmp")
        os.replace(Path(out) / f"rank{rank}.pt.tmp", Path(out) / f"rank{rank}.pt")  # complete, or absent
        dist.barrier()  # no rank tears the group down while another still needs it
    except Exception:  # for the parent, which names the rank that failed first, not those that lost their peer
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    else:
        code = 0
    # leave without the interpreter's teardown, where gloo's threads have been seen to abort a finished
    # rank (SIGABRT, "terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


STOP_GRACE = 5.0  # seconds a rank has to end after SIGTERM before SIGKILL


def _stop(procs: list) -> set[int]:
    """Terminate every live rank (SIGKILL after ``STOP_GRACE``) and reap it; the ranks that needed SIGKILL."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    killed = set()
    for r, p in enumerate(procs):
        p.join(STOP_GRACE)
        if p.is_alive():
            p.kill()
            p.join()
            killed.add(r)
    return killed


def run_ranks(fn: Callable[..., Any], world: int, args: tuple = (), *, backend: str = "gloo",
              threads: int | None = None) -> list[Any]:
    """Call ``fn(Ranks(r, world), *args)`` in ``world`` fresh processes joined in one process group and
    return each rank's return value (in rank order). ``fn`` must be importable (a module-level function);
    ``args`` are pickled (tensors through shared memory). A rank that raises or dies stops the others
    and raises ``RankFailed`` here; a KeyboardInterrupt here terminates every rank and propagates.
    Every rank dies with this process (``bnlab.lifeline``), so call it from a thread that waits here."""
    import multiprocessing
    from multiprocessing.connection import wait

    import torch.multiprocessing  # noqa: F401  (its pickling of tensors through shared memory)

    threads = threads or max(1, torch.get_num_threads() // world)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bnlab-ranks-") as out:
        port = _free_port()
        procs = [lifeline.spawn_process(ctx, _rank_main, (r, world, os.getpid(), port, backend, threads, out, fn,
                                                          args), name=f"bnlab-rank-{r}") for r in range(world)]
        try:
            with lifeline.held_signals():  # a rank begins with SIGINT / SIGTERM blocked: see bnlab.lifeline
                for p in procs:
                    p.start()
            waiting = {p.sentinel: r for r, p in enumerate(procs)}
            failed = None
            while waiting and failed is None:
                for s in wait(list(waiting)):
                    r = waiting.pop(s)
                    procs[r].join()
                    if procs[r].exitcode != 0:
                        failed = r
                        break
        except BaseException:
            _stop([p for p in procs if p.pid is not None])
            raise
        if failed is not None:
            killed = _stop(procs)
            # every rank had saved its result: an exit that failed afterwards loses nothing
            if not all((Path(out) / f"rank{r}.pt").is_file() for r in range(world)):
                raise _first_failure(failed, world, Path(out), [p.exitcode for p in procs], killed)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# what a rank raises when another rank is gone: a consequence, not the cause
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _first_failure(first: int, world: int, out: Path, exitcodes: list[int | None],
                   stopped: set[int]) -> RankFailed:
    """Which rank failed first, and why: a rank's own error rather than another's lost connection to it,
    else a rank that died without a word (killed, a crash in native code) and not by our stopping it,
    else ``first``, the one seen ending first."""
    errors = {r: (out / f"rank{r}.err").read_text().strip() for r in range(world) if (out / f"rank{r}.err").exists()}
    own = [r for r, text in errors.items() if not any(p in text for p in _LOST_PEER)]
    if own:
        return RankFailed(f"rank {own[0]} of {world} failed: {errors[own[0]].splitlines()[-1]}", errors[own[0]])
    # the other ranks were stopped with SIGTERM: a rank ended otherwise, with no error of its own, died first
    silent = [r for r in range(world)
              if r not in errors and r not in stopped and exitcodes[r] not in (None, 0, -signal.SIGTERM)]
    r = silent[0] if silent else first
    code = exitcodes[r]
    how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in signal.valid_signals()
           else f"exit code {code}")
    hint = ("; it ended before reaching bnlab (its start re-imports the calling script: a script that calls "
            "fit(devices=N) at its top level needs the call under `if __name__ == \"__main__\":`)"
            if code == 1 and not errors else "")
    return RankFailed(f"rank {r} of {world} died ({how}); the other ranks were stopped{hint}")


def _fit_rank(ranks: Ranks, model: nn.Module, data, kwargs: dict) -> Any:
    import copy

    from bnlab.train.engine import fit

    model = copy.deepcopy(model)  # its tensors arrived in memory shared by every rank: train a copy of its own
    hist = fit(model, data, _ranks=ranks, **kwargs)
    # the model comes back to the caller from rank 0 only
    return (hist, {k: v.cpu() for k, v in model.state_dict().items()}) if ranks.writes else None


def fit_on_ranks(model: nn.Module, data, devices: int, kwargs: dict):
    """``fit(model, data, devices=devices, **kwargs)``: rank 0's History; ``model`` ends with its weights."""
    from bnlab.train.engine import resolve_device
    from bnlab.train.resume import RunInterrupted, read_state

    dev = resolve_device(kwargs.get("device", "auto"))
    backend = check_devices(devices, dev, kwargs.get("batch_size", 32))
    if backend == "gloo" and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError("torch.nn.SyncBatchNorm works on GPUs only; on CPU use bnlab's: "
                         "bnlab.convert(model, 'syncbatch') (or norm = \"syncbatch\" in a model spec)")
    if kwargs.get("probes") is not None:
        raise ValueError("probes record one process's view of the network; train with devices=1 to use them")
    if kwargs.get("engine", "auto") in ("native", "fused"):
        raise ValueError(f"engine={kwargs['engine']!r} runs in one process; data-parallel training takes the "
                         "autograd step (use engine='auto')")
    was = model.training
    try:
        results = run_ranks(_fit_rank, devices, (model.cpu(), data.to("cpu"), kwargs), backend=backend)
    except KeyboardInterrupt as e:
        state_dir = kwargs.get("state_dir")
        if state_dir is None:
            raise
        state, _ = read_state(state_dir, kwargs.get("state_settings"))
        raise RunInterrupted(0 if state is None else state.epoch) from e
    hist, weights = results[0]
    model.load_state_dict(weights)
    model.to(dev).train(was)
    return hist


__all__ = ["MAX_DEVICES", "DistributedStep", "RankFailed", "Ranks", "SOLO", "check_devices", "fit_on_ranks",
           "run_ranks"]
