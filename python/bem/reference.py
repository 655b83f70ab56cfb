"""Readable pure-torch twins of bem's kernels: the test oracle, and the fallback where no compiled
kernel exists for a device. Same arguments and semantics as :mod:`bem.ops`, without validation.

Low-precision inputs are computed in float32 and rounded once at the end, like the kernels.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lora_gather(x, A, B, expert_index, rank_index, rank_gate):
    """Per-token views of the selected rank components: (a_rows (T,k,d_in), b_cols (T,k,d_out) or
    None, gate (T,k), routed (T,) bool), in the compute dtype."""
    ct = _compute_dtype(x.dtype)
    A3 = (A if A.dim() == 3 else A.unsqueeze(0)).to(ct)
    T, r = x.shape[0], A3.shape[1]
    dev = x.device
    ei = (expert_index.long() if expert_index is not None
          else torch.zeros(T, dtype=torch.long, device=dev))
    ri = (rank_index.long() if rank_index is not None
          else torch.arange(r, device=dev).expand(T, r))
    gate = (rank_gate.to(ct) if rank_gate is not None
            else torch.ones(ri.shape, dtype=ct, device=dev))
    e = ei.clamp(min=0)
    a_rows = A3[e[:, None], ri]
    b_cols = None
    if B is not None:
        B3 = (B if B.dim() == 3 else B.unsqueeze(0)).to(ct)
        b_cols = B3[e[:, None], :, ri]
    return a_rows, b_cols, gate, ei >= 0, e, ri


def lora_shrink(x: torch.Tensor, A: torch.Tensor, *, expert_index: torch.Tensor | None = None,
                rank_index: torch.Tensor | None = None) -> torch.Tensor:
    """h[t, j] = A[e_t][i_tj, :] · x[t] (0 where e_t = −1): (T, k) in float32 (float64 for float64)."""
    a_rows, _, _, routed, _, _ = _lora_gather(x, A, None, expert_index, rank_index, None)
    h = torch.einsum("tki,ti->tk", a_rows, x.to(a_rows.dtype))
    return torch.where(routed[:, None], h, torch.zeros_like(h))


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0,
               expert_index: torch.Tensor | None = None, rank_index: torch.Tensor | None = None,
               rank_gate: torch.Tensor | None = None) -> torch.Tensor:
    """delta[t] = scale · Σ_j gate[t,j] · B[e_t][:, i_tj] · (A[e_t][i_tj, :] · x[t]).

    x: (T, d_in); A: (E, r, d_in) or (r, d_in); B: (E, d_out, r) or (d_out, r);
    expert_index: (T,) int, −1 = no adapter; rank_index: (T, k) int; rank_gate: (T, k) float.
    Returns (T, d_out) in x's dtype.
    """
    a_rows, b_cols, gate, routed, _, _ = _lora_gather(x, A, B, expert_index, rank_index, rank_gate)
    h = torch.einsum("tki,ti->tk", a_rows, x.to(a_rows.dtype))           # shrink
    delta = scale * torch.einsum("tk,tko->to", gate * h, b_cols)          # expand
    delta = torch.where(routed[:, None], delta, torch.zeros_like(delta))
    return delta.to(x.dtype)


def lora_delta_backward(grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *,
                        scale: float = 1.0, expert_index: torch.Tensor | None = None,
                        rank_index: torch.Tensor | None = None,
                        rank_gate: torch.Tensor | None = None):
    """The explicit gradients of :func:`lora_delta` (the formulas the kernels implement), for
    3-D A (E, r, d_in) and B (E, d_out, r). Returns (grad_x, grad_A, grad_B, grad_gate)."""
    a_rows, b_cols, gate, routed, e, ri = _lora_gather(x, A, B, expert_index, rank_index, rank_gate)
    ct = a_rows.dtype
    xc = x.to(ct)
    gy = grad_y.to(ct) * routed[:, None].to(ct)
    h = torch.einsum("tki,ti->tk", a_rows, xc)
    u = torch.einsum("tko,to->tk", b_cols, gy)            # Bᵀ·dy per selected component
    grad_gate = scale * h * u
    grad_h = scale * gate * u
    grad_x = torch.einsum("tk,tki->ti", grad_h, a_rows)
    E, r, d_in = A.shape
    d_out = B.shape[1]
    idx = (e[:, None].expand_as(ri), ri)
    grad_A = torch.zeros((E, r, d_in), dtype=ct, device=x.device).index_put_(
        idx, grad_h[..., None] * xc[:, None, :], accumulate=True)
    grad_Bt = torch.zeros((E, r, d_out), dtype=ct, device=x.device).index_put_(
        idx, (scale * gate * h)[..., None] * gy[:, None, :], accumulate=True)
    return grad_x.to(x.dtype), grad_A.to(A.dtype), grad_Bt.transpose(1, 2).to(B.dtype), grad_gate


def kron_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *,
               scale: float = 1.0) -> torch.Tensor:
    """scale · (A ⊗ B) x[t] for every row, as scale · A X_t Bᵀ with X_t = x[t].view(i1, i2).

    x: (T, i1·i2); A: (o1, i1); B: (o2, i2). Returns (T, o1·o2) in x's dtype.
    """
    ct = _compute_dtype(x.dtype)
    (o1, i1), (o2, i2) = A.shape, B.shape
    X = x.to(ct).reshape(x.shape[0], i1, i2)
    Y = torch.matmul(torch.matmul(A.to(ct), X), B.to(ct).transpose(0, 1))
    return (scale * Y).reshape(x.shape[0], o1 * o2).to(x.dtype)


def kron_delta_backward(grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *,
                        scale: float = 1.0):
    """Explicit gradients of :func:`kron_delta` for x (T, i1·i2): with Y_t = s·A X_t Bᵀ,
    dX_t = s·Aᵀ dY_t B, dA = s·Σ_t dY_t B X_tᵀ, dB = s·Σ_t dY_tᵀ A X_t."""
    ct = _compute_dtype(x.dtype)
    (o1, i1), (o2, i2) = A.shape, B.shape
    T = x.shape[0]
    X = x.to(ct).reshape(T, i1, i2)
    dY = grad_y.to(ct).reshape(T, o1, o2)
    Ac, Bc = A.to(ct), B.to(ct)
    grad_x = scale * torch.matmul(torch.matmul(Ac.transpose(0, 1), dY), Bc)
    grad_A = scale * torch.einsum("tpq,qb,tab->pa", dY, Bc, X)
    grad_B = scale * torch.einsum("tpq,pa,tab->qb", dY, Ac, X)
    return grad_x.reshape(T, i1 * i2).to(x.dtype), grad_A.to(A.dtype), grad_B.to(B.dtype)


def kron_weight(A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """The materialised ΔW = scale · (A ⊗ B), shape (o1·o2, i1·i2)."""
    return scale * torch.kron(A, B)


def film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *,
         gamma_bounds: tuple[float, float] | None = (0.5, 2.0),
         beta_bound: float | None = 0.5) -> torch.Tensor:
    """clip(γ)·x + clip(β) with γ, β broadcast against x (…, d). Bounds of None mean no clipping."""
    ct = _compute_dtype(x.dtype)
    g, b = gamma.to(ct), beta.to(ct)
    if gamma_bounds is not None:
        g = g.clamp(gamma_bounds[0], gamma_bounds[1])
    if beta_bound is not None:
        b = b.clamp(-beta_bound, beta_bound)
    return (g * x.to(ct) + b).to(x.dtype)


def film_backward(grad_y: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *,
                  gamma_bounds: tuple[float, float] = (0.5, 2.0), beta_bound: float = 0.5):
    """Explicit gradients of :func:`film` for x (rows, d) and γ, β (groups, d), groups dividing
    rows: dx = clip(γ)·dy; dγ = Σ_group dy·x where lo ≤ γ ≤ hi; dβ = Σ_group dy where |β| ≤ b."""
    ct = _compute_dtype(x.dtype)
    rows, d = x.shape
    groups = gamma.shape[0]
    lo, hi = gamma_bounds
    g, b = gamma.to(ct), beta.to(ct)
    dy = grad_y.to(ct).reshape(groups, rows // groups, d)
    xc = x.to(ct).reshape(groups, rows // groups, d)
    grad_x = (g.clamp(lo, hi)[:, None, :] * dy).reshape(rows, d)
    grad_g = (dy * xc).sum(1) * ((g >= lo) & (g <= hi)).to(ct)
    grad_b = dy.sum(1) * ((b >= -beta_bound) & (b <= beta_bound)).to(ct)
    return grad_x.to(x.dtype), grad_g.to(gamma.dtype), grad_b.to(beta.dtype)
