"""PT1 head-group attention gating: scales each group of attention heads' output per chunk, before
the attention output projection, with gates bounded smoothly around 1 (identity at init)."""
from __future__ import annotations

import torch
from torch import nn

from bem.modules import base
from bem.modules.control import current_control


class HeadGating(base.LinearAdapter):
    """``y = o_proj(x ⊙ g)`` where x (B, T, H·d_head) holds the concatenated head outputs and
    g repeats, per feature, the gate of the feature's head group:
    ``g[c, j] = 1 + bound · tanh(z[c, j] / τ_j)``, ``z = W f_c + b`` from chunk c's control
    feature f_c (W, b zero-initialised: the identity at init). τ (B, G) comes from V2's gate
    shaping (ChunkControl.head_temperature) and is 1 without it; with
    ChunkControl.temperature_from_chunk (B,) row b uses τ only in chunks c ≥ its value and 1 before
    (so the chunks before a request's query stay cache-shareable). Gating uses bem.ops.film.

    Args:
        base_layer: the attention output projection (nn.Linear / Conv1D), d_in = H·d_head.
        num_heads: H. num_groups: G dividing H (default H: one gate per head).
        d_ctrl: width of the control features. bound: max |g − 1| (0 < bound < 1).
    """

    needs_control = True

    def __init__(self, base_layer: nn.Module, num_heads: int, d_ctrl: int,
                 num_groups: int | None = None, bound: float = 0.5):
        super().__init__(base_layer)
        self.num_heads = base.positive_int("HeadGating", "num_heads", num_heads)
        self.num_groups = base.positive_int("HeadGating", "num_groups",
                                            num_heads if num_groups is None else num_groups)
        if num_heads % self.num_groups or self.d_in % num_heads:
            raise ValueError(f"HeadGating: expected num_groups={self.num_groups} to divide "
                             f"num_heads={num_heads} and num_heads to divide d_in={self.d_in}")
        self.d_ctrl = base.positive_int("HeadGating", "d_ctrl", d_ctrl)
        self.bound = base.positive_float("HeadGating", "bound", bound)
        if self.bound >= 1:
            raise ValueError(f"HeadGating: bound: expected < 1 (gates stay positive), got {bound}")
        self.gate_proj = nn.Linear(d_ctrl, self.num_groups, **self._factory)
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.zeros_(self.gate_proj.bias)

    def gates(self, features: torch.Tensor, temperature: torch.Tensor | None,
              from_chunk: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, C, d_ctrl), temperature (B, G) or None, from_chunk (B,) int or None →
        gates (B, C, G). Chunk c of row b divides its logits by temperature[b] when
        c ≥ from_chunk[b] (every chunk when from_chunk is None), and is unshaped before."""
        z = self.gate_proj(features)
        if temperature is not None:
            B, C = z.shape[:2]
            if tuple(temperature.shape) != (B, self.num_groups):
                raise ValueError(f"HeadGating: head_temperature: expected shape "
                                 f"({B}, {self.num_groups}), got {tuple(temperature.shape)}")
            t = temperature.to(z.dtype)[:, None, :]                          # (B, 1, G)
            if from_chunk is not None:
                dt = from_chunk.dtype
                if tuple(from_chunk.shape) != (B,) or dt.is_floating_point or dt.is_complex or \
                        dt == torch.bool:
                    raise ValueError(f"HeadGating: temperature_from_chunk: expected a ({B},) int "
                                     f"tensor, got {from_chunk.dtype} {tuple(from_chunk.shape)}")
                shaped = torch.arange(C, device=z.device) >= from_chunk.to(z.device)[:, None]
                t = torch.where(shaped[..., None], t, torch.ones_like(t))    # (B, C, G)
            z = z / t
        return 1.0 + self.bound * torch.tanh(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H·d_head) → (B, T, d_out)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"HeadGating: x: expected last dimension {self.d_in}, got shape "
                             f"{tuple(x.shape)}")
        ctrl = current_control("HeadGating", x)
        gamma = ctrl.cached(self, "gamma", lambda: ctrl.per_token(ctrl.keep_base(
            self.gates(ctrl.features.to(x.dtype), ctrl.head_temperature,
                       ctrl.temperature_from_chunk), 1.0)).repeat_interleave(
            self.d_in // self.num_groups, dim=-1))
        return self.base_layer(base.film(x, gamma, x.new_zeros(self.d_in)))

    def delta(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The change of the output: o_proj(x ⊙ g) − o_proj(x), (N, d_out)."""
        return (self.forward(x) - self.base_layer(x)).reshape(-1, self.d_out)

    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        return 2 * num_chunks * self.d_ctrl * self.num_groups

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, num_heads={self.num_heads}, num_groups={self.num_groups}, "
                f"bound={self.bound}")
