"""Shared timing helper for the benchmark scripts (median of device-event timings on CUDA)."""
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` untimed calls (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(timed_ms(fn, reps, cuda))


def timed_ms(fn: Callable[[], object], reps: int, cuda: bool) -> list:
    """Milliseconds of each of ``reps`` calls of ``fn()`` (no warm-up)."""
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times
