"""Trust-region math for low-rank deltas ΔW = scale·B A: the Frobenius norm from r×r Gram matrices
(never the d_out×d_in product), the projection factor min(1, τ/‖ΔW‖_F), projection statistics."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["ProjectionStats", "lowrank_frobenius_norm", "projection_factor"]

_HALF = (torch.float16, torch.bfloat16)


def lowrank_frobenius_norm(A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor = 1.0,
                           rank_index: torch.Tensor | None = None, *,
                           accumulate_dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖scale · B A‖_F of one or E low-rank deltas, via ‖BA‖_F² = tr((BᵀB)(AAᵀ)).

    Costs O(r²·(d_in + d_out)) instead of the O(r·d_in·d_out) of forming ΔW, and is differentiable
    in A, B and a tensor ``scale`` (the gradient is 0 where the norm is 0, never NaN).

    Args:
        A: (r, d_in) or (E, r, d_in) float — down projections.
        B: (d_out, r) or (E, d_out, r) float — up projections (same E and r as A).
        scale: float or float tensor broadcastable to the result (() or (E,)); |scale| is used.
        rank_index: None (all r components), (k,) int64 (the same components of every expert) or
            (E, k) int64 (per expert; batched A, B only): ΔW keeps only those rank components,
            ΔW = scale · B[:, idx] A[idx]. Indices in [0, r).
        accumulate_dtype: dtype of the Gram matrices and the trace (default: float32 for fp16/bf16
            inputs, else A's dtype); torch.float64 for exact checks.

    Returns: () or (E,) norms in ``accumulate_dtype`` (a float norm, kept at that precision for the
    projection factor).
    """
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name}: expected 2 or 3 dims, got shape {tuple(t.shape)}")
    if A.dim() != B.dim() or A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"B: expected (d_out, r) or (E, d_out, r) matching A {tuple(A.shape)} "
                         f"(r = {A.shape[-2]}), got {tuple(B.shape)}")
    if accumulate_dtype is None:
        accumulate_dtype = torch.float32 if A.dtype in _HALF else A.dtype
    elif not isinstance(accumulate_dtype, torch.dtype) or not accumulate_dtype.is_floating_point:
        raise TypeError(f"accumulate_dtype: expected a floating torch.dtype, got "
                        f"{accumulate_dtype!r}")
    if not isinstance(scale, torch.Tensor):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number or tensor, got {scale!r}")
    if rank_index is not None:
        A, B = _select_rank(A, B, rank_index)
    A = A.to(accumulate_dtype)
    B = B.to(accumulate_dtype)
    # Both Grams are symmetric, so tr(G_B G_A) is the sum of their elementwise product.
    squared = ((A @ A.mT) * (B.mT @ B)).sum((-2, -1))
    # Round-off can push a (mathematically ≥ 0) trace slightly negative; the inner where keeps
    # sqrt's infinite slope at 0 out of the graph so the gradient there is 0 instead of NaN.
    positive = squared > 0
    norm = torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)
    if isinstance(scale, torch.Tensor):
        return norm * scale.to(accumulate_dtype).abs()
    return norm * abs(float(scale))


def _select_rank(A: torch.Tensor, B: torch.Tensor,
                 rank_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of A and columns of B named by rank_index ((k,) or (E, k))."""
    if not isinstance(rank_index, torch.Tensor) or rank_index.dtype != torch.int64:
        raise TypeError(f"rank_index: expected an int64 tensor, got "
                        f"{getattr(rank_index, 'dtype', type(rank_index).__name__)}")
    r = A.shape[-2]
    per_expert = rank_index.dim() == 2 and A.dim() == 3 and rank_index.shape[0] == A.shape[0]
    if rank_index.dim() != 1 and not per_expert:
        raise ValueError(f"rank_index: expected (k,) or (E, k) with E = "
                         f"{A.shape[0] if A.dim() == 3 else 'batched A only'}, got "
                         f"{tuple(rank_index.shape)}")
    if rank_index.numel() and (int(rank_index.min()) < 0 or int(rank_index.max()) >= r):
        raise ValueError(f"rank_index: expected indices in [0, {r}), got values in "
                         f"[{int(rank_index.min())}, {int(rank_index.max())}]")
    rank_index = rank_index.to(A.device)
    if not per_expert:
        return A.index_select(-2, rank_index), B.index_select(-1, rank_index)
    E, k = rank_index.shape
    A = torch.gather(A, 1, rank_index[:, :, None].expand(E, k, A.shape[-1]))
    B = torch.gather(B, 2, rank_index[:, None, :].expand(E, B.shape[1], k))
    return A, B


def projection_factor(norm: torch.Tensor, tau: float) -> torch.Tensor:
    """min(1, τ / norm) elementwise (1 where norm == 0): multiplying ΔW by it puts ΔW inside the
    Frobenius ball of radius τ. Differentiable in norm (d/dnorm = −τ/norm² where projected).

    norm: float tensor of non-negative norms (any shape); tau: positive float (inf: no bound).
    Returns a tensor of norm's shape and dtype with values in (0, 1].
    """
    if not isinstance(norm, torch.Tensor) or not norm.is_floating_point():
        raise TypeError(f"norm: expected a floating tensor, got "
                        f"{getattr(norm, 'dtype', type(norm).__name__)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau: expected a positive number, got {tau!r}")
    over = norm > tau
    return torch.where(over, tau / torch.where(over, norm, 1.0), 1.0)


@dataclass
class _Tally:
    """One layer's counts; tensors stay on the factors' device so recording never syncs."""

    evaluations: int
    projected: torch.Tensor      # () int64
    factor_sum: torch.Tensor     # () float64, over projected evaluations only
    min_factor: torch.Tensor     # () float64

    @classmethod
    def empty(cls, device: torch.device) -> _Tally:
        return cls(0, torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device),
                   torch.ones((), dtype=torch.float64, device=device))

    def add(self, other: _Tally) -> None:
        dev = self.projected.device
        self.evaluations += other.evaluations
        self.projected = self.projected + other.projected.to(dev)
        self.factor_sum = self.factor_sum + other.factor_sum.to(dev)
        self.min_factor = torch.minimum(self.min_factor, other.min_factor.to(dev))

    def to_dict(self) -> dict:
        projected = int(self.projected)
        return {"evaluations": self.evaluations, "projected": projected,
                "projection_rate": projected / self.evaluations if self.evaluations else 0.0,
                "mean_factor": float(self.factor_sum) / projected if projected else 1.0,
                "min_factor": float(self.min_factor)}


class ProjectionStats:
    """Per-layer tallies of trust-region projections: how many factors were evaluated, how many
    were < 1 (projected), their mean and the smallest. Deterministic (no clocks): the same
    forwards give the same statistics.

    Layers are named by strings; :meth:`update` and :meth:`merged` prefix them with a module path
    so the statistics of a whole model can be gathered into one object.
    """

    def __init__(self) -> None:
        self._layers: dict[str, _Tally] = {}

    def record(self, factor: torch.Tensor, layer: str = "") -> None:
        """Count every element of ``factor`` (any shape, values in (0, 1]) as one evaluation of
        ``layer``'s projection. Detached; does not synchronise with the factor's device."""
        if not isinstance(factor, torch.Tensor) or not factor.is_floating_point():
            raise TypeError(f"factor: expected a floating tensor, got "
                            f"{getattr(factor, 'dtype', type(factor).__name__)}")
        if not isinstance(layer, str):
            raise TypeError(f"layer: expected str, got {type(layer).__name__}")
        f = factor.detach().reshape(-1).to(torch.float64)
        below = f < 1
        one = _Tally(f.numel(), below.sum(), torch.where(below, f, 0.0).sum(),
                     f.min() if f.numel() else torch.ones((), dtype=torch.float64, device=f.device))
        self._tally(layer, f.device).add(one)

    def update(self, other: ProjectionStats, prefix: str = "") -> ProjectionStats:
        """Add ``other``'s tallies to these (its layer names prefixed by ``prefix.``); returns
        self."""
        if not isinstance(other, ProjectionStats):
            raise TypeError(f"other: expected ProjectionStats, got {type(other).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected str, got {type(prefix).__name__}")
        for name, tally in other._layers.items():
            full = ".".join(p for p in (prefix, name) if p)
            self._tally(full, tally.projected.device).add(tally)
        return self

    @classmethod
    def merged(cls, stats: Iterable[ProjectionStats] | Mapping[str, ProjectionStats]
               ) -> ProjectionStats:
        """One ProjectionStats holding all of ``stats``; a mapping prefixes each one's layer names
        with its key (e.g. the module path)."""
        out = cls()
        items = stats.items() if isinstance(stats, Mapping) else (("", s) for s in stats)
        for prefix, s in items:
            out.update(s, prefix)
        return out

    def reset(self) -> None:
        self._layers.clear()

    def _tally(self, layer: str, device: torch.device) -> _Tally:
        if layer not in self._layers:
            self._layers[layer] = _Tally.empty(device)
        return self._layers[layer]

    def to_dict(self) -> dict:
        """JSON-ready summary: totals over layers (evaluations, projected, projection_rate,
        mean_factor over projected evaluations (1.0 when none), min_factor), the number of layers
        seen, the sorted names of the layers with any projection, and per_layer dicts."""
        total = _Tally.empty(torch.device("cpu"))
        per_layer = {}
        for name in sorted(self._layers):
            total.add(self._layers[name])
            per_layer[name] = self._layers[name].to_dict()
        return {**total.to_dict(), "layers": len(per_layer),
                "layers_affected": [n for n, d in per_layer.items() if d["projected"]],
                "per_layer": per_layer}
