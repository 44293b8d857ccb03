"""Stopping a long command cleanly on SIGINT (Ctrl-C) and SIGTERM (kill, timeout, systemd, docker).

``StopSignals`` turns the first of them into a KeyboardInterrupt where the process is, except inside
``held()`` blocks (a store write), which finish first; the command then exits ``128 + signal``
(130 / 143) after saying how to resume.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the process."""


class StopSignals:
    """SIGINT and SIGTERM in a process running a long command (the runner's parent, bnlab train):
    the first raises a KeyboardInterrupt where the process is (waiting on its workers, or training
    in-process), except inside ``held()`` (a store write), where it waits for the block's end; a later one asks the shutdown to hurry (``hurry``: kill the
    workers now rather than after their grace period). Installed only in the main thread (the only
    one Python delivers signals to), and not over a signal the process was started ignoring."""

    def __init__(self):
        self.received: int | None = None
        self.hurry = False
        self._raised = False
        self._held = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.hurry = True
            return
        self.received = signum
        if not self._held:
            self._raise()

    def _raise(self) -> None:
        self._raised = True
        raise _Signalled(f"stopped by {signal.Signals(self.received).name}")

    def stop(self, signum: int) -> None:
        """Stop as if ``signum`` had arrived (a worker stopped by it)."""
        self._handle(signum, None)

    @contextmanager
    def held(self):
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self.received is not None and not self._raised:
            self._raise()


def exit_code(signum: int | None) -> int:
    """The shell's exit status for a command stopped by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum or signal.SIGINT)
