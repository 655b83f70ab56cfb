"""V4 residual FiLM: identity at init, the formula, smooth bounds that hold for any parameters
while passing gradients, output-width inference and bad arguments."""
import pytest
import torch
from torch import nn

from bem.modules import ChunkControl, ResidualFiLM, use_control
from helpers import assert_grads_match_finite_differences

D, D_CTRL = 13, 7


def _mlp():
    return nn.Sequential(nn.Linear(D, 29), nn.GELU(), nn.Linear(29, D)).double()


def test_identity_formula_bounds_gradients():
    gen = torch.Generator().manual_seed(1)
    sub = _mlp()
    m = ResidualFiLM(sub, d_ctrl=D_CTRL, gamma_bound=0.3, beta_bound=0.2)
    assert m.dim == D
    x = torch.randn(2, 140, D, generator=gen, dtype=torch.float64)
    ctrl = ChunkControl(torch.randn(2, 3, D_CTRL, generator=gen, dtype=torch.float64),
                        torch.arange(140).expand(2, 140) // 64)
    with use_control(ctrl):
        torch.testing.assert_close(m(x), sub(x), rtol=0, atol=0)
        with torch.no_grad():
            for p in (m.hidden.weight, m.out.weight, m.out.bias):
                p.normal_(0, 30.0, generator=gen)       # saturate the bounds
        y = m(x)
    gamma, beta = m.modulation(ctrl.features)
    torch.testing.assert_close(y, ctrl.per_token(gamma) * sub(x) + ctrl.per_token(beta),
                               rtol=1e-12, atol=1e-12)
    assert bool(((gamma - 1).abs() <= 0.3 + 1e-12).all() and (beta.abs() <= 0.2).all())
    with torch.no_grad():
        m.out.weight.normal_(0, 0.1, generator=gen)
    w = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def loss():
        with use_control(ctrl):
            return (m(x) * w).sum()
    assert_grads_match_finite_differences(loss, dict(m.named_parameters()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma_bound"):
        ResidualFiLM(_mlp(), d_ctrl=3, gamma_bound=1.0)
    with pytest.raises(ValueError, match="beta_bound"):
        ResidualFiLM(_mlp(), d_ctrl=3, beta_bound=0)
    with pytest.raises(TypeError, match="dim="):
        ResidualFiLM(nn.GELU(), d_ctrl=3)
    m = ResidualFiLM(_mlp(), d_ctrl=3, dim=D)
    with pytest.raises(RuntimeError, match="controls"):
        m(torch.zeros(1, 2, D, dtype=torch.float64))
    wrong = ResidualFiLM(_mlp(), d_ctrl=3, dim=D + 1)
    with pytest.raises(ValueError, match="sublayer"):
        wrong(torch.zeros(1, 2, D, dtype=torch.float64))
