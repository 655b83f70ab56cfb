"""bem.stats.fdr against scipy.stats.false_discovery_control, the step-up definition, edge cases
(ties, p = 0, p = 1, one p-value, 500 p-values) and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from bem.stats import fdr


def _step_up_reference(p: np.ndarray, method: str) -> np.ndarray:
    """The textbook definition, written the slow way: p_adj(i) = min_{j >= i} p_(j)·m/j·c."""
    m = p.size
    c = np.sum(1 / np.arange(1, m + 1)) if method == "by" else 1.0
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    adjusted_sorted = np.array([min(min(ranked[j] * m / (j + 1) * c for j in range(i, m)), 1.0)
                                for i in range(m)])
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted


def _p_values(kind: str, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random(m)
    if kind == "mixture":  # some real effects among nulls
        return np.where(rng.random(m) < 0.2, rng.beta(0.3, 20.0, m), rng.random(m))
    if kind == "ties":
        return rng.choice([0.001, 0.01, 0.02, 0.04, 0.5], size=m)
    if kind == "extremes":
        return rng.choice([0.0, 1.0, 0.03, 0.3], size=m)
    raise AssertionError(kind)


@pytest.mark.parametrize("method", ["bh", "by"])
@pytest.mark.parametrize("kind", ["uniform", "mixture", "ties", "extremes"])
@pytest.mark.parametrize("m", [1, 2, 7, 63, 500])
def test_equals_scipy_and_the_definition(method, kind, m):
    p = _p_values(kind, m, seed=m)
    result = fdr(p, method=method, alpha=0.05)
    want = scipy.stats.false_discovery_control(p, method=method)
    np.testing.assert_allclose(result.adjusted, want, rtol=1e-12, atol=1e-12)
    if m <= 63:
        np.testing.assert_allclose(result.adjusted, _step_up_reference(p, method), rtol=1e-12,
                                   atol=1e-15)
    np.testing.assert_array_equal(result.rejected, result.adjusted <= 0.05)
    assert result.method == method and result.alpha == 0.05


def test_hand_computed_example():
    # Sorted p: 0.001 0.008 0.039 0.041 0.042 0.06 0.074 0.205 (m = 8).
    # p·m/i:    0.008 0.032 0.104 0.082 0.0672 0.08 0.0846 0.205; reverse cumulative minimum:
    #           0.008 0.032 0.0672 0.0672 0.0672 0.08 0.0846 0.205.
    p = np.array([0.042, 0.001, 0.06, 0.039, 0.205, 0.008, 0.041, 0.074])
    r = fdr(p)
    want = np.array([0.0672, 0.008, 0.08, 0.0672, 0.205, 0.032, 0.0672, 0.0845714285714])
    np.testing.assert_allclose(r.adjusted, want, rtol=1e-9)
    np.testing.assert_array_equal(r.rejected, [False, True, False, False, False, True, False, False])
    # The seed's snippet ran the cumulative minimum the wrong way: 0.039's adjusted value would
    # stay 0.104 instead of 0.0672.
    assert r.adjusted[3] < 0.039 * 8 / 3


def test_edge_values():
    assert fdr([0.0]).adjusted.tolist() == [0.0]
    assert fdr([1.0]).adjusted.tolist() == [1.0]
    one = fdr([0.03], alpha=0.05)
    assert one.adjusted.tolist() == [0.03] and one.rejected.tolist() == [True]
    assert fdr([0.0, 1.0, 1.0]).adjusted.tolist() == [0.0, 1.0, 1.0]
    assert fdr([0.5] * 6).adjusted.tolist() == [0.5] * 6  # all tied: unchanged
    assert fdr([0.9, 0.95], method="by").adjusted.tolist() == [1.0, 1.0]  # clipped
    empty = fdr([])
    assert empty.adjusted.shape == (0,) and empty.rejected.shape == (0,)
    # alpha is a level: everything at or below it after adjustment is rejected.
    assert fdr([0.02, 0.04], alpha=0.04).rejected.tolist() == [True, True]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=40),
       st.sampled_from(["bh", "by"]))
def test_properties(ps, method):
    p = np.array(ps)
    r = fdr(p, method=method)
    np.testing.assert_allclose(r.adjusted, scipy.stats.false_discovery_control(p, method=method),
                               rtol=1e-12, atol=1e-300)
    assert np.all(r.adjusted >= p - 1e-15) and np.all(r.adjusted <= 1.0)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(r.adjusted[order]) >= 0)  # monotone in p
    if method == "by":
        assert np.all(r.adjusted >= fdr(p, method="bh").adjusted)


@pytest.mark.parametrize("p_values, kwargs, error, message", [
    ([0.1, np.nan], {}, ValueError, "p_values: expected finite values, got nan at index 1"),
    ([0.1, -0.01], {}, ValueError, "p_values: expected values in \\[0, 1\\], got -0.01 at index 1"),
    ([1.5], {}, ValueError, "p_values: expected values in \\[0, 1\\], got 1.5 at index 0"),
    ([np.inf], {}, ValueError, "p_values: expected finite values"),
    ([[0.1, 0.2]], {}, ValueError, "p_values: expected a 1-D array"),
    (["0.1"], {}, TypeError, "p_values: expected real numbers"),
    ([0.1], {"method": "holm"}, ValueError, "method: expected one of 'bh', 'by', got 'holm'"),
    ([0.1], {"alpha": 0.0}, ValueError, "alpha: expected a float in \\(0, 1\\)"),
    ([0.1], {"alpha": 1.0}, ValueError, "alpha"),
    ([0.1], {"alpha": "0.05"}, TypeError, "alpha"),
])
def test_bad_input_is_named(p_values, kwargs, error, message):
    with pytest.raises(error, match=message):
        fdr(p_values, **kwargs)
