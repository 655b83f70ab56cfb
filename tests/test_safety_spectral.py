"""bem.safety.lora_spectral_norm against torch.linalg.matrix_norm(ΔW, 2) of the materialised
delta in float64 (odd shapes, rank-deficient and zero factors, stacked experts, d < r), its
gradient (gradcheck), bad input, and SpectralMonitor's projection and statistics."""
import pytest
import torch

from bem.safety import SpectralMonitor, lora_spectral_norm

SHAPES = [(7, 59, 111), (16, 111, 59), (1, 1, 1), (5, 3, 97), (9, 64, 4), (6, 2, 3)]


def _dense_norm(A, B, scale=1.0):
    return torch.linalg.matrix_norm(scale * (B.double() @ A.double()), ord=2)


@pytest.mark.parametrize("r,d_in,d_out", SHAPES)
def test_matches_svd_of_materialised_delta(r, d_in, d_out):
    gen = torch.Generator().manual_seed(r * 1000 + d_in)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    got = lora_spectral_norm(A, B, scale=-0.37)
    want = _dense_norm(A, B, -0.37)
    assert got.dtype == torch.float64 and got.shape == ()
    assert abs(float(got - want)) <= 1e-10 * float(want)


def test_stacked_experts_with_per_expert_scale():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 6, 53, generator=gen, dtype=torch.float64)
    B = torch.randn(4, 71, 6, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.5, -2.0, 3.0, 1e-3], dtype=torch.float64)
    got = lora_spectral_norm(A, B, scale)
    want = torch.stack([_dense_norm(A[e], B[e], float(scale[e])) for e in range(4)])
    assert got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_rank_deficient_and_zero_factors():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(8, 61, generator=gen, dtype=torch.float64)
    A[3:] = A[:5] * 2.0                                # rank 3 rows of A, repeated
    B = torch.randn(37, 8, generator=gen, dtype=torch.float64)
    B[:, 6:] = 0                                       # two dead components
    want = _dense_norm(A, B)
    assert abs(float(lora_spectral_norm(A, B) - want)) <= 1e-10 * float(want)
    # A delta whose product vanishes although neither factor is zero: B's columns ⟂ A's rows.
    A0 = torch.zeros(4, 10, dtype=torch.float64)
    A0[:2] = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    B0 = torch.zeros(12, 4, dtype=torch.float64)
    B0[:, 2:] = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    assert float(lora_spectral_norm(A0, B0)) == 0.0
    assert float(lora_spectral_norm(torch.zeros(3, 9), torch.zeros(5, 3))) == 0.0
    stacked = lora_spectral_norm(torch.stack([A, torch.zeros_like(A)]),
                                 torch.stack([B, B]))
    assert float(stacked[1]) == 0.0 and abs(float(stacked[0] - want)) <= 1e-10 * float(want)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5),
                                        (torch.float16, 1e-5)])
def test_low_precision_inputs_computed_in_float32(dtype, rtol):
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(16, 257, generator=gen).to(dtype)
    B = torch.randn(129, 16, generator=gen).to(dtype)
    got = lora_spectral_norm(A, B, 0.25)
    assert got.dtype == torch.float32
    want = _dense_norm(A, B, 0.25)        # the same (rounded) inputs, in float64
    assert abs(float(got) - float(want)) <= rtol * float(want)


def test_gradcheck_and_finite_gradient_at_zero():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 13, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, sc: lora_spectral_norm(a, b, sc), (A, B, s))
    d_small = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b_small = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lora_spectral_norm, (d_small, b_small))   # d < r both sides
    A0 = torch.randn(4, 8, generator=gen, requires_grad=True)
    B0 = torch.zeros(6, 4, requires_grad=True)          # LoRA at initialisation
    lora_spectral_norm(A0, B0).backward()
    assert torch.isfinite(B0.grad).all() and torch.isfinite(A0.grad).all()
    assert float(A0.grad.abs().sum()) == 0.0            # ‖B A‖ is flat in A while B = 0
    assert float(B0.grad.norm()) > 0                    # …but not in B (a subgradient)


@pytest.mark.parametrize("A,B,scale,exc,name", [
    ([[1.0]], torch.ones(1, 1), 1.0, TypeError, "A"),
    (torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 2), 1.0, TypeError, "A"),
    (torch.ones(3), torch.ones(4, 3), 1.0, ValueError, "A"),
    (torch.ones(2, 3), torch.ones(4, 5), 1.0, ValueError, "B"),
    (torch.ones(2, 2, 3), torch.ones(3, 4, 2), 1.0, ValueError, "B"),
    (torch.ones(2, 3), torch.ones(1, 4, 2), 1.0, ValueError, "B"),
    (torch.ones(0, 3), torch.ones(4, 0), 1.0, ValueError, "A"),
    (torch.ones(2, 3), torch.ones(0, 2), 1.0, ValueError, "B"),
    (torch.tensor([[1.0, float("nan")]]), torch.ones(3, 1), 1.0, ValueError, "A"),
    (torch.ones(1, 2), torch.tensor([[float("inf")]]), 1.0, ValueError, "B"),
    (torch.ones(1, 2), torch.ones(3, 1), float("nan"), ValueError, "scale"),
    (torch.ones(1, 2), torch.ones(3, 1), "2", ValueError, "scale"),
    (torch.ones(2, 1, 2), torch.ones(2, 3, 1), torch.ones(3), ValueError, "scale"),
    (torch.ones(1, 2), torch.ones(3, 1), torch.ones((), dtype=torch.int64), TypeError, "scale"),
])
def test_bad_input_names_the_argument(A, B, scale, exc, name):
    with pytest.raises(exc, match=f"^{name}:"):
        lora_spectral_norm(A, B, scale)


def test_monitor_projects_into_budget_and_keeps_statistics():
    gen = torch.Generator().manual_seed(5)
    monitor = SpectralMonitor(spectral_budget=1.0, history_size=4, recent_calls=2)
    A = torch.randn(3, 5, 40, generator=gen)
    B = torch.randn(3, 30, 5, generator=gen)
    B[2] *= 1e-4                                           # expert 2 is inside the budget
    before = lora_spectral_norm(A, B, 0.5)
    out = monitor.monitor_and_project(A, B, 0.5, "layer.q")
    assert out.A is A and out.B is not B
    torch.testing.assert_close(out.spectral_norm, before)
    after = lora_spectral_norm(out.A, out.B, 0.5)
    assert bool((after <= 1.0 + 1e-5).all()) and float(out.factor[2]) == 1.0
    torch.testing.assert_close(after[:2], torch.ones(2), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.B[2], B[2])
    stats = monitor.get_projection_stats()
    assert stats["total_projections"] == 2 and stats["recent_projections"] == 2
    assert stats["layers_affected"] == ["layer.q"] and stats["evaluations"] == 3
    want_mean = float(out.factor[:2].double().mean())
    assert abs(stats["avg_projection_factor"] - want_mean) < 1e-6
    events = monitor.history()
    assert [(e.call, e.layer, e.expert) for e in events] == [(0, "layer.q", 0), (0, "layer.q", 1)]
    # Two calls inside the budget push the projection out of the recent window, not the totals.
    for _ in range(2):
        monitor.monitor_and_project(A * 1e-6, B, 0.5, "layer.v", inplace=True)
    stats = monitor.get_projection_stats()
    assert stats["recent_projections"] == 0 and stats["avg_projection_factor"] == 1.0
    assert stats["layers_affected"] == [] and stats["all_layers_affected"] == ["layer.q"]
    assert stats["total_projections"] == 2 and stats["calls"] == 3


def test_monitor_inplace_on_parameters_and_bad_arguments():
    gen = torch.Generator().manual_seed(6)
    A = torch.nn.Parameter(torch.randn(4, 20, generator=gen))
    B = torch.nn.Parameter(torch.randn(9, 4, generator=gen))
    monitor = SpectralMonitor(0.3)
    res = monitor.monitor_and_project(A, B, 2.0, inplace=True)
    assert res.B is B
    assert abs(float(lora_spectral_norm(A.detach(), B.detach(), 2.0)) - 0.3) <= 1e-6
    for kwargs, name in (({"spectral_budget": 0.0}, "spectral_budget"),
                         ({"spectral_budget": float("inf")}, "spectral_budget"),
                         ({"history_size": 0}, "history_size"),
                         ({"history_size": 2, "recent_calls": 3}, "recent_calls")):
        with pytest.raises(ValueError, match=name):
            SpectralMonitor(**kwargs)
    with pytest.raises(TypeError, match="^layer:"):
        monitor.monitor_and_project(A, B, layer=3)
