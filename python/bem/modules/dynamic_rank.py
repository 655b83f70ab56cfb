"""V1's dynamic-rank LoRA: a small predictor picks k of r rank components per chunk (or per token)
and only those k are computed (bem.ops.lora_delta with rank_index); trained straight-through."""
from __future__ import annotations

import math

import torch
from torch import nn

from bem.modules import base
from bem.modules.control import current_control

MODES = ("chunk", "token")


class DynamicRankLoRA(base.LinearAdapter):
    """``y = base(x) + (alpha / r) · Σ_{j ∈ top-k(s)} g_j · B_e[:, j] A_e[j, :] x``.

    The scores s (r,) come from a linear predictor over the chunk's control feature (mode "chunk",
    the default: one mask per 64-token chunk, computed from earlier chunks' tokens) or over the
    token's own input x (mode "token"). The forward uses exactly the k top-scoring components with
    gate g_j = 1 — work is fixed by k. Straight-through: g_j = 1 + p_j − stop_grad(p_j) with
    p = k·softmax(s), so the loss gradient on the gates reaches the predictor (the unselected
    components through the softmax normaliser). Under AR1's controls (bem.router), a chunk's
    rank budget b keeps the first min(b, k) of its top-k components (in score order) and its
    bias scale multiplies the gates.

    Args:
        base_layer: nn.Linear / Conv1D, weight (d_out, d_in).
        rank: r. active: k in [1, r]. alpha: scale = alpha / r (as static LoRA of rank r).
        d_ctrl: width of the control features (mode "chunk"; the model width).
        mode: "chunk" or "token". num_experts: E; E > 1 routes per chunk (ChunkControl.experts).

    Parameters: lora_A (E, r, d_in), lora_B (E, d_out, r) (zeros), predictor (r × d_ctrl or d_in).
    x: (B, T, d_in) → (B, T, d_out).
    """

    needs_control = True

    def __init__(self, base_layer: nn.Module, rank: int = 16, active: int = 8, alpha: float = 32.0,
                 d_ctrl: int | None = None, mode: str = "chunk", num_experts: int = 1):
        super().__init__(base_layer)
        self.rank = base.positive_int("DynamicRankLoRA", "rank", rank)
        self.active = base.positive_int("DynamicRankLoRA", "active", active)
        if active > rank:
            raise ValueError(f"DynamicRankLoRA: active: expected k <= rank={rank}, got {active}")
        self.alpha = base.positive_float("DynamicRankLoRA", "alpha", alpha)
        if mode not in MODES:
            raise ValueError(f"DynamicRankLoRA: mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        if mode == "chunk" and d_ctrl is None:
            raise ValueError("DynamicRankLoRA: d_ctrl: required in mode 'chunk' (the width of "
                             "the control features)")
        self.d_ctrl = base.positive_int("DynamicRankLoRA", "d_ctrl", d_ctrl) if mode == "chunk" \
            else self.d_in
        self.num_experts = base.positive_int("DynamicRankLoRA", "num_experts", num_experts)
        f = self._factory
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.d_in, **f))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.d_out, rank, **f))
        for e in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        self.predictor = nn.Linear(self.d_ctrl, rank, **f)
        nn.init.normal_(self.predictor.weight, std=1.0 / math.sqrt(self.d_ctrl))
        nn.init.zeros_(self.predictor.bias)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores (N, r) → (rank_index (N, k) int64, rank_gate (N, k)): gates are exactly 1 in
        the forward and carry the straight-through gradient."""
        idx = scores.detach().topk(self.active, dim=-1).indices
        soft = self.active * torch.softmax(scores, dim=-1).gather(-1, idx)
        return idx, (soft - soft.detach()) + 1.0

    def delta(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctrl = current_control("DynamicRankLoRA", x)
        experts = ctrl.token_experts()
        if self.num_experts > 1 and experts is None:
            raise RuntimeError(f"DynamicRankLoRA: {self.num_experts} experts but the controls "
                               "chose none")

        def ranks():
            if self.mode == "chunk":
                idx, gate = self.select(self.predictor(ctrl.features.to(x.dtype)))  # (B, C, k)
                idx, gate = ctrl.per_token(idx), ctrl.per_token(gate)
            else:
                idx, gate = self.select(self.predictor(x))
            if ctrl.rank_budget is not None:   # AR1: the chunk's first `budget` of the top-k
                budget = ctrl.per_token(ctrl.rank_budget).clamp(1, self.active)
                gate = gate * (torch.arange(self.active, device=x.device) < budget[..., None])
            if ctrl.delta_scale is not None:   # AR1: the chunk's bias scale
                gate = gate * ctrl.per_token(ctrl.delta_scale)[..., None].to(gate.dtype)
            return idx.reshape(-1, self.active), gate.reshape(-1, self.active)

        # Token mode reads x: its ranks change every token, so they are never kept.
        idx, gate = ctrl.cached(self, "ranks", ranks) if self.mode == "chunk" else ranks()
        return base.lora_delta(x2, self.lora_A, self.lora_B, scale=self.scale,
                               expert_index=experts, rank_index=idx, rank_gate=gate)

    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        rows = num_chunks if self.mode == "chunk" else num_tokens
        return (2 * num_tokens * self.active * (self.d_in + self.d_out)
                + 2 * rows * self.d_ctrl * self.rank)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, active={self.active}, "
                f"mode={self.mode!r}, num_experts={self.num_experts}")
