"""bem.router.TRPO: learning a contextual bandit and a chain MDP within the KL bound, the line
search's restore, the sᵀHs guard, determinism, conjugate gradient, factorised and continuous
policies, the bootstrap value, and argument errors."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import bem.router.trpo as trpo_module
from bem.router.trpo import TRPO, conjugate_gradient

KL_TOLERANCE = 1e-6  # float32 evaluation of the mean KL


class CategoricalPolicy(nn.Module):
    def __init__(self, n_states: int, n_actions: int) -> None:
        super().__init__()
        self.logits = nn.Linear(n_states, n_actions)

    def forward(self, states: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.logits(states))


class LinearValue(nn.Module):
    def __init__(self, n_states: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_states, 1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(states).squeeze(-1)


class FactorisedCategorical:
    """A product of independent categoricals of different sizes; actions (N, n_factors)."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        self.factors = [torch.distributions.Categorical(logits=x) for x in logits]

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return sum(f.log_prob(actions[:, i]) for i, f in enumerate(self.factors))

    def entropy(self) -> torch.Tensor:
        return sum(f.entropy() for f in self.factors)

    def kl(self, other: FactorisedCategorical) -> torch.Tensor:
        return sum(torch.distributions.kl_divergence(p, q)
                   for p, q in zip(self.factors, other.factors))


class FactorisedPolicy(nn.Module):
    def __init__(self, n_states: int, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes
        self.logits = nn.Linear(n_states, sum(sizes))

    def forward(self, states: torch.Tensor) -> FactorisedCategorical:
        return FactorisedCategorical(list(self.logits(states).split(self.sizes, dim=-1)))


BEST = torch.tensor([2, 0, 1, 2])  # the rewarded action of each of the 4 bandit contexts


def _bandit_batch(policy, generator, n=64, dtype=torch.float32):
    contexts = torch.randint(0, 4, (n,), generator=generator)
    states = torch.eye(4, dtype=dtype)[contexts]
    with torch.no_grad():
        probs = policy(states).probs
    actions = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    rewards = (actions == BEST[contexts]).float()
    return states, actions, rewards, torch.ones(n, dtype=torch.bool)


def _train_bandit(n_updates, seed=0, **kwargs):
    torch.manual_seed(seed)
    policy, value = CategoricalPolicy(4, 3), LinearValue(4)
    trainer = TRPO(policy, value, seed=seed, critic_lr=1e-2, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    history = [trainer.update(*_bandit_batch(policy, generator)) for _ in range(n_updates)]
    return policy, value, history


def _params(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_contextual_bandit_learns_the_optimal_policy_within_the_kl_bound():
    policy, _, history = _train_bandit(40)
    with torch.no_grad():
        probs = policy(torch.eye(4)).probs
    assert (probs.argmax(1) == BEST).all()
    assert (probs[torch.arange(4), BEST] > 0.9).all(), probs
    accepted = [h for h in history if h["accepted"]]
    assert len(accepted) >= 30
    assert all(h["kl"] <= 0.01 + KL_TOLERANCE for h in accepted)
    assert all(h["surrogate_improvement"] > 0 and h["step_size"] > 0 for h in accepted)
    assert all(1 <= h["line_search_steps"] <= 10 for h in history)
    assert all(h["kl"] == 0.0 and h["step_size"] == 0.0 for h in history if not h["accepted"])
    assert history[-1]["entropy"] < history[0]["entropy"]
    assert math.isfinite(history[0]["value_loss"])


def test_chain_mdp_learns_always_right():
    n_states, horizon, episodes = 5, 8, 16
    torch.manual_seed(0)
    policy, value = CategoricalPolicy(n_states, 2), LinearValue(n_states)
    trainer = TRPO(policy, value, target_kl=0.02, critic_lr=1e-2, seed=0)
    generator = torch.Generator().manual_seed(1)
    eye = torch.eye(n_states)

    def rollout():
        # 16 episodes stepped in parallel, then laid out episode after episode (time order).
        position = torch.zeros(episodes, dtype=torch.long)
        states, actions, rewards = [], [], []
        for _ in range(horizon):
            with torch.no_grad():
                probs = policy(eye[position]).probs
            action = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            states.append(eye[position])
            actions.append(action)
            position = (position + 2 * action - 1).clamp(0, n_states - 1)  # 1 = right
            rewards.append((position == n_states - 1).float())
        dones = torch.zeros(episodes, horizon, dtype=torch.bool)
        dones[:, -1] = True
        return (torch.stack(states, 1).reshape(-1, n_states), torch.stack(actions, 1).reshape(-1),
                torch.stack(rewards, 1).reshape(-1), dones.reshape(-1))

    for _ in range(30):
        stats = trainer.update(*rollout())
        assert not stats["accepted"] or stats["kl"] <= 0.02 + KL_TOLERANCE
    with torch.no_grad():
        right = policy(eye).probs[:, 1]
    assert (right > 0.9).all(), right
    _, _, rewards, _ = rollout()
    assert float(rewards.sum()) / episodes >= 4.5  # the optimum is horizon − (n_states − 1) − 1 = 5


def test_same_seeds_give_bitwise_equal_parameters():
    def run(trpo_seed, global_draws):
        torch.manual_seed(3)
        policy, value = CategoricalPolicy(4, 3), LinearValue(4)
        # critic_batch_size < N: the shuffle decides the critic's path, and it must come from
        # TRPO's own generator, not the global RNG (advanced differently per run here).
        trainer = TRPO(policy, value, critic_batch_size=16, seed=trpo_seed)
        torch.rand(global_draws)
        generator = torch.Generator().manual_seed(4)
        history = [trainer.update(*_bandit_batch(policy, generator)) for _ in range(4)]
        return _params(policy, value), history

    params_a, history_a = run(trpo_seed=7, global_draws=1)
    params_b, history_b = run(trpo_seed=7, global_draws=5)
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    assert history_a == history_b
    params_c, _ = run(trpo_seed=8, global_draws=1)
    assert any(not torch.equal(a, c) for a, c in zip(params_a, params_c))


@pytest.mark.parametrize("seed", [0, 1])
def test_step_length_puts_the_quadratic_kl_on_target(seed):
    # Undamped, float64, CG run to convergence: the step α·β with β = sqrt(2·target_kl / sᵀFs)
    # has KL = α²·target_kl up to third-order terms.
    torch.manual_seed(seed)
    policy, value = CategoricalPolicy(4, 3).double(), LinearValue(4).double()
    batch = _bandit_batch(policy, torch.Generator().manual_seed(seed), dtype=torch.float64)
    trainer = TRPO(policy, value, target_kl=1e-4, cg_damping=0.0, cg_max_steps=30,
                   n_critic_updates=0)
    stats = trainer.update(*batch)
    assert stats["accepted"]
    alpha = 0.8 ** (stats["line_search_steps"] - 1)
    assert stats["kl"] == pytest.approx(alpha ** 2 * 1e-4, rel=0.01)


def test_line_search_failure_restores_parameters_exactly(monkeypatch):
    # Stepping against the natural gradient lowers the surrogate for every step size tried.
    solve = trpo_module.conjugate_gradient
    monkeypatch.setattr(trpo_module, "conjugate_gradient", lambda *a, **k: -solve(*a, **k))
    torch.manual_seed(0)
    policy, value = CategoricalPolicy(4, 3), LinearValue(4)
    trainer = TRPO(policy, value, n_critic_updates=0, line_search_max_iter=6, seed=0)
    before = _params(policy)
    stats = trainer.update(*_bandit_batch(policy, torch.Generator().manual_seed(0)))
    assert stats["accepted"] is False
    assert stats["line_search_steps"] == 6
    assert stats["kl"] == 0.0 and stats["surrogate_improvement"] == 0.0
    assert math.isnan(stats["value_loss"])
    for a, b in zip(before, _params(policy), strict=True):
        assert torch.equal(a, b)


def test_non_positive_curvature_skips_the_step(monkeypatch, caplog):
    torch.manual_seed(0)
    policy, value = CategoricalPolicy(4, 3), LinearValue(4)
    trainer = TRPO(policy, value, seed=0)
    monkeypatch.setattr(trainer, "_fisher_vector_product", lambda kl_gradient, params, v: -v)
    before = _params(policy)
    value_before = _params(value)
    with caplog.at_level(logging.WARNING, logger="bem"):
        stats = trainer.update(*_bandit_batch(policy, torch.Generator().manual_seed(0)))
    assert stats["accepted"] is False and stats["line_search_steps"] == 0 and stats["kl"] == 0.0
    assert "sᵀHs" in caplog.text
    for a, b in zip(before, _params(policy), strict=True):
        assert torch.equal(a, b)
    # The critic still trains.
    assert any(not torch.equal(a, b) for a, b in zip(value_before, _params(value)))


def test_conjugate_gradient_solves_spd_system_from_zero():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, max_steps=6, residual_tol=1e-20)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    # One step from x = 0 is the exact line minimiser along b.
    one = conjugate_gradient(lambda v: a @ v, b, max_steps=1)
    torch.testing.assert_close(one, (b @ b) / (b @ a @ b) * b, rtol=1e-12, atol=1e-12)
    assert torch.equal(conjugate_gradient(lambda v: a @ v, torch.zeros(6, dtype=torch.float64), 5),
                       torch.zeros(6, dtype=torch.float64))


def test_factorised_policy_with_kl_method():
    torch.manual_seed(0)
    sizes = (2, 3, 4)
    best = torch.tensor([[1, 2, 3], [0, 0, 1]])  # per context, the rewarded action of each factor
    policy, value = FactorisedPolicy(2, sizes), LinearValue(2)
    trainer = TRPO(policy, value, critic_lr=1e-2, seed=0)
    generator = torch.Generator().manual_seed(1)
    history = []
    for _ in range(15):
        contexts = torch.randint(0, 2, (64,), generator=generator)
        states = torch.eye(2)[contexts]
        with torch.no_grad():
            dist = policy(states)
        actions = torch.stack([torch.multinomial(f.probs, 1, generator=generator).squeeze(1)
                               for f in dist.factors], 1)
        rewards = (actions == best[contexts]).float().sum(1)
        history.append(trainer.update(states, actions, rewards, torch.ones(64, dtype=torch.bool)))
    assert sum(h["accepted"] for h in history) >= 10
    assert all(h["kl"] <= 0.01 + KL_TOLERANCE for h in history)
    assert history[-1]["entropy"] < history[0]["entropy"]
    with torch.no_grad():
        dist = policy(torch.eye(2))
    for i, factor in enumerate(dist.factors):
        assert (factor.probs.argmax(1) == best[:, i]).all()


def test_continuous_policy_through_registered_kl_divergence():
    class GaussianPolicy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = nn.Linear(1, 2)
            self.log_std = nn.Parameter(torch.zeros(2))

        def forward(self, states):
            normal = torch.distributions.Normal(self.mean(states), self.log_std.exp())
            return torch.distributions.Independent(normal, 1)

    torch.manual_seed(0)
    policy, value = GaussianPolicy(), LinearValue(1)
    trainer = TRPO(policy, value, target_kl=0.05, critic_lr=1e-2, seed=0)
    target = torch.tensor([1.0, -1.0])
    states = torch.ones(128, 1)
    history = []
    for _ in range(20):
        with torch.no_grad():
            actions = policy(states).sample()
        rewards = -((actions - target) ** 2).sum(1)
        history.append(trainer.update(states, actions, rewards, torch.ones(128, dtype=torch.bool)))
    # Here the quadratic model underestimates the KL, so the line search has to backtrack.
    assert any(h["accepted"] and h["line_search_steps"] > 1 for h in history)
    assert all(h["kl"] <= 0.05 + KL_TOLERANCE for h in history)
    error = (policy(states[:1]).mean.detach()[0] - target).abs()
    assert (error < 0.2).all(), error


@pytest.mark.parametrize("last_done,last_value,expected", [
    (True, 5.0, 0.0), (False, 5.0, 5.0), (False, None, "value")])
def test_bootstrap_value(monkeypatch, last_done, last_value, expected):
    seen = {}
    real_gae = trpo_module.gae

    def spy(rewards, values, dones, bootstrap, **kwargs):
        seen["bootstrap"] = float(bootstrap)
        return real_gae(rewards, values, dones, bootstrap, **kwargs)

    monkeypatch.setattr(trpo_module, "gae", spy)
    torch.manual_seed(0)
    policy, value = CategoricalPolicy(4, 3), LinearValue(4)
    states, actions, rewards, dones = _bandit_batch(policy, torch.Generator().manual_seed(0), n=8)
    dones[-1] = last_done
    with torch.no_grad():
        v_last = float(value(states[-1:])[0])
    TRPO(policy, value, n_critic_updates=0).update(states, actions, rewards, dones,
                                                    last_value=last_value)
    assert seen["bootstrap"] == (v_last if expected == "value" else expected)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(target_kl=-0.01), ValueError, "target_kl"),
    (dict(target_kl=0.0), ValueError, "target_kl"),
    (dict(target_kl=math.nan), ValueError, "target_kl"),
    (dict(target_kl=math.inf), ValueError, "target_kl"),
    (dict(cg_max_steps=0), ValueError, "cg_max_steps"),
    (dict(cg_max_steps=2.0), TypeError, "cg_max_steps"),
    (dict(cg_damping=-0.1), ValueError, "cg_damping"),
    (dict(line_search_shrinking_factor=1.0), ValueError, "line_search_shrinking_factor"),
    (dict(line_search_shrinking_factor=0.0), ValueError, "line_search_shrinking_factor"),
    (dict(line_search_max_iter=0), ValueError, "line_search_max_iter"),
    (dict(n_critic_updates=-1), ValueError, "n_critic_updates"),
    (dict(gamma=1.01), ValueError, "gamma"),
    (dict(gae_lambda=-0.5), ValueError, "gae_lambda"),
    (dict(critic_lr=0.0), ValueError, "critic_lr"),
    (dict(critic_batch_size=0), ValueError, "critic_batch_size"),
])
def test_constructor_errors_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=f"^{name}: "):
        TRPO(CategoricalPolicy(4, 3), LinearValue(4), **kwargs)


@pytest.mark.parametrize("change,error,name", [
    (lambda b: b.update(actions=b["actions"][:-1]), ValueError, "actions"),
    (lambda b: b.update(rewards=b["rewards"][:-1]), ValueError, "rewards"),
    (lambda b: b.update(dones=b["dones"][:-1]), ValueError, "dones"),
    (lambda b: b.update(rewards=b["rewards"][:, None]), ValueError, "rewards"),
    (lambda b: b.update(dones=b["dones"][:, None]), ValueError, "dones"),
    (lambda b: b["rewards"].__setitem__(3, math.nan), ValueError, "rewards"),
    (lambda b: b["states"].__setitem__((2, 1), math.inf), ValueError, "states"),
    (lambda b: b.update(dones=torch.full((8,), 0.5)), ValueError, "dones"),
    (lambda b: b.update(states=b["states"][:0], actions=b["actions"][:0],
                        rewards=b["rewards"][:0], dones=b["dones"][:0]), ValueError, "states"),
])
def test_update_errors_name_the_argument(change, error, name):
    torch.manual_seed(0)
    policy = CategoricalPolicy(4, 3)
    trainer = TRPO(policy, LinearValue(4), seed=0)
    states, actions, rewards, dones = _bandit_batch(policy, torch.Generator().manual_seed(0), n=8)
    batch = dict(states=states, actions=actions, rewards=rewards, dones=dones)
    change(batch)
    before = _params(policy)
    with pytest.raises(error, match=f"^{name}: "):
        trainer.update(**batch)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(policy)))
