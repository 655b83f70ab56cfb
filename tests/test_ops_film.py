"""bem.ops.film against the float64 reference: broadcasting modes, clipping, gradients."""
from __future__ import annotations

import pytest
import torch

from bem import reference
from bem.ops import film
from helpers import assert_close_scaled, available_devices, kernel_dtypes

S, L, D = 3, 37, 111


def make(gshape, bshape=None, *, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, L, D, generator=g)
    gamma = 1 + 0.9 * torch.randn(gshape, generator=g)       # some beyond [0.5, 2]
    beta = 0.6 * torch.randn(bshape or gshape, generator=g)  # some beyond ±0.5
    return [t.to(device=device, dtype=dtype) for t in (x, gamma, beta)]


SHAPES = {"per_token": (S, L, D), "per_sequence": (S, 1, D), "global": (D,),
          "per_position": (1, L, D)}


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("mode", list(SHAPES))
def test_matches_float64_reference(device, mode):
    for i, dtype in enumerate(kernel_dtypes(device)):
        x, g, b = make(SHAPES[mode], device=device, dtype=dtype, seed=i)
        out = film(x, g, b)
        ref = reference.film(x.double(), g.double(), b.double())
        assert out.shape == x.shape and out.dtype == dtype
        assert_close_scaled(out, ref, dtype, f"{mode} {dtype}")


@pytest.mark.parametrize("device", available_devices())
def test_mixed_gamma_beta_broadcasts_and_no_bounds(device):
    x, g, b = make((S, L, D), (S, 1, D), device=device, seed=3)
    out = film(x, g, b, gamma_bounds=None, beta_bound=None)
    assert_close_scaled(out, g.double() * x.double() + b.double(), torch.float32)
    x, g, b = make((D,), (S, L, D), device=device, seed=4)
    assert_close_scaled(film(x, g, b), reference.film(x.double(), g.double(), b.double()),
                        torch.float32)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("mode", ["per_token", "per_sequence", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_zero_where_clipped(device, mode, dtype):
    x, g, b = make(SHAPES[mode], device=device, dtype=dtype, seed=5)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, g, b)]
    out = film(*leaves)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(up)
    l64 = [t.detach().double().requires_grad_(True) for t in (x, g, b)]
    reference.film(*l64).backward(up.double())
    for name, got, want in zip(("x", "gamma", "beta"), leaves, l64):
        assert_close_scaled(got.grad, want.grad, dtype, f"grad {name}")
    clipped = (g < 0.5) | (g > 2.0)
    assert clipped.any() and bool((leaves[1].grad[clipped] == 0).all())


def test_gradcheck_float64():
    x, g, b = make((S, 1, D), dtype=torch.float64, seed=6)
    x, g, b = x[:, :4, :6], g[..., :6] , b[..., :6]
    args = [t.contiguous().requires_grad_(True) for t in (x, g, b)]
    # Keep values away from the clip boundaries, where the function is not differentiable.
    with torch.no_grad():
        args[1].copy_(args[1].clamp(0.6, 1.9))
        args[2].copy_(args[2].clamp(-0.4, 0.4))
    assert torch.autograd.gradcheck(lambda x, g, b: film(x, g, b), args)


@pytest.mark.parametrize("device", available_devices())
def test_opcheck(device):
    x, g, b = make((S, 1, D), device=device, seed=7)
    x2, g2, b2 = x.reshape(-1, D), g.reshape(S, D), b.reshape(S, D)
    for t in (x2, g2, b2):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.bem.film.default, (x2, g2, b2, 0.5, 2.0, 0.5))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(gamma=torch.ones(S, L, D + 1)), ValueError, "gamma: expected last dimension"),
    (dict(beta=torch.ones(2, L, D)), ValueError, "beta: shape .* does not broadcast"),
    (dict(gamma=torch.ones(1, S, L, D)), ValueError, "gamma: shape .* more dimensions"),
    (dict(gamma=torch.ones(D).double()), TypeError, "gamma: expected dtype"),
    (dict(x=torch.zeros(0, D), gamma=torch.ones(D), beta=torch.zeros(D)), ValueError, "x: expected a non-empty"),
    (dict(gamma_bounds=(2.0, 0.5)), ValueError, "gamma_bounds"),
    (dict(gamma_bounds=0.5), TypeError, "gamma_bounds"),
    (dict(beta_bound=-1.0), ValueError, "beta_bound"),
    (dict(beta=torch.zeros(D, device="meta")), ValueError, "beta: expected a tensor on cpu"),
])
def test_bad_input(kw, exc, match):
    x, g, b = make((S, 1, D))
    args = dict(x=x, gamma=g, beta=b)
    args.update(kw)
    with pytest.raises(exc, match=match):
        film(args.pop("x"), args.pop("gamma"), args.pop("beta"), **args)


@pytest.mark.parametrize("name", ["x", "gamma", "beta"])
def test_nonfinite_input_raises(name):
    args = dict(zip(("x", "gamma", "beta"), make((S, 1, D))))
    args[name] = args[name].clone()
    args[name].view(-1)[5] = float("nan")  # NaN, not Inf: a clipped Inf γ/β is finite again
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        film(args["x"], args["gamma"], args["beta"])


@pytest.mark.parametrize("gmode,bmode", [("per_token", "per_token"), ("per_token", "global"),
                                          ("global", "per_token"), ("global", "global"),
                                          ("per_sequence", "global")])
def test_unbounded_inference_call_matches_reference(gmode, bmode):
    """The modules' call (no bounds, no gradient: a fast path on CPU) against float64, for the
    γ/β shapes bem's modules pass, and its bad input still gets the checked path's errors."""
    for i, dtype in enumerate(kernel_dtypes("cpu")):
        x, g, b = make(SHAPES[gmode], SHAPES[bmode], dtype=dtype, seed=10 + i)
        with torch.no_grad():
            y = film(x, g, b, gamma_bounds=None, beta_bound=None)
        want = reference.film(x.double(), g.double(), b.double(), gamma_bounds=None,
                              beta_bound=None)
        assert y.dtype == dtype and y.shape == x.shape
        assert_close_scaled(y, want, dtype)
    x, g, b = make(SHAPES["per_token"], SHAPES["global"])
    x[1, 2, 3] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="film: x contains NaN"):
        film(x, g, b, gamma_bounds=None, beta_bound=None)
    with torch.no_grad(), pytest.raises(ValueError, match="gamma"):
        film(x, g[:, :, :5].contiguous(), b, gamma_bounds=None, beta_bound=None)
    with torch.no_grad(), pytest.raises(TypeError, match="beta: expected dtype"):
        film(x, g, b.double(), gamma_bounds=None, beta_bound=None)
