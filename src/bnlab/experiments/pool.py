"""The runner's worker processes: started, fed, watched and stopped by the parent alone.

A worker is a fresh interpreter (``sys.executable``, nothing inherited but one socket) that runs
one task at a time: it receives ``args`` as a pickled tuple over a socket pair, calls its target
(a ``"module:function"``) and sends back the return value. The rules, so that no worker outlives
the command and the parent alone decides when work stops:

- A worker ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the parent
  decides. It is started with SIGINT and SIGTERM blocked (the mask is inherited), so a signal in the
  first milliseconds waits until the worker has set its dispositions instead of killing it half-way.
- A worker dies with its parent, even one killed by SIGKILL, by the rule every child of bnlab follows
  (``bnlab.lifeline``: PR_SET_PDEATHSIG, then a look at its parent, then a watcher thread), applied
  by its first lines, before torch is imported.
- SIGTERM kills a worker at once (the default action): what counts of its task is what it saved
  (a run saves its resume state at each epoch's end, replaced atomically).
- ``stop()`` sends SIGTERM to every worker, SIGKILL to any still alive after a grace period, and
  reaps each one: when it returns, no worker process exists.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, ContextManager

from bnlab import lifeline


class WorkerDied(RuntimeError):
    """A worker process ended while it held a task (killed, out of memory, a crash in native code)."""

    def __init__(self, returncode: int | None):
        self.returncode = returncode
        self.signal = -returncode if returncode is not None and returncode < 0 else None
        how = (f"killed by {signal.Signals(self.signal).name}" if self.signal in signal.valid_signals()
               else f"exit code {returncode}")
        super().__init__(f"the worker process died ({how})")


class Worker:
    def __init__(self, proc: subprocess.Popen, conn: Connection):
        self.proc, self.conn = proc, conn
        self.task: Any = None  # what the caller is waiting on; None: idle


class WorkerPool:
    """``n`` worker processes calling ``target`` (``"module:function"``), each with ``threads``
    torch threads. Use as a context manager: leaving it stops and reaps every worker. ``guard``: a
    context in which the caller's signal handlers do not raise (a worker started is then always
    counted, so ``stop()`` never misses one)."""

    def __init__(self, n: int, threads: int, target: str, *, grace: float = 5.0,
                 guard: Callable[[], ContextManager] = nullcontext):
        self.n, self.threads, self.target, self.grace, self.guard = n, threads, target, grace, guard
        self.workers: list[Worker] = []

    def __enter__(self) -> WorkerPool:
        try:
            for _ in range(self.n):
                self._spawn()
        except BaseException:  # a signal while starting them: the ones started are stopped too
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def _spawn(self, replacing: Worker | None = None) -> None:
        """Start a worker (in ``replacing``'s place)."""
        ours, theirs = socket.socketpair()
        code = _BOOT.format(parent=os.getpid(), fd=theirs.fileno(), threads=self.threads, target=self.target)
        with self.guard():
            self._start(code, ours, theirs, replacing)

    def _start(self, code: str, ours: socket.socket, theirs: socket.socket, replacing: Worker | None) -> None:
        try:
            with lifeline.held_signals():  # the child inherits the mask: see the rules
                proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL)
            worker = Worker(proc, Connection(ours.detach()))
            if replacing is None:
                self.workers.append(worker)
            else:
                self.workers[self.workers.index(replacing)] = worker
        finally:
            theirs.close()

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.task is None]

    def busy(self) -> list[Worker]:
        return [w for w in self.workers if w.task is not None]

    def submit(self, worker: Worker, task: Any, args: tuple) -> None:
        """Give ``worker`` (an idle one) ``args``; ``task`` is what ``results()`` hands back with the answer."""
        worker.task = task
        try:
            worker.conn.send(args)
        except OSError:  # it died: results() finds its socket closed and reports it
            pass

    def ready(self, timeout: float | None = None) -> list[Worker]:
        """Wait until busy workers have answered or died (a death closes a worker's end of the socket,
        so its connection turns readable too); [] after ``timeout``."""
        busy = {w.conn: w for w in self.busy()}
        return [busy[c] for c in wait(list(busy), timeout)] if busy else []

    def collect(self, ready: list[Worker]) -> list[tuple[Any, Any]]:
        """(task, return value) for each of ``ready`` that answered, (task, WorkerDied) for each that
        died holding its task (replaced by a fresh worker)."""
        out = []
        for w in ready:
            try:
                answer = w.conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):  # it died before (or while) answering
                answer = WorkerDied(self._reap(w))
                self._spawn(replacing=w)
            out.append((w.task, answer))
            w.task = None
        return out

    def _reap(self, w: Worker) -> int | None:
        try:
            return w.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:  # its socket closed, yet it lives: make sure
            w.proc.kill()
            return w.proc.wait()

    def stop(self, hurry: Callable[[], bool] = lambda: False) -> list[tuple[Any, Any]]:
        """Stop every worker (SIGTERM; SIGKILL after the grace period, or at once when ``hurry()``
        turns true) and reap it. Returns (task, return value) for answers that had fully arrived."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for w in self.workers:
            while w.proc.poll() is None and time.monotonic() < deadline and not hurry():
                try:
                    w.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        answered = []
        for w in self.workers:
            if w.task is not None and w.conn.poll(0):
                try:
                    answered.append((w.task, w.conn.recv()))
                except (EOFError, OSError, pickle.UnpicklingError):  # a half-sent answer counts for nothing
                    pass
            w.conn.close()
        self.workers = []
        return answered


# ---------------------------------------------------------------- in the worker

# A worker's program. Its first lines import the standard library and bnlab.lifeline alone, so a
# signal waits only milliseconds (not the seconds importing torch takes) before the rules are in force.
_BOOT = """
from bnlab.lifeline import start_child
start_child({parent})
from bnlab.experiments.pool import serve
serve({fd}, {threads}, {target!r})
"""


def serve(fd: int, threads: int, target: str) -> None:
    """The worker's task loop, once ``_BOOT`` has set its signals and tied it to its parent."""
    os.set_inheritable(fd, False)  # nothing this worker starts may hold it (its closing tells the parent)
    conn = Connection(fd)
    import torch

    torch.set_num_threads(threads)
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    while True:
        try:
            args = conn.recv()
        except EOFError:  # the parent closed its end: nothing more to do
            return
        conn.send(fn(*args))
