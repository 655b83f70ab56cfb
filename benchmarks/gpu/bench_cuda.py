"""GPU benchmark of bem's CUDA kernels, against torch eager formulations of the same math and a
device-to-device copy measured in the same run: lora_delta at decode (tokens of different experts)
and at prefill (64-token runs), film, kron_delta.

    python benchmarks/gpu/bench_cuda.py [--quick] [--dtype bfloat16|float16|float32]

Times are medians of repeats timed with CUDA events. "bem graph" replays a CUDA graph of many calls
(kernel time without Python overhead); "bem call" times ordinary calls back to back (with bem's
device-side checks off, as in a serving loop). Achieved bandwidth counts the bytes the math has to
move at least once — the A rows and B rows of the experts actually used, x, and the delta (film: x,
y, γ, β) — and is given as a percentage of the copy bandwidth measured at the start of the run.
Prints Markdown tables naming the GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bem import _ext
from bem.ops import device_checks, film, kron_delta, lora_delta

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from timing import machine  # noqa: E402

DEVICE = "cuda"


def _events_median(run, repeats: int, calls: int) -> float:
    """Median seconds per call of `run()` (which makes `calls` calls), timed with CUDA events."""
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / calls)
    return statistics.median(samples)


def _calls_for(fn, target_s: float = 2e-3) -> int:
    """How many back-to-back calls take about `target_s` (at least 1, at most 1000)."""
    fn()
    torch.cuda.synchronize()
    t = _events_median(fn, 3, 1)
    return max(1, min(1000, int(target_s / max(t, 1e-7))))


def time_eager(fn, repeats: int) -> float:
    calls = _calls_for(fn)

    def run():
        for _ in range(calls):
            fn()

    run()
    return _events_median(run, repeats, calls)


def time_graph(fn, repeats: int) -> float | None:
    """Seconds per call inside a captured CUDA graph of many calls, or None when capture fails."""
    calls = _calls_for(fn)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as exc:  # e.g. an op that synchronises
        print(f"<!-- CUDA graph capture failed: {exc} -->")
        torch.cuda.synchronize()
        return None
    return _events_median(graph.replay, repeats, calls)


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of `y.copy_(x)` on 512 MiB buffers (read + write counted)."""
    n = 512 << 20
    x = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    y = torch.empty_like(x)
    t = time_eager(lambda: y.copy_(x), repeats)
    del x, y
    return 2 * n / t


def fmt_us(s: float | None) -> str:
    return "—" if s is None else (f"{s * 1e6:.1f}" if s < 1e-3 else f"{s * 1e6:,.0f}")


# ---- lora_delta ------------------------------------------------------------------------------------

def torch_lora_gather(x, A, B, scale, ei, ri):
    """Eager BGMV-style formulation: gather each token's weights, batched matmuls."""
    if ri is None:
        h = torch.bmm(A[ei], x.unsqueeze(-1))                     # (T, r, 1)
        return torch.bmm(B[ei], h).squeeze(-1) * scale            # (T, d_out)
    e = ei.unsqueeze(1)
    a_sel = A[e, ri]                                              # (T, k, d_in)
    h = torch.bmm(a_sel, x.unsqueeze(-1))                         # (T, k, 1)
    b_sel = B[e, :, ri]                                           # (T, k, d_out)
    return torch.bmm(b_sel.transpose(1, 2), h).squeeze(-1) * scale


def torch_lora_loop(x, A, B, scale, ei, ri):
    """Eager PEFT-style formulation: per expert present, gather its tokens, shrink, mask, expand."""
    r = A.shape[1]
    mask = None
    if ri is not None:
        mask = torch.zeros(x.shape[0], r, dtype=x.dtype, device=x.device).scatter_(1, ri, 1.0)
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in ei.unique().tolist():
        sel = ei == e
        h = x[sel] @ A[e].T
        if mask is not None:
            h = h * mask[sel]
        out[sel] = (h @ B[e].T) * scale
    return out


def lora_inputs(T, d, r, k, E, runs, dtype, gen):
    """x, A, B, expert_index, rank_index: experts cycle per token (decode) or per 64-token run."""
    dev = DEVICE
    x = torch.randn(T, d, generator=gen, device=dev).to(dtype)
    A = (torch.randn(E, r, d, generator=gen, device=dev) / d ** 0.5).to(dtype)
    B = (torch.randn(E, d, r, generator=gen, device=dev) / r ** 0.5).to(dtype)
    if runs:
        chunks = (T + 63) // 64
        ei = torch.randint(0, E, (chunks,), generator=gen, device=dev).repeat_interleave(64)[:T]
    else:
        ei = torch.arange(T, device=dev) % E
    ri = None
    if k < r:
        rows = (T + 63) // 64 if runs else T  # one mask per run, or per token at decode
        per = torch.argsort(torch.rand(rows, r, generator=gen, device=dev), dim=1)[:, :k]
        ri = (per.repeat_interleave(64, dim=0)[:T] if runs else per).contiguous()
    return x, A, B, ei.contiguous(), ri


def lora_bytes(x, A, B, ei, ri):
    """Bytes the op must move: A rows (union of components per expert used), B rows of the experts
    used (d_out rows of r entries each), x and the delta."""
    es = x.element_size()
    d_in, d_out, r = x.shape[1], B.shape[1], A.shape[1]
    total = x.numel() * es + x.shape[0] * d_out * es
    for e in ei.unique().tolist():
        comps = r if ri is None else int(ri[ei == e].unique().numel())
        total += comps * d_in * es + d_out * r * es
    return total


def bench_lora(args, copy_bw, gen):
    dtype = getattr(torch, args.dtype)
    d, r, E = 4096, 16, 8
    cases = [(T, False) for T in ((1, 8, 64) if args.quick else (1, 2, 4, 8, 16, 32, 64))] + [(1024, True)]
    print(f"\n### lora_delta, d_in = d_out = {d}, r = {r}, E = {E}, {args.dtype}\n")
    print("Decode rows: token t uses expert t mod 8 (no two neighbours share one); k < r: a random "
          "rank_index row per token. Prefill row: 64-token runs of random experts, one rank_index row "
          "per run.\n")
    print("| T | k | layout | MB moved | bem graph µs | bem call µs | GB/s (graph) | % of copy | "
          "torch eager µs | bem speed-up |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for T, runs in cases:
        for k in (r, r // 2):
            x, A, B, ei, ri = lora_inputs(T, d, r, k, E, runs, dtype, gen)
            scale = 2.0
            fn = lambda: lora_delta(x, A, B, scale=scale, expert_index=ei, rank_index=ri)  # noqa: E731
            ref = torch_lora_gather(x.float(), A.float(), B.float(), scale, ei, ri)
            got = fn().float()
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            if err > 2e-2:
                print(f"<!-- WARNING: T={T} k={k}: relative max error {err:.3g} against fp32 torch -->")
            t_graph = time_graph(fn, args.repeats)
            t_call = time_eager(fn, args.repeats)
            eager = {}
            if T * d * k * 2 <= 256 << 20:  # the gather materialises (T, k, d) weights
                eager["gather"] = time_eager(lambda: torch_lora_gather(x, A, B, scale, ei, ri), args.repeats)
            eager["loop"] = time_eager(lambda: torch_lora_loop(x, A, B, scale, ei, ri), args.repeats)
            t_torch = min(eager.values())
            nbytes = lora_bytes(x, A, B, ei, ri)
            t_bem = t_graph if t_graph is not None else t_call
            bw = nbytes / t_bem
            print(f"| {T} | {k} | {'64-token runs' if runs else 'expert per token'} | "
                  f"{nbytes / 1e6:.2f} | {fmt_us(t_graph)} | {fmt_us(t_call)} | {bw / 1e9:,.0f} | "
                  f"{100 * bw / copy_bw:.0f}% | {fmt_us(t_torch)} ({min(eager, key=eager.get)}) | "
                  f"{t_torch / t_bem:.1f}× |")


# ---- film -----------------------------------------------------------------------------------------

def bench_film(args, copy_bw, gen):
    print("\n### film, x (8, 512, 4096) float32, γ and β per sequence (8, 1, 4096)\n")
    print("| rows × d | MB moved | bem graph µs | bem call µs | GB/s (graph) | % of copy | "
          "torch eager µs | torch % of copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    x = torch.randn(8, 512, 4096, generator=gen, device="cuda")
    gamma = torch.rand(8, 1, 4096, generator=gen, device="cuda") * 2
    beta = torch.randn(8, 1, 4096, generator=gen, device="cuda")
    fn = lambda: film(x, gamma, beta)  # noqa: E731
    eager = lambda: torch.clamp(gamma, 0.5, 2.0) * x + torch.clamp(beta, -0.5, 0.5)  # noqa: E731
    err = float((fn() - eager()).abs().max())
    if err > 1e-5:
        print(f"<!-- WARNING: film differs from torch by {err:.3g} -->")
    nbytes = (2 * x.numel() + gamma.numel() + beta.numel()) * 4
    t_graph = time_graph(fn, args.repeats)
    t_call = time_eager(fn, args.repeats)
    t_torch = time_eager(eager, args.repeats)
    t_bem = t_graph if t_graph is not None else t_call
    print(f"| 4096 × 4096 | {nbytes / 1e6:.0f} | {fmt_us(t_graph)} | {fmt_us(t_call)} | "
          f"{nbytes / t_bem / 1e9:,.0f} | {100 * nbytes / t_bem / copy_bw:.0f}% | {fmt_us(t_torch)} | "
          f"{100 * nbytes / t_torch / copy_bw:.0f}% |")


# ---- kron_delta -------------------------------------------------------------------------------------

def bench_kron(args, gen):
    dtype = getattr(torch, args.dtype)
    o1, i1, o2, i2 = 32, 64, 32, 64
    print(f"\n### kron_delta, A and B {o1}×{i1}, d_out = {o1 * o2}, d_in = {i1 * i2}, {args.dtype}\n")
    print("| T | bem graph µs | bem call µs | torch reshape+matmul µs | torch materialise µs |")
    print("|---:|---:|---:|---:|---:|")
    A = torch.randn(o1, i1, generator=gen, device="cuda").to(dtype)
    B = torch.randn(o2, i2, generator=gen, device="cuda").to(dtype)
    for T in ((1, 128) if args.quick else (1, 16, 128, 1024)):
        x = torch.randn(T, i1 * i2, generator=gen, device="cuda").to(dtype)
        fn = lambda: kron_delta(x, A, B)  # noqa: E731
        reshaped = lambda: (A @ x.view(T, i1, i2) @ B.T).reshape(T, o1 * o2)  # noqa: E731
        materialised = lambda: x @ torch.kron(A, B).T  # noqa: E731
        err = float((fn().float() - reshaped().float()).abs().max() / reshaped().float().abs().max())
        if err > 2e-2:
            print(f"<!-- WARNING: kron T={T}: relative max error {err:.3g} -->")
        print(f"| {T} | {fmt_us(time_graph(fn, args.repeats))} | {fmt_us(time_eager(fn, args.repeats))} | "
              f"{fmt_us(time_eager(reshaped, args.repeats))} | {fmt_us(time_eager(materialised, args.repeats))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--only", default="lora,film,kron", help="comma-separated subset")
    args = parser.parse_args()
    args.repeats = 5 if args.quick else 15
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    if not _ext.cuda_built():
        sys.exit("bem was built without CUDA kernels (rebuild with BEM_CUDA=ON)")
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    only = set(args.only.split(","))
    print(f"## bem CUDA kernels — {machine()}\n")
    copy_bw = copy_bandwidth(args.repeats)
    print(f"Device-to-device copy (`y.copy_(x)`, 512 MiB, read + write): {copy_bw / 1e9:,.0f} GB/s")
    with device_checks(False), torch.inference_mode():
        if "lora" in only:
            bench_lora(args, copy_bw, gen)
        if "film" in only:
            bench_film(args, copy_bw, gen)
        if "kron" in only:
            bench_kron(args, gen)


if __name__ == "__main__":
    main()
