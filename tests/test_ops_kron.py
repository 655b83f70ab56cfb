"""bem.ops.kron_delta and its helpers against the float64 reference and torch.kron."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bem import reference
from bem.ops import kron_delta, kron_spectral_norm, kron_weight
from helpers import assert_close_scaled, available_devices, kernel_dtypes


def make(T, o1=5, i1=7, o2=3, i2=9, *, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, i1 * i2, generator=g)
    A = torch.randn(o1, i1, generator=g) / i1 ** 0.5
    B = torch.randn(o2, i2, generator=g) / i2 ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, A, B)]


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("T", [1, 3, 64, 257])
def test_matches_torch_kron_in_float64(device, T):
    for i, dtype in enumerate(kernel_dtypes(device)):
        x, A, B = make(T, device=device, dtype=dtype, seed=T + i)
        out = kron_delta(x, A, B, scale=0.5)
        expected = 0.5 * x.double() @ torch.kron(A.double(), B.double()).T
        assert out.shape == (T, 15) and out.dtype == dtype
        assert_close_scaled(out, expected, dtype, str(dtype))


@pytest.mark.parametrize("device", available_devices())
def test_leading_dims_and_out_accumulation(device):
    x, A, B = make(24, device=device, seed=2)
    x3 = x.reshape(4, 6, 63)
    out = kron_delta(x3, A, B)
    assert out.shape == (4, 6, 15)
    base = torch.randn(4, 6, 15, device=device)
    acc = base.clone()
    assert kron_delta(x3, A, B, out=acc) is acc
    assert_close_scaled(acc, base.double() + out.double(), torch.float32)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_float64_reference(device, dtype):
    x, A, B = make(70, device=device, dtype=dtype, seed=4)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    out = kron_delta(*leaves, scale=1.5)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(up)
    l64 = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    reference.kron_delta(*l64, scale=1.5).backward(up.double())
    for name, got, want in zip("xAB", leaves, l64):
        assert_close_scaled(got.grad, want.grad, dtype, f"grad {name}")


def test_gradcheck_float64():
    x, A, B = make(4, 3, 2, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, A, B: kron_delta(x, A, B, scale=0.9),
                                    [t.requires_grad_(True) for t in (x, A, B)])


def test_gradcheck_kernel_float32():
    x, A, B = make(3, 3, 2, 2, 3, seed=7)
    with pytest.warns(UserWarning):
        assert torch.autograd.gradcheck(lambda x, A, B: kron_delta(x, A, B, scale=0.9),
                                        [t.requires_grad_(True) for t in (x, A, B)],
                                        eps=1e-2, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("device", available_devices())
def test_opcheck(device):
    x, A, B = make(33, device=device, seed=9)
    for t in (x, A, B):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.bem.kron_delta.default, (x, A, B, 0.25))


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 40), o1=st.integers(1, 9), i1=st.integers(1, 9), o2=st.integers(1, 9),
       i2=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes(T, o1, i1, o2, i2, seed):
    x, A, B = make(T, o1, i1, o2, i2, seed=seed)
    expected = x.double() @ torch.kron(A.double(), B.double()).T
    assert_close_scaled(kron_delta(x, A, B), expected, torch.float32)


def test_spectral_norm_and_weight():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(13, 8, generator=g), torch.randn(6, 11, generator=g)
    expected = torch.linalg.matrix_norm(torch.kron(A.double(), B.double()), ord=2).item()
    assert kron_spectral_norm(A, B, tol=1e-9, max_iter=2000) == pytest.approx(expected, rel=1e-5)
    W = kron_weight(A, B, scale=0.5)
    assert torch.equal(W, 0.5 * torch.kron(A, B))
    x = torch.randn(5, 88, generator=g)
    assert_close_scaled(kron_delta(x, A, B, scale=0.5), x.double() @ W.double().T, torch.float32)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(x=torch.randn(4, 62)), ValueError, "x: expected last dimension"),
    (dict(A=torch.randn(5, 7, 1)), ValueError, "A: expected 2 dimensions"),
    (dict(B=torch.randn(0, 9)), ValueError, "B: expected a non-empty"),
    (dict(x=torch.randn(0, 63)), ValueError, "x: expected at least one token"),
    (dict(A=torch.randn(5, 7).bfloat16()), TypeError, "A: expected dtype"),
    (dict(B=torch.randn(3, 9, device="meta")), ValueError, "B: expected a tensor on cpu"),
    (dict(scale=None), TypeError, "scale"),
    (dict(out=torch.zeros(4, 16)), ValueError, "out: expected shape"),
])
def test_bad_input(kw, exc, match):
    x, A, B = make(4)
    args = dict(x=x, A=A, B=B)
    args.update(kw)
    with pytest.raises(exc, match=match):
        kron_delta(args.pop("x"), args.pop("A"), args.pop("B"), **args)


@pytest.mark.parametrize("name", ["x", "A", "B"])
def test_nonfinite_input_raises(name):
    args = dict(zip("xAB", make(4)))
    args[name] = args[name].clone()
    args[name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        kron_delta(args["x"], args["A"], args["B"])
