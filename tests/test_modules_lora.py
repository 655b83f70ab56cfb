"""Static LoRA (the baseline) against its pure-torch formula: routing per chunk, gradients,
identity at init, merge, bad arguments."""
import pytest
import torch
from torch import nn

from bem.modules import ChunkControl, LoRA, use_control
from helpers import assert_grads_match_finite_differences

D_IN, D_OUT = 23, 17


def _control(B, T, E, gen):
    C = (T - 1) // 64 + 1
    pos = torch.arange(T).expand(B, T)
    experts = torch.randint(-1, E, (B, C), generator=gen)
    return ChunkControl(torch.randn(B, C, 8, generator=gen, dtype=torch.float64), pos // 64, experts)


def _randomise(m, gen):
    with torch.no_grad():
        for p in (m.lora_A, m.lora_B):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("E", [1, 3])
def test_matches_formula_and_gradients(E):
    gen = torch.Generator().manual_seed(11)
    base = nn.Linear(D_IN, D_OUT).double()
    m = LoRA(base, rank=5, alpha=7.0, num_experts=E)
    _randomise(m, gen)
    B, T = 2, 131
    x = torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    ctrl = _control(B, T, E, gen)
    with use_control(ctrl):
        y = m(x)
    e = ctrl.per_token(ctrl.experts)          # −1 turns the adapter off, for E = 1 too
    want = base(x)
    for b in range(B):
        for t in range(T):
            if e[b, t] >= 0:
                want[b, t] = want[b, t] + 7.0 / 5 * m.lora_B[e[b, t]] @ (m.lora_A[e[b, t]] @ x[b, t])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)

    def loss():
        with use_control(ctrl):
            return m(x).square().sum()
    assert_grads_match_finite_differences(loss, {"lora_A": m.lora_A, "lora_B": m.lora_B, "x": x})


def test_identity_at_init_and_merge():
    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(D_IN, D_OUT).double()
    x = torch.randn(3, 9, D_IN, generator=gen, dtype=torch.float64)
    before = base(x)
    m = LoRA(base, rank=4)
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)
    _randomise(m, gen)
    y = m(x)
    merged = m.merged_base()
    torch.testing.assert_close(merged(x), y, rtol=1e-12, atol=1e-12)


def test_routed_needs_controls_and_cannot_merge():
    m = LoRA(nn.Linear(D_IN, D_OUT).double(), rank=2, num_experts=2)
    with pytest.raises(RuntimeError, match="controls"):
        m(torch.zeros(1, 3, D_IN, dtype=torch.float64))
    with pytest.raises(TypeError, match="merge"):
        m.delta_weight()


@pytest.mark.parametrize("kw,match", [({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"),
                                      ({"num_experts": 0}, "num_experts"), ({"rank": 2.5}, "rank")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRA(nn.Linear(4, 4), **kw)


def test_bad_base_and_input():
    with pytest.raises(TypeError, match="base"):
        LoRA(nn.Conv2d(3, 3, 1))
    m = LoRA(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="last dimension 4"):
        m(torch.zeros(2, 5))
