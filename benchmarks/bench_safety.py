"""Benchmarks of bem.safety: (1) accuracy of lora_spectral_norm against the SVD of the
materialised ΔW in float64; (2) its speed against a full SVD (and svdvals) of the materialised ΔW;
(3) orthogonality to the safety basis after Adam steps with and without SafetyController, and the
controller's cost per step; (4) the violation detector's precision and recall on the generated
labelled set, per policy and per category, and its streaming throughput.

    PYTHONPATH=python python benchmarks/bench_safety.py               # d = 1024 and 4096
    PYTHONPATH=python python benchmarks/bench_safety.py --quick       # d = 1024 only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402
from timing import compare, fmt_us, machine  # noqa: E402

from bem.attach import BemConfig, attach  # noqa: E402
from bem.model import BemForCausalLM, TransformerConfig  # noqa: E402
from bem.safety import (SafetyBasis, SafetyController, ViolationDetector,  # noqa: E402
                        adapted_layers, lora_spectral_norm)
from bem.safety.labelled import detect_all, labelled_outputs, precision_recall  # noqa: E402


def accuracy(large: bool) -> None:
    """Relative errors; ``large`` adds the d = 4096 cases (minutes of float64 SVD on 2 cores)."""
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    cases = []
    shapes = [(7, 59, 111), (16, 111, 59), (1, 1, 1), (5, 3, 97), (64, 1000, 3001)]
    for r, d_in, d_out in shapes + ([(16, 4096, 4096)] if large else []):
        cases.append((f"random r={r}, {d_out}×{d_in}",
                      torch.randn(r, d_in, generator=gen, dtype=f64),
                      torch.randn(d_out, r, generator=gen, dtype=f64)))
    A = torch.randn(16, 513, generator=gen, dtype=f64)
    A[8:] = A[:8]
    B = torch.randn(257, 16, generator=gen, dtype=f64)
    B[:, :4] = 0
    cases.append(("rank-deficient (rank 8 of 16, 4 dead columns), 257×513", A, B))
    d = 1024
    A = torch.randn(16, d, generator=gen, dtype=f64)
    A *= torch.logspace(0, -12, 16, dtype=f64)[:, None]
    cases.append((f"ill-conditioned A (row scales 1 … 1e-12), {d}×{d}", A,
                  torch.randn(d, 16, generator=gen, dtype=f64)))
    print("\n### 1. Accuracy of lora_spectral_norm vs torch.linalg.matrix_norm(ΔW, 2), float64\n")
    print("| case | relative error (float64) | relative error (float32 inputs) |")
    print("|---|---:|---:|")
    for name, A, B in cases:
        ref = float(torch.linalg.matrix_norm(0.5 * B @ A, ord=2))
        got = float(lora_spectral_norm(A, B, 0.5))
        got32 = float(lora_spectral_norm(A.float(), B.float(), 0.5))
        print(f"| {name} | {abs(got - ref) / ref:.1e} | {abs(got32 - ref) / ref:.1e} |")
    z = float(lora_spectral_norm(torch.zeros(16, d, dtype=f64), torch.randn(d, 16, dtype=f64)))
    print(f"| zero A, {d}×{d} | exact: {z} (reference 0.0) | |", flush=True)


def _timed(fn, repeats: int) -> float:
    """Median of single calls on timing.py's clock (for calls of seconds to minutes, where
    compare() would spend minutes calibrating)."""
    out = []
    for _ in range(repeats):
        t0 = timing._clock()
        fn()
        out.append(timing._clock() - t0)
    return statistics.median(out)


def speed(dims: list[int], svd_repeats: int) -> None:
    print(f"\n### 2. Speed: spectral norm of ΔW = B A (r = 16, float32, {timing.clock_name()}, "
          f"medians)\n")
    print("| d_in = d_out | E | lora_spectral_norm (µs) | materialise + svdvals (µs) | "
          "materialise + full SVD (µs) | speed-up vs full SVD | vs svdvals |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(1)
    for d in dims:
        A = torch.randn(16, d, generator=gen) * 0.02
        B = torch.randn(d, 16, generator=gen) * 0.02
        ours = compare({"ours": lambda: lora_spectral_norm(A, B)}, repeats=9)["ours"]
        full = _timed(lambda: torch.linalg.svd(B @ A)[1][0], svd_repeats)
        if d <= 1024:      # svdvals at d = 4096 would add minutes; the full SVD is the baseline
            svdvals = _timed(lambda: torch.linalg.svdvals(B @ A)[0], svd_repeats)
            vals = (f"{fmt_us(svdvals)} | {fmt_us(full)} | {full / ours:,.0f}× | "
                    f"{svdvals / ours:,.0f}×")
        else:
            vals = f"— | {fmt_us(full)} | {full / ours:,.0f}× | —"
        print(f"| {d} | 1 | {fmt_us(ours)} | {vals} |", flush=True)
    d = dims[-1]
    A = torch.randn(8, 16, d, generator=gen) * 0.02
    B = torch.randn(8, d, 16, generator=gen) * 0.02
    stacked = compare({"ours": lambda: lora_spectral_norm(A, B)}, repeats=9)["ours"]
    print(f"| {d} | 8 (stacked) | {fmt_us(stacked)} | — | — | — | — |")
    print(f"\n(baselines: median of {svd_repeats} single calls each; ours: median of 9 "
          f"interleaved repeats, benchmarks/timing.py)")


def _train(model, ids, steps, controller=None) -> tuple[float, float, float]:
    """(first loss, last loss, seconds per Adam step: forward, backward, step and, with a
    controller, its projection)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if controller is not None:
        controller.attach_to(opt)
    losses = []
    t0 = timing._clock()
    for _ in range(steps):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1], (timing._clock() - t0) / steps


def orthogonality(steps: int) -> None:
    cfg = TransformerConfig(vocab_size=260, d_model=128, n_layers=4, n_heads=4, d_ff=256)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (4, 65), generator=gen)
    rows = []
    for side in ("input", "output"):
        for protected in (True, False):
            torch.manual_seed(0)
            model = BemForCausalLM(cfg)
            attach(model, BemConfig.preset("lora", rank=16, alpha=32.0))
            layers = adapted_layers(model)
            g = torch.Generator().manual_seed(3)
            basis = SafetyBasis({n: torch.linalg.qr(torch.randn(cfg.d_model, 16, generator=g))[0]
                                 for n in layers}, side)
            ctl = SafetyController(model, basis=basis)
            if not protected:       # the same start, then trained without projections
                for m in layers.values():
                    torch.nn.init.kaiming_uniform_(m.lora_A.data[0], a=5 ** 0.5)
            first, last, per_step = _train(model, ids, steps, ctl if protected else None)
            project = compare({"step": ctl.step}, repeats=5)["step"] if protected else None
            rows.append((side, protected, max(ctl.orthogonality().values()), first, last,
                         per_step, project))
    print(f"\n### 3. Orthogonality after {steps} Adam steps (lr 1e-2), built-in model d_model=128, "
          f"4 layers, LoRA r=16 on q/v (8 layers), random orthonormal basis s=16, float32, "
          f"batch 4×64 tokens, {timing.clock_name()}\n")
    print("| side | SafetyController | max ‖ΔW U‖_F/‖ΔW‖_F (input) or ‖UᵀΔW‖_F/‖ΔW‖_F (output) | "
          "loss first → last | ms per training step | controller.step() alone (µs, 8 layers) |")
    print("|---|---|---:|---|---:|---:|")
    for side, protected, ratio, first, last, per_step, project in rows:
        print(f"| {side} | {'yes' if protected else 'no'} | {ratio:.2e} | {first:.3f} → "
              f"{last:.3f} | {per_step * 1e3:.1f} | "
              f"{fmt_us(project) if project is not None else '—'} |", flush=True)


def detector(n: int) -> None:
    policies, items = labelled_outputs(n, seed=0)
    det = ViolationDetector(policies)
    t0 = timing._clock()
    reports = detect_all(det, items)
    elapsed = timing._clock() - t0
    whole = detect_all(ViolationDetector(policies), items, stream=False)
    same = all(a.violated == b.violated for a, b in zip(reports, whole))
    chars = sum(len(i.output) for i in items)
    chunks = sum(len(i.chunks) for i in items)
    print(f"\n### 4. ViolationDetector on the labelled set (bem.safety.labelled, n = {n}, seed 0, "
          f"chunks of 1–6 characters)\n")
    print("| policy | applies to | true violations | tp | fp | fn | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in precision_recall(reports, items).items():
        applies = row["tp"] + row["fp"] + row["fn"] + row["tn"]
        print(f"| {name} | {applies} | {row['tp'] + row['fn']} | {row['tp']} | {row['fp']} | "
              f"{row['fn']} | {row['precision']:.3f} | {row['recall']:.3f} |")
    print("\n| category | outputs | truth | detected |")
    print("|---|---:|---|---|")
    by: dict[str, dict] = {}
    for r, item in zip(reports, items):
        entry = by.setdefault(item.category, {"n": 0, "truth": item.truth, "seen": {}})
        entry["n"] += 1
        key = ", ".join(sorted(r.violated)) or "—"
        entry["seen"][key] = entry["seen"].get(key, 0) + 1
    for cat, e in by.items():
        seen = "; ".join(f"{k} ({v})" for k, v in sorted(e["seen"].items()))
        print(f"| {cat} | {e['n']} | {', '.join(sorted(e['truth'])) or '—'} | {seen} |")
    print(f"\nStreaming equals whole-output checking on every item: {same}. Throughput: "
          f"{chars / elapsed / 1e6:.2f} M characters/s, {chunks / elapsed / 1e3:.0f} k chunks/s "
          f"({elapsed * 1e6 / n:.0f} µs per output, 3 policies).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 1024 only, fewer steps and items")
    p.add_argument("--svd-repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this thread's CPU time on 1 thread (a shared machine disturbs it "
                        "far less)")
    args = p.parse_args()
    if args.clock == "cpu":
        timing.use_cpu_clock()
    print(f"Machine: {machine()}")
    accuracy(large=not args.quick)
    speed([1024] if args.quick else [1024, 4096], args.svd_repeats)
    orthogonality(30 if args.quick else 100)
    detector(1000 if args.quick else 5000)


if __name__ == "__main__":
    main()
