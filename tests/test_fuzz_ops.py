"""Property-based fuzzing of bem's three ops (hypothesis): random sizes, dtypes, strides, devices,
index ranges, NaN/Inf, empty inputs and one deliberate defect at a time. Every case either matches
the float64 reference element by element or raises the exception the defect calls for, with a
message that starts with the op's name — never a crash, a hang or a silent wrong answer.

BEM_FUZZ_EXAMPLES sets the cases per target (CI: the default 200; the recorded slow run: 10,000,
see docs/reliability.md)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from bem import reference
from bem.ops import film, kron_delta, lora_delta
from helpers import available_devices

FUZZ = settings(max_examples=int(os.environ.get("BEM_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Unit roundoff of each dtype: the per-element error bound is a small multiple of it times the
# magnitude of the terms summed into that element.
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
       torch.float64: 2.0**-53}
DEVICES = available_devices()


def _rand(draw, shape, dtype, device, *, strided):
    """Random normal values in `dtype`; when `strided`, a non-contiguous view with these values."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = t.to(dtype)
    if strided and t.dim() >= 1 and t.numel() > 1:
        # Same values, every other element of a twice-as-wide buffer (and transposed storage for 2-D).
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype)
        wide[..., ::2] = t
        t = wide[..., ::2]
    return t.to(device)


ARGUMENTS = {"lora_delta": ("x", "A", "B", "scale", "expert_index", "rank_index", "rank_gate", "out"),
             "kron_delta": ("x", "A", "B", "scale", "out"),
             "film": ("x", "gamma", "beta", "gamma_bounds", "beta_bound")}


def _expect(outcome, call, op):
    """Run `call`; outcome None → must succeed (returns the result), else must raise that type
    with a message that names the op or one of its arguments ("lora_delta: x: …" from the Python
    checks, "expert_index: …" from the kernels' own range checks)."""
    if outcome is None:
        return call()
    with pytest.raises(outcome) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{op}: ") or msg.split(":")[0] in ARGUMENTS[op], msg
    return None


def _assert_elementwise(out, want, magnitude, dtype, terms, what):
    """|out − want| ≤ (terms + 2)·(eps(dtype)·magnitude + tiny(dtype)), per element; magnitude is
    the same computation on absolute values (the sum of |terms| behind each element), tiny the
    smallest normal number (results below it may flush to zero)."""
    out, want, magnitude = out.double().cpu(), want.double().cpu(), magnitude.double().cpu()
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output from finite inputs"
    bound = (terms + 2) * (EPS[dtype] * magnitude + torch.finfo(dtype).tiny)
    bad = (out - want).abs() > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} elements off, worst {(out - want).abs()[bad].max():.3e}")


# ---- lora_delta -----------------------------------------------------------------------------------

LORA_DEFECTS = {
    None: None, "x int dtype": TypeError, "A dtype differs": TypeError, "A 4-D": ValueError,
    "d_in mismatch": ValueError, "B rank mismatch": ValueError,
    "no expert_index with E>1": ValueError,
    "expert_index too large": IndexError, "expert_index < -1": IndexError,
    "expert_index length": ValueError, "expert_index float": TypeError,
    "rank_index out of range": IndexError, "rank_index duplicate": ValueError,
    "k > r": ValueError, "rank_gate shape": ValueError, "NaN in x": ValueError,
    "Inf in A": ValueError, "NaN in rank_gate": ValueError, "scale NaN": ValueError,
    "scale str": TypeError, "empty x": ValueError, "out shape": ValueError, "out dtype": TypeError,
    "B on other device": ValueError,
}


@st.composite
def lora_cases(draw):
    device = draw(st.sampled_from(DEVICES))
    dtype = draw(st.sampled_from(DTYPES))
    T, d_in, d_out = draw(st.integers(1, 70)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    E, r = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    k = draw(st.integers(1, r))
    defects = [d for d in LORA_DEFECTS if d != "B on other device" or device == "cuda"]
    defect = draw(st.one_of(st.just(None), st.sampled_from(defects)))
    strided = draw(st.booleans())
    x = _rand(draw, (T, d_in), dtype, device, strided=strided)
    three_d = E > 1 or draw(st.booleans())
    A = _rand(draw, (E, r, d_in) if three_d else (r, d_in), dtype, device, strided=strided)
    B = _rand(draw, (E, d_out, r) if three_d else (d_out, r), dtype, device, strided=False)
    ei = None
    if three_d:
        ei = torch.tensor(draw(st.lists(st.integers(-1, E - 1), min_size=T, max_size=T)),
                          dtype=draw(st.sampled_from([torch.int64, torch.int32])), device=device)
    ri = gate = out = None
    if draw(st.booleans()):
        rows = [draw(st.permutations(range(r)))[:k] for _ in range(min(T, 3))]
        ri = torch.tensor([rows[t % len(rows)] for t in range(T)], device=device)
    if draw(st.booleans()):
        gate = (torch.rand(T, k if ri is not None else r) + 0.5).to(device)
    if draw(st.booleans()):
        out = _rand(draw, (T, d_out), dtype, device, strided=False)
    scale = draw(st.floats(-4, 4, allow_nan=False))

    if defect == "x int dtype":
        x = x.to(torch.int32)
    elif defect == "A dtype differs":
        A = A.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif defect == "A 4-D":
        A = A.reshape(1, *A.shape) if three_d else A.reshape(1, 1, *A.shape)
    elif defect == "d_in mismatch":
        x = _rand(draw, (T, d_in + 1), dtype, device, strided=False)
    elif defect == "B rank mismatch":
        B = _rand(draw, (*B.shape[:-1], r + 1), dtype, device, strided=False)
    elif defect == "no expert_index with E>1":
        if E == 1:
            A, B = A.expand(2, *A.shape[-2:]) if three_d else A.expand(2, *A.shape), \
                B.expand(2, *B.shape[-2:]) if three_d else B.expand(2, *B.shape)
        ei = None
    elif defect == "expert_index too large":
        ei = torch.full((T,), E, dtype=torch.int64, device=device) if ei is None else \
            torch.cat([ei[:-1], torch.tensor([E], dtype=ei.dtype, device=device)])
    elif defect == "expert_index < -1":
        ei = torch.full((T,), -2 - draw(st.integers(0, 5)), dtype=torch.int64, device=device)
    elif defect == "expert_index length":
        ei = torch.zeros(T + 1, dtype=torch.int64, device=device)
    elif defect == "expert_index float":
        ei = torch.zeros(T, dtype=torch.float32, device=device)
    elif defect == "rank_index out of range":
        ri = torch.full((T, 1), r + draw(st.integers(0, 3)), device=device)
        gate = None
    elif defect == "rank_index duplicate":
        if r < 2:
            A = _rand(draw, (*A.shape[:-2], 2, d_in), dtype, device, strided=False)
            B = _rand(draw, (*B.shape[:-1], 2), dtype, device, strided=False)
        ri = torch.zeros((T, 2), dtype=torch.int64, device=device)
        gate = None
    elif defect == "k > r":
        ri = torch.arange(r + 1, device=device).expand(T, r + 1)
        gate = None
    elif defect == "rank_gate shape":
        gate = torch.ones(T, (ri.shape[1] if ri is not None else r) + 1, device=device)
    elif defect == "NaN in x":
        if ei is not None:
            ei[0] = 0
        x = x.clone()
        x[0, draw(st.integers(0, d_in - 1))] = math.nan
    elif defect == "Inf in A":
        if ei is not None:
            ei[0] = 0
        A = A.clone()
        (A[0] if three_d else A).fill_(math.inf)
    elif defect == "NaN in rank_gate":
        gate = torch.full((T, ri.shape[1] if ri is not None else r), math.nan, device=device)
        if ei is not None:
            ei[0] = 0
    elif defect == "scale NaN":
        scale = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif defect == "scale str":
        scale = draw(st.sampled_from(["0.5", None, True, [1.0]]))
    elif defect == "empty x":
        x = x[:0]
        ei = ei[:0] if ei is not None else None
        ri = ri[:0] if ri is not None else None
        gate = gate[:0] if gate is not None else None
        out = None
    elif defect == "out shape":
        out = torch.zeros(T, d_out + 1, dtype=dtype, device=device)
    elif defect == "out dtype":
        out = torch.zeros(T, d_out, dtype=torch.float64 if dtype != torch.float64 else torch.float32,
                          device=device)
    elif defect == "B on other device":
        B = B.cpu()
    return dict(x=x, A=A, B=B, scale=scale, expert_index=ei, rank_index=ri, rank_gate=gate,
                out=out), defect


@FUZZ
@given(case=lora_cases())
def test_fuzz_lora_delta(case):
    kw, defect = case
    base = None if kw["out"] is None else kw["out"].clone()
    got = _expect(LORA_DEFECTS[defect], lambda: lora_delta(**kw), "lora_delta")
    if got is None:
        return
    x, A, B = kw["x"], kw["A"], kw["B"]
    gate = kw["rank_gate"]
    ref_kw = dict(expert_index=kw["expert_index"], rank_index=kw["rank_index"])
    want = reference.lora_delta(x.double(), A.double(), B.double(), scale=kw["scale"],
                                rank_gate=None if gate is None else gate.double(), **ref_kw)
    mag = reference.lora_delta(x.double().abs(), A.double().abs(), B.double().abs(),
                               scale=abs(kw["scale"]),
                               rank_gate=None if gate is None else gate.double().abs(), **ref_kw)
    if base is not None:
        assert got is kw["out"]
        want, mag = want + base.double(), mag + base.double().abs()
    _assert_elementwise(got, want, mag, x.dtype, x.shape[1] + A.shape[-2], "lora_delta")


# ---- kron_delta -----------------------------------------------------------------------------------

KRON_DEFECTS = {None: None, "x int dtype": TypeError, "A 3-D": ValueError,
                "B dtype differs": TypeError,
                "d_in mismatch": ValueError, "empty A": ValueError, "empty x": ValueError,
                "NaN in x": ValueError, "Inf in B": ValueError, "scale inf": ValueError,
                "out shape": ValueError, "x 0-D": ValueError, "A on other device": ValueError}


@st.composite
def kron_cases(draw):
    device = draw(st.sampled_from(DEVICES))
    dtype = draw(st.sampled_from(DTYPES))
    o1, i1, o2, i2 = (draw(st.integers(1, 9)) for _ in range(4))
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    defects = [d for d in KRON_DEFECTS if d != "A on other device" or device == "cuda"]
    defect = draw(st.one_of(st.just(None), st.sampled_from(defects)))
    strided = draw(st.booleans())
    x = _rand(draw, (*lead, i1 * i2), dtype, device, strided=strided)
    A = _rand(draw, (o1, i1), dtype, device, strided=strided)
    B = _rand(draw, (o2, i2), dtype, device, strided=False)
    out = _rand(draw, (*lead, o1 * o2), dtype, device, strided=False) if draw(st.booleans()) else None
    scale = draw(st.floats(-4, 4, allow_nan=False))
    if defect == "x int dtype":
        x = x.to(torch.int64)
    elif defect == "A 3-D":
        A = A.unsqueeze(0)
    elif defect == "B dtype differs":
        B = B.to(torch.float64 if dtype != torch.float64 else torch.float16)
    elif defect == "d_in mismatch":
        x = _rand(draw, (*lead, i1 * i2 + 1), dtype, device, strided=False)
    elif defect == "empty A":
        A = A[:0]
    elif defect == "empty x":
        x, out = x[..., :0, :] if x.dim() > 1 else x[:0], None
    elif defect == "NaN in x":
        x = x.clone()
        x.view(-1, i1 * i2)[0, draw(st.integers(0, i1 * i2 - 1))] = math.nan
    elif defect == "Inf in B":
        B = B.clone()
        B[draw(st.integers(0, o2 - 1)), draw(st.integers(0, i2 - 1))] = -math.inf
    elif defect == "scale inf":
        scale = math.inf
    elif defect == "out shape":
        out = torch.zeros(*lead, o1 * o2 + 1, dtype=dtype, device=device)
    elif defect == "x 0-D":
        x = torch.tensor(1.0, dtype=dtype, device=device)
    elif defect == "A on other device":
        A = A.cpu()
    return dict(x=x, A=A, B=B, scale=scale, out=out), defect


@FUZZ
@given(case=kron_cases())
def test_fuzz_kron_delta(case):
    kw, defect = case
    base = None if kw["out"] is None else kw["out"].clone()
    got = _expect(KRON_DEFECTS[defect], lambda: kron_delta(**kw), "kron_delta")
    if got is None:
        return
    x, A, B = kw["x"], kw["A"], kw["B"]
    x2 = x.reshape(-1, x.shape[-1])
    want = reference.kron_delta(x2.double(), A.double(), B.double(), scale=kw["scale"])
    mag = reference.kron_delta(x2.double().abs(), A.double().abs(), B.double().abs(),
                               scale=abs(kw["scale"]))
    want, mag = want.reshape(*x.shape[:-1], -1), mag.reshape(*x.shape[:-1], -1)
    if base is not None:
        assert got is kw["out"]
        want, mag = want + base.double(), mag + base.double().abs()
    _assert_elementwise(got, want, mag, x.dtype, A.shape[1] + B.shape[1], "kron_delta")


# ---- film -----------------------------------------------------------------------------------------

FILM_DEFECTS = {None: None, "x int dtype": TypeError, "gamma dtype differs": TypeError,
                "gamma wrong features": ValueError, "beta does not broadcast": ValueError,
                "beta more dims": ValueError, "empty x": ValueError, "NaN in x": ValueError,
                "Inf in gamma, unbounded": ValueError, "Inf in gamma, clipped": None,
                "NaN in beta": ValueError,
                "gamma_bounds reversed": ValueError, "gamma_bounds NaN": ValueError,
                "gamma_bounds not a pair": TypeError, "beta_bound negative": ValueError,
                "beta_bound str": TypeError, "gamma 0-D": ValueError,
                "beta on other device": ValueError}


@st.composite
def film_cases(draw):
    device = draw(st.sampled_from(DEVICES))
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    d = shape[-1]

    def mod_shape():
        # Per token, per sequence, global, or any broadcastable mix.
        lead = [draw(st.sampled_from([1, s])) for s in shape[:-1]]
        drop = draw(st.integers(0, len(lead)))
        return tuple(lead[drop:]) + (d,)
    defects = [f for f in FILM_DEFECTS if f != "beta on other device" or device == "cuda"]
    defect = draw(st.one_of(st.just(None), st.sampled_from(defects)))
    strided = draw(st.booleans())
    x = _rand(draw, shape, dtype, device, strided=strided)
    gamma = _rand(draw, mod_shape(), dtype, device, strided=strided) + 1.0
    beta = _rand(draw, mod_shape(), dtype, device, strided=False)
    gb = draw(st.one_of(st.none(), st.tuples(st.floats(-3, 1), st.floats(1, 3))))
    bb = draw(st.one_of(st.none(), st.floats(0, 2)))
    if defect == "x int dtype":
        x = x.to(torch.int16)
    elif defect == "gamma dtype differs":
        gamma = gamma.to(torch.float64 if dtype != torch.float64 else torch.bfloat16)
    elif defect == "gamma wrong features":
        gamma = torch.ones(d + 1, dtype=dtype, device=device)
    elif defect == "beta does not broadcast":
        beta = torch.zeros((*shape[:-2], shape[-2] + 1, d) if len(shape) > 1 else (d + 2,),
                           dtype=dtype, device=device)
    elif defect == "beta more dims":
        beta = torch.zeros((2, *shape), dtype=dtype, device=device)
    elif defect == "empty x":
        x = x[..., :0, :] if x.dim() > 1 else x[:0]
        gamma = torch.ones(x.shape[-1], dtype=dtype, device=device) if x.shape[-1] else gamma[..., :0]
        beta = torch.zeros_like(gamma)
    elif defect == "NaN in x":
        x = x.clone()
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = math.nan
    elif defect in ("Inf in gamma, unbounded", "Inf in gamma, clipped"):
        # ±Inf in γ is an error only where it reaches the output; gamma_bounds clip it to a bound.
        gamma = gamma.clone()
        where = draw(st.integers(0, gamma.numel() - 1))
        gamma.view(-1)[where] = draw(st.sampled_from([math.inf, -math.inf]))
        gb = (None if defect.endswith("unbounded")
              else (draw(st.floats(-3, 1)), draw(st.floats(1, 3))))
    elif defect == "NaN in beta":
        beta = beta.clone()
        beta.view(-1)[draw(st.integers(0, beta.numel() - 1))] = math.nan
    elif defect == "gamma_bounds reversed":
        gb = (2.0, 0.5)
    elif defect == "gamma_bounds NaN":
        gb = (math.nan, 1.0)
    elif defect == "gamma_bounds not a pair":
        gb = draw(st.sampled_from([0.5, (0.5,), (0.1, 0.2, 0.3), "0.5,2"]))
    elif defect == "beta_bound negative":
        bb = -draw(st.floats(0.001, 5))
    elif defect == "beta_bound str":
        bb = "0.5"
    elif defect == "gamma 0-D":
        gamma = torch.tensor(1.0, dtype=dtype, device=device)
    elif defect == "beta on other device":
        beta = beta.cpu()
    return dict(x=x, gamma=gamma, beta=beta, gamma_bounds=gb, beta_bound=bb), defect


@FUZZ
@given(case=film_cases())
def test_fuzz_film(case):
    kw, defect = case
    got = _expect(FILM_DEFECTS[defect], lambda: film(**kw), "film")
    if got is None:
        return
    x, gamma, beta = kw["x"], kw["gamma"], kw["beta"]
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device
    g, b = gamma.double(), beta.double()
    if kw["gamma_bounds"] is not None:
        g = g.clamp(*kw["gamma_bounds"])
    if kw["beta_bound"] is not None:
        b = b.clamp(-kw["beta_bound"], kw["beta_bound"])
    want = g * x.double() + b
    mag = (g * x.double()).abs() + b.abs()
    _assert_elementwise(got, want, mag, x.dtype, 2, "film")
