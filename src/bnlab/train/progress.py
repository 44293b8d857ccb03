"""Progress display: a rich bar with ETA, loss and accuracy on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress(AbstractContextManager):
    def __init__(self, epochs: int, steps_per_epoch: int, *, enabled: bool = True, console: Console | None = None,
                 label: str = "train"):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.interactive = enabled and self.console.is_terminal
        self.epochs, self.steps = epochs, steps_per_epoch
        self.label = label
        self._progress = None

    def __enter__(self):
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.epochs * self.steps, metrics="")
        return self

    def advance(self, steps: int, metrics: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, metrics=metrics)

    def epoch_done(self, line: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
