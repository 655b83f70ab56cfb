"""Spectral norm of low-rank deltas ΔW = scale·B A from QR of the factors and an SVD of the r×r
core (ΔW never materialised), and the spectral monitor that projects adapters into a spectral
budget and keeps the seed's projection statistics."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bem.modules.base import positive_float, positive_int
from bem.modules.trust_region import ProjectionStats, projection_factor
from bem.safety import _checks

__all__ = ["ProjectionEvent", "SpectralMonitor", "SpectralProjection", "lora_spectral_norm",
           "lora_top_singular"]


def _orthonormal_side(M: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """M (…, d, r) = Q S with Q (…, d, k) orthonormal columns and S (…, k, r) small. When d <= r
    the QR would not shrink anything: Q is the identity (returned as None) and S = M."""
    if M.shape[-2] <= M.shape[-1]:
        return None, M
    Q, R = torch.linalg.qr(M, mode="reduced")
    return Q, R


def lora_top_singular(A: torch.Tensor, B: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest singular value σ of B A and its singular vectors u, v (B A v = σ u), from QR of
    Aᵀ and B and an SVD of the (≤ r)×(≤ r) core R_B R_Aᵀ: O(r²·(d_in + d_out) + r³) work.

    A: (r, d_in) or (E, r, d_in); B: (d_out, r) or (E, d_out, r), float32/float64, checked by the
    caller. Returns σ (…,), u (…, d_out), v (…, d_in) in A's dtype, without gradients. Where
    B A = 0, σ = 0 and u, v are unit vectors from the SVD of the zero core.
    """
    with torch.no_grad():
        Q_a, S_a = _orthonormal_side(A.mT)           # Aᵀ = Q_a S_a, so A = S_aᵀ Q_aᵀ
        Q_b, S_b = _orthonormal_side(B)              # B = Q_b S_b
        U, S, Vh = torch.linalg.svd(S_b @ S_a.mT)    # B A = Q_b (U S Vh) Q_aᵀ
        u, v = U[..., :, 0], Vh[..., 0, :]
        if Q_b is not None:
            u = (Q_b @ u[..., None])[..., 0]
        if Q_a is not None:
            v = (Q_a @ v[..., None])[..., 0]
        return S[..., 0], u, v


def lora_spectral_norm(A: torch.Tensor, B: torch.Tensor,
                       scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """‖scale · B A‖₂, exactly (up to round-off), for one or E low-rank deltas, never forming the
    d_out×d_in product: Aᵀ = Q_A R_A and B = Q_B R_B (reduced QR), so ‖B A‖₂ = ‖R_B R_Aᵀ‖₂, the
    top singular value of an r×r matrix.

    Args:
        A: (r, d_in) or (E, r, d_in) float — down projections.
        B: (d_out, r) or (E, d_out, r) float — up projections (same E and r as A, same device).
        scale: finite float, or float tensor of shape () or (E,); |scale| is used.

    Returns: () or (E,) norms, float64 when A or B is float64, else float32 (half inputs are
    computed in float32). Differentiable in A, B and a tensor scale: the gradient is that of
    uᵀ(B A)v with the top singular pair (u, v) held fixed, which equals the true gradient wherever
    the top singular value is simple; at ΔW = 0 it is a subgradient (finite, never NaN).

    Raises TypeError/ValueError naming A, B or scale for non-tensors, integer dtypes, wrong or
    mismatched shapes, empty tensors and NaN/Inf.
    """
    A, B = _checks.lora_factors(A, B)
    s = _checks.scale(scale, tuple(A.shape[:-2]))
    dtype = _checks.compute_dtype(A, B)
    A, B = A.to(dtype), B.to(dtype)
    sigma, u, v = lora_top_singular(A, B)
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        # uᵀ B A v = (Bᵀu)·(A v) has σ's value and, by the envelope theorem, its gradient; the
        # straight-through form keeps the value bit-identical to the SVD's.
        along = ((B.mT @ u[..., None])[..., 0] * (A @ v[..., None])[..., 0]).sum(-1)
        sigma = sigma + (along - along.detach())
    if isinstance(s, torch.Tensor):
        return sigma * s.to(dtype).abs()
    return sigma * abs(s)


class SpectralProjection(NamedTuple):
    """What :meth:`SpectralMonitor.monitor_and_project` returns: the factors after projection
    (A unchanged, B multiplied by the factor), the spectral norms ‖scale·B A‖₂ before projection
    and the factors min(1, budget/norm), each () or (E,)."""

    A: torch.Tensor
    B: torch.Tensor
    spectral_norm: torch.Tensor
    factor: torch.Tensor


@dataclass(frozen=True)
class ProjectionEvent:
    """One projected delta: the monitor call it came from (0-based), layer, expert (0 for
    unbatched factors), its spectral norm before projection and the factor applied."""

    call: int
    layer: str
    expert: int
    spectral_norm: float
    factor: float


class SpectralMonitor:
    """Keeps adapters' ΔW = scale·B A inside the spectral ball ‖ΔW‖₂ <= spectral_budget.

    :meth:`monitor_and_project` computes each delta's spectral norm with
    :func:`lora_spectral_norm` and scales B by min(1, budget/‖ΔW‖₂) (the seed's norm-capping
    trust-region projection; a scaling keeps ΔW's directions, so it commutes with the safety
    basis' orthogonal projection). Every call is tallied per layer in a
    :class:`bem.modules.trust_region.ProjectionStats`; the last ``history_size`` calls are kept
    (as tensors, so monitoring never waits on the device) for :meth:`get_projection_stats` and
    :meth:`history`. Deterministic: "recent" means the last ``recent_calls`` calls, not a clock.

    Args:
        spectral_budget: τ > 0.
        history_size: calls kept for the recent statistics and the event history (>= 1).
        recent_calls: how many of the latest calls count as recent (>= 1, <= history_size).
    """

    def __init__(self, spectral_budget: float = 1.0, *, history_size: int = 1000,
                 recent_calls: int = 100) -> None:
        self.spectral_budget = positive_float("SpectralMonitor", "spectral_budget",
                                              spectral_budget)
        self.history_size = positive_int("SpectralMonitor", "history_size", history_size)
        self.recent_calls = positive_int("SpectralMonitor", "recent_calls", recent_calls)
        if self.recent_calls > self.history_size:
            raise ValueError(f"SpectralMonitor: recent_calls: expected <= history_size = {history_size}, got "
                             f"{recent_calls}")
        self.stats = ProjectionStats()
        self.calls = 0
        self._history: deque[tuple[int, str, torch.Tensor, torch.Tensor]] = deque(
            maxlen=self.history_size)

    def monitor_and_project(self, A: torch.Tensor, B: torch.Tensor,
                            scale: float | torch.Tensor = 1.0, layer: str = "", *,
                            inplace: bool = False) -> SpectralProjection:
        """Measures ‖scale·B A‖₂ of one or E deltas, records it under ``layer`` and projects.

        A: (r, d_in) or (E, r, d_in); B: (d_out, r) or (E, d_out, r); scale as in
        :func:`lora_spectral_norm`. With ``inplace`` B's storage is scaled under no_grad (for
        parameters, after an optimizer step); otherwise the returned B is a new, differentiable
        tensor (B times the factor; the factor carries gradient through the norm).
        """
        if not isinstance(layer, str):
            raise TypeError(f"layer: expected str, got {type(layer).__name__}")
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace: expected bool, got {type(inplace).__name__}")
        norm = lora_spectral_norm(A, B, scale)
        factor = projection_factor(norm, self.spectral_budget)
        self.stats.record(factor, layer)
        self._history.append((self.calls, layer, norm.detach().reshape(-1),
                              factor.detach().reshape(-1)))
        self.calls += 1
        expand = factor.reshape(*factor.shape, 1, 1)
        if inplace:
            with torch.no_grad():
                B.mul_(expand.to(B.dtype))
            return SpectralProjection(A, B, norm, factor)
        return SpectralProjection(A, B * expand.to(B.dtype), norm, factor)

    def history(self) -> list[ProjectionEvent]:
        """The projected deltas (factor < 1) among the kept calls, oldest first."""
        events = []
        for call, layer, norms, factors in self._history:
            for e in torch.nonzero(factors < 1).reshape(-1).tolist():
                events.append(ProjectionEvent(call, layer, e, float(norms[e]), float(factors[e])))
        return events

    def get_projection_stats(self) -> dict:
        """The seed's dashboard keys — total_projections (all calls), recent_projections,
        avg_projection_factor (mean over recent projections, 1.0 when none), layers_affected
        (recent, sorted) — plus max_recent_spectral_norm, spectral_budget, calls, and the
        all-time tallies of ProjectionStats (evaluations, projected, projection_rate,
        mean_factor, min_factor, per_layer)."""
        totals = self.stats.to_dict()
        recent = [h for h in self._history if h[0] >= self.calls - self.recent_calls]
        factors = [f for _, _, _, f in recent]
        flat = torch.cat([f.cpu() for f in factors]) if factors else torch.ones(0)
        projected = flat[flat < 1]
        max_norm = max((float(n.max()) for _, _, n, _ in recent), default=0.0)
        return {**totals,
                "total_projections": totals["projected"],
                "recent_projections": int(projected.numel()),
                "avg_projection_factor": float(projected.mean()) if projected.numel() else 1.0,
                "layers_affected": sorted({layer for _, layer, _, f in recent
                                           if bool((f < 1).any())}),
                "all_layers_affected": totals["layers_affected"],
                "max_recent_spectral_norm": max_norm,
                "spectral_budget": self.spectral_budget,
                "calls": self.calls}

    def reset(self) -> None:
        self.stats.reset()
        self._history.clear()
        self.calls = 0
