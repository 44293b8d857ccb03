"""Timing helpers shared by ``bnlab check`` and the scripts in benchmarks/."""

from __future__ import annotations

import time
from typing import Callable


def interleaved_best_times(fns: dict[str, Callable[[], object]], *, repeats: int = 10,
                           warmup: int = 2) -> dict[str, float]:
    """Best time of each function, alternating between them so that drift in machine load
    affects all of them alike (what a ratio measured in one run needs)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
