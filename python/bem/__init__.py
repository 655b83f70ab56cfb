"""bem — Basis Extension Modules.

Adaptive low-rank adapters for PyTorch transformers (dynamic-rank LoRA, Kronecker, FiLM, head
gating), routed between experts per 64-token chunk so the KV cache stays valid, and promoted only
when paired BCa-bootstrap statistics with FDR control and hard budget gates say they are better.
"""
from __future__ import annotations

import logging

from bem import _ext
from bem.attach import AdapterSpec, BemConfig, attach, detach, merge

__version__ = "0.1.0"
__all__ = ["AdapterSpec", "BemConfig", "__version__", "attach", "detach", "get_num_threads",
           "merge", "set_num_threads", "threading_backend"]

logging.getLogger("bem").addHandler(logging.NullHandler())


def get_num_threads() -> int:
    """Threads bem's CPU kernels use (the calling thread included)."""
    return _ext.C().num_threads()


def threading_backend() -> str:
    """Where bem's CPU kernels run their threads: ``"openmp (libgomp.so.1)"`` when the process has
    an OpenMP runtime loaded (torch's: bem's work then goes to the threads torch's own ops use,
    rather than to a second pool competing with them), ``"pool"`` (bem's own threads; also with
    ``BEM_CPU_THREADING=pool`` and in a forked child) or ``"serial"`` (one thread)."""
    return _ext.C().threading_backend()


def set_num_threads(n: int) -> None:
    """Set the threads bem's CPU kernels use. ``n`` must be a positive int."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    _ext.C().set_num_threads(n)
