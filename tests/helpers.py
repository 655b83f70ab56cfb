"""Shared test helpers: the devices to test on, per-dtype tolerances, and random routed inputs."""
from __future__ import annotations

import torch

from bem import _ext


def available_devices() -> list[str]:
    """Always "cpu"; "cuda" too when a GPU is present (bem's CUDA kernels or its fallback)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16, torch.float16]


# Error bound relative to the largest reference magnitude, per dtype: the kernels accumulate in
# fp32 and round once, so the error is dominated by rounding the inputs and the output.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-12}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                        what: str = "") -> None:
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, (
        f"{what}: max abs error {err:.3e} > {TOLERANCE[dtype]:.1e} × max|ref| {scale:.3e}")


def routed_expert_index(T: int, E: int, gen: torch.Generator, *, chunk: int = 64,
                        gap_prob: float = 0.2) -> torch.Tensor:
    """Experts in runs of random length (up to `chunk`), with −1 gaps (no adapter)."""
    out = torch.empty(T, dtype=torch.int64)
    t = 0
    while t < T:
        run = int(torch.randint(1, chunk + 1, (1,), generator=gen))
        e = -1 if torch.rand(1, generator=gen).item() < gap_prob else int(
            torch.randint(0, E, (1,), generator=gen))
        out[t:t + run] = e
        t += run
    return out


def random_rank_index(T: int, r: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct rank components per token, in random order."""
    return torch.argsort(torch.rand(T, r, generator=gen), dim=1)[:, :k].contiguous()
