"""Static LoRA around a linear layer — bem's baseline — on bem.ops.lora_delta, with optional
experts routed per 64-token chunk."""
from __future__ import annotations

import math

import torch
from torch import nn

from bem.modules import base
from bem.modules.control import current_control, optional_control


class LoRA(base.LinearAdapter):
    """``y = base(x) + (alpha / r) · B_e A_e x`` with e the expert of the token's chunk.

    Args:
        base_layer: nn.Linear (or GPT-2 Conv1D) with weight (d_out, d_in) (Conv1D: (d_in, d_out)).
        rank: r ≥ 1. alpha: scale numerator (scale = alpha / r, PEFT's convention).
        num_experts: E ≥ 1; with E > 1 each chunk's expert comes from the active ChunkControl
            (with E = 1 too when the controls carry experts: −1 turns the adapter off).

    Parameters: A (E, r, d_in) (Kaiming-uniform, as PEFT), B (E, d_out, r) (zeros: identity at
    init). x: (B, T, d_in) (any (..., d_in) when E = 1) → (..., d_out).
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0,
                 num_experts: int = 1):
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

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctrl = current_control("LoRA", x) if self.needs_control else optional_control()
        experts = ctrl.token_experts() if ctrl is not None and x.dim() == 3 and \
            tuple(x.shape[:2]) == tuple(ctrl.token_chunk.shape) else None
        if self.needs_control and experts is None:
            raise RuntimeError(f"LoRA: {self.num_experts} experts but the controls chose none")
        return base.lora_delta(x2, self.lora_A, self.lora_B, scale=self.scale, expert_index=experts)

    def delta_weight(self) -> torch.Tensor:
        if self.num_experts != 1:
            raise TypeError(f"LoRA: cannot merge {self.num_experts} routed experts into one weight")
        return self.scale * (self.lora_B[0] @ self.lora_A[0])

    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        return 2 * num_tokens * self.rank * (self.d_in + self.d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha}, "
                f"num_experts={self.num_experts}")
