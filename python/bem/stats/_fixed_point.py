"""bem's exact-sum convention: terms rounded once to 64-bit fixed point, so that sums of any
multiset of them are exact and independent of order (shared by the bootstrap core's NumPy twin and
the sign-flip test; cpp/src/bootstrap.cpp implements the same rounding)."""
from __future__ import annotations

import math

import numpy as np


def fixed_point_terms(x: np.ndarray, total_bits: int = 62) -> tuple[np.ndarray, int]:
    """Rounds x (n,) float64 to int64 terms v = rint(x · 2^shift), with the largest shift for which
    n · max|v| <= 2^total_bits, so every sum of n terms is exact in int64. Returns (v, shift)."""
    n = x.size
    _, exponent = math.frexp(float(np.max(np.abs(x))))  # max|x| < 2^exponent
    shift = total_bits - (n - 1).bit_length() - exponent  # (n - 1).bit_length() == ceil(log2 n)
    return np.rint(np.ldexp(x, shift)).astype(np.int64), shift
