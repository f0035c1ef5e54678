"""Wall-clock timing of inference calls: the one helper behind calibrate's latency and the
runtime benchmark's (the TensorRT runner times on the GPU with CUDA events instead)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np


def time_in_turn(calls: dict[str, Callable[[], object]], *, max_runs: int, min_runs: int = 2, min_s: float = 0.0, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of every entry, timed in turn (one call of each per round), so drifts
    in machine load fall on all of them alike and ratios within one run stay fair.

    Each gets `warmup` untimed calls first. An entry leaves the rotation after `max_runs` calls,
    or once it has `min_runs` and has spent `min_s` seconds of its own time (cheap calls get many
    runs, which steadies the median on a shared CPU)."""
    if max_runs < 1 or min_runs < 1:
        raise ValueError(f"max_runs and min_runs must be >= 1, got {max_runs}, {min_runs}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    active = list(calls)
    while active:
        for name in list(active):
            t0 = time.perf_counter()
            calls[name]()
            dt = time.perf_counter() - t0
            times[name].append(1000.0 * dt)
            spent[name] += dt
            if len(times[name]) >= max_runs or (len(times[name]) >= min_runs and spent[name] >= min_s):
                active.remove(name)
    return times


def summary(ms: list[float]) -> dict:
    """The one timing summary every timer reports: p50 / p90 / p95 / p99 / mean milliseconds and
    the number of timed runs `n` (calibrate, bench, the TensorRT build, the serving load test)."""
    if len(ms) == 0:
        raise ValueError("a timing summary needs at least one run")
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }
