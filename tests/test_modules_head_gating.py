"""PT1 head gating against its formula: identity at init, gates per chunk and head group,
temperatures, gradients, bad arguments."""
import pytest
import torch
from torch import nn

from bem.modules import ChunkControl, HeadGating, use_control

H, DH, D_CTRL = 6, 5, 9


def _ctrl(B, T, gen, temp=None):
    C = (T - 1) // 64 + 1
    return ChunkControl(torch.randn(B, C, D_CTRL, generator=gen, dtype=torch.float64),
                        torch.arange(T).expand(B, T) // 64, None, temp)


@pytest.mark.parametrize("groups", [6, 3, 1])
def test_formula_identity_and_gradients(groups):
    gen = torch.Generator().manual_seed(groups)
    base = nn.Linear(H * DH, 7).double()
    m = HeadGating(base, num_heads=H, d_ctrl=D_CTRL, num_groups=groups, bound=0.4)
    x = torch.randn(2, 100, H * DH, generator=gen, dtype=torch.float64, requires_grad=True)
    ctrl = _ctrl(2, 100, gen)
    with use_control(ctrl):
        torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)     # identity at init
        with torch.no_grad():
            m.gate_proj.weight.normal_(generator=gen)
        y = m(x)
    z = m.gate_proj(ctrl.per_token(ctrl.features))
    g = (1 + 0.4 * torch.tanh(z)).repeat_interleave(H * DH // groups, dim=-1)
    torch.testing.assert_close(y, base(x * g), rtol=1e-12, atol=1e-12)
    assert bool((g > 0.6).all() and (g < 1.4).all())
    y.sum().backward()
    assert m.gate_proj.weight.grad.abs().sum() > 0 and m.gate_proj.bias.grad.abs().sum() > 0


def test_temperature_divides_logits():
    gen = torch.Generator().manual_seed(2)
    m = HeadGating(nn.Linear(H * DH, 4).double(), num_heads=H, d_ctrl=D_CTRL, num_groups=3)
    with torch.no_grad():
        m.gate_proj.weight.normal_(generator=gen)
    f = torch.randn(2, 2, D_CTRL, generator=gen, dtype=torch.float64)
    temp = torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.1
    z = m.gate_proj(f)
    torch.testing.assert_close(m.gates(f, temp), 1 + 0.5 * torch.tanh(z / temp[:, None]))
    with pytest.raises(ValueError, match="head_temperature"):
        m.gates(f, temp[:, :2])


def test_bad_arguments():
    lin = nn.Linear(12, 4)
    with pytest.raises(ValueError, match="divide"):
        HeadGating(lin, num_heads=4, d_ctrl=3, num_groups=3)
    with pytest.raises(ValueError, match="divide"):
        HeadGating(lin, num_heads=5, d_ctrl=3)
    with pytest.raises(ValueError, match="bound"):
        HeadGating(lin, num_heads=4, d_ctrl=3, bound=1.0)
    m = HeadGating(lin, num_heads=4, d_ctrl=3)
    with pytest.raises(ValueError, match="last dimension"):
        m(torch.zeros(1, 2, 8))
    with pytest.raises(RuntimeError, match="controls"):
        m(torch.zeros(1, 2, 12))
