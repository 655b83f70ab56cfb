"""PT1 head gating against its formula: identity at init, gates per chunk and head group,
temperatures (from a chunk on), gradients, bad arguments."""
import pytest
import torch
from torch import nn

from bem.modules import ChunkControl, HeadGating, use_control
from helpers import assert_grads_match_finite_differences

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
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)

    def loss():
        with use_control(ctrl):
            return (m(x) * w).sum()
    assert_grads_match_finite_differences(loss, {"gate_proj.weight": m.gate_proj.weight,
                                                 "gate_proj.bias": m.gate_proj.bias, "x": x})


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


def test_temperature_from_chunk_matches_reference():
    """Row b's temperature applies to chunks c >= temperature_from_chunk[b] only (1 before)."""
    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(H * DH, 4).double()
    m = HeadGating(base, num_heads=H, d_ctrl=D_CTRL, num_groups=3)
    with torch.no_grad():
        m.gate_proj.weight.normal_(generator=gen)
    B, T = 3, 200                                         # chunks 0..3
    temp = (torch.rand(B, 3, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    from_chunk = torch.tensor([0, 2, 5])                  # row 2: no chunk shaped
    ctrl = ChunkControl(torch.randn(B, 4, D_CTRL, generator=gen, dtype=torch.float64),
                        torch.arange(T).expand(B, T) // 64, None, temp,
                        temperature_from_chunk=from_chunk)
    x = torch.randn(B, T, H * DH, generator=gen, dtype=torch.float64)
    with use_control(ctrl):
        y = m(x)
    z = m.gate_proj(ctrl.features)
    ref = torch.stack([torch.stack([1 + 0.5 * torch.tanh(z[b, c] / temp[b]) if c >= from_chunk[b]
                                    else 1 + 0.5 * torch.tanh(z[b, c]) for c in range(4)])
                       for b in range(B)])
    g = ctrl.per_token(ref).repeat_interleave(H * DH // 3, dim=-1)
    torch.testing.assert_close(y, base(x * g), rtol=1e-12, atol=1e-12)
    f = ctrl.features
    torch.testing.assert_close(m.gates(f, temp, torch.zeros(B, dtype=torch.int64)), m.gates(f, temp),
                               rtol=0, atol=0)
    torch.testing.assert_close(m.gates(f, temp, torch.full((B,), 4)), m.gates(f, None),
                               rtol=0, atol=0)
    y.sum().backward()
    assert bool((temp.grad[:2].abs().sum(-1) > 0).all()) and not temp.grad[2].any()
    for bad in (from_chunk.double(), from_chunk[:2], from_chunk[:, None]):
        with pytest.raises(ValueError, match="temperature_from_chunk"):
            m.gates(f, temp, bad)


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
