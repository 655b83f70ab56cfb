"""The orthogonal safety basis: per adapted layer an orthonormal U (d, s) spanning the directions
that carry the protected behaviour, and the factor projections that keep adapter updates
orthogonal to it during training — A ← A − (A U)Uᵀ on the input side, B ← B − U(Uᵀ B) on the
output side — at O(r·d·s) cost, never forming a d×d projector or the d_out×d_in ΔW."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bem.modules.base import positive_int
from bem.modules.trust_region import lowrank_frobenius_norm
from bem.safety import _checks

__all__ = ["SIDES", "BasisFit", "SafetyBasis", "layer_activations", "orthogonality_ratio",
           "principal_basis", "project_factors"]

# "input": ΔW U = 0 (the update ignores inputs along U); "output": Uᵀ ΔW = 0 (it writes nothing
# along U).
SIDES = ("input", "output")


def _side(side) -> str:
    if side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    return side


def _basis_for(A: torch.Tensor, B: torch.Tensor, U, side: str) -> torch.Tensor:
    """U checked against the factors' width on ``side`` and cast to their dtype and device."""
    U = _checks.tensor(U, "U", (2,))
    d = A.shape[-1] if side == "input" else B.shape[-2]
    if U.shape[0] != d:
        what = "d_in of A" if side == "input" else "d_out of B"
        raise ValueError(f"U: expected (d, s) with d = {d} ({what}, side={side!r}), got "
                         f"{tuple(U.shape)}")
    return U.to(device=A.device, dtype=A.dtype if side == "input" else B.dtype)


def project_factors(A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, side: str = "input"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the delta B A with the basis U's directions removed, differentiably.

    A: (r, d_in) or (E, r, d_in); B: (d_out, r) or (E, d_out, r); U: (d, s) orthonormal columns
    (d = d_in for side "input", d_out for "output"; orthonormality is the caller's contract — see
    :class:`SafetyBasis`, which checks it once). Returns (A − (A U)Uᵀ, B) for "input", so that
    ΔW' U = 0, or (A, B − U(Uᵀ B)) for "output", so that Uᵀ ΔW' = 0. Linear in A and B (the
    gradient w.r.t. the projected factor is projected the same way).
    """
    A, B = _checks.lora_factors(A, B)
    side = _side(side)
    U = _basis_for(A, B, U, side)
    if side == "input":
        return A - (A @ U) @ U.mT, B
    return A, B - U @ (U.mT @ B)


def orthogonality_ratio(A: torch.Tensor, B: torch.Tensor, U: torch.Tensor,
                        side: str = "input") -> torch.Tensor:
    """‖ΔW U‖_F / ‖ΔW‖_F ("input") or ‖Uᵀ ΔW‖_F / ‖ΔW‖_F ("output") of ΔW = B A, from r×r Gram
    matrices in float64 (bem.modules.trust_region.lowrank_frobenius_norm), so ratios down to
    ~1e-15 are resolved. A zero delta has ratio 0. Returns () or (E,) float64, without gradients.
    """
    A, B = _checks.lora_factors(A, B)
    side = _side(side)
    U = _basis_for(A, B, U, side)
    with torch.no_grad():
        f64 = torch.float64
        total = lowrank_frobenius_norm(A, B, accumulate_dtype=f64)
        if side == "input":
            along = lowrank_frobenius_norm(A @ U, B, accumulate_dtype=f64)
        else:
            along = lowrank_frobenius_norm(A, U.mT @ B, accumulate_dtype=f64)
        return torch.where(total > 0, along / torch.where(total > 0, total, 1.0), 0.0)


@dataclass(frozen=True)
class BasisFit:
    """An orthonormal basis U (d, s) and the cumulative share of the rows' energy (‖·‖_F²) that
    its first 1..s directions explain, (s,) float64 (use it to choose s)."""

    U: torch.Tensor
    explained: torch.Tensor


def principal_basis(rows: torch.Tensor, rank: int) -> BasisFit:
    """The top-``rank`` right singular vectors of ``rows`` (n, d): the directions along which the
    rows vary most. Feed it the differences of a layer's inputs between requests the base must
    refuse and close requests it must answer (paired row by row), or the rows of gradients of the
    refusal loss w.r.t. the layer's weight (see :meth:`SafetyBasis.from_gradients`).

    Computed in float64; signs fixed so that each vector's largest-magnitude entry is positive
    (the same rows give the same basis). Returns U in float64.
    """
    rows = _checks.tensor(rows, "rows", (2,)).to(torch.float64)
    rank = positive_int("principal_basis", "rank", rank)
    if rank > min(rows.shape):
        raise ValueError(f"rank: expected <= min(n, d) = {min(rows.shape)} for rows of shape "
                         f"{tuple(rows.shape)}, got {rank}")
    _, S, Vh = torch.linalg.svd(rows, full_matrices=False)
    energy = S.square()
    if float(energy.sum()) == 0:
        raise ValueError("rows: expected rows that are not all zero (no direction to protect)")
    if float(S[rank - 1]) <= float(S[0]) * 1e-12:
        raise ValueError(f"rank: the rows span fewer than {rank} directions (singular values "
                         f"{S[:rank].tolist()})")
    U = Vh[:rank].mT.contiguous()
    peak = U.abs().argmax(dim=0)
    U = U * torch.sign(U[peak, torch.arange(rank)])
    return BasisFit(U, (energy.cumsum(0) / energy.sum())[:rank])


def layer_activations(model: nn.Module, layers: Sequence[str], *inputs,
                      side: str = "input", position: int | None = None,
                      **kwargs) -> dict[str, torch.Tensor]:
    """Runs ``model(*inputs, **kwargs)`` under no_grad and returns, for each named module in
    ``layers``, its input ("input" side) or output ("output" side) activations as (N, d) float:
    every token (N = tokens of the batch) or, with ``position``, that position of each sequence
    (e.g. -1, the last prompt token; activations must then be (batch, T, d))."""
    side = _side(side)
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: expected a non-empty list of module names, got {layers!r}")
    named = dict(model.named_modules())
    missing = [n for n in layers if n not in named]
    if missing:
        raise ValueError(f"layers: no modules named {missing} in {type(model).__name__}")
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            act = args[0] if side == "input" else output
            if position is not None:
                if act.dim() != 3:
                    raise ValueError(f"position: needs (batch, T, d) activations at {name}, got "
                                     f"shape {tuple(act.shape)}")
                act = act[:, position]
            captured[name] = act.detach().reshape(-1, act.shape[-1])
        return hook

    handles = [named[n].register_forward_hook(hook_for(n)) for n in layers]
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return captured


class SafetyBasis:
    """Per adapted layer, an orthonormal basis U (d, s) of directions adapters must not touch.

    Args:
        bases: layer name → U (d, s), orthonormal columns (checked: |UᵀU − I| <= tol, finite,
            s <= d). Stored detached; cast to the factors' dtype and device when used.
        side: "input" (keep ΔW U = 0 by projecting A; U spans input directions, d = d_in) or
            "output" (keep Uᵀ ΔW = 0 by projecting B; d = d_out).
        tol: orthonormality tolerance (> 0).

    ``explained`` holds, for bases built by :meth:`from_activation_differences` or
    :meth:`from_gradients`, the cumulative energy share of each layer's directions.
    """

    def __init__(self, bases: Mapping[str, torch.Tensor], side: str = "input", *,
                 tol: float = 1e-5) -> None:
        if not isinstance(bases, Mapping) or not bases:
            raise ValueError(f"bases: expected a non-empty mapping of layer name → U, got "
                             f"{type(bases).__name__}")
        self.side = _side(side)
        self._bases: dict[str, torch.Tensor] = {}
        for name, U in bases.items():
            if not isinstance(name, str):
                raise TypeError(f"bases: expected str layer names, got {type(name).__name__}")
            self._bases[name] = _checks.orthonormal(U, f"bases[{name!r}]", tol).detach().clone()
        self.explained: dict[str, torch.Tensor] = {}

    @classmethod
    def from_activation_differences(cls, refused: Mapping[str, torch.Tensor],
                                    answered: Mapping[str, torch.Tensor], rank: int,
                                    side: str = "input") -> SafetyBasis:
        """Bases from paired activations (see :func:`layer_activations`): for each layer, the
        top-``rank`` directions of refused[i] − answered[i], where row i of both comes from a
        request the base refuses and a close one it answers."""
        if not isinstance(refused, Mapping) or not isinstance(answered, Mapping) or \
                set(refused) != set(answered) or not refused:
            raise ValueError("answered: expected the same non-empty set of layers as refused")
        fits = {}
        for name in refused:
            r = _checks.tensor(refused[name], f"refused[{name!r}]", (2,))
            a = _checks.tensor(answered[name], f"answered[{name!r}]", (2,))
            if r.shape != a.shape:
                raise ValueError(f"answered[{name!r}]: expected shape {tuple(r.shape)} (paired "
                                 f"with refused), got {tuple(a.shape)}")
            fits[name] = principal_basis(r.to(torch.float64) - a.to(torch.float64), rank)
        return cls._from_fits(fits, side)

    @classmethod
    def from_gradients(cls, gradients: Mapping[str, torch.Tensor], rank: int,
                       side: str = "input") -> SafetyBasis:
        """Bases from gradients of the refusal loss w.r.t. each layer's weight, (n, d_out, d_in)
        (one per safety prompt) or (d_out, d_in): the top-``rank`` input directions (right
        singular vectors) for "input", output directions (left) for "output"."""
        side = _side(side)
        if not isinstance(gradients, Mapping) or not gradients:
            raise ValueError("gradients: expected a non-empty mapping of layer name → gradients")
        fits = {}
        for name, g in gradients.items():
            g = _checks.tensor(g, f"gradients[{name!r}]", (2, 3))
            g = g if g.dim() == 3 else g[None]
            rows = g if side == "input" else g.mT
            fits[name] = principal_basis(rows.reshape(-1, rows.shape[-1]), rank)
        return cls._from_fits(fits, side)

    @classmethod
    def _from_fits(cls, fits: Mapping[str, BasisFit], side: str) -> SafetyBasis:
        basis = cls({n: f.U for n, f in fits.items()}, side)
        basis.explained = {n: f.explained for n, f in fits.items()}
        return basis

    @property
    def layers(self) -> list[str]:
        return list(self._bases)

    def __contains__(self, layer: object) -> bool:
        return layer in self._bases

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer not in self._bases:
            raise KeyError(f"layer: no safety basis for {layer!r}; layers: {self.layers}")
        return self._bases[layer]

    def rank(self, layer: str) -> int:
        return self[layer].shape[1]

    def project(self, layer: str, A: torch.Tensor, B: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`project_factors` with this layer's basis (differentiable, out of place)."""
        return project_factors(A, B, self[layer], self.side)

    def project_(self, layer: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Projects the factors in place under no_grad (A on the input side, B on the output
        side): what the training loop does after each optimizer step."""
        A_new, B_new = self.project(layer, A.detach(), B.detach())
        with torch.no_grad():
            (A if self.side == "input" else B).copy_(A_new if self.side == "input" else B_new)

    def orthogonality(self, layer: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """:func:`orthogonality_ratio` with this layer's basis: () or (E,) float64."""
        return orthogonality_ratio(A, B, self[layer], self.side)

    def state_dict(self) -> dict:
        return {"side": self.side, "bases": {n: U.clone() for n, U in self._bases.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> SafetyBasis:
        if not isinstance(state, Mapping) or "bases" not in state or "side" not in state:
            raise ValueError("state: expected a mapping with 'side' and 'bases'")
        return cls(state["bases"], state["side"])
