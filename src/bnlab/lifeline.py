"""No process bnlab starts outlives its parent: the rule, in one place, for every kind of child.

A child (an experiment worker, a data-parallel rank, a server's decoder) calls ``die_with_parent(pid)``
among its first lines, before anything heavy is imported (torch takes seconds):

1. ``PR_SET_PDEATHSIG(SIGKILL)`` (Linux): the kernel kills the child the moment its parent dies, even a
   parent killed with SIGKILL, which runs no code of its own. The kernel fires it when the parent's
   *thread* that started the child ends, so a child must be started by a thread that lives as long as
   the child does (bnlab's are: the thread that waits for them).
2. Then a check that the parent is still the process that started it: a parent that died before step 1
   took effect has left the child to another parent (init, or a subreaper) and no signal will come, so
   the child ends itself (SIGKILL, as the kernel would).
3. A daemon thread that checks ``os.getppid()`` every ``WATCH_SECONDS`` and does the same: the rule where
   prctl is missing (other systems, a seccomp filter refusing it), and a second line where it is not.

A killed child leaves what it had saved, never half a file: bnlab writes files by atomic replacement.

The parent's side, ``held_signals()``: a child inherits its starter's signal mask, so a child started
inside it begins with SIGINT and SIGTERM blocked, and ``child_signals()`` (SIGINT ignored: a terminal's
Ctrl-C reaches the whole process group and the parent alone decides when work stops; SIGTERM's default
action: the parent's stop kills at once) unblocks them once they are set. A signal in a child's first
milliseconds then waits instead of killing it half-way or printing a KeyboardInterrupt traceback.

Starting a ``multiprocessing`` ``spawn`` child, whose target and arguments are unpickled (importing their
modules, torch among them) before the target runs: ``spawn_process`` pickles them as one payload that is
unpickled only after ``child_signals`` and ``die_with_parent`` have run in the child.

Processes that bnlab does not start itself cannot follow the rule: a local Ray instance's are started by
Ray (its GCS server and raylet die with their starter by Ray's own PR_SET_PDEATHSIG; the raylet's agents
do not: they wait up to a minute for the dead GCS before they exit). For those, ``Sentinel``: a process of
the standard library alone that records every process below its parent, and when that parent dies (its
stdin, a pipe only the parent can write, closes) kills those still alive and exits. It is the one process
that outlives its parent, by the milliseconds that takes; closed by its parent, it exits doing nothing.

The standard library alone, and nothing of bnlab's: a child's first lines import this module.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 0.5  # how often the watcher thread looks at the parent
STARTUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _end() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as PR_SET_PDEATHSIG would: no handler, no cleanup, no file touched
    os._exit(1)  # pragma: no cover - not reached


def die_with_parent(parent: int) -> None:
    """End this process (SIGKILL) when process ``parent``, the one that started it, dies; at once if it
    already has. See the module docstring for the three steps and why each is needed."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still holds
    check_parent(parent)  # it may have died before the prctl call took effect

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        _end()

    threading.Thread(target=watch, name="bnlab-parent-watch", daemon=True).start()


def check_parent(parent: int) -> None:
    """End this process (SIGKILL) if ``parent`` is no longer its parent: a last look before writing what
    only a live run should write."""
    if os.getppid() != parent:
        _end()


# ---------------------------------------------------------------- signals while a child starts

@contextmanager
def held_signals() -> Iterator[None]:
    """The parent's side: children started in here begin with SIGINT and SIGTERM blocked (inherited)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def child_signals() -> None:
    """The child's side: SIGINT ignored, SIGTERM's default action, then both unblocked (a signal that
    arrived meanwhile takes effect now)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_SIGNALS)


def start_child(parent: int) -> None:
    """A child's first lines: ``child_signals()``, then ``die_with_parent(parent)``."""
    child_signals()
    die_with_parent(parent)


# ---------------------------------------------------------------- multiprocessing spawn children

class _Tied:
    """``fn(*args)`` for a spawn child, pickled as bytes within the process object: unpickling this object
    runs ``start_child`` before unpickling ``fn`` and ``args`` (and importing what they need)."""

    def __init__(self, parent: int, fn: Callable, args: tuple):
        self.parent, self.fn, self.args = parent, fn, args

    def __reduce__(self):
        # pickled while multiprocessing pickles the process object, so the pickler's registered
        # reductions (torch's tensors in shared memory, their file descriptors passed to the child) apply
        from multiprocessing.reduction import ForkingPickler

        return _start_then_load, (self.parent, bytes(ForkingPickler.dumps((self.fn, self.args))))


def _start_then_load(parent: int, payload: bytes) -> tuple[Callable, tuple]:
    start_child(parent)
    return pickle.loads(payload)


def _call(job: tuple[Callable, tuple]) -> Any:
    fn, args = job
    return fn(*args)


def spawn_process(ctx, fn: Callable, args: tuple = (), **kwargs):
    """A ``multiprocessing`` process of context ``ctx`` (``spawn``) calling ``fn(*args)`` after
    ``start_child(this process)``, which runs before ``fn`` and ``args`` are unpickled. Start it inside
    ``held_signals()``, from a thread that outlives it. ``kwargs``: ``ctx.Process``'s (name, daemon)."""
    return ctx.Process(target=_call, args=(_Tied(os.getpid(), fn, args),), **kwargs)


# ---------------------------------------------------------------- processes started by others: the sentinel

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent, start time) of process ``pid`` from /proc; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime (the 22nd)
    return fields[0], int(fields[1]), int(fields[19])


def processes_below(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root`` (from /proc; {} where there is none)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for name in entries:
        if name.isdigit() and (st := _stat(int(name))) is not None and st[0] != "Z":
            table[int(name)] = st[1:]
    found: dict[int, int] = {}
    frontier = {root}
    while frontier:
        frontier = {p for p, (ppid, _) in table.items() if ppid in frontier and p not in found}
        found.update({p: table[p][1] for p in frontier})
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == start  # the same process, not a reused pid


_ALL_CLEAR = b"closed by the parent\n"


def keep_watch(parent: int) -> None:
    """The sentinel's program (see ``Sentinel``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
    me, known, lock = os.getpid(), {}, threading.Lock()

    def record() -> None:
        while True:
            below = processes_below(parent)
            with lock:  # add what is new, forget what has ended: never what only left (reparented)
                known.update({p: t for p, t in below.items() if p != me})
                for p in [p for p, t in known.items() if not _alive(p, t)]:
                    del known[p]
            time.sleep(WATCH_SECONDS)

    threading.Thread(target=record, name="bnlab-sentinel-record", daemon=True).start()
    said = b""
    while chunk := sys.stdin.buffer.read(64):  # until the pipe closes: the parent closed it, or died
        said = (said + chunk)[-64:]
    # what the parent said, not os.getppid(): a dying process closes its files before its children are
    # given another parent, so the pipe can close while the parent is still the parent
    if said.endswith(_ALL_CLEAR):  # closed by the parent: its processes are its own business
        return
    with lock:
        for pid, start in known.items():
            if _alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


class Sentinel:
    """A process that kills what is left below this process when it dies, even by SIGKILL (the processes
    seen below it, recorded every ``WATCH_SECONDS``: one started in the last such interval may be missed).
    ``close()`` when those processes have been stopped the ordinary way. Linux (/proc) only: elsewhere it
    does nothing. Start it before the processes to watch."""

    def __init__(self):
        self.proc = None
        if sys.platform.startswith("linux") and os.path.isdir("/proc"):
            code = f"from bnlab.lifeline import keep_watch\nkeep_watch({os.getpid()})\n"
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.write(_ALL_CLEAR)
                self.proc.stdin.close()
            except OSError:  # it is gone already
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


__all__ = ["WATCH_SECONDS", "Sentinel", "check_parent", "child_signals", "die_with_parent", "held_signals",
           "processes_below", "spawn_process", "start_child"]
