"""bem.router — AR1, the macro-policy that routes experts at chunk boundaries: the factorised
policy, value and action-value heads, hysteresis and plan-length enforcement (policy), TRPO and
GAE (trpo, gae), and the composition engine that turns actions into the chunk controls with the
trust-region projection ‖ΔW‖_F ≤ τ (composition; the math lives in bem.modules.trust_region)."""
from bem.router.composition import CompositionEngine
from bem.router.gae import gae
from bem.router.policy import (ActionSpace, FactorisedCategorical, MacroPolicy, PlanStats, QHead,
                               ValueNetwork, action_histogram, plan, worth_flip)
from bem.router.trpo import TRPO, conjugate_gradient

__all__ = ["TRPO", "ActionSpace", "CompositionEngine", "FactorisedCategorical", "MacroPolicy",
           "PlanStats", "QHead", "ValueNetwork", "action_histogram", "conjugate_gradient", "gae",
           "plan", "worth_flip"]
