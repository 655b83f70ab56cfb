"""NumPy twin of the C++ bootstrap core (cpp/src/bootstrap.cpp): the same random streams, draws and
fixed-point sums, so it returns bit-identical statistics. It is the fallback when bem._C is missing
and the oracle the tests hold the C++ kernels to. Slow (a Python loop over the n draws of every
resample in lock-step), but O(B) memory like the core.
"""
from __future__ import annotations

import math

import numpy as np

from bem.stats._fixed_point import fixed_point_terms

_LOW_WORD = np.uint64(0xFFFFFFFF)
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


def _splitmix64_at(seed: np.uint64, position: np.ndarray) -> np.ndarray:
    z = seed + (position + np.uint64(1)) * _GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _next(state: np.ndarray, lanes: slice | list[int]) -> np.ndarray:
    """xoshiro256** step of the given lanes of state (4, B) uint64; returns their outputs."""
    s0, s1, s2, s3 = (state[k, lanes] for k in range(4))
    result = _rotl(s1 * np.uint64(5), 7) * np.uint64(9)
    t = s1 << np.uint64(17)
    s2 = s2 ^ s0
    s3 = s3 ^ s1
    s1 = s1 ^ s2
    s0 = s0 ^ s3
    s2 = s2 ^ t
    s3 = _rotl(s3, 45)
    state[0, lanes], state[1, lanes], state[2, lanes], state[3, lanes] = s0, s1, s2, s3
    return result


def _bounded(state: np.ndarray, lane: int, n: int, reject_below: int) -> int:
    """Lemire's unbiased index in [0, n) from the low words of one lane's next outputs."""
    while True:
        m = (int(_next(state, [lane])[0]) & 0xFFFFFFFF) * n
        if (m & 0xFFFFFFFF) >= reject_below:
            return m >> 32


def _linear_terms(values: np.ndarray, weights: np.ndarray | None):
    """Fixed-point numerator terms (x or w·x) and denominator terms (w, or None)."""
    if weights is None:
        return fixed_point_terms(values), None
    with np.errstate(over="ignore"):
        products = weights * values
    bad = ~np.isfinite(products)
    if bad.any():
        raise ValueError(f"weights: weights[i] * values[i] overflows at index {int(np.flatnonzero(bad)[0])}")
    den = fixed_point_terms(weights)
    zero = den[0] == 0
    if zero.any():
        i = int(np.flatnonzero(zero)[0])
        raise ValueError("weights: the ratio of the largest to the smallest weight is too large for "
                         f"64-bit fixed-point sums (weight {weights[i]} at index {i} rounds to 0)")
    return fixed_point_terms(products), den


def _statistic(num_sum, num_shift: int, den, n: int):
    numerator = np.ldexp(np.asarray(num_sum).astype(np.float64), -num_shift)
    if den is None:
        return numerator / n
    den_sum, den_shift = den
    return numerator / np.ldexp(np.asarray(den_sum).astype(np.float64), -den_shift)


def bootstrap_linear(values: np.ndarray, weights: np.ndarray | None, n_resamples: int,
                     seed: int) -> tuple[np.ndarray, float]:
    """Twin of bem._C.bootstrap_linear: values (n,) float64 finite, weights (n,) float64 > 0 or
    None, seed a uint64. Returns (statistics (n_resamples,) float64, observed statistic)."""
    n = values.size
    (num, num_shift), den = _linear_terms(values, weights)
    seed_word = np.uint64(seed)
    positions = 4 * np.arange(n_resamples, dtype=np.uint64)
    with np.errstate(over="ignore"):
        state = np.stack([_splitmix64_at(seed_word, positions + np.uint64(k)) for k in range(4)])
    reject_below = (1 << 32) % n
    num_sum = np.zeros(n_resamples, dtype=np.int64)
    den_sum = np.zeros(n_resamples, dtype=np.int64)
    lanes = slice(None)

    def add(index: np.ndarray) -> None:
        np.add(num_sum, num[index], out=num_sum)
        if den is not None:
            np.add(den_sum, den[0][index], out=den_sum)

    with np.errstate(over="ignore"):
        for _ in range(n // 2):
            x = _next(state, lanes)
            m_lo = (x & _LOW_WORD) * np.uint64(n)
            m_hi = (x >> np.uint64(32)) * np.uint64(n)
            lo, hi = (m_lo >> np.uint64(32)).astype(np.int64), (m_hi >> np.uint64(32)).astype(np.int64)
            bad_lo = (m_lo & _LOW_WORD) < reject_below
            bad_hi = (m_hi & _LOW_WORD) < reject_below
            for lane in np.flatnonzero(bad_lo | bad_hi):
                if bad_lo[lane]:
                    lo[lane] = _bounded(state, int(lane), n, reject_below)
                if bad_hi[lane]:
                    hi[lane] = _bounded(state, int(lane), n, reject_below)
            add(lo)
            add(hi)
        if n % 2:  # one more draw per lane, from the low word of its next output
            m = (_next(state, lanes) & _LOW_WORD) * np.uint64(n)
            last = (m >> np.uint64(32)).astype(np.int64)
            for lane in np.flatnonzero((m & _LOW_WORD) < reject_below):
                last[lane] = _bounded(state, int(lane), n, reject_below)
            add(last)
    den_terms = None if den is None else (den_sum, den[1])
    distribution = _statistic(num_sum, num_shift, den_terms, n)
    observed_den = None if den is None else (den[0].sum(), den[1])
    observed = float(_statistic(num.sum(), num_shift, observed_den, n))
    return distribution, observed


def jackknife_acceleration(values: np.ndarray, weights: np.ndarray | None) -> float:
    """Twin of bem._C.jackknife_acceleration: the BCa acceleration of the (weighted) mean from the
    closed-form leave-one-out jackknife; NaN when all values are equal."""
    if np.all(values == values[0]):
        return math.nan
    w = np.ones_like(values) if weights is None else weights
    total = w.sum()
    theta = (w * values).sum() / total
    shift = w * (theta - values) / (total - w)  # θ_(i) − θ̂
    d = shift.mean() - shift
    d /= np.max(np.abs(d))
    return float(np.sum(d**3) / (6.0 * np.sum(d**2) ** 1.5))
