"""How bem's multi-threaded CPU kernels fare between torch ops, on each threading backend.

torch's OpenMP workers busy-wait for the next parallel region after every torch op. bem runs its
parallel regions on that same OpenMP runtime when the process has one (`bem.threading_backend()`
says "openmp (...)"); `BEM_CPU_THREADING=pool` forces bem's own thread pool instead. This script
times large bem calls made right after a torch matmul (the pattern inside a model) and alone, for
bem on 1 thread, on its own 2-thread pool and on OpenMP's threads, switching backends between
repeats in one process (interleaved, so a noisy machine's drift hits every backend alike), and
prints one Markdown table (medians).

    python benchmarks/bench_threading.py [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

CASES = ("lora_delta T=1024 d=1024 r=64", "lora_delta T=1024 d=4096 r=16", "kron_delta T=1024",
         "film 4096x4096")


CONFIGS = (("1 thread", 1, None), ("bem's own pool, 2 threads", 2, "pool"),
           ("OpenMP's threads, 2 threads", 2, ""))


def _use(threads: int, threading: str | None) -> str:
    """Switch bem's backend: BEM_CPU_THREADING is read when set_num_threads rebuilds it."""
    import bem
    if threading:
        os.environ["BEM_CPU_THREADING"] = threading
    else:
        os.environ.pop("BEM_CPU_THREADING", None)
    bem.set_num_threads(threads)
    return bem.threading_backend()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    import bem
    from bem.ops import film, kron_delta, lora_delta
    from timing import machine

    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1024, 1024, generator=gen)
    A1, B1 = torch.randn(64, 1024, generator=gen) / 32, torch.randn(1024, 64, generator=gen)
    x2 = torch.randn(1024, 4096, generator=gen)
    A2, B2 = torch.randn(16, 4096, generator=gen) / 64, torch.randn(4096, 16, generator=gen)
    xk = torch.randn(1024, 4096, generator=gen)
    Ak, Bk = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
    xf = torch.randn(4096, 4096, generator=gen)
    gf, bf = torch.rand(1, 4096, generator=gen) + 0.5, torch.randn(1, 4096, generator=gen) * 0.1
    calls = {CASES[0]: lambda: lora_delta(x1, A1, B1), CASES[1]: lambda: lora_delta(x2, A2, B2),
             CASES[2]: lambda: kron_delta(xk, Ak, Bk), CASES[3]: lambda: film(xf, gf, bf)}
    m = torch.randn(512, 512, generator=gen)
    samples = {(c, w, n): [] for c, _, _ in CONFIGS for w in ("after", "alone") for n in CASES}
    backends = {}
    before = bem.get_num_threads(), os.environ.get("BEM_CPU_THREADING")
    try:
        with torch.no_grad():
            for _ in range(args.repeats):
                for label, threads, threading in CONFIGS:
                    backends[label] = _use(threads, threading)
                    for name, fn in calls.items():
                        fn()  # warm: a rebuilt pool, caches
                        m @ m  # a parallel torch op, as between a model's bem calls
                        t0 = time.perf_counter()
                        fn()
                        samples[(label, "after", name)].append(time.perf_counter() - t0)
                        time.sleep(0.02)  # long enough for any spinning thread to go to sleep
                        t0 = time.perf_counter()
                        fn()
                        samples[(label, "alone", name)].append(time.perf_counter() - t0)
    finally:
        _use(before[0], before[1])
    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    print(f"Machine: {machine()}; bem {bem.__version__}; medians of {args.repeats} interleaved "
          "repeats, wall clock\n")
    print("| call | when | " + " | ".join(f"{c} µs" for c, _, _ in CONFIGS) + " | own pool ÷ OpenMP |")
    print("|---|---|" + "---:|" * len(CONFIGS) + "---:|")
    for name in CASES:
        for when, label in (("after", "right after a torch matmul"), ("alone", "after 20 ms idle")):
            cells = [med[(c, when, name)] for c, _, _ in CONFIGS]
            print(f"| {name} | {label} | " + " | ".join(f"{v:,.0f}" for v in cells)
                  + f" | {cells[1] / cells[2]:.2f} |")
    print("\nBackends: " + "; ".join(f"{c}: {b}" for c, b in backends.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
