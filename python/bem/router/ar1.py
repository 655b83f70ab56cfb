"""The routers a model's ChunkController can use (ChunkController.set_macro_router): AR1, the
macro-policy with hysteresis, plan-length enforcement and the composition engine; and the
per-request router (the PEFT/vLLM way: one expert per request from a classifier on the prompt's
first chunk). Both are causal over chunks, so cached generation equals recomputation."""
from __future__ import annotations

import torch
from torch import nn

from bem.router.composition import CompositionEngine
from bem.router.policy import ActionSpace, MacroPolicy, PlanStats, QHead, ValueNetwork, plan


class AR1Router(nn.Module):
    """Greedy AR1 routing at inference: ``forward(features (B, C, d)) -> (experts (B, C) int64,
    rank_budget (B, C) int64, delta_scale (B, C))``.

    Holds the policy, the value network (TRPO's critic) and the action-value head (hysteresis);
    their parameters count in the system's budget. switch_cost, tau: the hysteresis margin;
    max_plan_length: distinct actions per sequence, enforced. ``last_stats`` keeps the PlanStats
    of the latest forward (telemetry)."""

    def __init__(self, action_space: ActionSpace, d_ctrl: int, *, switch_cost: float = 0.05,
                 tau: float = 0.05, max_plan_length: int = 3, trust_region: float = 1.0):
        super().__init__()
        self.action_space = action_space
        self.policy = MacroPolicy(action_space, d_ctrl)
        self.value = ValueNetwork(self.policy.state_dim)
        self.q = QHead(action_space, self.policy.state_dim)
        self.engine = CompositionEngine(action_space, tau=trust_region)
        self.switch_cost, self.tau, self.max_plan_length = switch_cost, tau, max_plan_length
        self.last_stats: PlanStats | None = None

    def plan(self, features: torch.Tensor, *, greedy: bool = True,
             generator: torch.Generator | None = None, hysteresis: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, PlanStats]:
        """bem.router.plan with this router's policy, Q-head and margins. hysteresis=False
        executes every proposal (plan length still enforced): used while training, so the
        Q-head also sees the returns of switching, which hysteresis would otherwise never let
        happen while Q is untrained."""
        return plan(self.policy, features.to(self.policy.net_dtype), greedy=greedy,
                    generator=generator, switch_cost=self.switch_cost if hysteresis else 0.0,
                    tau=self.tau if hysteresis else 0.0, max_plan_length=self.max_plan_length,
                    q_fn=self.q if hysteresis else None)

    def forward(self, features: torch.Tensor):
        actions, _, stats = self.plan(features)
        self.last_stats = stats
        return self.engine.fields(actions, dtype=features.dtype)


class PerRequestRouter(nn.Module):
    """One expert per request: a linear classifier on the feature of chunk 1 (the mean of the
    prompt's first chunk, known before generation) picks the expert of every chunk ≥ 1; chunk 0
    has no adapter, as under every router here (nothing is known before it)."""

    def __init__(self, d_ctrl: int, num_experts: int):
        super().__init__()
        self.classifier = nn.Linear(d_ctrl, num_experts)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C ≥ 2, d) → (B, E) expert logits of each request."""
        return self.classifier(features[:, 1].to(self.classifier.weight.dtype))

    def forward(self, features: torch.Tensor):
        B, C, _ = features.shape
        experts = torch.full((B, C), -1, dtype=torch.int64, device=features.device)
        if C > 1:
            experts[:, 1:] = self.logits(features).argmax(-1, keepdim=True)
        return experts, None, None
