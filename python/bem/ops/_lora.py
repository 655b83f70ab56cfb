"""`bem.ops.lora_delta`: masked multi-expert LoRA (dynamic rank, per-token experts) as a
torch.library custom op with fake and autograd registrations, over the C++/CUDA kernels."""
from __future__ import annotations

from typing import Optional

import torch

from bem import _ext, reference
from bem.ops import _common as c

OP = "lora_delta"


def _validate(x, A, B, scale, expert_index, rank_index, rank_gate, out):
    """Checks every argument; returns the normalised (x, A3, B3, ei, ri, gate, scale)."""
    c.check_tensor(OP, "x", x, (2,))
    c.check_float(OP, "x", x)
    c.check_tensor(OP, "A", A, (2, 3))
    c.check_tensor(OP, "B", B, (2, 3))
    dtype = x.dtype
    c.check_float(OP, "A", A, dtype)
    c.check_float(OP, "B", B, dtype)
    c.check_same_device(OP, "A", A, x)
    c.check_same_device(OP, "B", B, x)
    if A.dim() != B.dim():
        raise ValueError(f"{OP}: A and B: expected both (r, d_in)/(d_out, r) or both "
                         f"(E, r, d_in)/(E, d_out, r), got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    T, d_in = x.shape
    if T == 0:
        raise ValueError(f"{OP}: x: expected at least one token, got shape {tuple(x.shape)}")
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    B3 = B if B.dim() == 3 else B.unsqueeze(0)
    E, r, a_in = A3.shape
    if a_in != d_in:
        raise ValueError(f"{OP}: A: expected last dimension d_in={d_in} (from x), got shape "
                         f"{tuple(A.shape)}")
    if E == 0 or r == 0:
        raise ValueError(f"{OP}: A: expected at least one expert and rank >= 1, got shape {tuple(A.shape)}")
    if B3.shape[0] != E or B3.shape[2] != r or B3.shape[1] == 0:
        raise ValueError(f"{OP}: B: expected shape (E={E}, d_out, r={r}) matching A, got "
                         f"{tuple(B.shape)}")
    scale = c.check_scalar(OP, "scale", scale)

    if expert_index is None:
        if E > 1:
            raise ValueError(f"{OP}: expert_index: required when A holds E={E} > 1 experts")
    else:
        c.check_tensor(OP, "expert_index", expert_index, (1,))
        if expert_index.dtype not in c.INDEX_DTYPES:
            raise TypeError(f"{OP}: expert_index: expected an integer tensor, got {expert_index.dtype}")
        if expert_index.shape[0] != T:
            raise ValueError(f"{OP}: expert_index: expected shape ({T},) (one per token of x), got "
                             f"{tuple(expert_index.shape)}")
        c.check_same_device(OP, "expert_index", expert_index, x)
        if expert_index.dtype != torch.int64 or not expert_index.is_contiguous():
            expert_index = expert_index.to(torch.int64).contiguous()

    k = r
    if rank_index is not None:
        c.check_tensor(OP, "rank_index", rank_index, (2,))
        if rank_index.dtype not in c.INDEX_DTYPES:
            raise TypeError(f"{OP}: rank_index: expected an integer tensor, got {rank_index.dtype}")
        if rank_index.shape[0] != T:
            raise ValueError(f"{OP}: rank_index: expected shape ({T}, k), got {tuple(rank_index.shape)}")
        k = rank_index.shape[1]
        if k < 1 or k > r:
            raise ValueError(f"{OP}: rank_index: expected 1 <= k <= r={r} active components, got k={k}")
        c.check_same_device(OP, "rank_index", rank_index, x)
        if rank_index.dtype != torch.int64 or not rank_index.is_contiguous():
            rank_index = rank_index.to(torch.int64).contiguous()

    if rank_gate is not None:
        c.check_tensor(OP, "rank_gate", rank_gate, (2,))
        if not rank_gate.is_floating_point():
            raise TypeError(f"{OP}: rank_gate: expected a floating tensor, got {rank_gate.dtype}")
        if tuple(rank_gate.shape) != (T, k):
            raise ValueError(f"{OP}: rank_gate: expected shape ({T}, {k}), got {tuple(rank_gate.shape)}")
        c.check_same_device(OP, "rank_gate", rank_gate, x)
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if rank_gate.dtype != gate_dtype or not rank_gate.is_contiguous():
            rank_gate = rank_gate.to(gate_dtype).contiguous()

    if out is not None:
        c.check_tensor(OP, "out", out, (2,))
        c.check_float(OP, "out", out, dtype)
        c.check_same_device(OP, "out", out, x)
        if tuple(out.shape) != (T, B3.shape[1]):
            raise ValueError(f"{OP}: out: expected shape ({T}, {B3.shape[1]}), got {tuple(out.shape)}")
        if out.stride(1) != 1 or out.stride(0) < out.shape[1]:
            raise ValueError(f"{OP}: out: expected rows with unit stride (a row-strided view is fine)")

    return (c.row_major(x), A3.contiguous(), B3.contiguous(), expert_index, rank_index, rank_gate,
            scale)


def _check_indices_on_device(E, r, ei, ri):
    """Index validation with torch, for the GPU kernels and the reference path (the CPU kernels
    check inline); one device sync."""
    flags = []
    if ei is not None:
        flags.append(((ei < -1) | (ei >= E)).any())
    if ri is not None:
        flags.append(((ri < 0) | (ri >= r)).any())
        srt = ri.sort(dim=1).values
        flags.append((srt[:, 1:] == srt[:, :-1]).any())
    if not flags:
        return
    bad = torch.stack(flags).tolist()
    if ei is not None and bad.pop(0):
        raise IndexError(f"{OP}: expert_index: values must lie in [-1, {E}) (−1 = no adapter)")
    if ri is not None:
        if bad[0]:
            raise IndexError(f"{OP}: rank_index: values must lie in [0, {r})")
        if bad[1]:
            raise ValueError(f"{OP}: rank_index: duplicate rank components within a row")


def _reference_forward(x, A3, B3, ei, ri, gate, scale):
    delta = reference.lora_delta(x, A3, B3, scale=scale, expert_index=ei, rank_index=ri,
                                 rank_gate=gate)
    return delta, reference.lora_shrink(x, A3, expert_index=ei, rank_index=ri)


def _forward(x, A3, B3, ei, ri, gate, scale, out, want_shrink):
    """Runs the kernel (or the reference). Returns (delta or out, shrink or None)."""
    T, d_in = x.shape
    E, r, _ = A3.shape
    d_out = B3.shape[1]
    k = ri.shape[1] if ri is not None else r
    dev = c.kernel_device(x)
    if dev is None:
        reason = c.fallback_reason(x)
        if reason:
            c.warn_fallback(OP, reason)
        # The reference does not check its input: same index and finiteness contract as the kernels.
        _check_indices_on_device(E, r, ei, ri)
        delta, shrink = _reference_forward(x, A3, B3, ei, ri, gate, scale)
        if not bool(torch.isfinite(delta).all()):
            c.raise_if_nonfinite_input(OP, x=x, A=A3, B=B3, rank_gate=gate)
        if out is not None:
            out.add_(delta)
            delta = out
        return delta, (shrink if want_shrink else None)
    y = out if out is not None else torch.empty((T, d_out), dtype=x.dtype, device=x.device)
    shrink = torch.empty((T, k), dtype=torch.float32, device=x.device) if want_shrink else None
    flag = None
    if dev >= 0 and c.checks_enabled():
        _check_indices_on_device(E, r, ei, ri)
        flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    finite = _ext.C().lora_forward(
        dev, c.stream_of(dev), 0 if flag is None else flag.data_ptr(), T, d_in, d_out, r, k, E,
        _ext.DTYPE_CODES[x.dtype], scale, x.data_ptr(), x.stride(0), A3.data_ptr(),
        B3.data_ptr(), 0 if ei is None else ei.data_ptr(), 0 if ri is None else ri.data_ptr(),
        0 if gate is None else gate.data_ptr(), y.data_ptr(), y.stride(0), out is not None,
        0 if shrink is None else shrink.data_ptr())
    if not finite or (flag is not None and bool(flag.item())):
        c.raise_if_nonfinite_input(OP, x=x, A=A3, B=B3, rank_gate=gate)
    return y, shrink


@torch.library.custom_op("bem::lora_delta", mutates_args=())
def _lora_delta_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   expert_index: Optional[torch.Tensor], rank_index: Optional[torch.Tensor],
                   rank_gate: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised op: x (T, d_in) row-major, A (E, r, d_in), B (E, d_out, r) contiguous, int64
    indices, fp32 gate (fp64 with fp64 x). Returns (delta (T, d_out), shrink (T, k) fp32) — shrink
    is A[e_t][i_tj]·x[t], saved for the backward."""
    delta, shrink = _forward(x, A, B, expert_index, rank_index, rank_gate, scale, None, True)
    return delta, shrink


@_lora_delta_op.register_fake
def _lora_delta_fake(x, A, B, expert_index, rank_index, rank_gate, scale):
    k = rank_index.shape[1] if rank_index is not None else A.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], B.shape[1])), x.new_empty((x.shape[0], k), dtype=acc)


@torch.library.custom_op("bem::lora_delta_backward", mutates_args=())
def _lora_backward_op(grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      expert_index: Optional[torch.Tensor], rank_index: Optional[torch.Tensor],
                      rank_gate: Optional[torch.Tensor], shrink: torch.Tensor, scale: float,
                      needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, A, B, rank_gate) of the normalised op; an unneeded one is an empty tensor.
    grad_A/grad_B/grad_gate come back in x's dtype (the kernels accumulate them in fp32)."""
    T, d_in = x.shape
    E, r, _ = A.shape
    d_out = B.shape[1]
    k = rank_index.shape[1] if rank_index is not None else r
    dev = c.kernel_device(x)
    if dev is None:
        gx, gA, gB, gg = reference.lora_delta_backward(
            grad_y, x, A, B, scale=scale, expert_index=expert_index, rank_index=rank_index,
            rank_gate=rank_gate)
        return tuple(g if need else g.new_empty(0) for g, need in zip((gx, gA, gB, gg), needs))
    f32 = dict(dtype=torch.float32, device=x.device)
    gx = torch.empty((T, d_in), dtype=x.dtype, device=x.device) if needs[0] else x.new_empty(0)
    gA = torch.empty((E, r, d_in), **f32) if needs[1] else x.new_empty(0)
    gB = torch.empty((E, d_out, r), **f32) if needs[2] else x.new_empty(0)
    gg = torch.empty((T, k), **f32) if needs[3] else x.new_empty(0)
    ptr = lambda t, need: t.data_ptr() if need else 0  # noqa: E731
    _ext.C().lora_backward(
        dev, c.stream_of(dev), T, d_in, d_out, r, k, E, _ext.DTYPE_CODES[x.dtype], scale,
        x.data_ptr(), A.data_ptr(), B.data_ptr(),
        0 if expert_index is None else expert_index.data_ptr(),
        0 if rank_index is None else rank_index.data_ptr(),
        0 if rank_gate is None else rank_gate.data_ptr(), shrink.data_ptr(),
        grad_y.contiguous().data_ptr(), ptr(gx, needs[0]), ptr(gA, needs[1]), ptr(gB, needs[2]),
        ptr(gg, needs[3]))
    return gx, gA.to(A.dtype), gB.to(B.dtype), gg


@_lora_backward_op.register_fake
def _lora_backward_fake(grad_y, x, A, B, expert_index, rank_index, rank_gate, shrink, scale, needs):
    k = rank_index.shape[1] if rank_index is not None else A.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape if needs[0] else (0,)), A.new_empty(A.shape if needs[1] else (0,)),
            B.new_empty(B.shape if needs[2] else (0,)),
            x.new_empty((x.shape[0], k) if needs[3] else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, A, B, ei, ri, gate, scale = inputs
    ctx.save_for_backward(x, A, B, ei, ri, gate, output[1])
    ctx.scale = scale


def _backward(ctx, grad_delta, grad_shrink):
    x, A, B, ei, ri, gate, shrink = ctx.saved_tensors
    nx, nA, nB, _, _, ngate, _ = ctx.needs_input_grad
    needs = [bool(nx), bool(nA), bool(nB), bool(ngate) and gate is not None]
    gx, gA, gB, gg = _lora_backward_op(grad_delta.contiguous(), x, A, B, ei, ri, gate, shrink,
                                       ctx.scale, needs)
    return (gx if needs[0] else None, gA if needs[1] else None, gB if needs[2] else None, None,
            None, gg if needs[3] else None, None)


torch.library.register_autograd("bem::lora_delta", _backward, setup_context=_setup_context)


def _fast_sizes(x, A, B, ei, ri, gate, out):
    """The common valid case, checked with as few tensor attribute reads as possible (each costs
    0.1–0.3 µs, and a decode-sized delta is a few µs): CPU, kernel dtype, contiguous, int64 indices,
    fp32 gate, contiguous `out`. Returns (T, d_in, d_out, r, k, E, dtype), or None to take the
    fully checked path (which also produces the error messages and handles strided inputs)."""
    dt = c.fast_operands(x, A, B)
    if dt is None:
        return None
    xs, As, Bs = x.shape, A.shape, B.shape
    if len(xs) != 2 or len(As) != len(Bs):
        return None
    T, d_in = xs
    if len(As) == 3:
        E, r, a_in = As
        e2, d_out, r2 = Bs
        if e2 != E or (E > 1 and ei is None):
            return None
    elif len(As) == 2:
        E = 1
        r, a_in = As
        d_out, r2 = Bs
    else:
        return None
    if a_in != d_in or r2 != r or T == 0 or r == 0 or d_out == 0:
        return None
    if ei is not None and not (isinstance(ei, torch.Tensor) and ei.dtype is _INT64 and ei.is_cpu
                               and ei.is_contiguous() and ei.shape == (T,)):
        return None
    k = r
    if ri is not None:
        if not (isinstance(ri, torch.Tensor) and ri.dtype is _INT64 and ri.is_cpu and ri.is_contiguous()):
            return None
        rs = ri.shape  # read once: each attribute read costs ~0.1 µs here
        if len(rs) != 2:
            return None
        T2, k = rs
        if T2 != T or k < 1 or k > r:
            return None
    if gate is not None and not (isinstance(gate, torch.Tensor) and gate.dtype is _FLOAT32 and gate.is_cpu
                                 and gate.is_contiguous() and gate.shape == (T, k)):
        return None
    if out is not None and not c.fast_out(out, dt, (T, d_out)):
        return None
    return T, d_in, d_out, r, k, E, dt


_INT64 = torch.int64
_FLOAT32 = torch.float32


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0,
               expert_index: torch.Tensor | None = None, rank_index: torch.Tensor | None = None,
               rank_gate: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Masked multi-expert LoRA delta:
    ``delta[t] = scale · Σ_{j<k} rank_gate[t,j] · B[e_t][:, i_tj] · (A[e_t][i_tj, :] · x[t])``.

    Args:
        x: (T, d_in) float32 / bfloat16 (float16 too; float64 runs the pure-torch path).
        A: (E, r, d_in) experts' down projections, or (r, d_in) for one expert; dtype of x.
        B: (E, d_out, r) up projections, or (d_out, r); dtype of x (PEFT's lora_B.weight layout).
        scale: multiplies the delta (e.g. alpha / r).
        expert_index: (T,) integer, the expert of each token; −1 = no adapter (delta row 0).
            Required when E > 1. Tokens of one expert should come in runs (64-token chunks).
        rank_index: (T, k) integer, the k ≤ r active rank components of each token (distinct
            within a row). None = all r. Work is proportional to k.
        rank_gate: (T, k) float multipliers of the active components (default ones); its gradient
            is returned, so a straight-through estimator can train the mask predictor.
        out: optional (T, d_out) tensor (e.g. the base layer's output) to add the delta into, in
            place; returned. Rows whose expert is −1 are left unchanged.

    Returns:
        (T, d_out) delta in x's dtype (or ``out``). Differentiable in x, A, B and rank_gate.

    Raises:
        TypeError / ValueError / IndexError naming the argument for wrong types, shapes, dtypes,
        devices, out-of-range or duplicate indices, k > r, empty T, and NaN/Inf inputs.
    """
    if c.CPU_KERNELS is not None and not c.is_compiling():
        sizes = _fast_sizes(x, A, B, expert_index, rank_index, rank_gate, out)
        if sizes is not None and not (c.grad_enabled() and (
                x.requires_grad or A.requires_grad or B.requires_grad
                or (rank_gate is not None and rank_gate.requires_grad))):
            # Inference fast path: straight to the CPU kernel, no dispatcher round trip (a
            # decode-sized call costs less than the dispatcher itself); accumulates into `out`.
            if not (type(scale) is float and scale - scale == 0.0):  # check_scalar's common case
                scale = c.check_scalar(OP, "scale", scale)
            T, d_in, d_out, r, k, E, dt = sizes
            # x.new_empty(T, d_out): 0.9 µs; torch.empty((T, d_out), dtype=dt): 1.6 µs.
            y = out if out is not None else x.new_empty(T, d_out)
            if not c.CPU_KERNELS.lora_forward_cpu(
                    T, d_in, d_out, r, k, E, _ext.DTYPE_CODES[dt], scale, x.data_ptr(), A.data_ptr(),
                    B.data_ptr(), 0 if expert_index is None else expert_index.data_ptr(),
                    0 if rank_index is None else rank_index.data_ptr(),
                    0 if rank_gate is None else rank_gate.data_ptr(), y.data_ptr(), out is not None):
                c.raise_if_nonfinite_input(OP, x=x, A=A, B=B, rank_gate=rank_gate)
            return y
    x, A3, B3, ei, ri, gate, scale = _validate(x, A, B, scale, expert_index, rank_index,
                                               rank_gate, out)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            x.requires_grad or A3.requires_grad or B3.requires_grad
            or (gate is not None and gate.requires_grad))):
        delta = _lora_delta_op(x, A3, B3, ei, ri, gate, scale)[0]
        return delta if out is None else out.add_(delta)
    return _forward(x, A3, B3, ei, ri, gate, scale, out, False)[0]
