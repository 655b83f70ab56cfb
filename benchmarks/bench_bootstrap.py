"""BCa bootstrap of the mean: bem.stats.bca_interval against scipy.stats.bootstrap(method="BCa") in
the same run — median wall time, speed-up, and peak memory of each measured in its own subprocess.

    PYTHONPATH=python python benchmarks/bench_bootstrap.py [--sizes 500 2000 10000]
        [--resamples 10000] [--repeats 5] [--scipy-repeats 3]

Peak memory is the growth of the process's resident-set high-water mark during one call (VmHWM
reset through /proc/self/clear_refs just before it, so imports and the data do not count), plus
tracemalloc's peak of Python-visible allocations (numpy's included). Prints a Markdown table that
names the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import scipy
import scipy.stats

import bem
from bem import _ext
from bem.stats import bca_interval


def _data(n: int) -> np.ndarray:
    return np.random.default_rng(n).lognormal(0.0, 1.0, n)


def _run(library: str, x: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    if library == "bem":
        r = bca_interval(x, n_resamples=resamples, seed=seed)
        return r.lower, r.upper
    ci = scipy.stats.bootstrap((x,), np.mean, n_resamples=resamples, method="BCa",
                               rng=seed).confidence_interval
    return float(ci.low), float(ci.high)


def _median_seconds(library: str, x: np.ndarray, resamples: int, repeats: int) -> float:
    _run(library, x, resamples, seed=0)  # warm-up
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        _run(library, x, resamples, seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure_memory(library: str, n: int, resamples: int) -> dict:
    """Runs in a fresh interpreter: peak RSS growth and tracemalloc peak of one call, in MB."""
    x = _data(n)
    _run(library, _data(50), 100, seed=0)  # first-use costs (lazy imports, thread pool) excluded
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    _run(library, x, resamples, seed=1)
    rss_mb = (_status_kib("VmHWM") - before) / 1024
    tracemalloc.start()
    _run(library, x, resamples, seed=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rss_mb": rss_mb, "traced_mb": peak / 2**20}


def _memory_in_subprocess(library: str, n: int, resamples: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-of", library, "--sizes", str(n),
                          "--resamples", str(resamples)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 10000])
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of bem (median)")
    parser.add_argument("--scipy-repeats", type=int, default=3, help="timed runs of scipy (median)")
    parser.add_argument("--memory-of", choices=["bem", "scipy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(_measure_memory(args.memory_of, args.sizes[0], args.resamples)))
        return

    # bootstrap_kernels() lists 'best' first, then the supported ones from slowest to fastest.
    kernel = _ext.C().bootstrap_kernels()[-1] if _ext.available() else "NumPy reference"
    print(f"Machine: {_cpu_model()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; bem threads {bem.get_num_threads()}, bootstrap kernel "
          f"{kernel}; Python {platform.python_version()}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}")
    print(f"BCa interval of the mean, {args.resamples} resamples; medians of {args.repeats} (bem) "
          f"and {args.scipy_repeats} (scipy) runs after a warm-up; peak memory of one call, each "
          "library in its own subprocess.\n")
    print("| n | bem (s) | scipy (s) | speed-up | bem peak RSS (MB) | scipy peak RSS (MB) | "
          "bem traced peak (MB) | scipy traced peak (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        x = _data(n)
        t_bem = _median_seconds("bem", x, args.resamples, args.repeats)
        t_scipy = _median_seconds("scipy", x, args.resamples, args.scipy_repeats)
        m_bem = _memory_in_subprocess("bem", n, args.resamples)
        m_scipy = _memory_in_subprocess("scipy", n, args.resamples)
        print(f"| {n} | {t_bem:.4f} | {t_scipy:.3f} | {t_scipy / t_bem:.0f}x | "
              f"{m_bem['rss_mb']:.1f} | {m_scipy['rss_mb']:.0f} | {m_bem['traced_mb']:.2f} | "
              f"{m_scipy['traced_mb']:.0f} |", flush=True)
    if _ext.available():
        _kernel_table(max(args.sizes), args.resamples, args.repeats)


def _kernel_table(n: int, resamples: int, repeats: int) -> None:
    """The C++ resampling core alone (no BCa arithmetic) per SIMD kernel and thread count."""
    C = _ext.C()
    x = _data(n)
    threads = sorted({1, bem.get_num_threads()})
    print(f"\nC++ resampling core alone (bem._C.bootstrap_linear), n = {n}, {resamples} resamples, "
          f"median of {repeats} runs; all kernels return identical resamples.\n")
    print("| kernel | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} (s)" for t in threads)
          + " | draws/s (most threads) |")
    print("|---|" + "---:|" * (len(threads) + 1))
    before = bem.get_num_threads()
    try:
        for kernel in C.bootstrap_kernels()[1:]:
            cells = []
            for t in threads:
                bem.set_num_threads(t)
                C.bootstrap_linear(x, None, resamples, 0, kernel=kernel)
                times = []
                for seed in range(1, repeats + 1):
                    start = time.perf_counter()
                    C.bootstrap_linear(x, None, resamples, seed, kernel=kernel)
                    times.append(time.perf_counter() - start)
                cells.append(statistics.median(times))
            print(f"| {kernel} | " + " | ".join(f"{c:.4f}" for c in cells)
                  + f" | {n * resamples / cells[-1]:.2e} |", flush=True)
    finally:
        bem.set_num_threads(before)


if __name__ == "__main__":
    main()
