"""bem.ops.lora_delta against its float64 pure-torch reference: values, gradients, accumulation,
opcheck, torch.compile, threads, and every kind of bad input."""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bem import reference
from bem.ops import lora_delta
from helpers import (assert_close_scaled, available_devices, kernel_dtypes, random_rank_index,
                     routed_expert_index)

D_IN, D_OUT, R, K, E = 59, 111, 7, 3, 5


def make_inputs(T, *, device="cpu", dtype=torch.float32, seed=0, d_in=D_IN, d_out=D_OUT, r=R,
                k=K, E=E, dynamic=True, gated=True, gaps=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    A = torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5
    B = torch.randn(E, d_out, r, generator=gen)
    ei = routed_expert_index(T, E, gen, gap_prob=0.2 if gaps else 0.0)
    ri = random_rank_index(T, r, k, gen) if dynamic else None
    gate = torch.rand(T, k if dynamic else r, generator=gen) + 0.5 if gated else None
    to = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return (to(x, dtype), to(A, dtype), to(B, dtype), to(ei), to(ri), to(gate))


def ref64(x, A, B, ei, ri, gate, scale):
    return reference.lora_delta(x.double(), A.double(), B.double(), scale=scale, expert_index=ei,
                                rank_index=ri, rank_gate=None if gate is None else gate.double())


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("T", [1, 5, 64, 300])
@pytest.mark.parametrize("mode", ["dense", "dynamic", "dynamic_gated"])
def test_matches_float64_reference(device, T, mode):
    for i, dtype in enumerate(kernel_dtypes(device)):
        x, A, B, ei, ri, gate = make_inputs(T, device=device, dtype=dtype, seed=T * 31 + i,
                                            dynamic=mode != "dense", gated=mode == "dynamic_gated")
        out = lora_delta(x, A, B, scale=0.75, expert_index=ei, rank_index=ri, rank_gate=gate)
        assert out.shape == (T, D_OUT) and out.dtype == dtype and out.device == x.device
        assert_close_scaled(out, ref64(x, A, B, ei, ri, gate, 0.75), dtype, f"{dtype} {mode}")
        assert bool((out[ei < 0] == 0).all()), "tokens without an adapter must get a zero delta"


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("T", [2, 16, 40, 130])
@pytest.mark.parametrize("k", [32, 13])
def test_chunk_shared_ranks_match_float64_reference(device, T, k):
    """One rank set per 64-token chunk (the router's granularity) and k >= 13: the CPU kernels then
    take each expand form (row-dot at a few tokens, tokens-in-lanes at a few dozen, packed beyond)."""
    gen = torch.Generator().manual_seed(100 + T + k)
    d_in, d_out, r, E = 61, 133, 32, 3
    chunks = (T + 63) // 64
    per_chunk = torch.stack([torch.randperm(r, generator=gen)[:k] for _ in range(chunks)])
    ri = per_chunk.repeat_interleave(64, dim=0)[:T].contiguous()
    ei = routed_expert_index(T, E, gen, gap_prob=0.1)
    for i, dtype in enumerate(kernel_dtypes(device)):
        x = torch.randn(T, d_in, generator=gen).to(device=device, dtype=dtype)
        A = (torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5).to(device=device, dtype=dtype)
        B = torch.randn(E, d_out, r, generator=gen).to(device=device, dtype=dtype)
        for rank_index in (ri.to(device), None):
            out = lora_delta(x, A, B, scale=0.5, expert_index=ei.to(device), rank_index=rank_index)
            want = ref64(x, A, B, ei.to(device), rank_index, None, 0.5)
            assert_close_scaled(out, want, dtype, f"{dtype} T={T} k={k} ranks={rank_index is not None}")
            # One run of all T tokens (a single expert, 2-D weights): T = 16 and 40 take the lanes form.
            out = lora_delta(x, A[0], B[0], scale=0.5, rank_index=rank_index)
            want = ref64(x, A[:1], B[:1], None, rank_index, None, 0.5)
            assert_close_scaled(out, want, dtype, f"{dtype} T={T} k={k} one run")


@pytest.mark.parametrize("device", available_devices())
def test_single_expert_2d_weights_and_no_routing(device):
    x, A, B, _, _, _ = make_inputs(33, device=device, E=1, dynamic=False, gated=False)
    out = lora_delta(x, A[0], B[0], scale=2.0)
    expected = 2.0 * (x.double() @ A[0].double().T) @ B[0].double().T
    assert_close_scaled(out, expected, torch.float32)


@pytest.mark.parametrize("device", available_devices())
def test_accumulates_into_out(device):
    x, A, B, ei, ri, gate = make_inputs(130, device=device, seed=3)
    base = torch.randn(130, D_OUT, device=device)
    out = base.clone()
    result = lora_delta(x, A, B, scale=0.5, expert_index=ei, rank_index=ri, rank_gate=gate, out=out)
    assert result is out
    assert_close_scaled(out, base.double() + ref64(x, A, B, ei, ri, gate, 0.5), torch.float32)
    assert torch.equal(out[ei < 0], base[ei < 0]), "rows without an adapter must stay untouched"
    # A row-strided view of a larger buffer works too (e.g. a slice of the base output).
    wide = torch.zeros(130, D_OUT + 9, device=device)
    lora_delta(x, A, B, scale=0.5, expert_index=ei, rank_index=ri, rank_gate=gate,
               out=wide[:, 4:4 + D_OUT])
    assert_close_scaled(wide[:, 4:4 + D_OUT], ref64(x, A, B, ei, ri, gate, 0.5), torch.float32)
    assert bool((wide[:, :4] == 0).all() and (wide[:, 4 + D_OUT:] == 0).all())


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["dense", "dynamic_gated"])
def test_gradients_match_float64_reference(device, dtype, mode):
    x, A, B, ei, ri, gate = make_inputs(150, device=device, dtype=dtype, seed=11,
                                        dynamic=mode != "dense", gated=mode != "dense")
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    g = gate.detach().clone().requires_grad_(True) if gate is not None else None
    out = lora_delta(*leaves, scale=0.3, expert_index=ei, rank_index=ri, rank_gate=g)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    out.backward(upstream)

    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    g64 = g.detach().double().requires_grad_(True) if g is not None else None
    ref = reference.lora_delta(*leaves64, scale=0.3, expert_index=ei, rank_index=ri, rank_gate=g64)
    ref.backward(upstream.double())
    for name, got, want in zip(("x", "A", "B"), leaves, leaves64):
        assert got.grad.dtype == dtype
        assert_close_scaled(got.grad, want.grad, dtype, f"grad {name}")
    if g is not None:
        assert_close_scaled(g.grad, g64.grad, dtype, "grad rank_gate")


def test_gradcheck_float64():
    x, A, B, ei, ri, gate = make_inputs(9, dtype=torch.float64, d_in=5, d_out=6, r=4, k=2, E=3)
    args = [t.requires_grad_(True) for t in (x, A, B, gate.double())]
    fn = lambda x, A, B, g: lora_delta(x, A, B, scale=0.7, expert_index=ei, rank_index=ri,  # noqa: E731
                                       rank_gate=g)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", available_devices())
def test_gradcheck_kernel_float32(device):
    """The compiled backward itself, checked numerically in fp32 with loose tolerances."""
    x, A, B, ei, ri, gate = make_inputs(6, device=device, d_in=5, d_out=4, r=4, k=2, E=2, seed=2)
    args = [t.requires_grad_(True) for t in (x, A, B, gate)]
    fn = lambda x, A, B, g: lora_delta(x, A, B, scale=0.7, expert_index=ei, rank_index=ri,  # noqa: E731
                                       rank_gate=g)
    with pytest.warns(UserWarning):
        assert torch.autograd.gradcheck(fn, args, eps=1e-2, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("device", available_devices())
def test_opcheck(device):
    for dynamic in (False, True):
        x, A, B, ei, ri, gate = make_inputs(70, device=device, seed=4, dynamic=dynamic,
                                            gated=dynamic)
        for t in (x, A, B):
            t.requires_grad_(True)
        torch.library.opcheck(torch.ops.bem.lora_delta.default, (x, A, B, ei, ri, gate, 0.5))


def test_torch_compile_fullgraph():
    x, A, B, ei, ri, gate = make_inputs(64, seed=8)
    A.requires_grad_(True)

    def step(x, A, B, gate):
        return (lora_delta(x, A, B, scale=0.5, expert_index=ei, rank_index=ri, rank_gate=gate) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, A, B, gate)
    (grad_compiled,) = torch.autograd.grad(loss, A)
    loss_eager = step(x, A, B, gate)
    (grad_eager,) = torch.autograd.grad(loss_eager, A)
    assert torch.allclose(loss, loss_eager, rtol=1e-5)
    assert torch.allclose(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", available_devices())
def test_non_contiguous_inputs_are_copied(device):
    x, A, B, ei, ri, gate = make_inputs(40, device=device, seed=6)
    xt = x.t().contiguous().t()                    # column-major
    At = A.transpose(1, 2).contiguous().transpose(1, 2)
    Bt = B.transpose(1, 2).contiguous().transpose(1, 2)
    ei_nc = torch.stack([ei, ei], dim=1)[:, 0]      # stride 2
    assert not (xt.is_contiguous() or At.is_contiguous() or ei_nc.is_contiguous())
    got = lora_delta(xt, At, Bt, expert_index=ei_nc, rank_index=ri.t().contiguous().t(),
                     rank_gate=gate.t().contiguous().t())
    want = lora_delta(x, A, B, expert_index=ei, rank_index=ri, rank_gate=gate)
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 150), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
       r=st.integers(1, 9), E=st.integers(1, 4), data=st.data())
def test_hypothesis_shapes_and_index_patterns(T, d_in, d_out, r, E, data):
    k = data.draw(st.integers(1, r))
    seed = data.draw(st.integers(0, 2**31 - 1))
    dynamic = data.draw(st.booleans())
    x, A, B, ei, ri, gate = make_inputs(T, seed=seed, d_in=d_in, d_out=d_out, r=r,
                                        k=k if dynamic else r, E=E, dynamic=dynamic, gated=dynamic)
    if E == 1 and data.draw(st.booleans()):
        ei = None
    out = lora_delta(x, A, B, scale=1.25, expert_index=ei, rank_index=ri, rank_gate=gate)
    assert_close_scaled(out, ref64(x, A, B, ei, ri, gate, 1.25), torch.float32)


def test_concurrent_calls_from_threads_match_serial():
    cases = [make_inputs(T, seed=s) for s, T in enumerate([300, 64, 1, 257, 128, 90])]
    serial = [lora_delta(x, A, B, expert_index=ei, rank_index=ri, rank_gate=g)
              for x, A, B, ei, ri, g in cases]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(tid):
        try:
            for rep in range(5):
                for i, (x, A, B, ei, ri, g) in enumerate(cases):
                    results[(tid, rep * 10 + i)] = lora_delta(x, A, B, expert_index=ei,
                                                             rank_index=ri, rank_gate=g)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (tid, key), value in results.items():
        assert torch.equal(value, serial[key % 10]), f"thread {tid} call {key} differs"


# ---- bad input -------------------------------------------------------------------------------


def good(T=10):
    return dict(zip(("x", "A", "B", "expert_index", "rank_index", "rank_gate"),
                    make_inputs(T, seed=1, gaps=False)))


def call(**kw):
    args = good()
    args.update(kw)
    return lora_delta(args.pop("x"), args.pop("A"), args.pop("B"), **args)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(x=torch.randn(10, 3, D_IN)), ValueError, "x: expected 2 dimensions"),
    (dict(x=torch.randn(10, D_IN + 1)), ValueError, "A: expected last dimension d_in"),
    (dict(A=torch.randn(E, R)), ValueError, "A and B"),
    (dict(A=torch.randn(E, R + 1, D_IN)), ValueError, "B: expected shape"),
    (dict(B=torch.randn(E + 1, D_OUT, R)), ValueError, "B: expected shape"),
    (dict(x=torch.randn(0, D_IN)), ValueError, "x: expected at least one token"),
    (dict(x=torch.randn(10, D_IN, dtype=torch.float64)), TypeError, "A: expected dtype"),
    (dict(A=torch.randn(E, R, D_IN).bfloat16()), TypeError, "A: expected dtype"),
    (dict(x=torch.randint(0, 3, (10, D_IN))), TypeError, "x: expected float32"),
    (dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    (dict(expert_index=None), ValueError, "expert_index: required"),
    (dict(expert_index=torch.full((10,), E)), IndexError, "expert_index"),
    (dict(expert_index=torch.full((10,), -2)), IndexError, "expert_index"),
    (dict(expert_index=torch.zeros(9, dtype=torch.long)), ValueError, "expert_index: expected shape"),
    (dict(expert_index=torch.zeros(10)), TypeError, "expert_index: expected an integer"),
    (dict(rank_index=torch.full((10, K), R)), IndexError, "rank_index"),
    (dict(rank_index=torch.full((10, K), -1)), IndexError, "rank_index"),
    (dict(rank_index=torch.zeros(10, K, dtype=torch.long)), ValueError, "rank_index: .*(twice|duplicate)"),
    (dict(rank_index=torch.zeros(10, R + 1, dtype=torch.long), rank_gate=None), ValueError, "k="),
    (dict(rank_gate=torch.ones(10, K + 1)), ValueError, "rank_gate: expected shape"),
    (dict(rank_gate=torch.ones(10, K, dtype=torch.long)), TypeError, "rank_gate"),
    (dict(scale="2"), TypeError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(out=torch.zeros(10, D_OUT + 1)), ValueError, "out: expected shape"),
    (dict(A=torch.randn(E, R, D_IN, device="meta")), ValueError, "A: expected a tensor on cpu"),
])
def test_bad_input_raises_naming_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


@pytest.mark.parametrize("name", ["x", "A", "B", "rank_gate"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises_naming_it(name, bad):
    args = good()
    t = args[name].clone()
    t.view(-1)[3] = bad
    if name in ("A", "B"):  # poison every expert so the routed tokens are sure to read it
        t[:] = bad
    args[name] = t
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        lora_delta(args.pop("x"), args.pop("A"), args.pop("B"), **args)


def test_bad_index_leaves_out_untouched():
    args = good()
    out = torch.randn(10, D_OUT)
    before = out.clone()
    args["expert_index"] = args["expert_index"].clone()
    args["expert_index"][-1] = E
    with pytest.raises(IndexError):
        lora_delta(args.pop("x"), args.pop("A"), args.pop("B"), out=out, **args)
    assert torch.equal(out, before)
