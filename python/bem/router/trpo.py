"""Trust Region Policy Optimization (Schulman et al. 2015) for bem's AR1 router: a natural-gradient
policy step under a mean-KL bound found by conjugate gradient and a backtracking line search, and a
GAE-trained critic. Modelled on sb3-contrib's TRPO, with a batch-in, stats-out interface."""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

from bem.router.gae import bool_vector, check_finite, float_tensor, gae, unit_float

log = logging.getLogger("bem")

__all__ = ["TRPO", "conjugate_gradient"]


def conjugate_gradient(matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       max_steps: int, residual_tol: float = 1e-10) -> torch.Tensor:
    """Approximate solution x (same shape as the (P,) vector b) of A·x = b for a symmetric positive
    definite A given only as ``matrix_vector(v) = A·v``. Starts from x = 0, so it is deterministic,
    and stops after ``max_steps`` iterations or once the squared residual norm is < residual_tol."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual.dot(residual)
    for _ in range(max_steps):
        if residual_sq < residual_tol:
            break
        a_direction = matrix_vector(direction)
        step = residual_sq / direction.dot(a_direction)
        x += step * direction
        residual -= step * a_direction
        new_residual_sq = residual.dot(residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def _mean_kl(old, new) -> torch.Tensor:
    """Mean over the batch of KL(old‖new): ``old.kl(new)`` when the distribution has such a method,
    else torch.distributions.kl_divergence. Either must give one value per sample, (N,)."""
    if callable(getattr(old, "kl", None)):
        kl = old.kl(new)
    else:
        try:
            kl = torch.distributions.kl_divergence(old, new)
        except NotImplementedError as exc:
            raise TypeError(f"policy: no KL divergence is registered for {type(old).__name__}; "
                            "register one or give the distribution a kl(other) method") from exc
    if kl.ndim != 1:
        raise ValueError(f"policy: the KL divergence must have shape (N,), got {tuple(kl.shape)} "
                         "(wrap per-dimension distributions in torch.distributions.Independent)")
    return kl.mean()


def _flat_grad(output: torch.Tensor, params: list[nn.Parameter], **kwargs) -> torch.Tensor:
    """d output / d params as one (P,) vector; parameters output does not use get zeros."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params)])


class TRPO:
    """TRPO updates of ``policy`` with a critic ``value`` trained alongside.

    policy(states) must return a distribution object whose ``log_prob(actions)`` is (N,), for which
    either the object has a method ``kl(other)`` giving KL(self‖other) as (N,) (used when present)
    or torch.distributions.kl_divergence is registered; ``entropy()`` (N,) is optional (reported
    only). The KL must be twice differentiable in the parameters of ``other``.
    value(states) must return (N,). Both are nn.Modules; only the policy's parameters with
    requires_grad take the TRPO step, the critic takes Adam(critic_lr) steps.
    """

    def __init__(self, policy: nn.Module, value: nn.Module, *, target_kl: float = 0.01,
                 cg_max_steps: int = 15, cg_damping: float = 0.1,
                 line_search_shrinking_factor: float = 0.8, line_search_max_iter: int = 10,
                 n_critic_updates: int = 10, gamma: float = 0.99, gae_lambda: float = 0.95,
                 critic_lr: float = 1e-3, critic_batch_size: int = 64,
                 normalize_advantage: bool = True, seed: int | None = None) -> None:
        for name, module in (("policy", policy), ("value", value)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module, got {type(module).__name__}")
        self.target_kl = _positive_float(target_kl, "target_kl")
        self.cg_max_steps = _integer(cg_max_steps, "cg_max_steps", minimum=1)
        self.cg_damping = _positive_float(cg_damping, "cg_damping", allow_zero=True)
        factor = _positive_float(line_search_shrinking_factor, "line_search_shrinking_factor")
        if factor >= 1.0:
            raise ValueError("line_search_shrinking_factor: expected a float in (0, 1), "
                             f"got {factor}")
        self.line_search_shrinking_factor = factor
        self.line_search_max_iter = _integer(line_search_max_iter, "line_search_max_iter",
                                             minimum=1)
        self.n_critic_updates = _integer(n_critic_updates, "n_critic_updates", minimum=0)
        self.gamma = unit_float(gamma, "gamma")
        self.gae_lambda = unit_float(gae_lambda, "gae_lambda")
        self.critic_batch_size = _integer(critic_batch_size, "critic_batch_size", minimum=1)
        self.normalize_advantage = bool(normalize_advantage)
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError("policy: has no parameters with requires_grad")
        self.policy, self.value = policy, value
        self.critic_optimizer = torch.optim.Adam(
            value.parameters(), lr=_positive_float(critic_lr, "critic_lr"))
        # The critic's minibatch order is the only randomness here; seed=None draws a fresh seed.
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(_integer(seed, "seed", minimum=0))

    def update(self, states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
               dones: torch.Tensor, *, last_value: float | torch.Tensor | None = None) -> dict:
        """One TRPO policy step and ``n_critic_updates`` critic epochs on a batch of trajectories.

        states: (N, ...) float; actions: (N, ...) as policy(states).log_prob accepts; rewards: (N,)
        float; dones: (N,) bool, True on the last step of an episode. The batch is trajectories
        concatenated in time order. If the final step is not done its successor is valued at
        ``last_value``, or, when that is None, at value(states[-1]) (the successor state itself
        is not in the batch).
        Returns kl (mean KL(old‖new) of the accepted step, 0.0 when none), accepted,
        line_search_steps (iterations tried), step_size (α·β taken, 0.0 when none),
        surrogate_improvement, policy_loss_before (−surrogate at the old policy), entropy (mean,
        NaN without entropy()), value_loss (mean minibatch MSE over the critic updates, NaN when
        n_critic_updates=0) and explained_variance of the returns by the values before the update.
        """
        states = torch.as_tensor(states)
        if states.ndim == 0 or states.shape[0] == 0:
            raise ValueError("states: expected a non-empty batch (N, ...), "
                             f"got {tuple(states.shape)}")
        if not states.is_floating_point():
            raise TypeError(f"states: expected a floating-point tensor, got dtype {states.dtype}")
        check_finite(states, "states")
        n = states.shape[0]
        actions = torch.as_tensor(actions)
        if actions.ndim == 0 or actions.shape[0] != n:
            raise ValueError(f"actions: expected first dimension {n} (the batch size of states), "
                             f"got shape {tuple(actions.shape)}")
        rewards = float_tensor(rewards, "rewards", n=n, reference="states")
        dones = bool_vector(dones, "dones", n=n)

        with torch.no_grad():
            values = self.value(states)
            if values.shape != (n,):
                raise ValueError(f"value: expected value(states) of shape ({n},), "
                                 f"got {tuple(values.shape)}")
            if bool(dones[-1]):
                bootstrap = 0.0
            elif last_value is None:
                bootstrap = self.value(states[-1:])[0]
            else:
                bootstrap = last_value
            advantages, returns = gae(rewards, values, dones, bootstrap,
                                      gamma=self.gamma, lam=self.gae_lambda)
            explained_variance = _explained_variance(values, returns)
            if self.normalize_advantage and n > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        stats = self._policy_step(states, actions, advantages)
        stats["value_loss"] = self._critic_updates(states, returns)
        stats["explained_variance"] = explained_variance
        return stats

    def _policy_step(self, states: torch.Tensor, actions: torch.Tensor,
                     advantages: torch.Tensor) -> dict:
        """The natural-gradient step with backtracking line search; parameters change only if a
        step is accepted."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        with torch.no_grad():
            old_dist = self.policy(states)
            old_log_prob = old_dist.log_prob(actions)
            try:
                entropy = float(old_dist.entropy().mean())
            except (AttributeError, NotImplementedError):
                entropy = math.nan
        if old_log_prob.shape != advantages.shape:
            raise ValueError("policy: log_prob(actions) must have shape "
                             f"{tuple(advantages.shape)}, got {tuple(old_log_prob.shape)}")

        def surrogate(dist) -> torch.Tensor:
            return (advantages * torch.exp(dist.log_prob(actions) - old_log_prob)).mean()

        # Both gradients come from one forward pass at θ_old; the KL against the detached old
        # distribution is 0 there, but its Hessian (the Fisher matrix) is not.
        dist = self.policy(states)
        old_surrogate = surrogate(dist)
        policy_gradient = _flat_grad(old_surrogate, params, retain_graph=True)
        old_surrogate = float(old_surrogate.detach())
        kl_gradient = _flat_grad(_mean_kl(old_dist, dist), params, create_graph=True)
        step = conjugate_gradient(lambda v: self._fisher_vector_product(kl_gradient, params, v),
                                  policy_gradient, self.cg_max_steps)
        s_h_s = float(step.dot(self._fisher_vector_product(kl_gradient, params, step)))
        stats = {"kl": 0.0, "accepted": False, "line_search_steps": 0, "step_size": 0.0,
                 "surrogate_improvement": 0.0, "policy_loss_before": -old_surrogate,
                 "entropy": entropy}
        if not (math.isfinite(s_h_s) and s_h_s > 0.0):
            log.warning("TRPO: policy step skipped, sᵀHs = %g is not finite and > 0", s_h_s)
            return stats

        max_step = math.sqrt(2.0 * self.target_kl / s_h_s)
        old_params = [p.detach().clone() for p in params]
        chunks = step.split([p.numel() for p in params])
        with torch.no_grad():
            for i in range(self.line_search_max_iter):
                step_size = self.line_search_shrinking_factor ** i * max_step
                for p, old, chunk in zip(params, old_params, chunks):
                    p.copy_(old + step_size * chunk.view_as(p))
                new_dist = self.policy(states)
                kl = float(_mean_kl(old_dist, new_dist))
                improvement = float(surrogate(new_dist)) - old_surrogate
                stats["line_search_steps"] = i + 1
                # A NaN kl or improvement fails both comparisons, so it is never accepted.
                if kl <= self.target_kl and improvement > 0.0:
                    stats.update(kl=kl, accepted=True, step_size=step_size,
                                 surrogate_improvement=improvement)
                    return stats
            for p, old in zip(params, old_params):
                p.copy_(old)
        log.debug("TRPO: line search found no step within kl <= %g that improves the surrogate",
                  self.target_kl)
        return stats

    def _fisher_vector_product(self, kl_gradient: torch.Tensor, params: list[nn.Parameter],
                               vector: torch.Tensor) -> torch.Tensor:
        """(F + cg_damping·I)·vector for a (P,) ``vector``, F·v = ∇(∇KL · v) by double backward;
        the damping keeps F, singular for over-parametrised policies, positive definite for CG."""
        product = _flat_grad(kl_gradient.dot(vector), params, retain_graph=True)
        return product + self.cg_damping * vector

    def _critic_updates(self, states: torch.Tensor, returns: torch.Tensor) -> float:
        """``n_critic_updates`` shuffled epochs of minibatch MSE toward ``returns`` (N,); returns
        the mean minibatch loss."""
        losses = []
        n = states.shape[0]
        for _ in range(self.n_critic_updates):
            order = torch.randperm(n, generator=self.generator).to(states.device)
            for batch in order.split(self.critic_batch_size):
                prediction = self.value(states[batch])
                loss = nn.functional.mse_loss(prediction, returns[batch].to(prediction.dtype))
                self.critic_optimizer.zero_grad()
                loss.backward()
                self.critic_optimizer.step()
                losses.append(float(loss.detach()))
        return sum(losses) / len(losses) if losses else math.nan


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns); NaN when the returns do not vary."""
    returns = returns.to(torch.float64)
    variance = float(returns.var(unbiased=False)) if returns.numel() > 1 else 0.0
    if variance == 0.0:
        return math.nan
    return 1.0 - float((returns - values.to(torch.float64)).var(unbiased=False)) / variance


def _positive_float(value: object, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite float {bound}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0 or (value == 0.0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite float {bound}, got {value}")
    return value


def _integer(value: object, name: str, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused: True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)
