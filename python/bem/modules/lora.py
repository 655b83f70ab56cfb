"""Static LoRA around a linear layer — bem's baseline — on bem.ops.lora_delta, with optional
experts routed per 64-token chunk."""
from __future__ import annotations

import math

import torch
from torch import nn

from bem.modules import base
from bem.modules.control import ChunkControl, current_control, optional_control
from bem.modules.trust_region import ProjectionStats, lowrank_frobenius_norm, projection_factor


class LoRA(base.LinearAdapter):
    """``y = base(x) + (alpha / r) · B_e A_e x`` with e the expert of the token's chunk.

    Args:
        base_layer: nn.Linear (or GPT-2 Conv1D) with weight (d_out, d_in) (Conv1D: (d_in, d_out)).
        rank: r ≥ 1. alpha: scale numerator (scale = alpha / r, PEFT's convention).
        num_experts: E ≥ 1; with E > 1 each chunk's expert comes from the active ChunkControl
            (with E = 1 too when the controls carry experts: −1 turns the adapter off).
        trust_region: τ or None. With τ, each (expert, rank budget, bias scale) delta is projected
            into the Frobenius ball ‖ΔW‖_F ≤ τ without materialising ΔW (bem.modules.trust_region):
            its factor min(1, τ/‖ΔW‖_F) multiplies the kernel's rank gates. The controls'
            rank_budget (k of r: the k components of largest ‖B_j‖·‖A_j‖, chosen per expert) and
            delta_scale (AR1's bias scale) apply per chunk; `projection_stats` tallies the
            factors of evaluation forwards.

    Parameters: A (E, r, d_in) (Kaiming-uniform, as PEFT), B (E, d_out, r) (zeros: identity at
    init). x: (B, T, d_in) (any (..., d_in) when E = 1) → (..., d_out).
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0,
                 num_experts: int = 1, trust_region: float | None = None):
        super().__init__(base_layer)
        self.rank = base.positive_int("LoRA", "rank", rank)
        self.alpha = base.positive_float("LoRA", "alpha", alpha)
        self.num_experts = base.positive_int("LoRA", "num_experts", num_experts)
        self.needs_control = num_experts > 1
        self.mergeable = num_experts == 1
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.d_in, **self._factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.d_out, rank, **self._factory))
        for e in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        self.trust_region = (None if trust_region is None else
                             base.positive_float("LoRA", "trust_region", trust_region))
        self.projection_stats = ProjectionStats()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctrl = current_control("LoRA", x) if self.needs_control else optional_control()
        experts = ctrl.token_experts() if ctrl is not None and x.dim() == 3 and \
            tuple(x.shape[:2]) == tuple(ctrl.token_chunk.shape) else None
        if self.needs_control and experts is None:
            raise RuntimeError(f"LoRA: {self.num_experts} experts but the controls chose none")
        if self.trust_region is None and (ctrl is None or experts is None or (
                ctrl.rank_budget is None and ctrl.delta_scale is None)):
            return base.lora_delta(x2, self.lora_A, self.lora_B, scale=self.scale,
                                   expert_index=experts)
        if ctrl is None:
            index, gate = self._composed_gates(ctrl, experts, x2.shape[0])
        else:
            index, gate = ctrl.cached(self, "gates",
                                      lambda: self._composed_gates(ctrl, experts, x2.shape[0]))
        return base.lora_delta(x2, self.lora_A, self.lora_B, scale=self.scale,
                               expert_index=experts, rank_index=index, rank_gate=gate.to(x2.dtype))

    def _composed_gates(self, ctrl: ChunkControl | None, experts: torch.Tensor | None, n: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rank_index (n, r) and rank_gate (n, r) composing AR1's action with the trust
        region: components in order of importance, gate = bias scale · projection factor on the
        first k (the chunk's rank budget), 0 on the rest."""
        E, r = self.num_experts, self.rank
        A, B = self.lora_A, self.lora_B
        dev = A.device
        with torch.no_grad():
            importance = B.norm(dim=1) * A.norm(dim=2)                       # (E, r)
            order = importance.argsort(dim=1, descending=True)               # (E, r)
        if experts is not None and int(experts.max()) >= E:
            raise IndexError(f"LoRA: experts: expert id {int(experts.max())} out of range for "
                             f"{E} experts")
        e_tok = (experts if experts is not None else torch.zeros(n, dtype=torch.int64,
                                                                 device=dev)).clamp(min=0)
        per_token = ((lambda t: ctrl.per_token(t).reshape(-1)) if ctrl is not None and
                     ctrl.experts is not None else None)
        k_tok = (per_token(ctrl.rank_budget).clamp(1, r) if per_token is not None and
                 ctrl.rank_budget is not None else torch.full((n,), r, device=dev))
        s_tok = (per_token(ctrl.delta_scale).to(A.dtype) if per_token is not None and
                 ctrl.delta_scale is not None else torch.ones(n, dtype=A.dtype, device=dev))
        if self.trust_region is not None:
            # ‖s·ΔW_{e,k}‖ = s·‖ΔW_{e,k}‖: one norm per (expert, k), scaled per token.
            norms = torch.stack([lowrank_frobenius_norm(A, B, self.scale, order[:, :k])
                                 for k in range(1, r + 1)], dim=1).to(A.dtype)  # (E, r)
            factor = projection_factor(norms[e_tok, k_tok - 1] * s_tok, self.trust_region)
            if not self.training:
                routed = experts >= 0 if experts is not None else slice(None)
                self.projection_stats.record(factor.detach()[routed])
        else:
            factor = torch.ones_like(s_tok)
        keep = torch.arange(r, device=dev)[None, :] < k_tok[:, None]       # (n, r)
        gate = (s_tok * factor)[:, None] * keep
        return order[e_tok], gate

    def delta_weight(self) -> torch.Tensor:
        if self.num_experts != 1:
            raise TypeError(f"LoRA: cannot merge {self.num_experts} routed experts into one weight")
        dw = self.scale * (self.lora_B[0] @ self.lora_A[0])
        if self.trust_region is not None:        # the forward's projection, folded in
            dw = dw * projection_factor(torch.linalg.matrix_norm(dw), self.trust_region)
        return dw

    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        return 2 * num_tokens * self.rank * (self.d_in + self.d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha}, "
                f"num_experts={self.num_experts}, trust_region={self.trust_region}")
