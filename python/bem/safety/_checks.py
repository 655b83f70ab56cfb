"""Argument checks shared by bem.safety: LoRA factor pairs, scales and orthonormal bases, with
errors that name the argument, what was expected and what was given."""
from __future__ import annotations

import math

import torch

_HALF = (torch.float16, torch.bfloat16)


def tensor(t, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` as a non-empty, finite floating tensor with one of ``dims`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dims, got shape "
                         f"{tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")
    return t


def lora_factors(A, B) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a LoRA pair: A (r, d_in) or (E, r, d_in), B (d_out, r) or (E, d_out, r)."""
    A = tensor(A, "A", (2, 3))
    B = tensor(B, "B", (2, 3))
    if A.dim() != B.dim() or A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"B: expected (d_out, r) or (E, d_out, r) matching A {tuple(A.shape)} "
                         f"(r = {A.shape[-2]}), got {tuple(B.shape)}")
    if A.device != B.device:
        raise ValueError(f"B: expected A's device {A.device}, got {B.device}")
    return A, B


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (QR and SVD have no half kernels)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def scale(value, batch: tuple[int, ...]) -> float | torch.Tensor:
    """A finite number, or a finite floating tensor of shape () or ``batch`` (one per expert)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"scale: expected a floating tensor, got {value.dtype}")
        if tuple(value.shape) not in ((), tuple(batch)):
            raise ValueError(f"scale: expected shape () or {tuple(batch)}, got "
                             f"{tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError("scale: expected finite values, found NaN or Inf")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"scale: expected a finite number or tensor, got {value!r}")
    return float(value)


def orthonormal(U, name: str, tol: float) -> torch.Tensor:
    """``U`` (d, s) with s <= d and ‖UᵀU − I‖_max <= tol (computed in float64)."""
    U = tensor(U, name, (2,))
    d, s = U.shape
    if s > d:
        raise ValueError(f"{name}: expected (d, s) with s <= d, got {tuple(U.shape)}")
    U64 = U.to(torch.float64)
    err = float((U64.mT @ U64 - torch.eye(s, dtype=torch.float64, device=U.device)).abs().max())
    if err > tol:
        raise ValueError(f"{name}: expected orthonormal columns (|UᵀU − I| <= {tol:g}), got a "
                         f"deviation of {err:.3g}")
    return U
