"""What the benchmarks share about timing: one call's wall and process CPU time, and the ``median (range)`` they
report over repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable


def timed(fn: Callable, *args: Any) -> tuple[Any, float, float]:
    """(``fn(*args)``, wall s, process CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def median_range(values: Iterable[float], spec: str = ".2f", unit: str = "", sep: str = "-") -> str:
    """``median<unit> (min<sep>max)`` of repeated measurements, each number formatted with ``spec``."""
    v = list(values)
    return f"{statistics.median(v):{spec}}{unit} ({min(v):{spec}}{sep}{max(v):{spec}})"
