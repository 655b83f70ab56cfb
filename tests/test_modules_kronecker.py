"""V3 Kronecker adapter against torch.kron: the spectral clamp (forward and projection, within
1e-3), identity at init, gradients, merge, factorisation and bad arguments."""
import pytest
import torch
from torch import nn

from bem.modules import KroneckerAdapter
from bem.modules.kronecker import near_square_factors
from helpers import assert_grads_match_finite_differences


def _exact_norm(m):
    n = lambda t: torch.linalg.matrix_norm(t.detach().double(), ord=2)  # noqa: E731
    return float(n(m.kron_A) * n(m.kron_B))


def test_factors():
    assert near_square_factors(4096) == (64, 64)
    assert near_square_factors(90) == (9, 10)
    assert near_square_factors(13) == (1, 13)


@pytest.mark.parametrize("budget", [0.05, 100.0])
def test_formula_clamp_and_gradients(budget):
    gen = torch.Generator().manual_seed(4)
    base = nn.Linear(35, 22).double()
    m = KroneckerAdapter(base, out_factors=(2, 11), in_factors=(5, 7), budget=budget, scale=0.7)
    x = torch.randn(3, 8, 35, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)       # identity at init
    with torch.no_grad():
        m.kron_B.normal_(generator=gen)
    sigma = _exact_norm(m)
    c = min(1.0, budget / sigma)
    y = m(x)
    want = base(x) + 0.7 * c * x @ torch.kron(m.kron_A, m.kron_B).T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    applied = torch.linalg.matrix_norm(m.delta_weight().detach() / 0.7, ord=2).item()
    assert applied <= budget * (1 + 1e-3)
    # The clamp factor c is a constant in the backward (a float from an SVD of detached factors):
    # the gradient is the one of the formula with c frozen, which is the true one when c = 1.
    def frozen():
        return (base(x) + 0.7 * c * x @ torch.kron(m.kron_A, m.kron_B).T).square().sum()
    assert_grads_match_finite_differences(lambda: m(x).square().sum(),
                                          {"kron_A": m.kron_A, "kron_B": m.kron_B, "x": x},
                                          differenced_fn=frozen if c < 1 else None)
    after = m.project_()
    assert after <= budget * (1 + 1e-3) and _exact_norm(m) <= budget * (1 + 1e-3)
    if sigma > budget:
        assert abs(after - budget) <= 1e-3 * budget


def test_merge_equals_forward():
    gen = torch.Generator().manual_seed(9)
    base = nn.Linear(24, 20).double()
    m = KroneckerAdapter(base, budget=0.3)
    with torch.no_grad():
        m.kron_B.normal_(generator=gen)
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(m.merged_base()(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw,match", [({"out_factors": (3, 7)}, "out_factors"),
                                      ({"in_factors": (2,)}, "in_factors"),
                                      ({"in_factors": (0, 35)}, "in_factors"),
                                      ({"budget": 0.0}, "budget"), ({"scale": float("nan")}, "scale")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        KroneckerAdapter(nn.Linear(35, 22), **kw)


def test_clamp_factor_follows_every_weight_change(monkeypatch):
    """The clamp factor is cached per weight version: repeated forwards do no SVD, and any change
    of A or B (in place, optimizer step, load_state_dict, a new Parameter) recomputes it."""
    torch.manual_seed(5)
    m = KroneckerAdapter(nn.Linear(12, 6).double(), budget=0.5)
    with torch.no_grad():
        m.kron_B.normal_()
    calls = []
    real = KroneckerAdapter.spectral_norm
    monkeypatch.setattr(KroneckerAdapter, "spectral_norm",
                        lambda self: calls.append(1) or real(self))
    x = torch.randn(4, 12, dtype=torch.float64)
    for _ in range(3):
        m(x)
    assert len(calls) == 1

    def check():
        assert m.clamp_factor() == pytest.approx(min(1.0, 0.5 / _exact_norm(m)), rel=1e-12)

    with torch.no_grad():
        m.kron_A.mul_(3.0)
    check()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).sum().backward()
    opt.step()
    check()
    state = {k: v * 0.1 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    check()
    m.kron_B = nn.Parameter(torch.randn(m.kron_B.shape, dtype=torch.float64) * 4)
    check()
    n = len(calls)
    m(x)
    assert len(calls) == n
