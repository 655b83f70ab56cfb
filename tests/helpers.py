"""Shared test helpers: the devices to test on, per-dtype tolerances, and random routed inputs."""
from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """Always "cpu"; "cuda" too when a GPU is present (bem's CUDA kernels or its fallback)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16, torch.float16]


# Error bound per dtype, relative to each element's own magnitude: the kernels accumulate in fp32
# and round once, so the error is dominated by rounding the output (relative to the element) and,
# where terms cancel, by the fp32 accumulation (relative to the terms, bounded here by a share of
# the largest reference magnitude).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-12}
CANCELLATION_SHARE = 0.01


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                        what: str = "") -> None:
    """|actual − expected| ≤ TOLERANCE[dtype] · (|expected| + CANCELLATION_SHARE · max|expected|)
    element by element: small entries cannot be badly wrong and pass on the scale of large ones."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    floor = CANCELLATION_SHARE * max(expected.abs().max().item(), 1e-30)
    bound = TOLERANCE[dtype] * (expected.abs() + floor)
    err = (actual - expected).abs()
    bad = err > bound
    if bool(bad.any()):
        i = int((err / bound).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements off; worst at flat index {i}: got "
            f"{actual.reshape(-1)[i].item():.6e}, expected {expected.reshape(-1)[i].item():.6e} "
            f"(bound {bound.reshape(-1)[i].item():.3e})")


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


def assert_grads_match_finite_differences(loss_fn, tensors: dict[str, torch.Tensor], *,
                                          entries: int = 6, eps: float = 1e-6, seed: int = 0,
                                          differenced_fn=None) -> None:
    """The autograd gradient of the float64 scalar ``loss_fn()`` with respect to each tensor in
    `tensors` (leaves with requires_grad) equals central finite differences (of
    ``differenced_fn()``, default `loss_fn`: a function with the gradient `loss_fn` should have),
    checked at the `entries` largest-gradient entries plus as many random ones; not all zero.

    Rounding makes a difference quotient accurate to about 1e-16·|loss|/eps, hence the tolerance
    relative to the loss as well as to the gradient."""
    for t in tensors.values():
        assert t.dtype == torch.float64 and t.requires_grad, "float64 leaves expected"
        t.grad = None
    loss = loss_fn()
    loss.backward()
    grads = {name: t.grad.detach().clone() for name, t in tensors.items()}
    scale = abs(loss.item()) + 1.0
    gen = torch.Generator().manual_seed(seed)
    differenced_fn = differenced_fn or loss_fn
    with torch.no_grad():
        for name, t in tensors.items():
            g = grads[name].reshape(-1)
            assert bool(g.abs().max() > 0), f"{name}: gradient is all zero"
            picks = set(g.abs().topk(min(entries, g.numel())).indices.tolist())
            picks |= set(torch.randperm(g.numel(), generator=gen)[:entries].tolist())
            flat = t.view(-1)
            for i in sorted(picks):
                old = flat[i].item()
                flat[i] = old + eps
                up = differenced_fn().item()
                flat[i] = old - eps
                down = differenced_fn().item()
                flat[i] = old
                fd = (up - down) / (2 * eps)
                tol = 1e-6 * (abs(fd) + g.abs().max().item()) + 1e-9 * scale
                assert abs(g[i].item() - fd) <= tol, (
                    f"{name}[{i}]: autograd {g[i].item():.10g}, finite differences {fd:.10g}")
