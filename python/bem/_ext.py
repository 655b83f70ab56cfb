"""Loads the compiled core ``bem._C`` and says what it can do here.

Importing bem never fails because of the extension: a missing or broken build is reported by
:func:`available` / :func:`load_error`, and the ops fall back to their pure-torch references with a
one-time warning.
"""
from __future__ import annotations

import logging
from types import ModuleType

import torch

log = logging.getLogger("bem")

try:
    from bem import _C as _C_module  # type: ignore[attr-defined]

    _load_error: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C_module = None
    _load_error = f"{type(exc).__name__}: {exc}"

# Element types the kernels take, with the codes of cpp/include/bem/common.h (DType).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    """True when the compiled extension imported."""
    return _C_module is not None


def load_error() -> str | None:
    """Why the compiled extension did not import, or None."""
    return _load_error


def C() -> ModuleType:
    """The compiled module; raises RuntimeError with the import error when it is missing."""
    if _C_module is None:
        raise RuntimeError(f"bem's compiled extension bem._C is not available ({_load_error}); "
                           "reinstall bem from source with `pip install .`")
    return _C_module


def cuda_built() -> bool:
    """True when the extension was compiled with the CUDA kernels."""
    return _C_module is not None and bool(_C_module.build_info()["cuda"])
