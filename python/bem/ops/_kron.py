"""`bem.ops.kron_delta`: the Kronecker-factored delta (A ⊗ B) x without materialising A ⊗ B, as a
torch.library custom op over the C++/CUDA kernels; plus its spectral norm and merge helpers."""
from __future__ import annotations

import torch

from bem import _ext, reference
from bem.ops import _common as c

OP = "kron_delta"


def _validate(x, A, B, scale, out):
    c.check_tensor(OP, "x", x, tuple(range(1, 9)))
    c.check_float(OP, "x", x)
    c.check_tensor(OP, "A", A, (2,))
    c.check_tensor(OP, "B", B, (2,))
    c.check_float(OP, "A", A, x.dtype)
    c.check_float(OP, "B", B, x.dtype)
    c.check_same_device(OP, "A", A, x)
    c.check_same_device(OP, "B", B, x)
    (o1, i1), (o2, i2) = A.shape, B.shape
    if min(o1, i1) == 0:
        raise ValueError(f"{OP}: A: expected a non-empty (o1, i1) matrix, got {tuple(A.shape)}")
    if min(o2, i2) == 0:
        raise ValueError(f"{OP}: B: expected a non-empty (o2, i2) matrix, got {tuple(B.shape)}")
    if x.shape[-1] != i1 * i2:
        raise ValueError(f"{OP}: x: expected last dimension i1·i2 = {i1}·{i2} = {i1 * i2} "
                         f"(from A and B), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{OP}: x: expected at least one token, got shape {tuple(x.shape)}")
    scale = c.check_scalar(OP, "scale", scale)
    lead = x.shape[:-1]
    if out is not None:
        c.check_tensor(OP, "out", out, (x.dim(),))
        c.check_float(OP, "out", out, x.dtype)
        c.check_same_device(OP, "out", out, x)
        if tuple(out.shape) != (*lead, o1 * o2):
            raise ValueError(f"{OP}: out: expected shape {(*lead, o1 * o2)}, got {tuple(out.shape)}")
    return x.reshape(-1, i1 * i2).contiguous(), A.contiguous(), B.contiguous(), scale, lead


def _forward(x, A, B, scale, y2d):
    """x (T, d_in) contiguous; y2d: (T, d_out) row-strided tensor to accumulate into, or None."""
    T = x.shape[0]
    (o1, i1), (o2, i2) = A.shape, B.shape
    dev = c.kernel_device(x)
    if dev is None:
        reason = c.fallback_reason(x)
        if reason:
            c.warn_fallback(OP, reason)
        delta = reference.kron_delta(x, A, B, scale=scale)
        if not bool(torch.isfinite(delta).all()):  # the kernels' finiteness contract
            c.raise_if_nonfinite_input(OP, x=x, A=A, B=B)
        return delta if y2d is None else y2d.add_(delta)
    y = y2d if y2d is not None else torch.empty((T, o1 * o2), dtype=x.dtype, device=x.device)
    flag = (torch.zeros(1, dtype=torch.int32, device=x.device)
            if dev >= 0 and c.checks_enabled() else None)
    finite = _ext.C().kron_forward(
        dev, c.stream_of(dev), 0 if flag is None else flag.data_ptr(), T, o1, i1, o2, i2,
        _ext.DTYPE_CODES[x.dtype], scale, x.data_ptr(), A.data_ptr(), B.data_ptr(), y.data_ptr(),
        y.stride(0), y2d is not None)
    if not finite or (flag is not None and bool(flag.item())):
        c.raise_if_nonfinite_input(OP, x=x, A=A, B=B)
    return y


@torch.library.custom_op("bem::kron_delta", mutates_args=())
def _kron_delta_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised op: x (T, i1·i2), A (o1, i1), B (o2, i2), all contiguous. Returns (T, o1·o2)."""
    return _forward(x, A, B, scale, None)


@_kron_delta_op.register_fake
def _kron_delta_fake(x, A, B, scale):
    return x.new_empty((x.shape[0], A.shape[0] * B.shape[0]))


@torch.library.custom_op("bem::kron_delta_backward", mutates_args=())
def _kron_backward_op(grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      scale: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, A, B) of the normalised op; an unneeded one is an empty tensor."""
    T = x.shape[0]
    (o1, i1), (o2, i2) = A.shape, B.shape
    dev = c.kernel_device(x)
    if dev is None:
        gx, gA, gB = reference.kron_delta_backward(grad_y, x, A, B, scale=scale)
        return tuple(g if need else g.new_empty(0) for g, need in zip((gx, gA, gB), needs))
    f32 = dict(dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    gA = torch.empty((o1, i1), **f32) if needs[1] else x.new_empty(0)
    gB = torch.empty((o2, i2), **f32) if needs[2] else x.new_empty(0)
    _ext.C().kron_backward(
        dev, c.stream_of(dev), T, o1, i1, o2, i2, _ext.DTYPE_CODES[x.dtype], scale, x.data_ptr(),
        A.data_ptr(), B.data_ptr(), grad_y.contiguous().data_ptr(),
        gx.data_ptr() if needs[0] else 0, gA.data_ptr() if needs[1] else 0,
        gB.data_ptr() if needs[2] else 0)
    return gx, gA.to(A.dtype), gB.to(B.dtype)


@_kron_backward_op.register_fake
def _kron_backward_fake(grad_y, x, A, B, scale, needs):
    return (x.new_empty(x.shape if needs[0] else (0,)), A.new_empty(A.shape if needs[1] else (0,)),
            B.new_empty(B.shape if needs[2] else (0,)))


def _setup_context(ctx, inputs, output):
    x, A, B, scale = inputs
    ctx.save_for_backward(x, A, B)
    ctx.scale = scale


def _backward(ctx, grad_y):
    x, A, B = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    gx, gA, gB = _kron_backward_op(grad_y.contiguous(), x, A, B, ctx.scale, needs)
    return (gx if needs[0] else None, gA if needs[1] else None, gB if needs[2] else None, None)


torch.library.register_autograd("bem::kron_delta", _backward, setup_context=_setup_context)


def kron_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale · (A ⊗ B) x`` for every row of x, without materialising A ⊗ B.

    Uses ``(A ⊗ B) vec(X) = vec(A X Bᵀ)`` with X = x[t] viewed row-major as (i1, i2) — the same
    convention as ``torch.kron(A, B) @ x[t]`` (and PEFT LoKr's ``torch.kron(w1, w2)``).

    Args:
        x: (..., i1·i2) float32 / bfloat16 (float16 too; float64 runs the pure-torch path).
        A: (o1, i1) and B: (o2, i2), dtype of x; d_out = o1·o2.
        scale: multiplies the delta.
        out: optional (..., o1·o2) tensor to add the delta into, in place; returned.

    Returns:
        (..., o1·o2) in x's dtype. Differentiable in x, A and B.
    """
    if c.CPU_KERNELS is not None and not c.is_compiling():
        sizes = _fast_sizes(x, A, B, out)
        if sizes is not None and not (c.grad_enabled() and (
                x.requires_grad or A.requires_grad or B.requires_grad)):
            # Inference fast path (CPU, contiguous, kernel dtype): straight to the kernel.
            scale = c.check_scalar(OP, "scale", scale)
            T, o1, i1, o2, i2, dt = sizes
            y = out if out is not None else x.new_empty(*x.shape[:-1], o1 * o2)
            if not c.CPU_KERNELS.kron_forward(
                    -1, 0, 0, T, o1, i1, o2, i2, _ext.DTYPE_CODES[dt], scale, x.data_ptr(),
                    A.data_ptr(), B.data_ptr(), y.data_ptr(), o1 * o2, out is not None):
                c.raise_if_nonfinite_input(OP, x=x, A=A, B=B)
            return y
    x2, A, B, scale, lead = _validate(x, A, B, scale, out)
    d_out = A.shape[0] * B.shape[0]
    needs_grad = torch.is_grad_enabled() and (x2.requires_grad or A.requires_grad or B.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        delta = _kron_delta_op(x2, A, B, scale).reshape(*lead, d_out)
        return delta if out is None else out.add_(delta)
    if out is not None:
        y2d = out.view(-1, d_out) if out.is_contiguous() else None
        if y2d is None:
            return out.add_(_forward(x2, A, B, scale, None).reshape(out.shape))
        _forward(x2, A, B, scale, y2d)
        return out
    return _forward(x2, A, B, scale, None).reshape(*lead, d_out)


def _fast_sizes(x, A, B, out):
    """The common valid case (CPU, kernel dtype, contiguous x, A, B and `out`), checked with few
    attribute reads; (T, o1, i1, o2, i2, dtype), or None for the fully checked path (which also produces
    the error messages)."""
    dt = c.fast_operands(x, A, B)
    if dt is None:
        return None
    xs, As, Bs = x.shape, A.shape, B.shape
    if len(As) != 2 or len(Bs) != 2 or len(xs) < 1:
        return None
    (o1, i1), (o2, i2) = As, Bs
    d_in = xs[-1]
    if d_in != i1 * i2 or o1 == 0 or i1 == 0 or o2 == 0 or i2 == 0:
        return None
    T = x.numel() // d_in
    if T == 0:
        return None
    if out is not None and not c.fast_out(out, dt, (*xs[:-1], o1 * o2)):
        return None
    return T, o1, i1, o2, i2, dt


def kron_spectral_norm(A: torch.Tensor, B: torch.Tensor, *, tol: float = 1e-6,
                       max_iter: int = 200) -> float:
    """‖A ⊗ B‖₂ = ‖A‖₂ · ‖B‖₂ (largest singular values), by power iteration on the CPU kernel
    (torch.linalg on other devices). Used by the spectral clamp of Kronecker adapters."""
    op = "kron_spectral_norm"
    for name, m in (("A", A), ("B", B)):
        c.check_tensor(op, name, m, (2,))
        c.check_float(op, name, m)
        if m.numel() == 0:
            raise ValueError(f"{op}: {name}: expected a non-empty matrix, got {tuple(m.shape)}")
    tol = c.check_scalar(op, "tol", tol)
    if tol <= 0:
        raise ValueError(f"{op}: tol: expected > 0, got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{op}: max_iter: expected a positive int, got {max_iter!r}")

    def norm(m: torch.Tensor) -> float:
        m = m.detach()
        if m.device.type == "cpu" and _ext.available():
            m32 = m.to(torch.float32).contiguous()
            return _ext.C().spectral_norm(m32.data_ptr(), m32.shape[0], m32.shape[1], tol, max_iter)
        return float(torch.linalg.matrix_norm(m.to(torch.float64), ord=2))

    return norm(A) * norm(B)


def kron_weight(A: torch.Tensor, B: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """The materialised ΔW = scale · (A ⊗ B), shape (o1·o2, i1·i2), for merging into a base weight
    (``W += kron_weight(A, B, scale=s)``)."""
    op = "kron_weight"
    c.check_tensor(op, "A", A, (2,))
    c.check_tensor(op, "B", B, (2,))
    c.check_float(op, "A", A)
    c.check_float(op, "B", B, A.dtype)
    c.check_same_device(op, "B", B, A)
    return reference.kron_weight(A, B, scale=c.check_scalar(op, "scale", scale))
