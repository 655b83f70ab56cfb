"""Trust-region math of bem.modules.trust_region against materialised ΔW in float64: norms of one
or E low-rank deltas and of rank subsets, gradients (gradcheck, finite at ΔW = 0), the projection
factor, and projection statistics."""
import math

import pytest
import torch

from bem.modules.trust_region import ProjectionStats, lowrank_frobenius_norm, projection_factor

D_IN, D_OUT, R, E = 59, 111, 7, 3


def _factors(gen, batched=True, dtype=torch.float64):
    lead = (E,) if batched else ()
    A = torch.randn(*lead, R, D_IN, generator=gen, dtype=dtype)
    B = torch.randn(*lead, D_OUT, R, generator=gen, dtype=dtype)
    return A, B


def test_matches_materialised_delta():
    gen = torch.Generator().manual_seed(0)
    A, B = _factors(gen, batched=False)
    torch.testing.assert_close(lowrank_frobenius_norm(A, B, scale=-0.3),
                               torch.linalg.matrix_norm(-0.3 * B @ A), rtol=1e-12, atol=0)
    A, B = _factors(gen)
    want = torch.stack([torch.linalg.matrix_norm(B[e] @ A[e]) for e in range(E)])
    torch.testing.assert_close(lowrank_frobenius_norm(A, B), want, rtol=1e-12, atol=0)
    scale = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(lowrank_frobenius_norm(A, B, scale), want * scale.abs(),
                               rtol=1e-12, atol=0)


def test_rank_subsets():
    gen = torch.Generator().manual_seed(1)
    A, B = _factors(gen)
    shared = torch.tensor([5, 0, 3])
    per_expert = torch.stack([torch.randperm(R, generator=gen)[:4] for _ in range(E)])
    for idx in (shared, per_expert):
        rows = idx.expand(E, -1)
        want = torch.stack([torch.linalg.matrix_norm(1.7 * B[e][:, rows[e]] @ A[e][rows[e]])
                            for e in range(E)])
        torch.testing.assert_close(lowrank_frobenius_norm(A, B, 1.7, rank_index=idx), want,
                                   rtol=1e-12, atol=0)
    a1, b1 = A[0], B[0]
    torch.testing.assert_close(lowrank_frobenius_norm(a1, b1, rank_index=shared),
                               torch.linalg.matrix_norm(b1[:, shared] @ a1[shared]), rtol=1e-12,
                               atol=0)
    empty = torch.empty(0, dtype=torch.int64)
    assert lowrank_frobenius_norm(a1, b1, rank_index=empty) == 0


def test_low_precision_accumulates_in_float32():
    gen = torch.Generator().manual_seed(2)
    A, B = _factors(gen)
    want = lowrank_frobenius_norm(A, B)
    got = lowrank_frobenius_norm(A.bfloat16(), B.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=0)
    exact = lowrank_frobenius_norm(A.float(), B.float(), accumulate_dtype=torch.float64)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, want, rtol=1e-6, atol=0)


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2, 3], [3, 1, 0]])
    assert torch.autograd.gradcheck(lambda a, b, s: lowrank_frobenius_norm(a, b, s), (A, B, scale))
    assert torch.autograd.gradcheck(lambda a, b: lowrank_frobenius_norm(a, b, rank_index=idx),
                                    (A, B))


def test_zero_delta_has_finite_gradient():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(E, R, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.zeros(E, D_OUT, R, dtype=torch.float64, requires_grad=True)
    norm = lowrank_frobenius_norm(A, B)
    assert torch.equal(norm, torch.zeros(E, dtype=torch.float64))
    projection_factor(norm, 0.5).sum().backward()
    (lowrank_frobenius_norm(A, B).sum()).backward()
    for g in (A.grad, B.grad):
        assert g is not None and torch.isfinite(g).all()


def test_projection_factor():
    norm = torch.tensor([0.0, 0.5, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    f = projection_factor(norm, 1.0)
    torch.testing.assert_close(f, torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=torch.float64))
    f.sum().backward()
    torch.testing.assert_close(norm.grad, torch.tensor([0, 0, 0, -1 / 16], dtype=torch.float64))
    unbounded = projection_factor(norm.detach(), math.inf)
    assert torch.equal(unbounded, torch.ones(4, dtype=torch.float64))


def test_projected_delta_is_inside_the_ball():
    gen = torch.Generator().manual_seed(5)
    A, B = _factors(gen)
    idx = torch.tensor([1, 4, 6, 2])
    scale = 0.8
    for tau in (1e-3, 3.0, 1e6):
        norm = lowrank_frobenius_norm(A, B, scale, rank_index=idx)
        factor = projection_factor(norm, tau)
        for e in range(E):
            dw = factor[e] * scale * B[e][:, idx] @ A[e][idx]
            got = torch.linalg.matrix_norm(dw).item()
            assert got <= tau * (1 + 1e-6)
            if factor[e] < 1:  # projected onto the sphere, not shrunk further
                assert got == pytest.approx(tau, rel=1e-9)


def test_bad_arguments():
    A, B = _factors(torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="B:"):
        lowrank_frobenius_norm(A, B[:, :, :5])
    with pytest.raises(ValueError, match="B:"):
        lowrank_frobenius_norm(A, B[0])
    with pytest.raises(TypeError, match="A:"):
        lowrank_frobenius_norm(A.long(), B)
    with pytest.raises(ValueError, match="A:"):
        lowrank_frobenius_norm(A[0, 0], B)
    with pytest.raises(ValueError, match="rank_index"):
        lowrank_frobenius_norm(A, B, rank_index=torch.tensor([0, R]))
    with pytest.raises(ValueError, match="rank_index"):
        lowrank_frobenius_norm(A, B, rank_index=torch.zeros(E + 1, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="rank_index"):
        lowrank_frobenius_norm(A, B, rank_index=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="scale"):
        lowrank_frobenius_norm(A, B, scale=math.nan)
    with pytest.raises(TypeError, match="accumulate_dtype"):
        lowrank_frobenius_norm(A, B, accumulate_dtype=torch.int32)
    with pytest.raises(ValueError, match="tau"):
        projection_factor(torch.ones(2), 0.0)
    with pytest.raises(TypeError, match="norm"):
        projection_factor([1.0], 1.0)


def test_stats_record_and_merge():
    a, b = ProjectionStats(), ProjectionStats()
    a.record(torch.tensor([1.0, 0.5, 1.0]), "q")
    a.record(torch.tensor([0.25]), "q")
    a.record(torch.ones(2), "v")
    b.record(torch.tensor([0.1, 1.0], dtype=torch.float64))
    d = a.to_dict()
    assert d["evaluations"] == 6 and d["projected"] == 2 and d["layers"] == 2
    assert d["mean_factor"] == pytest.approx(0.375) and d["min_factor"] == 0.25
    assert d["layers_affected"] == ["q"]
    assert d["per_layer"]["v"] == {"evaluations": 2, "projected": 0, "projection_rate": 0.0,
                                   "mean_factor": 1.0, "min_factor": 1.0}
    m = ProjectionStats.merged({"layer0": a, "layer1": b}).to_dict()
    assert sorted(m["per_layer"]) == ["layer0.q", "layer0.v", "layer1"]
    assert m["evaluations"] == 8 and m["projected"] == 3 and m["min_factor"] == pytest.approx(0.1)
    assert m["mean_factor"] == pytest.approx((0.5 + 0.25 + 0.1) / 3)
    assert m["layers_affected"] == ["layer0.q", "layer1"]
    assert ProjectionStats.merged([a, a]).to_dict()["evaluations"] == 12
    assert a.to_dict() == d  # merging copies, never changes its inputs
    a.reset()
    assert a.to_dict()["evaluations"] == 0 and a.to_dict()["mean_factor"] == 1.0
    with pytest.raises(TypeError, match="factor"):
        a.record(torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="other"):
        a.update({"x": 1})
