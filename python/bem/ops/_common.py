"""Shared plumbing of bem's ops: argument checks that name the argument, the choice between a
compiled kernel and the pure-torch reference, and the diagnosis of non-finite results."""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

import torch

from bem import _ext

log = logging.getLogger("bem")

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

_state = threading.local()
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def checks_enabled() -> bool:
    """Whether GPU calls verify index ranges and finiteness (each costs a device sync)."""
    return getattr(_state, "checks", True)


@contextlib.contextmanager
def device_checks(enabled: bool) -> Iterator[None]:
    """Turn the GPU-side data checks of bem's ops on or off in this thread, e.g. off while
    capturing a CUDA graph (where a device sync is not allowed). CPU checks are free and always on.
    """
    previous = checks_enabled()
    _state.checks = bool(enabled)
    try:
        yield
    finally:
        _state.checks = previous


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that the slow pure-torch reference is being used."""
    key = (op, reason)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"bem.ops.{op}: no compiled kernel for {reason}; using the pure-torch reference "
                  "(correct but slower)", RuntimeWarning, stacklevel=4)


def kernel_device(t: torch.Tensor) -> int | None:
    """−1 for a CPU kernel, the CUDA ordinal for a CUDA kernel, None when only the reference can run.
    float64 always runs the reference (it exists for gradcheck and as an exact oracle)."""
    if t.dtype == torch.float64 or not _ext.available():
        return None
    kind = t.device.type
    if kind == "cpu":
        return -1
    if kind == "cuda" and _ext.cuda_built():
        return t.device.index if t.device.index is not None else torch.cuda.current_device()
    return None


def fallback_reason(t: torch.Tensor) -> str | None:
    """Why `t` cannot use a compiled kernel, for the one-time warning (None: not worth warning)."""
    if t.dtype == torch.float64:
        return None
    if not _ext.available():
        return "this install (bem._C did not import)"
    return f"device {t.device.type}" + (" (bem built without CUDA)" if t.device.type == "cuda" else "")


def stream_of(device: int) -> int:
    return 0 if device < 0 else torch.cuda.current_stream(device).cuda_stream


def type_name(v: object) -> str:
    return type(v).__name__


def check_tensor(op: str, name: str, t: object, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type_name(t)}")
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{op}: {name}: expected {want} dimensions, got shape {tuple(t.shape)}")
    return t


def check_float(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if dtype is None:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name}: expected float32, bfloat16, float16 or float64, "
                            f"got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{op}: {name}: expected dtype {dtype} (the dtype of x), got {t.dtype}")


def check_same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name}: expected a tensor on {ref.device} (the device of x), "
                         f"got {t.device}")


def check_scalar(op: str, name: str, v: object) -> float:
    if type(v) is float and v - v == 0.0:  # the common case, finite (inf - inf and NaN are NaN)
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name}: expected a float, got {type_name(v)}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name}: expected a finite number, got {v}")
    return v


# ---- the CPU inference fast paths of lora_delta and kron_delta ------------------------------------
# A decode-sized call costs a few µs, so these read as few tensor attributes as they can (each costs
# 0.1–0.3 µs); anything unusual takes the op's fully checked path, which also words the errors.
CPU_KERNELS = _ext.C() if _ext.available() else None
is_compiling = torch.compiler.is_compiling
grad_enabled = torch.is_grad_enabled
_FAST_DTYPES = frozenset(KERNEL_DTYPES)


def fast_operands(x: object, A: object, B: object) -> torch.dtype | None:
    """x's dtype when x, A and B are contiguous CPU tensors of one kernel dtype, else None."""
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(A, Tensor) and isinstance(B, Tensor)):
        return None
    dt = x.dtype
    if dt not in _FAST_DTYPES or A.dtype is not dt or B.dtype is not dt:
        return None
    if not (x.is_cpu and A.is_cpu and B.is_cpu and x.is_contiguous() and A.is_contiguous()
            and B.is_contiguous()):
        return None
    return dt


def fast_out(out: object, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Whether `out` can take a fast path's result: a contiguous CPU tensor of `dtype` and `shape`
    (a row-strided `out`, e.g. a slice of a wider buffer, takes the checked path)."""
    return (isinstance(out, torch.Tensor) and out.dtype is dtype and out.is_cpu and out.is_contiguous()
            and out.shape == shape)


def row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its rows are contiguous (a row stride is allowed), else a contiguous copy."""
    if t.stride(-1) == 1 and t.stride(0) >= t.shape[-1]:
        return t
    return t.contiguous()


def raise_if_nonfinite_input(op: str, **inputs: torch.Tensor | None) -> None:
    """Called when a kernel reported a non-finite output: name the input that caused it. When all
    inputs are finite the non-finite output is a genuine overflow and is returned as it is."""
    for name, t in inputs.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} contains NaN or Inf")
