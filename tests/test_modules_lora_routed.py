"""Routed multi-expert LoRA with AR1's chunk controls (rank budget, bias scale) and the trust
region ‖ΔW‖_F ≤ τ, against a hand-written float64 reference that materialises every ΔW: outputs
(float64 reference path and float32 kernels), the plain path when nothing is composed, gradients
(gradcheck and the reference's autograd), projection statistics, bad options, and merging."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bem import ops
from bem.modules import ChunkControl, LoRA, use_control

D_IN, D_OUT, E, R, ALPHA = 59, 37, 3, 5, 10.0
SCALE = ALPHA / R
NB, T = 3, 70                      # odd length: 2 chunks of 64 per row, the second one partial
C = (T - 1) // 64 + 1
EXPERTS = torch.tensor([[0, 2], [-1, 1], [2, 0]])
BUDGETS = torch.tensor([[2, 7], [3, 1], [5, 4]])          # 7 > r: clamped to r
SCALES = torch.tensor([[1.0, 0.5], [2.0, 1.5], [0.7, 1.0]], dtype=torch.float64)


def _module(dtype=torch.float64, trust_region=None, seed=0, num_experts=E, rank=R):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                         # the base layer's init
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    m = LoRA(base, rank=rank, alpha=ALPHA, num_experts=num_experts, trust_region=trust_region)
    with torch.no_grad():
        m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen, dtype=torch.float64) * 0.3)
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen, dtype=torch.float64) * 0.3)
    return m


def _x(dtype=torch.float64, seed=1, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(NB, T, D_IN, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(
        requires_grad)


def _control(dtype=torch.float64, budgets=True, scales=True, experts=EXPERTS):
    pos = torch.arange(T).expand(NB, T)
    return ChunkControl(torch.zeros(NB, C, 4, dtype=dtype), pos // 64, experts.clone(),
                        rank_budget=BUDGETS.clone() if budgets else None,
                        delta_scale=SCALES.to(dtype) if scales else None)


def _delta_w(A, B, e, k, s):
    """scale·s·B_e[:, idx] A_e[idx] for the k components of largest ‖B_e[:, j]‖·‖A_e[j, :]‖,
    materialised in float64 (differentiable in A, B; the choice of components is not)."""
    A, B = A.double(), B.double()
    with torch.no_grad():
        importance = B[e].norm(dim=0) * A[e].norm(dim=1)
        idx = importance.argsort(descending=True)[:k]
    return SCALE * s * B[e][:, idx] @ A[e][idx]


def _reference(m, x, experts, budgets, scales, tau):
    """(delta (NB, T, d_out) float64, factors {(row, token): factor} of the routed tokens); one
    ΔW per chunk, since a chunk's tokens share its expert, budget and scale."""
    rows = []
    factors = {}
    for b in range(NB):
        parts = []
        for c in range(C):
            xs = x[b, c * 64:(c + 1) * 64].double()
            e = int(experts[b, c])
            if e < 0:
                parts.append(torch.zeros(xs.shape[0], D_OUT, dtype=torch.float64))
                continue
            k = min(int(budgets[b, c]), R) if budgets is not None else R
            s = float(scales[b, c]) if scales is not None else 1.0
            dw = _delta_w(m.lora_A, m.lora_B, e, k, s)
            f = torch.clamp(tau / torch.linalg.matrix_norm(dw), max=1.0) if tau else torch.ones(())
            n = xs.shape[0]
            factors.update({(b, t): float(f.detach()) for t in range(c * 64, c * 64 + n)})
            parts.append(f * (xs @ dw.T))
        rows.append(torch.cat(parts))
    return torch.stack(rows), factors


def _norms_used():
    """‖ΔW‖_F of every routed (expert, budget, scale) chunk of the controls, for choosing τ."""
    m = _module()
    return sorted(float(torch.linalg.matrix_norm(_delta_w(m.lora_A, m.lora_B, int(EXPERTS[b, c]),
                                                          min(int(BUDGETS[b, c]), R),
                                                          float(SCALES[b, c]))).detach())
                  for b in range(NB) for c in range(C) if EXPERTS[b, c] >= 0)


def _tau():
    """A radius between the routed deltas' norms: some chunks are projected, some are not."""
    n = _norms_used()
    return (n[len(n) // 2 - 1] * n[len(n) // 2]) ** 0.5


def test_lora_delta_supports_float64():
    """The float64 path (the pure-torch reference inside bem.ops) is what the exact checks use."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    A = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    ei = torch.tensor([0, 1, -1, 1, 0])
    y = ops.lora_delta(x, A, B, scale=0.5, expert_index=ei)
    assert y.dtype == torch.float64
    want = torch.stack([0.5 * B[e] @ A[e] @ x[t] if e >= 0 else torch.zeros(6, dtype=torch.float64)
                        for t, e in enumerate(ei.tolist())])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("budgets,scales", [(True, True), (True, False), (False, True),
                                            (False, False)])
def test_trust_region_rank_budget_and_scale_match_the_reference(budgets, scales):
    tau = _tau()
    m = _module(trust_region=tau)
    x = _x()
    ctrl = _control(budgets=budgets, scales=scales)
    with torch.no_grad(), use_control(ctrl):
        y = m(x)
    want, factors = _reference(m, x, EXPERTS, BUDGETS if budgets else None,
                               SCALES if scales else None, tau)
    torch.testing.assert_close(y, m.base_layer(x) + want, rtol=1e-10, atol=1e-12)
    if budgets and scales:   # the chosen τ projects some chunks and leaves others alone
        assert any(f < 1 for f in factors.values()) and any(f == 1 for f in factors.values())
    # Chunk 0 of row 1 has no adapter: its rows are the base layer's exactly.
    torch.testing.assert_close(y[1, :64], m.base_layer(x)[1, :64], rtol=0, atol=0)


def test_rank_budget_and_scale_without_trust_region():
    m = _module()
    x = _x()
    with torch.no_grad(), use_control(_control()):
        y = m(x)
    want, factors = _reference(m, x, EXPERTS, BUDGETS, SCALES, None)
    assert set(factors.values()) == {1.0}
    torch.testing.assert_close(y, m.base_layer(x) + want, rtol=1e-10, atol=1e-12)


def test_float32_kernels_match_the_float64_reference():
    """float32 runs bem's compiled kernel with rank gates; the reference is float64 on the same
    (float32-rounded) parameters. Tolerance: 1e-5 of the largest delta (fp32 accumulation over
    d_in = 59 and r = 5 terms, ~1e-6 relative, with margin)."""
    tau = _tau()
    m = _module(dtype=torch.float32, trust_region=tau)
    x = _x(torch.float32)
    with torch.no_grad(), use_control(_control(torch.float32)):
        y = m(x) - m.base_layer(x)
    want, factors = _reference(m, x, EXPERTS, BUDGETS, SCALES, tau)
    assert any(f < 1 for f in factors.values()) and any(f == 1 for f in factors.values())
    err = (y.double() - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err


def test_without_composition_equals_the_plain_multi_expert_path():
    m = _module()
    x = _x()
    ctrl = _control(budgets=False, scales=False)
    with torch.no_grad(), use_control(ctrl):
        y = m(x)
    e_tok = ctrl.token_experts()
    plain = ops.lora_delta(x.reshape(-1, D_IN), m.lora_A.detach(), m.lora_B.detach(), scale=SCALE,
                           expert_index=e_tok).reshape(NB, T, D_OUT)
    torch.testing.assert_close(y, m.base_layer(x) + plain, rtol=0, atol=0)
    want, _ = _reference(m, x, EXPERTS, None, None, None)
    torch.testing.assert_close(y, m.base_layer(x) + want, rtol=1e-10, atol=1e-12)
    # The composed path with a budget of r, scale 1 and an unreachable τ gives the same result.
    big = _module(trust_region=1e9)
    full = ChunkControl(ctrl.features, ctrl.token_chunk, ctrl.experts,
                        rank_budget=torch.full((NB, C), R),
                        delta_scale=torch.ones(NB, C, dtype=torch.float64))
    with torch.no_grad(), use_control(full):
        torch.testing.assert_close(big(x), y, rtol=1e-12, atol=1e-12)


def test_single_expert_trust_region_without_controls():
    """E = 1 needs no controls; with τ every token's delta is projected as one ΔW."""
    tau = 0.5
    m = _module(trust_region=tau, num_experts=1)
    x = _x()
    with torch.no_grad():
        y = m(x)
        dw = SCALE * m.lora_B[0] @ m.lora_A[0]
        f = min(1.0, tau / float(torch.linalg.matrix_norm(dw)))
    assert f < 1
    torch.testing.assert_close(y, m.base_layer(x) + f * x @ dw.T, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    """Analytic gradients (through the kernel's rank gates and the trust-region factor) against
    finite differences, on a tiny case with one projected and one unprojected chunk."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    m = LoRA(nn.Linear(6, 5).double(), rank=3, alpha=3.0, num_experts=2, trust_region=3.0)
    A0 = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64) * 0.5
    B0 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) * 0.5
    x = torch.randn(1, 70, 6, generator=gen, dtype=torch.float64)
    ctrl = ChunkControl(torch.zeros(1, 2, 4, dtype=torch.float64),
                        (torch.arange(70) // 64)[None], torch.tensor([[0, 1]]),
                        rank_budget=torch.tensor([[2, 3]]),
                        delta_scale=torch.tensor([[0.6, 1.3]], dtype=torch.float64))
    norms = [float(torch.linalg.matrix_norm(
        _delta_w_small(A0, B0, e, k, s))) for e, k, s in ((0, 2, 0.6), (1, 3, 1.3))]
    assert min(norms) < 3.0 < max(norms), norms   # one chunk projected, one not

    def f(A, B):
        with use_control(ctrl):
            return torch.func.functional_call(m, {"lora_A": A, "lora_B": B}, (x,))

    assert torch.autograd.gradcheck(f, (A0.requires_grad_(), B0.requires_grad_()), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def _delta_w_small(A, B, e, k, s):
    """_delta_w for the gradcheck module (its scale alpha / r is 1)."""
    importance = B[e].norm(dim=0) * A[e].norm(dim=1)
    idx = importance.argsort(descending=True)[:k]
    return s * B[e][:, idx] @ A[e][idx]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_gradients_match_the_reference_autograd(dtype, tol):
    """Gradients of A, B and x against the materialised reference's autograd (float32: relative
    to the largest gradient, the kernels accumulate in fp32)."""
    tau = _tau()
    m = _module(dtype=dtype, trust_region=tau)
    x = _x(dtype, requires_grad=True)
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(NB, T, D_OUT, generator=gen, dtype=torch.float64)
    with use_control(_control(dtype)):
        ((m(x) - m.base_layer(x)).double() * w).sum().backward()
    A = m.lora_A.detach().double().requires_grad_()
    B = m.lora_B.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    ref = torch.nn.Module()
    ref.lora_A, ref.lora_B = A, B
    want, _ = _reference(ref, xr, EXPERTS, BUDGETS, SCALES, tau)
    (want * w).sum().backward()
    for name, got, exp in (("lora_A", m.lora_A.grad, A.grad), ("lora_B", m.lora_B.grad, B.grad),
                           ("x", x.grad, xr.grad)):
        err = (got.double() - exp).abs().max().item()
        assert err <= tol * exp.abs().max().item(), (name, err)
    # Every expert is routed somewhere here, so each gets a gradient.
    assert all(m.lora_B.grad[e].abs().sum() > 0 for e in range(E))


def test_projection_stats_only_in_eval_mode():
    tau = _tau()
    m = _module(trust_region=tau)
    x = _x()
    _, factors = _reference(m, x, EXPERTS, BUDGETS, SCALES, tau)
    m.train()
    with torch.no_grad(), use_control(_control()):
        m(x)
    assert m.projection_stats.to_dict()["evaluations"] == 0
    m.eval()
    with torch.no_grad(), use_control(_control()):
        m(x)
    d = m.projection_stats.to_dict()
    routed = int((EXPERTS.repeat_interleave(64, dim=1)[:, :T] >= 0).sum())
    assert d["evaluations"] == routed == len(factors)
    projected = sum(f < 1 for f in factors.values())
    assert 0 < d["projected"] == projected < routed
    assert d["min_factor"] == pytest.approx(min(factors.values()), rel=1e-9)
    assert d["mean_factor"] == pytest.approx(
        sum(f for f in factors.values() if f < 1) / projected, rel=1e-9)
    m.projection_stats.reset()
    assert m.projection_stats.to_dict()["evaluations"] == 0


@pytest.mark.parametrize("tau", [0, 0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_trust_region(tau):
    with pytest.raises(ValueError, match="trust_region"):
        LoRA(nn.Linear(4, 4), rank=2, trust_region=tau)


def test_merge_keeps_the_projected_delta():
    """A single-expert LoRA with a trust region is mergeable, so its merged layer must compute
    what its forward computes: the projected delta, not scale·B A."""
    m = _module(trust_region=0.5, num_experts=1)
    x = _x()
    with torch.no_grad():
        y = m(x)
        dw = SCALE * m.lora_B[0] @ m.lora_A[0]
        assert float(torch.linalg.matrix_norm(dw)) > 0.5      # the forward projects
        merged = m.merged_base()
        torch.testing.assert_close(merged(x), y, rtol=1e-10, atol=1e-10)
