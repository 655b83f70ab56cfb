"""AR1 router pieces: the action space, the factorised categorical policy and its critics, the
planner's hysteresis and plan-length rules (against a plain-Python reference), the cache rule, and
the composition of actions into chunk controls."""
import json
import math

import pytest
import torch
from torch import nn

from bem.modules.control import ChunkControl
from bem.modules.trust_region import ProjectionStats
from bem.router.composition import CompositionEngine
from bem.router.policy import (ActionSpace, FactorisedCategorical, MacroPolicy, QHead,
                               ValueNetwork, action_histogram, plan, worth_flip)

SPACE = ActionSpace(4, (2, 4, 8), (0.5, 1.0))
D = 6


def _policy(gen, hidden=0, scale=2.0):
    p = MacroPolicy(SPACE, D, hidden=hidden).double()
    with torch.no_grad():
        for t in p.parameters():
            t.copy_(scale * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return p


def _logits(gen, N=5):
    return [torch.randn(N, n, generator=gen, dtype=torch.float64) for n in SPACE.sizes]


# ---------------------------------------------------------------- action space

def test_action_space_round_trip_and_conversions():
    space = ActionSpace(3, [4, 2], [1, 0.25])
    assert space.rank_budgets == (4, 2) and space.bias_scales == (1.0, 0.25)
    assert ActionSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    assert space.sizes == (4, 2, 2) and space.num_actions == 16
    experts = torch.tensor([[-1, 0], [2, 1]])
    a = space.encode(experts, torch.tensor([1, 0]), torch.tensor(1))
    assert a.tolist() == [[[0, 1, 1], [1, 0, 1]], [[3, 1, 1], [2, 0, 1]]]
    e, k, s = space.decode(a)
    assert torch.equal(e, experts) and k.tolist() == [[1, 0], [1, 0]] and s.eq(1).all()
    assert space.canonical(a)[0, 0].tolist() == [0, 0, 0]
    assert torch.equal(space.canonical(a)[1], a[1])
    every = torch.cartesian_prod(*[torch.arange(n) for n in space.sizes])
    assert torch.equal(space.flat(every), torch.arange(space.num_actions))
    assert space.label(a[0, 0]) == "none" and space.label(a[1, 0]) == "e2/k2/s0.25"


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=0, rank_budgets=(1,), bias_scales=(1.0,)), "num_experts"),
    (dict(num_experts=True, rank_budgets=(1,), bias_scales=(1.0,)), "num_experts"),
    (dict(num_experts=2, rank_budgets=(), bias_scales=(1.0,)), "rank_budgets"),
    (dict(num_experts=2, rank_budgets=(2, 2), bias_scales=(1.0,)), "rank_budgets"),
    (dict(num_experts=2, rank_budgets=(0,), bias_scales=(1.0,)), "rank_budgets"),
    (dict(num_experts=2, rank_budgets=(1.5,), bias_scales=(1.0,)), "rank_budgets"),
    (dict(num_experts=2, rank_budgets=(1,), bias_scales=(math.nan,)), "bias_scales"),
    (dict(num_experts=2, rank_budgets=(1,), bias_scales=(-1.0,)), "bias_scales"),
    (dict(num_experts=2, rank_budgets=(1,), bias_scales="1"), "bias_scales"),
])
def test_action_space_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActionSpace(**kwargs)


def test_action_errors_name_the_argument():
    with pytest.raises(ValueError, match="experts"):
        SPACE.encode(torch.tensor([4]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="experts"):
        SPACE.encode(torch.tensor([-2]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="scale_index"):
        SPACE.encode(torch.tensor([0]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(TypeError, match="rank_index"):
        SPACE.encode(torch.tensor([0]), torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="actions"):
        SPACE.validate(torch.tensor([[5, 0, 0]]))
    with pytest.raises(ValueError, match="actions"):
        SPACE.validate(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="actions"):
        SPACE.validate(torch.zeros(2, 3, dtype=torch.int32))
    SPACE.validate(torch.tensor([[-1, -1, -1]]), allow_none=True)
    with pytest.raises(ValueError, match="prev"):
        SPACE.validate(torch.tensor([[-1, 0, 0]]), "prev", allow_none=True)
    with pytest.raises(ValueError, match="data"):
        ActionSpace.from_dict({"num_experts": 2, "rank_budgets": [1]})


# ---------------------------------------------------------------- distribution

def test_factorised_categorical_matches_independent_categoricals():
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = _logits(gen), _logits(gen)
    p, q = FactorisedCategorical(*p_logits), FactorisedCategorical(*q_logits)
    cats_p = [torch.distributions.Categorical(logits=t) for t in p_logits]
    cats_q = [torch.distributions.Categorical(logits=t) for t in q_logits]
    actions = torch.stack([torch.randint(n, (5,), generator=gen) for n in SPACE.sizes], -1)
    want = sum(c.log_prob(actions[:, f]) for f, c in enumerate(cats_p))
    torch.testing.assert_close(p.log_prob(actions), want)
    torch.testing.assert_close(p.entropy(), sum(c.entropy() for c in cats_p))
    kl = sum(torch.distributions.kl_divergence(a, b) for a, b in zip(cats_p, cats_q))
    torch.testing.assert_close(p.kl(q), kl)
    torch.testing.assert_close(torch.distributions.kl_divergence(p, q), kl)
    assert p.kl(p).abs().max() < 1e-12
    assert torch.equal(p.mode, torch.stack([t.argmax(-1) for t in p_logits], -1))
    # a leading sample dimension broadcasts over the batch
    assert p.log_prob(actions.expand(7, 5, 3)).shape == (7, 5)


def test_kl_is_twice_differentiable():
    gen = torch.Generator().manual_seed(1)
    logits = [t.requires_grad_() for t in _logits(gen)]
    old = FactorisedCategorical(*[t.detach() for t in logits])
    kl = old.kl(FactorisedCategorical(*logits)).mean()
    grads = torch.autograd.grad(kl, logits, create_graph=True)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in logits]
    hvp = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v)), logits)
    assert all(torch.isfinite(h).all() for h in hvp) and any(h.abs().sum() > 0 for h in hvp)


def test_sampling_is_seeded_and_follows_the_probabilities():
    gen = torch.Generator().manual_seed(2)
    logits = _logits(gen, N=1)
    logits[0][0, 2] = -math.inf  # a masked expert is never drawn
    d = FactorisedCategorical(*logits)
    draw = lambda seed: d.sample((20000,), generator=torch.Generator().manual_seed(seed))  # noqa
    a, b = draw(7), draw(7)
    assert torch.equal(a, b) and not torch.equal(a, draw(8))
    assert a.shape == (20000, 1, 3) and a.dtype == torch.int64
    for f, lp in enumerate(d.factor_log_probs):
        freq = torch.bincount(a[:, 0, f], minlength=lp.shape[-1]).double() / a.shape[0]
        torch.testing.assert_close(freq, lp[0].exp(), atol=0.015, rtol=0)
    assert (a[:, 0, 0] != 2).all()
    assert torch.isfinite(d.entropy()).all()


def test_distribution_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(3)
    e, k, s = _logits(gen)
    with pytest.raises(ValueError, match="rank_logits"):
        FactorisedCategorical(e, k[:4], s)
    with pytest.raises(ValueError, match="scale_logits"):
        FactorisedCategorical(e, k, torch.full_like(s, math.nan))
    with pytest.raises(ValueError, match="expert_logits"):
        FactorisedCategorical(torch.full_like(e, -math.inf), k, s)
    with pytest.raises(TypeError, match="expert_logits"):
        FactorisedCategorical(e.long(), k, s)
    d = FactorisedCategorical(e, k, s)
    with pytest.raises(ValueError, match="actions"):
        d.log_prob(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="actions"):
        d.log_prob(torch.tensor([[5, 0, 0]] * 5))
    with pytest.raises(TypeError, match="actions"):
        d.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="other"):
        d.kl(FactorisedCategorical(e[:, :3], k, s))
    with pytest.raises(TypeError, match="other"):
        d.kl(torch.distributions.Categorical(logits=e))


# ---------------------------------------------------------------- policy and critics

def test_policy_states_and_initial_uniform_policy():
    gen = torch.Generator().manual_seed(4)
    p = MacroPolicy(SPACE, D)
    n_out = sum(SPACE.sizes)
    assert p.state_dim == D + n_out + 1
    assert sum(t.numel() for t in p.parameters()) == (p.state_dim + 1) * n_out
    feats = torch.randn(2, 3, D, generator=gen)
    prev = torch.tensor([[[-1, -1, -1], [2, 1, 0], [0, 0, 1]]] * 2)
    s = p.states(feats, prev)
    assert s.shape == (2, 3, p.state_dim) and s.dtype == feats.dtype
    assert torch.equal(s[..., :D], feats)
    assert s[0, 0, D:].sum() == 1 and s[:, 0, -1].eq(1).all()  # no previous action, first chunk
    hot = s[0, 1, D:-1]
    assert hot.nonzero().flatten().tolist() == [2, 5 + 1, 5 + 3 + 0]
    assert p.states(feats, prev, first_chunk=1)[..., -1].eq(0).all()
    d = p(s)
    assert d.batch_shape == (2, 3)
    for lp in d.factor_log_probs:  # uniform at init; the mode is "no adapter"
        torch.testing.assert_close(lp.exp(), torch.full_like(lp, 1 / lp.shape[-1]))
    assert d.mode.eq(0).all()
    deep = MacroPolicy(SPACE, D, hidden=5)
    assert deep(s).batch_shape == (2, 3)


def test_policy_errors_name_the_argument():
    p = MacroPolicy(SPACE, D)
    feats = torch.zeros(1, 2, D)
    prev = torch.full((1, 2, 3), -1)
    with pytest.raises(ValueError, match="features"):
        p.states(torch.zeros(1, 2, D + 1), prev)
    with pytest.raises(ValueError, match="features"):
        p.states(torch.full((1, 2, D), math.nan), prev)
    with pytest.raises(ValueError, match="prev_actions"):
        p.states(feats, torch.full((1, 3, 3), -1))
    with pytest.raises(ValueError, match="prev_actions"):
        p.states(feats, torch.tensor([[[9, 0, 0], [0, 0, 0]]]))
    with pytest.raises(ValueError, match="first_chunk"):
        p.states(feats, prev, first_chunk=-1)
    with pytest.raises(ValueError, match="states"):
        p(torch.zeros(3, p.state_dim + 1))
    with pytest.raises(ValueError, match="d_ctrl"):
        MacroPolicy(SPACE, 0)
    with pytest.raises(ValueError, match="hidden"):
        ValueNetwork(4, hidden=-1)
    with pytest.raises(TypeError, match="action_space"):
        QHead(SPACE.to_dict(), 4)


def test_value_network_and_q_head():
    gen = torch.Generator().manual_seed(5)
    p = MacroPolicy(SPACE, D)
    states = torch.randn(64, p.state_dim, generator=gen)
    v = ValueNetwork(p.state_dim, hidden=4)
    assert v(states).shape == (64,)
    q = QHead(SPACE, p.state_dim)
    actions = torch.stack([torch.randint(n, (64,), generator=gen) for n in SPACE.sizes], -1)
    actions[:8, 0] = 0
    assert q(states, actions).shape == (64,)
    # "no adapter" ignores its rank and scale indices
    with torch.no_grad():
        q.net.weight.normal_(generator=gen)
    none = torch.tensor([[0, 2, 1]]).expand(64, 3)
    torch.testing.assert_close(q(states, none), q(states, SPACE.canonical(none)))
    # regression on returns fits a target in the head's span
    target = q(states, actions).detach()
    fit = QHead(SPACE, p.state_dim)
    opt = torch.optim.Adam(fit.parameters(), lr=0.05)
    first = fit.loss(states, actions, target).item()
    for _ in range(300):
        opt.zero_grad()
        loss = fit.loss(states, actions, target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    with pytest.raises(ValueError, match="returns"):
        fit.loss(states, actions, target[:3])
    with pytest.raises(ValueError, match="actions"):
        q(states, actions[:3])


def test_worth_flip():
    q = torch.tensor([1.0, 1.0, 1.0, 1.0])
    new = torch.tensor([1.0, 1.5, 1.6, 0.0])
    assert worth_flip(q, q, switch_cost=0.0, tau=0.0).eq(False).all()  # unchanged: never a flip
    assert worth_flip(q, new, switch_cost=0.4, tau=0.1).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="switch_cost"):
        worth_flip(q, new, switch_cost=-0.1, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        worth_flip(q, new, switch_cost=0.0, tau=math.inf)
    with pytest.raises(ValueError, match="q_new"):
        worth_flip(q, new[:2], switch_cost=0.0, tau=0.0)
    with pytest.raises(ValueError, match="q_prev"):
        worth_flip(q * math.nan, new, switch_cost=0.0, tau=0.0)


# ---------------------------------------------------------------- planner

def _reference_execution(space, proposed, states, q_fn, switch_cost, tau, max_len):
    """The post-processing rules, one row and chunk at a time, in plain Python."""
    out = []
    for b in range(proposed.shape[0]):
        used, prev, row = [], None, []
        for c in range(proposed.shape[1]):
            a = space.canonical(proposed[b, c]).tolist()
            if prev is not None and a != prev:
                keep = False
                if q_fn is not None:
                    s = states[b, c][None]
                    gain = q_fn(s, torch.tensor([a]))[0] - q_fn(s, torch.tensor([prev]))[0]
                    keep = not gain > switch_cost + tau
                if keep or (a not in used and len(used) >= max_len):
                    a = prev
            if a not in used:
                used.append(a)
            row.append(a)
            prev = a
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("switch_cost, tau, max_len, with_q", [
    (0.0, 0.0, 3, False), (0.0, 0.0, 1, False), (0.3, 0.2, 2, True), (0.0, 0.0, 4, True)])
def test_plan_matches_reference_rules(greedy, switch_cost, tau, max_len, with_q):
    gen = torch.Generator().manual_seed(6)
    p = _policy(gen)
    q = QHead(SPACE, p.state_dim).double()
    with torch.no_grad():
        q.net.weight.normal_(generator=gen)
    feats = torch.randn(5, 9, D, generator=gen, dtype=torch.float64)
    actions, log_probs, stats = plan(
        p, feats, greedy=greedy, generator=torch.Generator().manual_seed(1),
        switch_cost=switch_cost, tau=tau, max_plan_length=max_len, q_fn=q if with_q else None)
    want = _reference_execution(SPACE, stats.proposed, stats.states, q if with_q else None,
                                switch_cost, tau, max_len)
    assert torch.equal(actions, want)
    # the log-probs are those of the proposals under the states the plan used (TRPO's ratio)
    torch.testing.assert_close(p(stats.states).log_prob(stats.proposed), log_probs)
    # the states carry the previous executed action
    prev = torch.cat([torch.full((5, 1, 3), -1), actions[:, :-1]], 1)
    torch.testing.assert_close(p.states(feats, prev), stats.states)
    if greedy:
        assert torch.equal(stats.proposed, p(stats.states).mode)
    changed = (actions[:, 1:] != actions[:, :-1]).any(-1)
    assert torch.equal(stats.switches, changed.sum(1))
    torch.testing.assert_close(stats.switch_rate, changed.float().mean(1))
    distinct = [len({tuple(a) for a in row.tolist()}) for row in actions]
    assert stats.plan_length.tolist() == distinct and max(distinct) <= max_len
    assert torch.equal(stats.overridden, (actions != SPACE.canonical(stats.proposed)).any(-1))
    assert sum(stats.plan_length_histogram().values()) == 5
    assert sum(action_histogram(SPACE, actions).values()) == 5 * 9
    json.dumps(stats.to_dict())


def test_hysteresis_thresholds_against_a_value_table():
    """Proposals cycle through the experts; Q is a per-expert table. A change is executed exactly
    when Q(new) − Q(prev) > switch_cost + τ."""
    space = ActionSpace(3, (4,), (1.0,))
    p = MacroPolicy(space, 4).double()
    with torch.no_grad():  # the feature one-hot picks the expert index
        p.net.weight[:4, :4] = 10 * torch.eye(4, dtype=torch.float64)
    order = [1, 2, 3, 2, 0, 1]
    feats = torch.eye(4, dtype=torch.float64)[order][None]
    table = torch.tensor([0.0, 1.0, 1.75, 1.5], dtype=torch.float64)  # exact in binary
    q_fn = lambda s, a: table[a[:, 0]]  # noqa: E731
    run = lambda cost, tau: plan(p, feats, switch_cost=cost, tau=tau, q_fn=q_fn,  # noqa: E731
                                 max_plan_length=4)[0][0, :, 0].tolist()
    assert run(0.0, 0.0) == [1, 2, 2, 2, 2, 2]      # 1→2 gains 0.75; 2→3, 2→0, 2→1 lose
    assert run(0.5, 0.125) == [1, 2, 2, 2, 2, 2]
    assert run(0.5, 0.25) == [1, 1, 1, 1, 1, 1]     # 0.75 is not > 0.75
    assert plan(p, feats, switch_cost=0.0, tau=0.0, max_plan_length=4)[0][0, :, 0].tolist() == order
    assert plan(p, feats, switch_cost=0.0, tau=0.0, max_plan_length=2)[0][0, :, 0].tolist() == \
        [1, 2, 2, 2, 2, 1]                           # 3 and 0 would be a third distinct action


def test_greedy_plan_is_deterministic_row_independent_and_cache_safe():
    gen = torch.Generator().manual_seed(7)
    p = _policy(gen, hidden=8)
    q = QHead(SPACE, p.state_dim).double()
    with torch.no_grad():
        q.net.weight.normal_(generator=gen)
    feats = torch.randn(4, 10, D, generator=gen, dtype=torch.float64)
    kw = dict(switch_cost=0.1, tau=0.05, q_fn=q, max_plan_length=3)
    actions, lp, _ = plan(p, feats, **kw)
    again, lp2, _ = plan(p, feats, **kw)
    assert torch.equal(actions, again) and torch.equal(lp, lp2)
    assert len({tuple(a) for a in actions.reshape(-1, 3).tolist()}) > 1  # not a trivial plan
    for b in range(4):  # row b alone gives row b
        assert torch.equal(plan(p, feats[b:b + 1], **kw)[0][0], actions[b])
    for c in range(1, 10):  # a prefix of the chunks gives the prefix of the plan
        assert torch.equal(plan(p, feats[:, :c], **kw)[0], actions[:, :c])
    changed = feats.clone()
    changed[:, 6:] = torch.randn(4, 4, D, generator=gen, dtype=torch.float64)
    assert torch.equal(plan(p, changed, **kw)[0][:, :6], actions[:, :6])


def test_plan_single_chunk_and_errors():
    gen = torch.Generator().manual_seed(8)
    p = _policy(gen)
    feats = torch.randn(2, 1, D, generator=gen, dtype=torch.float64)
    actions, lp, stats = plan(p, feats, switch_cost=0.0, tau=0.0)
    assert actions.shape == (2, 1, 3) and lp.shape == (2, 1)
    assert stats.switch_rate.eq(0).all() and stats.plan_length.eq(1).all()
    feats = torch.randn(2, 3, D, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_plan_length"):
        plan(p, feats, switch_cost=0.0, tau=0.0, max_plan_length=0)
    with pytest.raises(ValueError, match="switch_cost"):
        plan(p, feats, switch_cost=-1.0, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        plan(p, feats, switch_cost=0.0, tau=-0.5)
    with pytest.raises(ValueError, match="q_fn"):
        plan(p, feats, switch_cost=0.1, tau=0.0)
    with pytest.raises(ValueError, match="q_fn"):
        plan(p, feats, switch_cost=0.1, tau=0.0, q_fn=lambda s, a: torch.zeros(3))
    with pytest.raises(ValueError, match="features"):
        plan(p, feats[0], switch_cost=0.0, tau=0.0)
    bad = feats.clone()
    bad[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="features"):
        plan(p, bad, switch_cost=0.0, tau=0.0)
    with pytest.raises(TypeError, match="policy"):
        plan(nn.Linear(2, 2), feats, switch_cost=0.0, tau=0.0)


# ---------------------------------------------------------------- composition

def test_composition_sets_the_control_fields():
    engine = CompositionEngine(SPACE, tau=0.5)
    assert engine.tau == 0.5
    actions = torch.tensor([[[0, 2, 1], [1, 0, 0], [4, 2, 1]], [[3, 1, 0], [0, 0, 0], [2, 1, 1]]])
    ctrl = ChunkControl(torch.zeros(2, 3, 8, dtype=torch.float64),
                        torch.arange(130).div(64, rounding_mode="floor").expand(2, 130),
                        head_temperature=torch.ones(2, 1))
    out = engine.apply(ctrl, actions)
    assert out.experts.tolist() == [[-1, 0, 3], [2, -1, 1]]
    assert out.rank_budget.tolist() == [[2, 2, 8], [4, 2, 4]]
    assert out.delta_scale.tolist() == [[0.5, 0.5, 1.0], [0.5, 0.5, 1.0]]
    assert out.experts.dtype == out.rank_budget.dtype == torch.int64
    assert out.delta_scale.dtype == torch.float64
    assert out.features is ctrl.features and out.head_temperature is ctrl.head_temperature
    assert ctrl.experts is None  # a copy; the input is unchanged
    e, k, s = engine.fields(actions, dtype=torch.float16)
    assert torch.equal(e, out.experts) and s.dtype == torch.float16


def test_composition_errors():
    with pytest.raises(ValueError, match="tau"):
        CompositionEngine(SPACE, tau=0.0)
    with pytest.raises(TypeError, match="action_space"):
        CompositionEngine({"num_experts": 2})
    engine = CompositionEngine(SPACE)
    ctrl = ChunkControl(torch.zeros(2, 3, 8), torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="actions"):
        engine.apply(ctrl, torch.zeros(2, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="actions"):
        engine.apply(ctrl, torch.full((2, 3, 3), 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="actions"):
        engine.apply(ctrl, torch.zeros(2, 3, 3))
    with pytest.raises(TypeError, match="control"):
        engine.apply("ctrl", torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="actions"):
        engine.fields(torch.zeros(3, 3, dtype=torch.int64))


def test_composition_gathers_projection_stats():
    class Layer(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.projection_stats = ProjectionStats()
            self.projection_stats.record(torch.tensor([factor, 1.0]))

    class Method(nn.Module):
        def projection_stats(self):
            s = ProjectionStats()
            s.record(torch.tensor([0.2]), "inner")
            return s

    model = nn.Sequential(Layer(0.5), nn.Sequential(Layer(1.0), Method()), nn.Linear(2, 2))
    d = CompositionEngine(SPACE).projection_stats(model).to_dict()
    assert sorted(d["per_layer"]) == ["0", "1.0", "1.1.inner"]
    assert d["evaluations"] == 5 and d["projected"] == 2
    assert d["layers_affected"] == ["0", "1.1.inner"] and d["min_factor"] == pytest.approx(0.2)
    bad = nn.Module()
    bad.projection_stats = 3
    with pytest.raises(TypeError, match="projection_stats"):
        CompositionEngine(SPACE).projection_stats(bad)
