"""V3 Kronecker adapter (meant for the MLP down projection): ΔW = s·(A ⊗ B) applied with
bem.ops.kron_delta without materialising ΔW, under a spectral clamp ‖A‖₂‖B‖₂ ≤ budget."""
from __future__ import annotations

import math

import torch
from torch import nn

from bem import ops
from bem.modules import base


def near_square_factors(n: int) -> tuple[int, int]:
    """(a, b) with a·b = n, a ≤ b and a the largest divisor ≤ √n (LoKr's factorisation)."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


class KroneckerAdapter(base.LinearAdapter):
    """``y = base(x) + s·c·(A ⊗ B) x`` with A (o1, i1), B (o2, i2), o1·o2 = d_out, i1·i2 = d_in.

    c = min(1, budget / (‖A‖₂‖B‖₂)) enforces the spectral clamp on every forward (‖A ⊗ B‖₂ =
    ‖A‖₂‖B‖₂); :meth:`project_` rescales A and B in place so that the bound holds on the
    parameters themselves (call it after optimizer steps). s = scale; the Kronecker product follows
    ``torch.kron(A, B)`` (PEFT LoKr's convention; bem keeps s as given, no alpha/r).

    Args:
        base_layer: nn.Linear / Conv1D, weight (d_out, d_in).
        out_factors: (o1, o2), default the divisor pair of d_out nearest √d_out (same for in).
        budget: spectral budget (> 0). scale: s.

    Init: A Kaiming-uniform, B zeros (ΔW = 0: the identity at init). x: (..., d_in).
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, out_factors: tuple[int, int] | None = None,
                 in_factors: tuple[int, int] | None = None, budget: float = 1.0,
                 scale: float = 1.0):
        super().__init__(base_layer)
        o1, o2 = self._factors("out_factors", out_factors, self.d_out)
        i1, i2 = self._factors("in_factors", in_factors, self.d_in)
        self.budget = base.positive_float("KroneckerAdapter", "budget", budget)
        self.scale = base.positive_float("KroneckerAdapter", "scale", scale)
        self.kron_A = nn.Parameter(torch.empty(o1, i1, **self._factory))
        self.kron_B = nn.Parameter(torch.zeros(o2, i2, **self._factory))
        nn.init.kaiming_uniform_(self.kron_A, a=math.sqrt(5))

    @staticmethod
    def _factors(name: str, given, n: int) -> tuple[int, int]:
        if given is None:
            return near_square_factors(n)
        if (not isinstance(given, (tuple, list)) or len(given) != 2 or
                any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in given) or
                given[0] * given[1] != n):
            raise ValueError(f"KroneckerAdapter: {name}: expected two positive ints with product "
                             f"{n}, got {given!r}")
        return int(given[0]), int(given[1])

    def spectral_norm(self) -> float:
        """‖A‖₂·‖B‖₂ (= ‖A ⊗ B‖₂), exact: SVD of the small (≈√d-sized) factors in float64."""
        norm = lambda m: float(torch.linalg.matrix_norm(m.detach().double(), ord=2))  # noqa: E731
        return norm(self.kron_A) * norm(self.kron_B)

    def clamp_factor(self) -> float:
        """min(1, budget/σ); computed once per weight version (inference calls it per forward:
        the SVDs are skipped until A or B changes — optimizer steps, load_state_dict and other
        in-place updates bump the tensors' version counters)."""
        A, B = self.kron_A, self.kron_B
        key = (id(A), A._version, A.data_ptr(), id(B), B._version, B.data_ptr(), self.budget)
        cached = self.__dict__.get("_clamp_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        sigma = self.spectral_norm()
        c = 1.0 if sigma <= self.budget else self.budget / sigma
        self.__dict__["_clamp_cache"] = (key, c)
        return c

    @torch.no_grad()
    def project_(self) -> float:
        """Rescale A and B (each by √(budget/σ)) when σ = ‖A‖₂‖B‖₂ exceeds the budget. Returns
        the norm after projection."""
        c = self.clamp_factor()
        if c < 1.0:
            self.kron_A.mul_(math.sqrt(c))
            self.kron_B.mul_(math.sqrt(c))
        return self.spectral_norm()

    def delta(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return base.kron_delta(x2, self.kron_A, self.kron_B, scale=self.scale * self.clamp_factor())

    def delta_weight(self) -> torch.Tensor:
        return ops.kron_weight(self.kron_A, self.kron_B, scale=self.scale * self.clamp_factor())

    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        (o1, i1), (o2, i2) = self.kron_A.shape, self.kron_B.shape
        return 2 * num_tokens * (o1 * i1 * i2 + o1 * i2 * o2)

    def extra_repr(self) -> str:
        return (f"A={tuple(self.kron_A.shape)}, B={tuple(self.kron_B.shape)}, budget={self.budget}, "
                f"scale={self.scale}")
