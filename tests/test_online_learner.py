"""bem.online learner pieces: the per-sample Fisher against a hand-computed one on a tiny model,
EWC (separate and online) and proximal penalties by gradcheck and closed form, the replay buffer,
and OnlineLearner — learning, limits, bit-identical state round trips, and bad input that never
touches the live adapter."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bem.online import EWC, OnlineLearner, ProximalAnchor, ReplayBuffer, per_sample_fisher


class TinyAdapted(nn.Module):
    """A frozen linear 'base' plus a trainable low-rank 'adapter': logits = (W + B A) x + b."""

    def __init__(self, d_in=5, classes=3, rank=2, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(classes, d_in, generator=g, dtype=dtype),
                              requires_grad=False)
        self.A = nn.Parameter(torch.randn(rank, d_in, generator=g, dtype=dtype) * 0.5)
        self.B = nn.Parameter(torch.randn(classes, rank, generator=g, dtype=dtype) * 0.5)

    def forward(self, x):
        return x @ (self.W + self.B @ self.A).T


def item_loss(model, items):
    x = torch.stack([torch.as_tensor(i[0], dtype=model.W.dtype) for i in items])
    y = torch.tensor([i[1] for i in items])
    return F.cross_entropy(model(x), y, reduction="none")


def make_items(n, seed, shift=0.0, d_in=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) + shift
    y = (x[:, 0] + x[:, 1] > 2 * shift).long() + (x[:, 2] > shift).long()
    return [(x[i], int(y[i])) for i in range(n)]


# ---- Fisher ----------------------------------------------------------------------------------
def test_per_sample_fisher_matches_hand_computed_logistic_regression():
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(7, 4, dtype=torch.float64)
    ys = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    fisher = per_sample_fisher({"W": W, "b": b},
                               lambda i: F.cross_entropy((xs[i] @ W.T + b)[None], ys[i:i + 1]),
                               list(range(7)))
    # d(-log softmax_y)/d logits = p - e_y; dW = (p - e_y) x^T, db = p - e_y, per sample.
    with torch.no_grad():
        p = torch.softmax(xs @ W.T + b, dim=1)
        r = p - F.one_hot(ys, 3).double()
        fw = (r[:, :, None] * xs[:, None, :]).square().mean(0)
        fb = r.square().mean(0)
        batch_mean_sq = (r[:, :, None] * xs[:, None, :]).mean(0).square()
    torch.testing.assert_close(fisher["W"], fw, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fisher["b"], fb, rtol=1e-12, atol=1e-14)
    # Not the square of the batch-mean gradient (the common mistake):
    assert (fisher["W"] - batch_mean_sq).abs().max() > 1e-3


def test_per_sample_fisher_bad_input():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="samples"):
        per_sample_fisher({"w": w}, lambda s: w.sum(), [])
    with pytest.raises(ValueError, match="nll: non-finite"):
        per_sample_fisher({"w": w}, lambda s: w.sum() * float("nan"), [0])
    with pytest.raises(ValueError, match="nll: expected a scalar"):
        per_sample_fisher({"w": w}, lambda s: w * 2, [0])


# ---- penalties -------------------------------------------------------------------------------
def test_ewc_penalty_gradcheck_and_closed_form_both_modes():
    torch.manual_seed(1)
    shapes = {"a": (3, 2), "b": (4,)}
    t1 = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    t2 = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    f1 = {k: torch.rand(s, dtype=torch.float64) for k, s in shapes.items()}
    f2 = {k: torch.rand(s, dtype=torch.float64) for k, s in shapes.items()}
    lam, gamma = 0.7, 0.6
    sep, onl = EWC(lam, "separate"), EWC(lam, "online", gamma=gamma)
    for e in (sep, onl):
        e.consolidate(t1, f1)
        e.consolidate(t2, f2)
    theta = {k: torch.randn(s, dtype=torch.float64, requires_grad=True) for k, s in shapes.items()}
    expected_sep = 0.5 * lam * sum((f1[k] * (theta[k] - t1[k]) ** 2).sum() +
                                   (f2[k] * (theta[k] - t2[k]) ** 2).sum() for k in shapes)
    expected_onl = 0.5 * lam * sum(((gamma * f1[k] + f2[k]) * (theta[k] - t2[k]) ** 2).sum()
                                   for k in shapes)
    torch.testing.assert_close(sep.penalty(theta), expected_sep)
    torch.testing.assert_close(onl.penalty(theta), expected_onl)
    for e in (sep, onl):
        assert torch.autograd.gradcheck(lambda a, b: e.penalty({"a": a, "b": b}),
                                        (theta["a"], theta["b"]))
    g = torch.autograd.grad(onl.penalty(theta), [theta["a"]])[0]
    torch.testing.assert_close(g, lam * (gamma * f1["a"] + f2["a"]) * (theta["a"] - t2["a"]).detach())


def test_prox_penalty_gradcheck():
    torch.manual_seed(2)
    anchor = {"w": torch.randn(3, 3, dtype=torch.float64)}
    prox = ProximalAnchor(0.3)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert float(prox.penalty({"w": w})) == 0.0
    prox.set_anchor(anchor)
    torch.testing.assert_close(prox.penalty({"w": w}), 0.15 * ((w - anchor["w"]) ** 2).sum())
    assert torch.autograd.gradcheck(lambda x: prox.penalty({"w": x}), (w,))


def test_ewc_rejects_mismatched_shapes_and_bad_fisher():
    e = EWC(1.0, "online")
    p = {"a": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"fisher\['a'\]: expected shape"):
        e.consolidate(p, {"a": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="fisher"):
        e.consolidate(p, {"a": torch.full((2, 3), -1.0)})
    e.consolidate(p, {"a": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"params\['a'\]: expected shape"):
        e.penalty({"a": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="mode"):
        EWC(1.0, "rolling")
    with pytest.raises(ValueError, match="gamma"):
        EWC(1.0, gamma=1.5)


# ---- replay ----------------------------------------------------------------------------------
def test_replay_reservoir_is_uniform_and_round_trips():
    counts = torch.zeros(100)
    for seed in range(200):
        buf = ReplayBuffer(10, seed=seed)
        buf.add(list(range(100)))
        assert len(buf) == 10 and buf.seen == 100
        counts[buf.items] += 1
    # Each item is kept with probability 0.1: 20 expected per item over 200 runs.
    assert counts.mean() == 20 and counts.min() >= 5 and counts.max() <= 40
    buf = ReplayBuffer(5, seed=3)
    buf.add(list(range(30)))
    twin = ReplayBuffer(5)
    twin.load_state_dict(json.loads(json.dumps(buf.state_dict(lambda v: v))), lambda v: v)
    assert twin.sample(3) == buf.sample(3) and twin.items == buf.items


# ---- learner ---------------------------------------------------------------------------------
def _state(learner):
    return ({k: p.detach().clone() for k, p in learner.params.items()},
            json.dumps(learner.optimizer.state_dict()["param_groups"], sort_keys=True),
            {(i, k): v.clone() for i, s in learner.optimizer.state_dict()["state"].items()
             for k, v in s.items()})


def _assert_same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_learner_learns_and_respects_limits():
    model = TinyAdapted()
    learner = OnlineLearner(model, item_loss, lr=0.05, steps_per_update=2)
    items = make_items(64, 0)
    before = float(item_loss(model, items).mean().detach())
    for k in range(10):
        r = learner.update(items[k * 6:(k + 1) * 6])
        assert r.steps == 2 and r.loss > 0
    assert float(item_loss(model, items).mean()) < before
    assert learner.n_updates == 10 and learner.items_seen == 60
    assert not model.W.requires_grad                  # the base stays frozen
    limited = OnlineLearner(TinyAdapted(), item_loss, lr=1.0, max_update_norm=0.01)
    start = {k: p.detach().clone() for k, p in limited.params.items()}
    r = limited.update(items[:8])
    moved = sum(float((p - start[k]).square().sum()) for k, p in limited.params.items()) ** 0.5
    assert r.limited and moved == pytest.approx(0.01, rel=1e-4)


def test_learner_bad_input_never_corrupts_the_adapter():
    model = TinyAdapted()
    learner = OnlineLearner(model, item_loss, lr=0.05, ewc=EWC(1.0))
    items = make_items(16, 1)
    learner.update(items[:8])
    before = _state(learner)
    with pytest.raises(ValueError, match="batch: expected at least one"):
        learner.update([])
    with pytest.raises(ValueError, match="weights: feedback weight nan at index 2"):
        learner.update(items[:4], weights=[1.0, 1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="weights: expected 4 feedback weights"):
        learner.update(items[:4], weights=[1.0, 1.0])
    poisoned = items[:3] + [(torch.full((5,), float("nan")), 0)]
    with pytest.raises(ValueError, match="loss_fn: non-finite per-item loss"):
        learner.update(poisoned)
    with pytest.raises(TypeError, match="batch"):
        learner.update("not a batch")
    _assert_same(before, _state(learner))
    assert learner.n_updates == 1
    learner.promote(items[:4])
    with pytest.raises(ValueError, match=r"params\['A'\]: expected shape"):
        learner.ewc.consolidate({"A": torch.zeros(3, 5), "B": model.B.detach()},
                                {"A": torch.zeros(3, 5), "B": torch.zeros_like(model.B)})


def test_learner_state_round_trip_is_bit_identical_and_continues_identically():
    items = make_items(80, 2)
    a = OnlineLearner(TinyAdapted(), item_loss, lr=0.03, ewc=EWC(0.5, "online", 0.9),
                      prox_mu=0.1, replay=ReplayBuffer(16, seed=1), replay_batch=3)
    for k in range(4):
        a.update(items[k * 8:(k + 1) * 8])
    a.promote(items[:12])
    a.update(items[32:40])
    tensors, doc = a.state_dict(encode_item=lambda it: [it[0].tolist(), it[1]])
    doc = json.loads(json.dumps(doc))
    b = OnlineLearner(TinyAdapted(seed=9), item_loss, lr=0.03, ewc=EWC(0.5, "online", 0.9),
                      prox_mu=0.1, replay=ReplayBuffer(16), replay_batch=3)
    b.model.W.data.copy_(a.model.W.data)
    b.load_state_dict({k: v.clone() for k, v in tensors.items()}, doc,
                      decode_item=lambda v: (torch.tensor(v[0]), v[1]))
    _assert_same(_state(a), _state(b))
    for k in range(5, 9):
        a.update(items[k * 8:(k + 1) * 8])
        b.update(items[k * 8:(k + 1) * 8])
    _assert_same(_state(a), _state(b))


def test_learner_load_refuses_mismatched_adapter_and_leaves_it_unchanged():
    a = OnlineLearner(TinyAdapted(rank=2), item_loss)
    a.update(make_items(8, 3))
    tensors, doc = a.state_dict()
    b = OnlineLearner(TinyAdapted(rank=3), item_loss)
    b.update(make_items(8, 4))
    before = _state(b)
    with pytest.raises(ValueError, match=r"state: param\.\*\['A'\]: expected shape \(3, 5\)"):
        b.load_state_dict(tensors, doc)
    bad = dict(tensors)
    bad["param.A"] = torch.full_like(bad["param.A"], float("nan"))
    c = OnlineLearner(TinyAdapted(rank=2), item_loss)
    with pytest.raises(ValueError, match="non-finite"):
        c.load_state_dict(bad, doc)
    with pytest.raises(ValueError, match="not a bem.online-learner"):
        c.load_state_dict(tensors, {"format": "other"})
    _assert_same(before, _state(b))


def test_ewc_reduces_forgetting_on_a_toy_task_sequence():
    def run(lam):
        torch.manual_seed(0)
        model = TinyAdapted(seed=5)
        learner = OnlineLearner(model, item_loss, lr=0.1, ewc=EWC(lam, "online"))
        task_a = make_items(96, 10)
        # Task B relabels the same kind of inputs: learning it overwrites task A.
        task_b = [(x, (y + 1) % 3) for x, y in make_items(96, 11)]
        for k in range(60):
            learner.update(task_a[(k * 8) % 96:(k * 8) % 96 + 8])
        loss_a = float(item_loss(model, task_a).mean())
        learner.promote(task_a[:48])
        for k in range(60):
            learner.update(task_b[(k * 8) % 96:(k * 8) % 96 + 8])
        return (float(item_loss(model, task_a).mean()) - loss_a,
                float(item_loss(model, task_b).mean()))
    forgetting_plain, b_plain = run(0.0)
    forgetting_ewc, b_ewc = run(1.0)
    assert forgetting_plain > 1.0                      # the sequence does forget without EWC
    assert forgetting_ewc < 0.25 * forgetting_plain    # measured: 0.28 vs 1.69
    assert b_ewc < 1.2                                 # and still learns task B (from ~2.3)


def test_consolidate_only_where_asked_and_state_dict_is_a_snapshot():
    model = TinyAdapted()
    learner = OnlineLearner(model, item_loss, lr=0.05, ewc=EWC(1.0, "separate"))
    items = make_items(16, 7)
    learner.update(items[:8])
    learner.promote()                      # release: proximal anchor only, no EWC term
    assert learner.ewc.terms == []
    learner.consolidate(items[:4])         # a task ended
    assert len(learner.ewc.terms) == 1
    learner.promote(items[4:8])            # promote with samples still consolidates
    assert len(learner.ewc.terms) == 2
    with pytest.raises(ValueError, match="samples: expected at least one"):
        learner.consolidate([])
    with pytest.raises(TypeError, match="samples"):
        learner.consolidate("abc")
    tensors, _ = learner.state_dict()
    frozen = {k: v.clone() for k, v in tensors.items()}
    learner.update(items[8:16])            # later updates leave the snapshot unchanged
    assert all(torch.equal(frozen[k], tensors[k]) for k in frozen)
    assert not torch.equal(tensors["param.A"], model.A.detach())
