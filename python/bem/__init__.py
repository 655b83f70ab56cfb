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
           "merge", "set_num_threads"]

logging.getLogger("bem").addHandler(logging.NullHandler())


def get_num_threads() -> int:
    """Threads bem's CPU kernels use (the calling thread included)."""
    return _ext.C().num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads bem's CPU kernels use. ``n`` must be a positive int."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    _ext.C().set_num_threads(n)
