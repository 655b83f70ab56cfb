"""The wrapper shared by bem modules that sit around a linear layer (torch nn.Linear or Hugging
Face's GPT-2 Conv1D): shapes, the base weight in (d_out, d_in) layout, and merging a ΔW into it."""
from __future__ import annotations

import abc
import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
from torch import nn

from bem import ops, reference

_use_reference: contextvars.ContextVar[bool] = contextvars.ContextVar("bem_reference", default=False)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside the block bem modules call the pure-torch twins in :mod:`bem.reference` instead of
    :mod:`bem.ops` (same math; used to count FLOPs with torch.utils.flop_counter)."""
    token = _use_reference.set(True)
    try:
        yield
    finally:
        _use_reference.reset(token)


def lora_delta(x, A, B, **kw) -> torch.Tensor:
    """bem.ops.lora_delta, or its reference inside :func:`reference_kernels`."""
    return (reference.lora_delta if _use_reference.get() else ops.lora_delta)(x, A, B, **kw)


def kron_delta(x, A, B, *, scale: float) -> torch.Tensor:
    """bem.ops.kron_delta, or its reference inside :func:`reference_kernels`."""
    if _use_reference.get():
        return reference.kron_delta(x.reshape(-1, x.shape[-1]), A, B, scale=scale).reshape(
            *x.shape[:-1], A.shape[0] * B.shape[0])
    return ops.kron_delta(x, A, B, scale=scale)


def film(x, gamma, beta) -> torch.Tensor:
    """Unbounded bem.ops.film (bem modules bound γ, β smoothly themselves), or its reference."""
    if _use_reference.get():
        return reference.film(x, gamma, beta, gamma_bounds=None, beta_bound=None)
    return ops.film(x, gamma, beta, gamma_bounds=None, beta_bound=None)


def linear_shape(layer: nn.Module, name: str = "base") -> tuple[int, int, bool]:
    """(d_in, d_out, transposed) of a linear-like layer: nn.Linear (weight (d_out, d_in)) or a
    Conv1D-style layer with ``nf`` and weight (d_in, d_out) (transposed=True)."""
    w = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(layer, "nf", None) == w.shape[1]:
        return w.shape[0], w.shape[1], True
    raise TypeError(f"{name}: expected nn.Linear or a Conv1D (weight (d_in, d_out) with nf), got "
                    f"{type(layer).__name__}")


def positive_int(owner: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{owner}: {name}: expected a positive int, got {v!r}")
    return v


def positive_float(owner: str, name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{owner}: {name}: expected a finite number > 0, got {v!r}")
    return float(v)


class LinearAdapter(nn.Module, abc.ABC):
    """Base class: ``forward(x) = base(x) + delta(x)`` around a frozen linear-like ``base_layer``.

    Subclasses implement ``delta(x2, x) -> (N, d_out)`` for x2 = x viewed (N, d_in).
    ``needs_control`` says whether the module reads per-chunk controls.
    """

    needs_control = False
    mergeable = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.d_in, self.d_out, self.transposed = linear_shape(base_layer)
        self.base_layer = base_layer
        w = base_layer.weight
        self._factory = dict(dtype=w.dtype, device=w.device)

    @abc.abstractmethod
    def delta(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x2: (N, d_in) = x viewed flat; x: (B, T, d_in) as given. Returns (N, d_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) → (..., d_out), dtype of x."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{type(self).__name__}: x: expected last dimension {self.d_in}, got "
                             f"shape {tuple(x.shape)}")
        y = self.base_layer(x)
        d = self.delta(x.reshape(-1, self.d_in), x)
        return y + d.reshape(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in (d_out, d_in) layout, for merge (mergeable modules only)."""
        raise TypeError(f"{type(self).__name__} cannot be merged into its base layer")

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with ΔW added to its weight (in place); the adapter is then spent."""
        dw = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight.add_(dw.t() if self.transposed else dw)
        return self.base_layer

    @abc.abstractmethod
    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        """Matmul FLOPs (2 per multiply-add, torch.utils.flop_counter's convention) this module
        adds to a forward of `num_tokens` tokens in `num_chunks` chunks (one sequence)."""
