"""`bem.ops.film`: bounded feature-wise modulation clip(γ)·x + clip(β) as a torch.library custom op
over the C++/CUDA kernels, with γ and β per token, per sequence or global."""
from __future__ import annotations

import math

import torch

from bem import _ext, reference
from bem.ops import _common as c

OP = "film"


def _group_rows(name: str, g: torch.Tensor, x: torch.Tensor) -> int | None:
    """Number of consecutive-row groups G such that `g` is (G, d) after dropping broadcast dims
    (per token: rows of x; per sequence; global: 1), or None when `g` broadcasts some other way."""
    d = x.shape[-1]
    if g.dim() == 0 or g.shape[-1] != d:
        raise ValueError(f"{OP}: {name}: expected last dimension d={d} (the features of x), got "
                         f"shape {tuple(g.shape)}")
    lead_x, lead_g = x.shape[:-1], g.shape[:-1]
    if len(lead_g) > len(lead_x):
        raise ValueError(f"{OP}: {name}: shape {tuple(g.shape)} has more dimensions than x "
                         f"{tuple(x.shape)}")
    lead_g = (1,) * (len(lead_x) - len(lead_g)) + tuple(lead_g)
    for gx, gg in zip(lead_x, lead_g):
        if gg not in (1, gx):
            raise ValueError(f"{OP}: {name}: shape {tuple(g.shape)} does not broadcast against x "
                             f"{tuple(x.shape)}")
    j = 0
    while j < len(lead_x) and lead_g[j] == lead_x[j]:
        j += 1
    if any(v != 1 for v in lead_g[j:]):
        return None
    return math.prod(lead_x[:j])


def _as_groups(g: torch.Tensor, x: torch.Tensor, groups: int | None, target: int) -> torch.Tensor:
    d = x.shape[-1]
    if groups is None:
        return g.expand(x.shape).reshape(-1, d).contiguous()
    g2 = g.reshape(groups, d)
    if groups != target:
        g2 = g2.repeat_interleave(target // groups, dim=0)
    return g2.contiguous()


def _validate(x, gamma, beta, gamma_bounds, beta_bound):
    c.check_tensor(OP, "x", x, tuple(range(1, 9)))
    c.check_float(OP, "x", x)
    if x.numel() == 0:
        raise ValueError(f"{OP}: x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        c.check_tensor(OP, name, t, tuple(range(1, 9)))
        c.check_float(OP, name, t, x.dtype)
        c.check_same_device(OP, name, t, x)
    if gamma_bounds is None:
        lo, hi = -math.inf, math.inf
    else:
        if not isinstance(gamma_bounds, (tuple, list)) or len(gamma_bounds) != 2:
            raise TypeError(f"{OP}: gamma_bounds: expected a (low, high) pair or None, got "
                            f"{gamma_bounds!r}")
        lo, hi = (float(v) for v in gamma_bounds)
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"{OP}: gamma_bounds: expected low <= high, got {gamma_bounds!r}")
    if beta_bound is None:
        bb = math.inf
    else:
        if isinstance(beta_bound, bool) or not isinstance(beta_bound, (int, float)):
            raise TypeError(f"{OP}: beta_bound: expected a float or None, got {type(beta_bound).__name__}")
        bb = float(beta_bound)
        if math.isnan(bb) or bb < 0:
            raise ValueError(f"{OP}: beta_bound: expected >= 0, got {beta_bound!r}")
    gg = _group_rows("gamma", gamma, x)
    gb = _group_rows("beta", beta, x)
    rows = x.numel() // x.shape[-1]
    if gg is None or gb is None:
        target = rows
    else:
        target = max(gg, gb)
        if target % min(gg, gb):
            target = rows
    return (x.reshape(rows, x.shape[-1]).contiguous(), _as_groups(gamma, x, gg, target),
            _as_groups(beta, x, gb, target), lo, hi, bb)


def _fast_unbounded(x, gamma, beta) -> torch.Tensor | None:
    """The inference call of bem's modules (no bounds, no gradient), checked with a few attribute
    reads: x a contiguous CPU tensor of a kernel dtype, γ and β of x's dtype, contiguous, each
    either x's shape (per token) or (d,) (global). None: take the fully checked path (which also
    produces the error messages and handles every other case)."""
    dt = c.fast_operands(x, gamma, beta)
    if dt is None or not _ext.available():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad or beta.requires_grad):
        return None
    xs, gs, bs = x.shape, gamma.shape, beta.shape
    if not xs:
        return None
    d = xs[-1]
    rows = x.numel() // d if d else 0
    if rows == 0 or d == 0:
        return None
    glob = (d,)
    if (gs != xs and gs != glob) or (bs != xs and bs != glob):
        return None
    g2, b2 = gamma.view(-1, d), beta.view(-1, d)
    if g2.shape[0] != b2.shape[0]:                 # one per token, the other global
        g2, b2 = g2.expand(rows, d).contiguous(), b2.expand(rows, d).contiguous()
    y = torch.empty_like(x)
    inf = math.inf
    if not _ext.C().film_forward(-1, 0, 0, rows, d, g2.shape[0], _ext.DTYPE_CODES[dt], -inf, inf,
                                 inf, x.data_ptr(), g2.data_ptr(), b2.data_ptr(), y.data_ptr()):
        c.raise_if_nonfinite_input(OP, x=x, gamma=gamma, beta=beta)
    return y


def _forward(x, gamma, beta, lo, hi, bb):
    rows, d = x.shape
    groups = gamma.shape[0]
    dev = c.kernel_device(x)
    if dev is None:
        reason = c.fallback_reason(x)
        if reason:
            c.warn_fallback(OP, reason)
        reps = rows // groups
        y = reference.film(x, gamma.repeat_interleave(reps, dim=0),
                           beta.repeat_interleave(reps, dim=0), gamma_bounds=(lo, hi), beta_bound=bb)
        if not bool(torch.isfinite(y).all()):  # the kernels' finiteness contract
            c.raise_if_nonfinite_input(OP, x=x, gamma=gamma, beta=beta)
        return y
    y = torch.empty_like(x)
    flag = (torch.zeros(1, dtype=torch.int32, device=x.device)
            if dev >= 0 and c.checks_enabled() else None)
    finite = _ext.C().film_forward(
        dev, c.stream_of(dev), 0 if flag is None else flag.data_ptr(), rows, d, groups,
        _ext.DTYPE_CODES[x.dtype], lo, hi, bb, x.data_ptr(), gamma.data_ptr(), beta.data_ptr(),
        y.data_ptr())
    if not finite or (flag is not None and bool(flag.item())):
        c.raise_if_nonfinite_input(OP, x=x, gamma=gamma, beta=beta)
    return y


@torch.library.custom_op("bem::film", mutates_args=())
def _film_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, gamma_lo: float,
             gamma_hi: float, beta_bound: float) -> torch.Tensor:
    """Normalised op: x (rows, d), gamma and beta (groups, d), contiguous; groups divides rows."""
    return _forward(x, gamma, beta, gamma_lo, gamma_hi, beta_bound)


@_film_op.register_fake
def _film_fake(x, gamma, beta, gamma_lo, gamma_hi, beta_bound):
    return torch.empty_like(x)


@torch.library.custom_op("bem::film_backward", mutates_args=())
def _film_backward_op(grad_y: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor,
                      beta: torch.Tensor, gamma_lo: float, gamma_hi: float, beta_bound: float,
                      needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, gamma, beta) of the normalised op; an unneeded one is an empty tensor."""
    rows, d = x.shape
    groups = gamma.shape[0]
    dev = c.kernel_device(x)
    if dev is None:
        gx, gg, gb = reference.film_backward(grad_y, x, gamma, beta, gamma_bounds=(gamma_lo, gamma_hi),
                                             beta_bound=beta_bound)
        return tuple(g if need else g.new_empty(0) for g, need in zip((gx, gg, gb), needs))
    f32 = dict(dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    gg = torch.empty((groups, d), **f32) if needs[1] else x.new_empty(0)
    gb = torch.empty((groups, d), **f32) if needs[2] else x.new_empty(0)
    _ext.C().film_backward(
        dev, c.stream_of(dev), rows, d, groups, _ext.DTYPE_CODES[x.dtype], gamma_lo, gamma_hi,
        beta_bound, x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), grad_y.contiguous().data_ptr(),
        gx.data_ptr() if needs[0] else 0, gg.data_ptr() if needs[1] else 0,
        gb.data_ptr() if needs[2] else 0)
    return gx, gg.to(gamma.dtype), gb.to(beta.dtype)


@_film_backward_op.register_fake
def _film_backward_fake(grad_y, x, gamma, beta, gamma_lo, gamma_hi, beta_bound, needs):
    return (x.new_empty(x.shape if needs[0] else (0,)),
            gamma.new_empty(gamma.shape if needs[1] else (0,)),
            beta.new_empty(beta.shape if needs[2] else (0,)))


def _setup_context(ctx, inputs, output):
    x, gamma, beta, lo, hi, bb = inputs
    ctx.save_for_backward(x, gamma, beta)
    ctx.bounds = (lo, hi, bb)


def _backward(ctx, grad_y):
    x, gamma, beta = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    gx, gg, gb = _film_backward_op(grad_y.contiguous(), x, gamma, beta, *ctx.bounds, needs)
    return (gx if needs[0] else None, gg if needs[1] else None, gb if needs[2] else None,
            None, None, None)


torch.library.register_autograd("bem::film", _backward, setup_context=_setup_context)


def film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *,
         gamma_bounds: tuple[float, float] | None = (0.5, 2.0),
         beta_bound: float | None = 0.5) -> torch.Tensor:
    """Bounded FiLM: ``clip(γ, *gamma_bounds) · x + clip(β, −beta_bound, beta_bound)``.

    Args:
        x: (..., d) float32 / bfloat16 (float16 too; float64 runs the pure-torch path).
        gamma, beta: dtype of x, broadcastable to x with feature dimension d: per token
            (same leading shape as x), per sequence (e.g. (S, 1, d) for x (S, L, d)) or global
            ((d,)); other broadcasts work too (materialised per row).
        gamma_bounds: (low, high) clip of γ, or None for none. beta_bound: |β| clip, or None.

    Returns:
        x's shape and dtype. Gradients for x, γ and β; zero where γ or β was clipped (the
        convention of torch.clamp: a value exactly on a bound passes its gradient).
    """
    if gamma_bounds is None and beta_bound is None and not torch.compiler.is_compiling():
        y = _fast_unbounded(x, gamma, beta)
        if y is not None:
            return y
    x2, g2, b2, lo, hi, bb = _validate(x, gamma, beta, gamma_bounds, beta_bound)
    needs_grad = torch.is_grad_enabled() and (x2.requires_grad or g2.requires_grad or b2.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        return _film_op(x2, g2, b2, lo, hi, bb).reshape(x.shape)
    return _forward(x2, g2, b2, lo, hi, bb).reshape(x.shape)
