"""The native library, built on first use, cached, and driven from here: the MLP step
(``native/mlp_step.cpp``) and the kernels the fused CNN step calls (``bn_act.cpp``: BN with the activation
after it; ``dropout.cpp``: hashed dropout; ``pool.cpp``: side-by-side max-pooling).

Why the MLP step: the Python fused step (``bnlab.train.fused``) still dispatches ~40 small ops per batch,
which at batch 32 on a CPU costs more than the arithmetic. The C++ step runs the same maths in one call:
plain loops for BN, activations and the loss, ATen for the matrix products.

It is built with PyTorch's own extension builder (a C++ compiler and ninja are needed; the first
build takes ~30 s, later runs load the cached library from ``build_dir()``). Where it cannot be
built, or for what it does not support (CUDA, dropout, frozen parameters), the engine uses
the Python fused step (with ATen's kernels) instead and says so in ``History.engine``. ``BNLAB_NATIVE=0`` turns it off;
``python -c "from bnlab.train import native; native.load(verbose=True)"`` shows the compiler's output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from bnlab.conventions import get_convention, running_update
from bnlab.nn import BatchNorm
from bnlab.nn.activations import BY_MODULE, activation_parameter
from bnlab.train.program import program_of

NATIVE_DIR = Path(__file__).with_name("native")
SOURCES = ("mlp_step.cpp", "bn_act.cpp", "dropout.cpp", "pool.cpp")  # compiled into one library
HEADERS = ("activations.h", "bn_core.h", "lanes.h")
SLOTS = 7  # tensors and scalars per op, as in mlp_step.cpp
_LINEAR, _BATCHNORM, _ACTIVATION = 0, 1, 2

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    """The CPU's instruction-set flags on Linux ('' elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def compile_flags() -> list[str]:
    """-O3, plus -march=native where the CPU is known: the BN and update loops then use its widest
    vectors. The build folder is keyed by the CPU flags, so a shared cache never hands one CPU's
    build to another."""
    if sys.platform == "win32":
        return ["/O2"]
    flags = ["-O3", "-march=native"] if _cpu_flags() and platform.machine() in ("x86_64", "AMD64") else ["-O3"]
    return flags + openmp_flags()


def openmp_flags() -> list[str]:
    """-fopenmp where torch's threads are OpenMP's on Linux: ``at::parallel_for`` is an inline OpenMP
    loop, so without it the kernels run on one thread. The library then uses the OpenMP runtime torch
    has already loaded (same soname), not a second one."""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def build_dir() -> Path:
    """Where the compiled library is cached: $BNLAB_NATIVE_DIR, else the user cache folder, in a
    sub-folder per torch version, torch installation, CPU and source text (so checkouts, environments and
    versions never collide: the build files name the installation's include paths)."""
    if os.environ.get("BNLAB_NATIVE_DIR"):
        root = Path(os.environ["BNLAB_NATIVE_DIR"])
    else:
        from platformdirs import user_cache_dir
        root = Path(user_cache_dir("bnlab")) / "native"
    key = hashlib.sha256(f"{platform.machine()} {_cpu_flags()} {Path(torch.__file__).parent}".encode()
                         + b"".join((NATIVE_DIR / f).read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:16]
    return root / f"torch-{torch.__version__}-{key}"


@contextlib.contextmanager
def _bundled_ninja():
    """torch's builder runs ``ninja`` from PATH: put the ninja installed with bnlab first while it
    builds (its bin folder is not on PATH when bnlab runs as ``.venv/bin/bnlab``, and a system
    ninja of another version would not read the pinned one's build log, so would rebuild)."""
    old = os.environ.get("PATH")
    try:
        import ninja
        os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, old) if p)
    except ImportError:
        pass
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


STALE_LOCK_SECONDS = 600  # without OS locks: a build takes ~30 s, so an older lock file was left behind


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Held around torch's build. torch guards a build with a lock file that a killed build (kill -9,
    power loss) leaves behind, after which every later build waits forever. An OS lock is released
    when its process dies, so whoever holds it and still finds torch's lock file knows that file is
    stale and removes it. Where there are no OS file locks, a lock file older than
    STALE_LOCK_SECONDS counts as stale."""
    baton = folder / "lock"
    try:
        import fcntl
    except ImportError:  # Windows
        if baton.exists() and time.time() - baton.stat().st_mtime > STALE_LOCK_SECONDS:
            baton.unlink(missing_ok=True)
        yield
        return
    with open(folder / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if baton.exists():
                print(f"bnlab: removing {baton}, left by an interrupted build", file=sys.stderr, flush=True)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(verbose: bool = False):
    """The ``torch.classes.bnlab_native`` namespace, building the library if needed; None (with the
    reason in ``unavailable_reason()``) where it cannot be built or is turned off."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops, reason = None, None
        if os.environ.get("BNLAB_NATIVE", "1") == "0":
            reason = "turned off by BNLAB_NATIVE=0"
        else:
            try:
                from torch.utils.cpp_extension import load as build
                folder = build_dir()
                folder.mkdir(parents=True, exist_ok=True)
                # compiled from copies inside the folder: the same command line from every checkout,
                # so ninja's log stays valid and no checkout rebuilds another's library
                for name in SOURCES + HEADERS:
                    copy, text = folder / name, (NATIVE_DIR / name).read_bytes()
                    if not copy.exists() or copy.read_bytes() != text:
                        copy.write_bytes(text)
                if not (folder / "bnlab_native.so").exists() and not verbose:
                    print("bnlab: compiling the native kernels for this machine (once, ~30 s)...",
                          file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                with _build_lock(folder), _bundled_ninja():
                    build("bnlab_native", [str(folder / name) for name in SOURCES], extra_cflags=compile_flags(),
                          extra_ldflags=openmp_flags(), build_directory=str(folder), is_python_module=False,
                          verbose=verbose)
                _state["seconds"] = time.perf_counter() - t0
                ops = torch.classes.bnlab_native
            except Exception as e:  # no compiler, no ninja, a read-only cache...: the Python step still works
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                print(f"bnlab: the native library is unavailable ({reason}); models train with the Python "
                      "fused step and ATen's kernels (slower). native.load(verbose=True) shows the compiler's output.",
                      file=sys.stderr, flush=True)
        _state["ops"], _state["reason"] = ops, reason
        return ops


def kernels():
    """The fused step's native kernels (``torch.ops.bnlab_native``: ``bn_act_forward`` / ``_backward``,
    ``hashed_dropout``, ``max_pool_forward`` / ``_backward``), or None where the library cannot be built
    or is turned off."""
    return torch.ops.bnlab_native if load() is not None else None


def unavailable_reason() -> str | None:
    """Why ``load()`` returned None (None if it has not been called or succeeded)."""
    return _state.get("reason")  # type: ignore[return-value]


def load_seconds() -> float | None:
    """How long ``load()`` took: building and loading, or only loading the cached library."""
    return _state.get("seconds")  # type: ignore[return-value]


def native_unsupported(model: nn.Sequential, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the native step cannot run this (already fused-supported) MLP; empty: it can."""
    return program_of(model).unsupported("native", device, dtype, model)


def _check_widths(model: nn.Sequential) -> None:
    """The C++ loops trust each BN's size to match the features reaching it: check that once here."""
    width = None
    for name, mod in model.named_children():
        if isinstance(mod, nn.Linear):
            if width is not None and mod.in_features != width:
                raise ValueError(f"layer {name} takes {mod.in_features} features but receives {width}")
            width = mod.out_features
        elif isinstance(mod, BatchNorm):
            if width is not None and mod.num_features != width:
                raise ValueError(f"layer {name} normalises {mod.num_features} features but receives {width}")
            width = mod.num_features


class NativeMLPStep:
    """Same interface and maths as ``FusedMLPStep``, one C++ call per batch.

    ``sgd_lr=None``: gradients land in ``.grad`` for an optimizer (overwritten by each step, so no
    zero_grad is needed); else plain SGD in place. The step holds the model's tensors: build it
    after ``model.to(...)``.
    """

    def __init__(self, model: nn.Sequential, *, sgd_lr: float | None = None):
        self.ops = load()
        if self.ops is None:
            raise RuntimeError(f"the native step is not available ({unavailable_reason()})")
        self.model = model
        self.applies_update = sgd_lr is not None
        self.lr = 0.0 if sgd_lr is None else float(sgd_lr)
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, the tensor its gradient goes to)
        self.bns: list[tuple[int, BatchNorm]] = []  # (op index, module)
        self.batch_size = None  # the running-statistics scalars below are set for this batch size
        codes: list[int] = []
        tensors: list[torch.Tensor | None] = []
        scalars: list[float] = []
        _check_widths(model)
        for op in program_of(model).ops:
            mod = op.module
            if op.kind in ("flatten", "dropout"):  # the step flattens its input; p=0 dropout is identity
                continue
            slots: list[torch.Tensor | None] = [None] * SLOTS
            values = [0.0] * SLOTS
            if op.kind == "linear":
                code = (_LINEAR, 0)
                slots[:4] = [mod.weight, mod.bias, self._grad(mod.weight), self._grad(mod.bias)]
            elif op.kind == "batchnorm":
                code = (_BATCHNORM, 0)
                slots[:4] = [mod.weight, mod.bias, self._grad(mod.weight), self._grad(mod.bias)]
                if mod.track_running_stats:
                    slots[4:7] = [mod.running_mean, mod.running_var, mod.num_batches_tracked]
                    self.bns.append((len(codes) // 2, mod))
                # factor and variance correction: set per batch size by _set_running_updates
                values[:4] = [mod.eps, 0.0, 1.0, float(mod.track_running_stats)]
            else:
                code = (_ACTIVATION, BY_MODULE[type(mod)].native)
                values[0] = activation_parameter(mod)
            codes += code
            tensors += slots
            scalars += values
        self.has_bn = _BATCHNORM in codes[::2]
        self.scalars = scalars
        self.program = self.ops.MLPProgram(tensors, codes, scalars)

    def _set_running_updates(self, batch_size: int) -> None:
        """Each BN's factor and variance correction for this batch size, from ``running_update`` (the
        one rule). momentum=None's factor 1/num_batches_tracked changes every step: the C++ applies it
        (factor -1), and tests/test_running_stats.py checks it against the rule."""
        for o, mod in self.bns:
            u = running_update(get_convention(mod.convention), mod.momentum, 1, batch_size)
            self.scalars[o * SLOTS + 1] = -1.0 if mod.momentum is None else u.factor
            self.scalars[o * SLOTS + 2] = u.var_correction
        self.program.set_scalars(self.scalars)
        self.batch_size = batch_size

    def _grad(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """The tensor the step writes p's gradient into (None: plain SGD, or p frozen)."""
        if p is None or not p.requires_grad or self.applies_update:
            return None
        if p.grad is None or p.grad.shape != p.shape:
            p.grad = torch.zeros_like(p)
        self.grads.append((p, p.grad))
        return p.grad

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward (+ SGD) on one batch. Returns (mean loss, number correct), 0-d tensors."""
        if x.shape[0] < 2 and self.has_bn:
            raise ValueError(f"BatchNorm needs more than one value per channel in training (got a batch of {x.shape[0]})")
        if x.shape[0] != self.batch_size and self.bns:
            self._set_running_updates(x.shape[0])
        loss, correct = self.program.step(x, y, self.lr)
        for p, g in self.grads:  # someone (zero_grad(set_to_none=True), probes) may have unset .grad
            if p.grad is not g:
                p.grad = g
        return loss, correct
