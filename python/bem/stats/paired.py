"""Paired two-sample tests of per-example scores: Student's t, Wilcoxon signed-rank, and the
sign-flip permutation test of the mean difference (exact up to n = 20, seeded Monte Carlo beyond)."""
from __future__ import annotations

import numpy as np
import scipy.stats

from bem.stats import _checks
from bem.stats._fixed_point import fixed_point_terms

__all__ = ["EXACT_PERMUTATION_MAX_N", "paired_test"]

# Up to this many pairs the permutation test enumerates all 2^n sign flips.
EXACT_PERMUTATION_MAX_N = 20

_METHODS = ("t", "wilcoxon", "permutation")
_ALTERNATIVES = ("two-sided", "greater", "less")
# Sign-flip rows drawn at once in the Monte Carlo test (int64 (rows, n) buffer <= 16 MB).
_BATCH_ELEMENTS = 1 << 21


def paired_test(a, b, *, method: str = "t", alternative: str = "two-sided",
                n_resamples: int = 10_000, seed: int | None = None) -> float:
    """p-value of the null "a and b do not differ" for paired scores a, b: (n,) finite reals.

    The differences d = a - b are tested. method:
      "t": paired Student's t-test (scipy.stats.ttest_rel);
      "wilcoxon": Wilcoxon signed-rank test on d (scipy.stats.wilcoxon defaults: zero
        differences dropped, exact or normal approximation chosen by scipy);
      "permutation": sign-flip test of the mean difference: under the null each d_i is as likely
        to be -d_i. Exact enumeration of all 2^n flips for n <= 20 (p = share of flips at least
        as extreme); beyond, ``n_resamples`` random flips from np.random.default_rng(seed) with
        p = (1 + #{at least as extreme}) / (1 + n_resamples). Sums are taken in exact fixed
        point, so flips tying with the observed sum are counted exactly.
    alternative: "two-sided" (|mean d| large), "greater" (a larger) or "less" (a smaller).
    When every difference is exactly zero there is no evidence of a difference and the p-value is
    1 for every method (scipy's t-test would give NaN).
    """
    x = _checks.float_vector(a, "a")
    y = _checks.float_vector(b, "b")
    _checks.check_length(y, "b", x.size, "a")
    _checks.choice(method, "method", _METHODS)
    _checks.choice(alternative, "alternative", _ALTERNATIVES)
    n_resamples = _checks.integer(n_resamples, "n_resamples", minimum=1)
    seed = _checks.seed_value(seed)
    with np.errstate(over="ignore"):
        d = x - y
    _checks.check_finite(d, "a - b")
    if not d.any():
        return 1.0
    if method == "t":
        return float(scipy.stats.ttest_rel(x, y, alternative=alternative).pvalue)
    if method == "wilcoxon":
        return float(scipy.stats.wilcoxon(d, alternative=alternative).pvalue)
    return _sign_flip_p_value(d, alternative, n_resamples, seed)


def _sign_flip_p_value(d: np.ndarray, alternative: str, n_resamples: int,
                       seed: int | None) -> float:
    # 61 bits of headroom: every ± sum and every difference of two of them fits in int64.
    v, _ = fixed_point_terms(d, total_bits=61)
    observed = int(v.sum())
    if v.size <= EXACT_PERMUTATION_MAX_N:
        return _exact_sign_flip(v, observed, alternative)
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_ELEMENTS // v.size)
    words = -(-v.size // 64)
    extreme = 0
    for start in range(0, n_resamples, batch):
        rows = min(batch, n_resamples - start)
        # Each flip takes whole 64-bit words, one bit per pair, so batching never changes the
        # stream (numpy's narrow-integer draws keep per-call bit buffers and would).
        bits = rng.integers(0, np.iinfo(np.uint64).max, size=(rows, words), dtype=np.uint64,
                            endpoint=True)
        flips = np.unpackbits(bits.view(np.uint8), axis=1, count=v.size, bitorder="little")
        sums = np.where(flips.astype(bool), -v, v).sum(axis=1)
        extreme += int(np.count_nonzero(_at_least_as_extreme(sums, observed, alternative)))
    return (1 + extreme) / (1 + n_resamples)


def _at_least_as_extreme(sums: np.ndarray, observed: int, alternative: str) -> np.ndarray:
    if alternative == "greater":
        return sums >= observed
    if alternative == "less":
        return sums <= observed
    return np.abs(sums) >= abs(observed)


def _signed_subset_sums(v: np.ndarray) -> np.ndarray:
    """All 2^k sums Σ ±v_i of v (k,) int64."""
    sums = np.zeros(1, dtype=np.int64)
    for value in v:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def _exact_sign_flip(v: np.ndarray, observed: int, alternative: str) -> float:
    """Share of all 2^n sign flips at least as extreme as the observed sum, by meet in the
    middle: the sums of each half's flips, one half sorted and searched for every sum of the
    other (O(2^(n/2) n) instead of O(2^n n))."""
    half = v.size // 2
    left = _signed_subset_sums(v[:half])
    right = np.sort(_signed_subset_sums(v[half:]))

    def count_at_least(t: int) -> int:  # #{left + right >= t}
        return int(np.sum(right.size - np.searchsorted(right, t - left, side="left")))

    def count_at_most(t: int) -> int:  # #{left + right <= t}
        return int(np.sum(np.searchsorted(right, t - left, side="right")))

    total = 2 ** v.size
    if alternative == "greater":
        extreme = count_at_least(observed)
    elif alternative == "less":
        extreme = count_at_most(observed)
    elif observed == 0:
        extreme = total
    else:
        extreme = count_at_least(abs(observed)) + count_at_most(-abs(observed))
    return extreme / total
