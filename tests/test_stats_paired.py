"""bem.stats.paired_test: t and Wilcoxon equal scipy; the sign-flip permutation test equals
scipy.stats.permutation_test's exact enumeration for n <= 20 and a brute-force enumeration within
Monte Carlo error beyond; every bad argument is named."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from bem.stats import paired_test
from bem.stats import paired as paired_module

ALTERNATIVES = ["two-sided", "greater", "less"]


def _pair(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        a = rng.normal(0.0, 1.0, n)
        return a + rng.normal(0.25, 0.8, n), a
    if kind == "exact_match":  # 0/1 scores: differences in {-1, 0, 1}, heavy ties
        a = (rng.random(n) < 0.55).astype(float)
        return np.where(rng.random(n) < 0.3, 1.0 - a, a), a
    if kind == "skewed":
        a = rng.lognormal(0.0, 1.0, n)
        return a * rng.lognormal(0.1, 0.3, n), a
    raise AssertionError(kind)


def _scipy_sign_flip(a: np.ndarray, b: np.ndarray, alternative: str) -> float:
    return scipy.stats.permutation_test(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
        alternative=alternative, n_resamples=np.inf).pvalue


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize("kind", ["continuous", "exact_match", "skewed"])
def test_t_and_wilcoxon_equal_scipy(kind, alternative):
    a, b = _pair(kind, 37, seed=4)
    assert paired_test(a, b, method="t", alternative=alternative) == pytest.approx(
        scipy.stats.ttest_rel(a, b, alternative=alternative).pvalue, rel=1e-12)
    assert paired_test(a, b, method="wilcoxon", alternative=alternative) == pytest.approx(
        scipy.stats.wilcoxon(a - b, alternative=alternative).pvalue, rel=1e-12)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
@pytest.mark.parametrize("kind, n", [("continuous", 2), ("continuous", 9), ("continuous", 15),
                                     ("exact_match", 13), ("exact_match", 16), ("skewed", 11)])
def test_exact_permutation_equals_scipy_enumeration(kind, n, alternative):
    a, b = _pair(kind, n, seed=n)
    assert np.any(a - b)
    assert paired_test(a, b, method="permutation", alternative=alternative) == pytest.approx(
        _scipy_sign_flip(a, b, alternative), rel=1e-12)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_exact_permutation_at_n_20_equals_brute_force(alternative):
    # Integer differences, so the brute-force float sums over all 2^20 flips are exact.
    a, b = _pair("exact_match", 20, seed=6)
    d = a - b
    signs = 1 - 2 * ((np.arange(2**20)[:, None] >> np.arange(20)) & 1)
    sums = signs @ d
    t = d.sum()
    extreme = {"greater": sums >= t, "less": sums <= t, "two-sided": np.abs(sums) >= abs(t)}
    assert paired_test(a, b, method="permutation", alternative=alternative) == \
        np.count_nonzero(extreme[alternative]) / 2**20


def test_exact_permutation_counts_ties_exactly():
    # Differences 0.1, 0.2, -0.1, -0.2 sum to exactly 0, but a float sum in this order gives
    # 2.8e-17; fixed-point sums see that the four flips with s1 = s3 and s2 = s4 tie the observed 0.
    a = np.array([0.1, 0.2, 0.0, 0.0])
    b = np.array([0.0, 0.0, 0.1, 0.2])
    assert ((0.1 + 0.2) - 0.1) - 0.2 != 0.0
    signs = np.array(list(itertools.product([1, -1], repeat=4)))
    units = signs @ np.array([1, 2, -1, -2])  # the same sums in units of 0.1, exactly
    assert np.count_nonzero(units == 0) == 4
    assert paired_test(a, b, method="permutation", alternative="greater") == \
        np.count_nonzero(units >= 0) / 16
    assert paired_test(a, b, method="permutation", alternative="less") == \
        np.count_nonzero(units <= 0) / 16
    assert paired_test(a, b, method="permutation", alternative="two-sided") == 1.0


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_monte_carlo_beyond_20_within_sampling_error(alternative, monkeypatch):
    a, b = _pair("exact_match", 22, seed=8)
    p = paired_test(a, b, method="permutation", alternative=alternative, n_resamples=20_000, seed=3)
    assert p == paired_test(a, b, method="permutation", alternative=alternative,
                            n_resamples=20_000, seed=3)
    assert p >= 1 / 20_001
    monkeypatch.setattr(paired_module, "EXACT_PERMUTATION_MAX_N", 22)  # enumerate 2^22 flips
    exact = paired_test(a, b, method="permutation", alternative=alternative)
    assert abs(p - exact) <= 4 * np.sqrt(exact * (1 - exact) / 20_000) + 1 / 20_001


def test_monte_carlo_batches_agree(monkeypatch):
    a, b = _pair("continuous", 61, seed=2)
    whole = paired_test(a, b, method="permutation", n_resamples=999, seed=5)
    monkeypatch.setattr(paired_module, "_BATCH_ELEMENTS", 200)
    assert paired_test(a, b, method="permutation", n_resamples=999, seed=5) == whole


def test_monte_carlo_matches_t_test_for_large_samples():
    a, b = _pair("continuous", 400, seed=12)
    b = b + 0.15  # a modest effect: p well inside (0, 1)
    p_perm = paired_test(a, b, method="permutation", n_resamples=20_000, seed=1)
    p_t = paired_test(a, b, method="t")
    assert 0.001 < p_t < 0.5
    assert abs(p_perm - p_t) < 0.25 * p_t + 0.005


def test_no_difference_gives_p_one():
    a = np.array([0.3, 0.5, 0.1, 0.9])
    for method in ("t", "wilcoxon", "permutation"):
        assert paired_test(a, a.copy(), method=method) == 1.0


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(a=[1.0]), ValueError, "a: expected at least 2 values"),
    (dict(b=[1.0, 2.0]), ValueError, "b: expected 3 values \\(the length of a\\), got 2"),
    (dict(a=[1.0, np.nan, 2.0]), ValueError, "a: expected finite values, got nan at index 1"),
    (dict(b=[1.0, 2.0, np.inf]), ValueError, "b: expected finite values"),
    (dict(a=[1e308, -1e308, 0.0], b=[-1e308, 1e308, 0.0]), ValueError, "a - b: expected finite"),
    (dict(a=np.zeros((3, 1))), ValueError, "a: expected a 1-D array"),
    (dict(b=["x", "y", "z"]), TypeError, "b: expected real numbers"),
    (dict(method="sign"), ValueError, "method: expected one of 't', 'wilcoxon', 'permutation'"),
    (dict(alternative="bigger"), ValueError, "alternative: expected one of"),
    (dict(n_resamples=0), ValueError, "n_resamples: expected an int >= 1"),
    (dict(seed=-3), ValueError, "seed: expected an int >= 0"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    args = dict(a=[0.2, 0.4, 0.9], b=[0.1, 0.5, 0.3])
    args.update(kwargs)
    with pytest.raises(error, match=message):
        paired_test(args.pop("a"), args.pop("b"), **args)
