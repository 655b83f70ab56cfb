"""The proximal term ½·μ·‖θ − θ_anchor‖² that keeps online updates near the last promoted adapter
(FedProx-style), so one bad batch cannot carry the adapter far."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from bem.online._checks import nonneg_float, same_layout


class ProximalAnchor:
    """mu: μ ≥ 0. :meth:`set_anchor` copies the parameters to anchor to (the last promoted
    adapter); :meth:`penalty` is 0 until then."""

    def __init__(self, mu: float):
        self.mu = nonneg_float(mu, "mu")
        self.anchor: dict[str, torch.Tensor] | None = None

    def set_anchor(self, params: Mapping[str, torch.Tensor]) -> None:
        if self.anchor is not None:
            same_layout(params, self.anchor, "params", "the anchor")
        self.anchor = {k: p.detach().clone() for k, p in params.items()}

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """½·μ·Σ ‖θ − θ_anchor‖², a differentiable scalar."""
        if self.anchor is None or self.mu == 0:
            return next(iter(params.values())).new_zeros(())
        same_layout(params, self.anchor, "params", "the anchor")
        total = sum((p - self.anchor[k]).square().sum() for k, p in params.items())
        return 0.5 * self.mu * total
