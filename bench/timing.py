"""Interleaved wall-clock timing: each candidate runs in turn, so load changes hit all alike."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1,
                before: Callable[[], None] | None = None, label: str = "") -> dict[str, float]:
    """Median seconds of each of `fns`, run `repeats` times in alternating order after `warmup` rounds.

    The order flips every round (A B, B A, ...) so neither side always runs right after
    the other. `before` runs untimed before every call (e.g. evicting the page cache).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if before is not None:
                before()
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            timed = r >= warmup
            if timed:
                times[name].append(dt)
            progress(f"{label} {name}: {dt:.3f} s{'' if timed else ' (warm-up)'}")
    return {name: statistics.median(ts) for name, ts in times.items()}


_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[bench {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)
