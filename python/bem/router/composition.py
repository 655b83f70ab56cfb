"""Turns AR1 router actions into the per-chunk controls bem modules read (expert, rank budget,
bias scale), and gathers the trust-region projection statistics of a model's modules."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bem.modules.control import ChunkControl
from bem.modules.trust_region import ProjectionStats
from bem.router.policy import ActionSpace

__all__ = ["CompositionEngine"]


class CompositionEngine:
    """Maps (B, C, 3) actions of ``action_space`` to ChunkControl fields.

    Args:
        action_space: the router's choices (its num_experts must be the routed modules' E).
        tau: the trust-region radius τ > 0 of the routed deltas (‖ΔW‖_F ≤ τ), kept here for the
            modules that are built or configured from this engine.
    """

    def __init__(self, action_space: ActionSpace, tau: float = 1.0):
        if not isinstance(action_space, ActionSpace):
            raise TypeError(f"CompositionEngine: action_space: expected ActionSpace, got "
                            f"{type(action_space).__name__}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"CompositionEngine: tau: expected a positive number, got {tau!r}")
        self.action_space = action_space
        self.tau = float(tau)

    def fields(self, actions: torch.Tensor, *, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """actions (B, C, 3) int64 → (experts (B, C) int64 with −1 = no adapter, rank_budget
        (B, C) int64 (the budget k itself), delta_scale (B, C) ``dtype`` (the bias scale)), on
        the actions' device. No-adapter chunks carry the first budget and scale (unused there)."""
        space = self.action_space
        space.validate(actions)
        if actions.dim() != 3:
            raise ValueError(f"actions: expected shape (B, C, 3), got {tuple(actions.shape)}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        actions = space.canonical(actions)
        budgets = torch.tensor(space.rank_budgets, dtype=torch.int64, device=actions.device)
        scales = torch.tensor(space.bias_scales, dtype=dtype, device=actions.device)
        return actions[..., 0] - 1, budgets[actions[..., 1]], scales[actions[..., 2]]

    def apply(self, control: ChunkControl, actions: torch.Tensor) -> ChunkControl:
        """A copy of ``control`` with experts, rank_budget and delta_scale set from ``actions``
        (B, C, 3) int64, where (B, C) = control.features.shape[:2]; delta_scale takes the
        features' dtype and every field their device."""
        if not isinstance(control, ChunkControl):
            raise TypeError(f"control: expected ChunkControl, got {type(control).__name__}")
        want = tuple(control.features.shape[:2])
        if not isinstance(actions, torch.Tensor) or tuple(actions.shape) != want + (3,):
            raise ValueError(f"actions: expected shape {want + (3,)} (the controls' chunks), got "
                             f"{tuple(getattr(actions, 'shape', ()))}")
        dtype = control.features.dtype if control.features.is_floating_point() else torch.float32
        experts, budget, scale = self.fields(actions.to(control.features.device), dtype=dtype)
        return dataclasses.replace(control, experts=experts, rank_budget=budget, delta_scale=scale)

    def projection_stats(self, model: nn.Module) -> ProjectionStats:
        """Merged ProjectionStats of every submodule of ``model`` (itself included) that has a
        ``projection_stats`` attribute (a ProjectionStats, or a method returning one), with layer
        names prefixed by the module's path."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected nn.Module, got {type(model).__name__}")
        found = {}
        for name, module in model.named_modules():
            stats = getattr(module, "projection_stats", None)
            if stats is None:
                continue
            if callable(stats) and not isinstance(stats, ProjectionStats):
                stats = stats()
            if not isinstance(stats, ProjectionStats):
                raise TypeError(f"model: {name or type(module).__name__}.projection_stats: "
                                f"expected ProjectionStats, got {type(stats).__name__}")
            found[name] = stats
        return ProjectionStats.merged(found)
