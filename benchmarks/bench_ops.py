"""CPU benchmarks of bem.ops against torch eager formulations of the same math, measured in the
same run: decode overhead on top of F.linear, lora delta grid, kron_delta, film bandwidth.

    python benchmarks/bench_ops.py [--quick] [--only decode,lora,kron,film] [--clock wall|cpu] [--out FILE]

Prints Markdown tables (medians of interleaved repeats; ratios against the baseline of the same run).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

import bem
from bem.ops import film, kron_delta, lora_delta

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import timing  # noqa: E402
from timing import compare, fmt_us, machine  # noqa: E402


def eager_lora(x, A, B, scale, ei, mask):
    """What eager PyTorch code does for the same math (PEFT-style): per active expert, gather its
    tokens, full-rank shrink, multiply by the rank mask (dynamic rank), expand."""
    if A.shape[0] == 1:
        h = x @ A[0].T
        if mask is not None:
            h = h * mask
        return (h @ B[0].T) * scale
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)
    for e in ei.unique().tolist():
        if e < 0:
            continue
        sel = ei == e
        h = x[sel] @ A[e].T
        if mask is not None:
            h = h * mask[sel]
        out[sel] = (h @ B[e].T) * scale
    return out


def lora_case(T, d, r, k, E, gen):
    x = torch.randn(T, d, generator=gen)
    A = torch.randn(E, r, d, generator=gen) / d ** 0.5
    B = torch.randn(E, d, r, generator=gen) / r ** 0.5
    chunks = (T + 63) // 64
    ei = torch.randint(0, E, (chunks,), generator=gen).repeat_interleave(64)[:T].contiguous()
    ri = mask = None
    if k < r:  # one rank mask per 64-token chunk (V1's default granularity)
        per_chunk = torch.argsort(torch.rand(chunks, r, generator=gen), dim=1)[:, :k]
        ri = per_chunk.repeat_interleave(64, dim=0)[:T].contiguous()
        mask = torch.zeros(T, r).scatter_(1, ri, 1.0)
    return x, A, B, ei, ri, mask


def bench_decode(quick):
    gen = torch.Generator().manual_seed(0)
    d, r = 1024, 8
    x = torch.randn(1, d, generator=gen)
    W = torch.randn(d, d, generator=gen) / d ** 0.5
    A = torch.randn(r, d, generator=gen) / d ** 0.5
    B = torch.randn(d, r, generator=gen)
    ei = torch.zeros(1, dtype=torch.long)

    def bem_path():
        y = F.linear(x, W)
        return lora_delta(x, A, B, scale=2.0, out=y)

    def bem_routed():
        y = F.linear(x, W)
        return lora_delta(x, A[None], B[None], scale=2.0, expert_index=ei, out=y)

    with torch.no_grad():
        t = compare({"linear": lambda: F.linear(x, W), "bem": bem_path, "bem_routed": bem_routed,
                     "eager": lambda: F.linear(x, W).add_((x @ A.T) @ B.T, alpha=2.0)},
                    repeats=7 if quick else 15, budget_s=0.2)
    base = t["linear"]
    rows = ["| path | µs / call | × F.linear alone |", "|---|---:|---:|"]
    for name, label in (("linear", "F.linear(x, W) alone"),
                        ("bem", "F.linear + bem lora_delta(out=y)"),
                        ("bem_routed", "F.linear + bem lora_delta(out=y, expert_index)"),
                        ("eager", "F.linear + eager (x@A.T)@B.T")):
        rows.append(f"| {label} | {fmt_us(t[name])} | {t[name] / base:.3f} |")
    return "### Decode: T=1, d=1024, r=8, float32, no grad\n\n" + "\n".join(rows)


def bench_lora(quick):
    gen = torch.Generator().manual_seed(1)
    Ts = [1, 16, 128] if quick else [1, 16, 128, 1024]
    ds = [1024] if quick else [1024, 4096]
    rs = [8, 64] if quick else [8, 16, 64]
    rows = ["| T | d | r | k | E | bem µs | eager µs | speed-up | bem k=r/2 ÷ bem dense |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with torch.no_grad():
        for T, d, r, E in itertools.product(Ts, ds, rs, [1, 8]):
            # Dense and k = r/2, bem and eager, all in one interleaved comparison: the k=r/2 ÷
            # dense ratio is then a same-run ratio too.
            fns, half = {}, r // 2
            for k in (r, half):
                x, A, B, ei, ri, mask = lora_case(T, d, r, k, E, gen)
                eidx = ei if E > 1 else None
                fns[f"bem{k}"] = (lambda x=x, A=A, B=B, eidx=eidx, ri=ri:
                                  lora_delta(x, A, B, scale=0.5, expert_index=eidx, rank_index=ri))
                fns[f"eager{k}"] = (lambda x=x, A=A, B=B, ei=ei, mask=mask:
                                    eager_lora(x, A, B, 0.5, ei, mask))
            t = compare(fns, repeats=5 if quick else 7, budget_s=0.03 if quick else 0.06)
            for k in (r, half):
                rel = "" if k == r else f"{t[f'bem{k}'] / t[f'bem{r}']:.2f}"
                rows.append(f"| {T} | {d} | {r} | {k} | {E} | {fmt_us(t[f'bem{k}'])} | "
                            f"{fmt_us(t[f'eager{k}'])} | {t[f'eager{k}'] / t[f'bem{k}']:.2f}× | {rel} |")
    return ("### lora_delta alone (float32, no grad; E=8 in 64-token runs; k<r: one mask per chunk)\n\n"
            + "\n".join(rows))


def bench_kron(quick):
    gen = torch.Generator().manual_seed(2)
    o1, i1, o2, i2 = 32, 64, 32, 64
    A = torch.randn(o1, i1, generator=gen)
    B = torch.randn(o2, i2, generator=gen)
    rows = ["| T | bem µs | reshape-matmul µs | materialise µs | × reshape-matmul | × materialise |",
            "|---:|---:|---:|---:|---:|---:|"]
    with torch.no_grad():
        for T in ([1, 16, 128] if quick else [1, 16, 128, 1024]):
            x = torch.randn(T, i1 * i2, generator=gen)
            t = compare({
                "bem": lambda: kron_delta(x, A, B),
                "reshape": lambda: torch.matmul(torch.matmul(A, x.view(T, i1, i2)), B.T).reshape(T, o1 * o2),
                "materialise": lambda: x @ torch.kron(A, B).T},
                repeats=5 if quick else 9, budget_s=0.05)
            rows.append(f"| {T} | {fmt_us(t['bem'])} | {fmt_us(t['reshape'])} | "
                        f"{fmt_us(t['materialise'])} | {t['reshape'] / t['bem']:.2f} | "
                        f"{t['materialise'] / t['bem']:.1f} |")
    return ("### kron_delta: d_out=1024, d_in=4096, A and B 32×64, float32 (× = how many times "
            "faster bem is)\n\n" + "\n".join(rows))


def bench_film(quick):
    gen = torch.Generator().manual_seed(3)
    T, d = (1024, 4096) if quick else (4096, 4096)
    x = torch.randn(T, d, generator=gen)
    per_tok = (1 + 0.3 * torch.randn(T, d, generator=gen), 0.2 * torch.randn(T, d, generator=gen))
    per_seq = (1 + 0.3 * torch.randn(d, generator=gen), 0.2 * torch.randn(d, generator=gen))

    def eager(g, b):
        return g.clamp(0.5, 2.0) * x + b.clamp(-0.5, 0.5)

    with torch.no_grad():
        t = compare({"clone": lambda: x.clone(),
                     "bem_tok": lambda: film(x, *per_tok), "eager_tok": lambda: eager(*per_tok),
                     "bem_seq": lambda: film(x, *per_seq), "eager_seq": lambda: eager(*per_seq)},
                    repeats=7 if quick else 11, budget_s=0.3)
    n = T * d * 4
    gbs = lambda name, streams: streams * n / t[name] / 1e9  # noqa: E731
    clone_bw = gbs("clone", 2)
    rows = ["| path | bytes moved | ms | GB/s | % of x.clone() GB/s |", "|---|---:|---:|---:|---:|",
            f"| x.clone() | 2·N | {t['clone'] * 1e3:.2f} | {clone_bw:.1f} | 100% |"]
    for name, label, streams in (("bem_tok", "bem film, γ/β per token", 4),
                                 ("eager_tok", "eager clamp·x+clamp, per token", 4),
                                 ("bem_seq", "bem film, γ/β per sequence", 2),
                                 ("eager_seq", "eager clamp·x+clamp, per sequence", 2)):
        rows.append(f"| {label} | {streams}·N | {t[name] * 1e3:.2f} | {gbs(name, streams):.1f} | "
                    f"{100 * gbs(name, streams) / clone_bw:.0f}% |")
    return (f"### film: T={T}, d={d}, float32 (N = T·d·4 bytes; bandwidth counts every stream read "
            "or written)\n\n" + "\n".join(rows))


BENCHES = {"decode": bench_decode, "lora": bench_lora, "kron": bench_kron, "film": bench_film}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time with thread CPU time on one thread (for a loaded, shared machine)")
    args = p.parse_args(argv)
    if args.clock == "cpu":
        timing.use_cpu_clock()
    parts = [f"Machine: {machine()}; bem {bem.__version__}, {bem.get_num_threads()} bem threads; "
             f"clock: {timing.clock_name()}."]
    for name in args.only.split(","):
        if name not in BENCHES:
            p.error(f"--only: unknown benchmark {name!r}")
        parts.append(BENCHES[name](args.quick))
        print(parts[-1] + "\n", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
