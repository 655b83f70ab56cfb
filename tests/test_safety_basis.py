"""bem.safety's orthogonal safety basis: factor projections on both sides against the
materialised ΔW in float64, their gradient (gradcheck), the orthogonality ratio, bases recovered
from planted activation differences and gradients, activations captured from a model, and bad
input (non-orthonormal bases, wrong widths, NaN, empty)."""
import pytest
import torch

from bem.attach import BemConfig, attach
from bem.model import BemForCausalLM, TransformerConfig
from bem.safety import (SafetyBasis, adapted_layers, layer_activations, orthogonality_ratio,
                        principal_basis, project_factors)

R, D_IN, D_OUT, S = 5, 59, 37, 4


def _orthonormal(d, s, gen, dtype=torch.float64):
    return torch.linalg.qr(torch.randn(d, s, generator=gen, dtype=torch.float64))[0].to(dtype)


def _factors(gen, E=3, dtype=torch.float64):
    return (torch.randn(E, R, D_IN, generator=gen, dtype=dtype),
            torch.randn(E, D_OUT, R, generator=gen, dtype=dtype))


@pytest.mark.parametrize("side", ["input", "output"])
def test_projection_removes_the_basis_from_the_delta(side):
    gen = torch.Generator().manual_seed(0)
    A, B = _factors(gen)
    U = _orthonormal(D_IN if side == "input" else D_OUT, S, gen)
    dense_ratio = lambda a, b: torch.stack([  # noqa: E731
        torch.linalg.matrix_norm(b[e] @ a[e] @ U if side == "input" else U.mT @ b[e] @ a[e])
        / torch.linalg.matrix_norm(b[e] @ a[e]) for e in range(3)])
    torch.testing.assert_close(orthogonality_ratio(A, B, U, side), dense_ratio(A, B),
                               rtol=1e-10, atol=0)
    assert float(orthogonality_ratio(A, B, U, side).min()) > 0.05     # not orthogonal before
    A2, B2 = project_factors(A, B, U, side)
    assert (A2 is A) == (side == "output") and (B2 is B) == (side == "input")
    assert float(orthogonality_ratio(A2, B2, U, side).max()) < 1e-14
    assert float(dense_ratio(A2, B2).max()) < 1e-14
    # The rest of ΔW is untouched: ΔW' = ΔW (I − UUᵀ) or (I − UUᵀ) ΔW.
    P = torch.eye(U.shape[0], dtype=torch.float64) - U @ U.mT
    want = (B @ A) @ P if side == "input" else P @ (B @ A)
    torch.testing.assert_close(B2 @ A2, want, rtol=0, atol=1e-12)
    A3, B3 = project_factors(A2, B2, U, side)                          # idempotent
    torch.testing.assert_close(B3 @ A3, B2 @ A2, rtol=0, atol=1e-12)


def test_projection_gradcheck_and_zero_delta_ratio():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(3, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    for side, U in (("input", _orthonormal(9, 2, gen)), ("output", _orthonormal(7, 2, gen))):
        assert torch.autograd.gradcheck(lambda a, b: project_factors(a, b, U, side), (A, B))
    zero = torch.zeros(2, 3, 9, dtype=torch.float64)
    assert orthogonality_ratio(zero, torch.ones(2, 7, 3, dtype=torch.float64),
                               _orthonormal(9, 2, gen)).tolist() == [0.0, 0.0]


def test_principal_basis_recovers_planted_directions():
    gen = torch.Generator().manual_seed(2)
    d, n = 48, 300
    planted = _orthonormal(d, 3, gen)
    answered = torch.randn(n, d, generator=gen, dtype=torch.float64)
    shift = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([9.0, 6.0, 4.0])
    refused = answered + shift @ planted.mT + 0.01 * torch.randn(n, d, generator=gen,
                                                                  dtype=torch.float64)
    basis = SafetyBasis.from_activation_differences({"q": refused}, {"q": answered}, rank=3)
    U = basis["q"]
    # Same subspace: the principal angles' cosines are all ~1.
    cosines = torch.linalg.svdvals(U.mT @ planted)
    assert float(cosines.min()) > 0.999
    assert basis.explained["q"].shape == (3,) and float(basis.explained["q"][-1]) > 0.99
    assert 0.5 < float(basis.explained["q"][0]) < 0.72     # 9² of 9² + 6² + 4² ≈ 0.61
    again = principal_basis(refused - answered, 3).U
    torch.testing.assert_close(again, U, rtol=0, atol=1e-12)            # deterministic signs


def test_basis_from_gradients_on_both_sides():
    gen = torch.Generator().manual_seed(3)
    u_in, u_out = _orthonormal(D_IN, 2, gen), _orthonormal(D_OUT, 2, gen)
    coef = torch.randn(6, D_OUT, 2, generator=gen, dtype=torch.float64)
    grads = coef @ u_in.mT                                   # (6, d_out, d_in), rows in span(u_in)
    b_in = SafetyBasis.from_gradients({"l": grads}, 2, side="input")
    assert float(torch.linalg.svdvals(b_in["l"].mT @ u_in).min()) > 1 - 1e-9
    grads_out = u_out @ torch.randn(2, D_IN, generator=gen, dtype=torch.float64)
    b_out = SafetyBasis.from_gradients({"l": grads_out}, 2, side="output")
    assert float(torch.linalg.svdvals(b_out["l"].mT @ u_out).min()) > 1 - 1e-9
    state = SafetyBasis.from_state_dict(b_out.state_dict())
    assert state.side == "output" and torch.equal(state["l"], b_out["l"])


def test_layer_activations_from_a_model_with_adapters():
    torch.manual_seed(0)
    model = BemForCausalLM(TransformerConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=4,
                                             d_ff=36))
    attach(model, BemConfig.preset("lora", rank=4))
    names = sorted(adapted_layers(model))
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)
    ids = torch.randint(0, 41, (3, 7))
    acts = layer_activations(model, names, ids, position=-1)
    assert set(acts) == set(names) and all(a.shape == (3, 16) for a in acts.values())
    every = layer_activations(model, names[:1], ids)
    assert every[names[0]].shape == (21, 16)
    torch.testing.assert_close(every[names[0]].reshape(3, 7, 16)[:, -1], acts[names[0]])
    out = layer_activations(model, names[:1], ids, side="output")
    assert out[names[0]].shape[0] == 21
    with pytest.raises(ValueError, match="^layers:"):
        layer_activations(model, ["nope"], ids)
    with pytest.raises(ValueError, match="^side:"):
        layer_activations(model, names, ids, side="both")


def test_bad_input_names_the_argument():
    gen = torch.Generator().manual_seed(4)
    A, B = _factors(gen)
    U = _orthonormal(D_IN, S, gen)
    with pytest.raises(ValueError, match=r"^bases\['q'\]: expected orthonormal"):
        SafetyBasis({"q": U * 1.01})
    with pytest.raises(ValueError, match=r"^bases\['q'\]: expected \(d, s\) with s <= d"):
        SafetyBasis({"q": torch.eye(3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"^bases\['q'\]: expected finite"):
        SafetyBasis({"q": torch.full((4, 1), float("nan"))})
    with pytest.raises(ValueError, match="^bases:"):
        SafetyBasis({})
    with pytest.raises(ValueError, match="^side:"):
        SafetyBasis({"q": U}, side="left")
    with pytest.raises(ValueError, match="^U: expected .* d = 37"):
        project_factors(A, B, U, "output")
    with pytest.raises(ValueError, match="^U: expected a non-empty"):
        project_factors(A, B, torch.empty(D_IN, 0))
    with pytest.raises(TypeError, match="^U:"):
        orthogonality_ratio(A, B, U.numpy())
    with pytest.raises(ValueError, match="^B:"):
        project_factors(A, B[:2], U)
    with pytest.raises(ValueError, match="^rank:"):
        principal_basis(torch.randn(3, 8, generator=gen), 4)
    with pytest.raises(ValueError, match="^rows:"):
        principal_basis(torch.zeros(5, 8), 1)
    with pytest.raises(ValueError, match="^answered"):
        SafetyBasis.from_activation_differences({"q": torch.ones(4, 3)}, {"k": torch.ones(4, 3)},
                                                1)
    with pytest.raises(ValueError, match=r"^answered\['q'\]: expected shape"):
        SafetyBasis.from_activation_differences({"q": torch.randn(4, 3)},
                                                {"q": torch.randn(5, 3)}, 1)
    with pytest.raises(KeyError, match="no safety basis"):
        SafetyBasis({"q": U})["k"]
