"""V4 residual FiLM: modulates a sublayer's contribution to the residual stream per chunk,
γ ⊙ f(x) + β with smoothly bounded γ, β from the chunk's control feature; identity at init."""
from __future__ import annotations

import torch
from torch import nn

from bem.modules import base
from bem.modules.control import current_control


def output_features(module: nn.Module) -> int:
    """Width of a sublayer's output: its own out_features/nf, else its last linear-like child's."""
    try:
        return base.linear_shape(module)[1]
    except TypeError:
        pass
    last = None
    for child in module.modules():
        try:
            last = base.linear_shape(child)[1]
        except TypeError:
            continue
    if last is None:
        raise TypeError(f"ResidualFiLM: cannot infer the output width of {type(module).__name__}; "
                        "pass dim=")
    return last


class ResidualFiLM(nn.Module):
    """``y = γ ⊙ sublayer(x) + β`` with ``γ = 1 + gamma_bound·tanh(u)``, ``β = beta_bound·tanh(v)``
    and (u, v) = MLP(f_c) from chunk c's control feature. The MLP's last layer starts at zero, so
    the module is the identity at init; tanh bounds γ ∈ (1 − gamma_bound, 1 + gamma_bound) and
    |β| < beta_bound without the zero gradients of a clamp. Applied with bem.ops.film.

    Args:
        sublayer: the wrapped module (e.g. a decoder layer's MLP), output (B, T, dim).
        d_ctrl: control feature width. dim: output width (inferred from the sublayer's last linear).
        d_hidden: controller MLP width (default dim // 4, at least 1).
        gamma_bound in (0, 1), beta_bound > 0.
    """

    needs_control = True
    mergeable = False

    def __init__(self, sublayer: nn.Module, d_ctrl: int, dim: int | None = None,
                 d_hidden: int | None = None, gamma_bound: float = 0.5, beta_bound: float = 0.5):
        super().__init__()
        self.base_layer = sublayer
        self.dim = output_features(sublayer) if dim is None else base.positive_int(
            "ResidualFiLM", "dim", dim)
        self.d_ctrl = base.positive_int("ResidualFiLM", "d_ctrl", d_ctrl)
        self.d_hidden = base.positive_int("ResidualFiLM", "d_hidden",
                                          max(1, self.dim // 4) if d_hidden is None else d_hidden)
        self.gamma_bound = base.positive_float("ResidualFiLM", "gamma_bound", gamma_bound)
        if self.gamma_bound >= 1:
            raise ValueError(f"ResidualFiLM: gamma_bound: expected < 1 (γ stays positive), got "
                             f"{gamma_bound}")
        self.beta_bound = base.positive_float("ResidualFiLM", "beta_bound", beta_bound)
        p = next(sublayer.parameters(), None)
        f = dict(dtype=p.dtype, device=p.device) if p is not None else {}
        self.hidden = nn.Linear(self.d_ctrl, self.d_hidden, **f)
        self.out = nn.Linear(self.d_hidden, 2 * self.dim, **f)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def modulation(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, C, d_ctrl) → (γ, β), each (B, C, dim)."""
        u, v = self.out(torch.relu(self.hidden(features))).chunk(2, dim=-1)
        return 1.0 + self.gamma_bound * torch.tanh(u), self.beta_bound * torch.tanh(v)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: (B, T, ·) → (B, T, dim); extra arguments go to the sublayer."""
        h = self.base_layer(x, *args, **kwargs)
        if not isinstance(h, torch.Tensor) or h.shape[-1] != self.dim:
            raise ValueError(f"ResidualFiLM: expected the sublayer to return a (B, T, {self.dim}) "
                             f"tensor, got {type(h).__name__} {tuple(getattr(h, 'shape', ()))}")
        ctrl = current_control("ResidualFiLM", h)

        def modulation():
            gamma, beta = self.modulation(ctrl.features.to(h.dtype))
            return (ctrl.per_token(ctrl.keep_base(gamma, 1.0)),
                    ctrl.per_token(ctrl.keep_base(beta, 0.0)))

        return base.film(h, *ctrl.cached(self, "film", modulation))

    def adapter_flops(self, num_tokens: int, num_chunks: int) -> int:
        return 2 * num_chunks * (self.d_ctrl * self.d_hidden + self.d_hidden * 2 * self.dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, d_hidden={self.d_hidden}, gamma_bound={self.gamma_bound}, "
                f"beta_bound={self.beta_bound}")
