"""V1 dynamic-rank LoRA against a dense masked formula: exactly k components per chunk/token,
gates exactly 1 forward, the straight-through gradient reaching the predictor, bad arguments."""
import pytest
import torch
from torch import nn

from bem.modules import ChunkControl, DynamicRankLoRA, use_control
from helpers import assert_grads_match_finite_differences

D_IN, D_OUT, D_CTRL, R, K = 19, 13, 11, 7, 3


def _setup(mode, E, seed):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).double()
    m = DynamicRankLoRA(base, rank=R, active=K, alpha=5.0, d_ctrl=D_CTRL, mode=mode, num_experts=E)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen, dtype=torch.float64))
    B, T = 2, 150
    C = 3
    ctrl = ChunkControl(torch.randn(B, C, D_CTRL, generator=gen, dtype=torch.float64),
                        torch.arange(T).expand(B, T) // 64,
                        torch.randint(0, E, (B, C), generator=gen) if E > 1 else None)
    x = torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    return m, base, ctrl, x


@pytest.mark.parametrize("mode,E", [("chunk", 1), ("chunk", 3), ("token", 2)])
def test_matches_dense_masked_formula(mode, E):
    m, base, ctrl, x = _setup(mode, E, 5)
    with use_control(ctrl):
        y = m(x)
    src = ctrl.per_token(ctrl.features) if mode == "chunk" else x
    scores = m.predictor(src)
    top = scores.topk(K, dim=-1).indices
    mask = torch.zeros_like(scores).scatter_(-1, top, 1.0)
    assert int(mask.sum(-1).unique().item()) == K  # exactly k per token
    e = ctrl.per_token(ctrl.experts) if E > 1 else torch.zeros(x.shape[:2], dtype=torch.long)
    A, Bm = m.lora_A[e], m.lora_B[e]                      # (B, T, r, d_in), (B, T, d_out, r)
    h = torch.einsum("btri,bti->btr", A, x) * mask
    want = base(x) + 5.0 / R * torch.einsum("btor,btr->bto", Bm, h)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    if mode == "chunk":   # one mask per chunk
        assert torch.equal(mask[:, :64], mask[:, :1].expand(-1, 64, -1))


@pytest.mark.parametrize("mode", ["chunk", "token"])
def test_ar1_rank_budget_and_bias_scale(mode):
    """AR1's controls: a chunk's rank budget b keeps the first min(b, k) of the top-k components
    (score order), its bias scale multiplies the delta, expert −1 turns the module off."""
    import dataclasses

    m, base, ctrl, x = _setup(mode, 3, 11)
    budget = torch.tensor([[1, 3, 2], [5, 1, 1]])
    scale = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.25, 0.5]], dtype=torch.float64)
    experts = ctrl.experts.clone()
    experts[1, 2] = -1
    ctrl = dataclasses.replace(ctrl, experts=experts, rank_budget=budget, delta_scale=scale)
    with use_control(ctrl):
        y = m(x)
    src = ctrl.per_token(ctrl.features) if mode == "chunk" else x
    top = m.predictor(src).topk(K, dim=-1).indices                       # (B, T, K) by score
    keep = torch.arange(K) < ctrl.per_token(budget).clamp(max=K)[..., None]
    mask = torch.zeros(*x.shape[:2], R, dtype=torch.float64).scatter_(-1, top, keep.double())
    e = ctrl.per_token(experts)
    A, Bm = m.lora_A[e.clamp(min=0)], m.lora_B[e.clamp(min=0)]
    h = torch.einsum("btri,bti->btr", A, x) * mask
    delta = 5.0 / R * torch.einsum("btor,btr->bto", Bm, h) * ctrl.per_token(scale)[..., None]
    want = base(x) + delta * (e >= 0)[..., None]
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["chunk", "token"])
def test_straight_through_reaches_predictor(mode):
    m, _, ctrl, x = _setup(mode, 1, 8)
    idx, gate = m.select(m.predictor(ctrl.features if mode == "chunk" else x))
    assert torch.equal(gate.detach(), torch.ones_like(gate))   # exactly 1 in the forward
    with use_control(ctrl):
        m(x).pow(2).sum().backward()
    # The predictor's gradient is a straight-through surrogate (top-k has none): it must reach it.
    for name, p in m.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    def loss():   # the selection does not depend on A and B: their gradient is the true one
        with use_control(ctrl):
            return m(x).pow(2).sum()
    assert_grads_match_finite_differences(loss, {"lora_A": m.lora_A, "lora_B": m.lora_B})


def test_bad_arguments():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="active"):
        DynamicRankLoRA(lin, rank=2, active=3, d_ctrl=4)
    with pytest.raises(ValueError, match="mode"):
        DynamicRankLoRA(lin, rank=2, active=1, d_ctrl=4, mode="block")
    with pytest.raises(ValueError, match="d_ctrl"):
        DynamicRankLoRA(lin, rank=2, active=1)
    m = DynamicRankLoRA(lin, rank=2, active=1, d_ctrl=4)
    with pytest.raises(RuntimeError, match="controls"):
        m(torch.zeros(1, 2, 4))
    ctrl = ChunkControl(torch.zeros(1, 1, 4), torch.zeros(1, 3, dtype=torch.long))
    with use_control(ctrl), pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.zeros(1, 2, 4))
