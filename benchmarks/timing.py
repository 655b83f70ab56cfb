"""Timing helpers shared by bem's benchmarks: warm-up, interleaved repeats, medians, and a
description of the machine, so every table says where it was measured."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """CPU model, cores and torch build; the GPU name when CUDA is in use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


# The clock of compare(): wall time by default; `use_cpu_clock()` switches to this thread's CPU time
# (time.thread_time), which a loaded, shared machine disturbs far less — valid for single-threaded
# runs only (the caller sets torch and bem to one thread).
_clock = time.perf_counter


def use_cpu_clock() -> None:
    """Time with the calling thread's CPU time and run torch and bem on one thread."""
    global _clock
    import bem
    torch.set_num_threads(1)
    bem.set_num_threads(1)
    _clock = time.thread_time


def clock_name() -> str:
    return "thread CPU time, 1 thread" if _clock is time.thread_time else "wall time"


def _calls_for(fn: Callable[[], object], budget_s: float, sync: Callable[[], None]) -> int:
    fn()
    sync()
    n, elapsed = 1, 0.0
    while True:
        t0 = _clock()
        for _ in range(n):
            fn()
        sync()
        elapsed = _clock() - t0
        if elapsed >= budget_s / 10 or n >= 1 << 20:
            return max(1, int(n * (budget_s / 10) / max(elapsed, 1e-9)))
        n *= 4


def compare(fns: dict[str, Callable[[], object]], *, repeats: int = 9, budget_s: float = 0.05,
            sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each function. Repeats are interleaved (A B C A B C …) so slow
    drift of a shared, noisy machine hits every candidate alike."""
    calls = {name: _calls_for(fn, budget_s, sync) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = calls[name]
            sync()
            t0 = _clock()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((_clock() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 1000 else f"{us:,.0f}"
