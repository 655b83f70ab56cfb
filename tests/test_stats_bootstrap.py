"""bem.stats.bca_interval against scipy.stats.bootstrap(method="BCa"), the C++ core against its
NumPy twin, the exact-tie convention, coverage, and every bad argument."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.stats

import bem
from bem import _ext
from bem.stats import DegenerateDataWarning, bca_interval
from bem.stats import _reference
from bem.stats import bootstrap as bootstrap_module

needs_core = pytest.mark.skipif(not _ext.available(), reason="bem._C not built")


def _data(kind: str, n: int, seed: int) -> np.ndarray:
    """The data shapes the issue asks for; 'mostly_zeros_dyadic' keeps its non-zeros on a dyadic
    grid so that np.mean and bem's fixed point agree on every tie."""
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        return rng.normal(0.2, 1.0, n)
    if kind == "skewed":
        return rng.lognormal(0.0, 1.0, n)
    if kind == "heavy_tailed":
        return rng.standard_t(2, n)
    if kind == "discrete":  # exact-match deltas
        return rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.25, 0.45, 0.30])
    if kind == "mostly_zeros":
        return np.where(rng.random(n) < 0.9, 0.0, rng.normal(0.5, 1.0, n))
    if kind == "mostly_zeros_dyadic":
        return np.where(rng.random(n) < 0.9, 0.0, rng.integers(-8, 24, n) / 16)
    raise AssertionError(kind)


KINDS = ["continuous", "skewed", "heavy_tailed", "discrete", "mostly_zeros"]


class _Result:
    """Stand-in for scipy's BootstrapResult: scipy reuses bootstrap_distribution when given."""

    def __init__(self, distribution: np.ndarray):
        self.bootstrap_distribution = distribution


def _scipy_bca_of(distribution: np.ndarray, data: tuple, statistic, paired: bool = False,
                  confidence: float = 0.95):
    """scipy's BCa interval computed from bem's resamples (n_resamples=0 reuses them)."""
    return scipy.stats.bootstrap(data, statistic, n_resamples=0, paired=paired,
                                 confidence_level=confidence, method="BCa",
                                 bootstrap_result=_Result(distribution)).confidence_interval


def _explicit_acceleration(x: np.ndarray, statistic=np.mean) -> float:
    """scipy's jackknife acceleration computed the long way (n leave-one-out statistics)."""
    n = x.size
    theta = np.array([statistic(np.delete(x, i)) for i in range(n)])
    u = (n - 1) * (theta.mean() - theta)
    return np.sum(u**3) / n**3 / 6 / (np.sum(u**2) / n**2) ** 1.5


# ---- the C++ core ---------------------------------------------------------------------------------

@needs_core
@pytest.mark.parametrize("n", [2, 3, 17, 101, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_core_equals_numpy_twin_bit_for_bit(n, weighted):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)
    w = rng.uniform(0.1, 3.0, n) if weighted else None
    C = _ext.C()
    want, want_observed = _reference.bootstrap_linear(x, w, 45, 987654321)
    for kernel in C.bootstrap_kernels():
        got, observed = C.bootstrap_linear(x, w, 45, 987654321, kernel=kernel)
        np.testing.assert_array_equal(got, want, err_msg=kernel)
        assert observed == want_observed
    np.testing.assert_allclose(C.jackknife_acceleration(x, w),
                               _reference.jackknife_acceleration(x, w), rtol=1e-12, atol=1e-15)


@needs_core
@pytest.mark.slow
def test_core_equals_numpy_twin_on_the_rejection_path():
    # n = 100003: Lemire rejects a draw with probability (2^32 mod n) / 2^32 = 9e-6, so the
    # 16 × 100003 draws below reject about 14 times; both sides must redraw identically.
    x = np.random.default_rng(1).standard_normal(100_003)
    want, _ = _reference.bootstrap_linear(x, None, 16, 3)
    got, _ = _ext.C().bootstrap_linear(x, None, 16, 3)
    np.testing.assert_array_equal(got, want)


@needs_core
def test_core_result_does_not_depend_on_threads():
    x = _data("skewed", 1531, 4)
    before = bem.get_num_threads()
    try:
        bem.set_num_threads(1)
        one = bca_interval(x, seed=11, keep_distribution=True)
        bem.set_num_threads(3)
        three = bca_interval(x, seed=11, keep_distribution=True)
    finally:
        bem.set_num_threads(before)
    np.testing.assert_array_equal(one.distribution, three.distribution)
    assert (one.lower, one.upper) == (three.lower, three.upper)


@needs_core
def test_binding_checks_name_the_argument():
    C = _ext.C()
    with pytest.raises(ValueError, match="values: expected a 1-D array"):
        C.bootstrap_linear(np.ones((2, 3)), None, 10, 1)
    with pytest.raises(ValueError, match="weights: expected length 3"):
        C.bootstrap_linear(np.arange(3.0), np.ones(4), 10, 1)
    with pytest.raises(ValueError, match="n_resamples"):
        C.bootstrap_linear(np.arange(3.0), None, 0, 1)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        C.bootstrap_linear(np.arange(3.0), None, 10, 1, kernel="sse9")
    with pytest.raises(ValueError, match="values: expected finite values, got nan at index 1"):
        C.bootstrap_linear(np.array([0.0, np.nan, 1.0]), None, 10, 1)


def test_numpy_fallback_matches_core_and_warns_once(monkeypatch, caplog):
    x = _data("discrete", 64, 2)
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(bootstrap_module, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger="bem"):
        first = bca_interval(x, seed=3, n_resamples=300, keep_distribution=True)
        bca_interval(x, seed=4, n_resamples=30)
    assert sum("NumPy reference" in r.message for r in caplog.records) == 1
    monkeypatch.undo()
    if _ext.available():
        core = bca_interval(x, seed=3, n_resamples=300, keep_distribution=True)
        np.testing.assert_array_equal(first.distribution, core.distribution)
        assert (first.lower, first.upper, first.acceleration) == \
            pytest.approx((core.lower, core.upper, core.acceleration), rel=1e-12)


# ---- scipy semantics, exactly: same resamples in, same interval out --------------------------------

@pytest.mark.parametrize("kind", ["continuous", "skewed", "heavy_tailed", "discrete",
                                  "mostly_zeros_dyadic"])
@pytest.mark.parametrize("n", [23, 200])
def test_interval_equals_scipy_given_the_same_resamples(kind, n):
    x = _data(kind, n, seed=n + 3)
    assert np.count_nonzero(x) >= 3
    for confidence in (0.95, 0.8):
        ours = bca_interval(x, seed=7, n_resamples=3001, confidence=confidence,
                            keep_distribution=True)
        theirs = _scipy_bca_of(ours.distribution, (x,), np.mean, confidence=confidence)
        np.testing.assert_allclose([ours.lower, ours.upper], [theirs.low, theirs.high],
                                   rtol=1e-12, atol=1e-15)
    assert ours.observed == np.mean(x) or abs(ours.observed - np.mean(x)) < 1e-15 * np.abs(x).max()
    np.testing.assert_allclose(ours.acceleration, _explicit_acceleration(x), rtol=1e-9,
                               atol=1e-15)
    assert ours.standard_error == pytest.approx(np.std(ours.distribution, ddof=1))


def test_ties_count_one_half_in_the_bias_correction():
    # Discrete data: many resample means equal the observed mean exactly.
    x = _data("discrete", 30, seed=5)
    r = bca_interval(x, seed=1, n_resamples=5000, keep_distribution=True)
    d = r.distribution
    ties = np.count_nonzero(d == r.observed)
    assert ties > 100
    share = (np.count_nonzero(d < r.observed) + ties / 2) / d.size
    assert r.bias_correction == pytest.approx(scipy.stats.norm.ppf(share), rel=1e-12)
    # The seed's snippet counted only d < observed, which biases z0 downwards here.
    assert r.bias_correction > scipy.stats.norm.ppf(np.count_nonzero(d < r.observed) / d.size)


def test_resamples_that_permute_the_data_tie_exactly():
    # Decimal values whose float sum depends on the order: fixed-point sums tie every
    # permutation (6 of the 27 equally likely resamples) with the observed mean.
    x = np.array([0.1, 0.7, 0.2])
    r = bca_interval(x, seed=2, n_resamples=27_000, keep_distribution=True)
    assert len(np.unique(r.distribution)) == 10  # multisets of 3 draws from 3 values
    ties = np.count_nonzero(r.distribution == r.observed)
    assert abs(ties - 6000) < 5 * np.sqrt(27_000 * 6 / 27 * 21 / 27)
    assert bca_interval(x[::-1], seed=2, n_resamples=10).observed == r.observed


@pytest.mark.parametrize("n", [2, 9, 64])
def test_callable_path_reproduces_scipy_exactly(n):
    x = _data("skewed", n, seed=3 * n)
    ours = bca_interval(x, statistic=np.median, seed=12, n_resamples=777, keep_distribution=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        theirs = scipy.stats.bootstrap((x,), np.median, n_resamples=777, rng=12, method="BCa")
    np.testing.assert_array_equal(ours.distribution, theirs.bootstrap_distribution)
    np.testing.assert_allclose([ours.lower, ours.upper],
                               [theirs.confidence_interval.low, theirs.confidence_interval.high],
                               rtol=1e-12)
    assert ours.observed == np.median(x)


def test_callable_path_batches_bound_memory(monkeypatch):
    monkeypatch.setattr(bootstrap_module, "_BATCH_ELEMENTS", 1000)
    x = _data("continuous", 97, seed=8)
    shapes = []

    def mean(sample, axis=-1):
        shapes.append(sample.shape)
        return np.mean(sample, axis=axis)

    batched = bca_interval(x, statistic=mean, seed=4, n_resamples=101, keep_distribution=True)
    assert max(int(np.prod(s)) for s in shapes) <= 1000
    monkeypatch.undo()
    whole = bca_interval(x, statistic=np.mean, seed=4, n_resamples=101, keep_distribution=True)
    np.testing.assert_array_equal(batched.distribution, whole.distribution)
    assert batched.acceleration == pytest.approx(whole.acceleration, rel=1e-12)


def test_paired_resampling_is_by_pair():
    rng = np.random.default_rng(21)
    a = rng.normal(0.3, 1.0, 41)
    b = a + rng.normal(-0.2, 0.5, 41)
    # The callable path draws scipy's indices; scipy's paired bootstrap draws one index vector for
    # both samples, so the two must agree exactly.
    ours = bca_interval(a, paired_with=b, statistic=np.mean, seed=9, n_resamples=2000,
                        keep_distribution=True)
    theirs = scipy.stats.bootstrap((a, b), lambda u, v, axis: np.mean(u - v, axis=axis),
                                   paired=True, n_resamples=2000, rng=9, method="BCa")
    np.testing.assert_allclose(ours.distribution, theirs.bootstrap_distribution, rtol=1e-13,
                               atol=1e-15)
    np.testing.assert_allclose([ours.lower, ours.upper],
                               [theirs.confidence_interval.low, theirs.confidence_interval.high],
                               rtol=1e-10)
    # The fast path bootstraps the same statistic of the same differences.
    fast = bca_interval(a, paired_with=b, seed=9, n_resamples=500, keep_distribution=True)
    direct = bca_interval(a - b, seed=9, n_resamples=500, keep_distribution=True)
    np.testing.assert_array_equal(fast.distribution, direct.distribution)


def test_weighted_mean_equals_scipy_paired_ratio():
    rng = np.random.default_rng(31)
    x = rng.normal(1.0, 2.0, 57)
    w = rng.uniform(0.2, 5.0, 57)
    ours = bca_interval(x, weights=w, seed=5, n_resamples=2500, keep_distribution=True)
    assert ours.observed == pytest.approx(np.sum(w * x) / np.sum(w), rel=1e-14)

    def ratio(values, weights, axis=-1):
        return np.sum(weights * values, axis=axis) / np.sum(weights, axis=axis)

    theirs = _scipy_bca_of(ours.distribution, (x, w), ratio, paired=True)
    np.testing.assert_allclose([ours.lower, ours.upper], [theirs.low, theirs.high], rtol=1e-9)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inside scipy's own 0/0
def test_all_equal_data_gives_nan_bounds_and_a_warning():
    x = np.full(12, 0.3)
    with pytest.warns(DegenerateDataWarning):
        r = bca_interval(x, seed=1, n_resamples=200)
    assert np.isnan(r.lower) and np.isnan(r.upper) and np.isnan(r.acceleration)
    assert r.observed == pytest.approx(0.3) and r.bias_correction == 0.0
    # scipy agrees where its float means are exact (0.25); with 0.3 its jackknife means differ by
    # an ulp and it reports a meaningless finite interval, which bem's exact sums avoid.
    with pytest.warns(DegenerateDataWarning):
        theirs = scipy.stats.bootstrap((np.full(12, 0.25),), np.mean, n_resamples=200, rng=1,
                                       method="BCa")
    assert np.isnan(theirs.confidence_interval.low)
    with pytest.warns(DegenerateDataWarning):
        bca_interval(x, statistic=np.mean, seed=1, n_resamples=50)


# ---- scipy semantics, statistically: fresh resamples, scipy's own seed-to-seed spread ------------

@pytest.mark.parametrize("kind", KINDS)
def test_interval_agrees_with_scipy_within_its_seed_spread(kind):
    """Fresh resamples: bem's bounds over 20 seeds against scipy's over 20 other seeds. The
    tolerance is the seed-to-seed standard deviation of the bounds (scipy's, or bem's when larger:
    on lattice data such as exact-match deltas one side can land on the same atom every time)."""
    x = _data(kind, 101, seed=500 + KINDS.index(kind))
    seeds = range(20)
    scipy_bounds = np.array([
        [r.low, r.high] for r in (
            scipy.stats.bootstrap((x,), np.mean, n_resamples=4000, rng=100 + s,
                                  method="BCa").confidence_interval for s in seeds)])
    ours = np.array([[r.lower, r.upper] for r in (
        bca_interval(x, seed=s, n_resamples=4000) for s in seeds)])
    spread = np.maximum(scipy_bounds.std(axis=0, ddof=1), ours.std(axis=0, ddof=1))
    # The means of two sets of 20 runs differ by about spread·sqrt(2/20); allow 4 of those.
    np.testing.assert_array_less(np.abs(ours.mean(axis=0) - scipy_bounds.mean(axis=0)),
                                 4 * spread * np.sqrt(2 / len(seeds)) + 1e-12)
    # Every single run lies where scipy's runs lie.
    assert np.all(np.abs(ours - scipy_bounds.mean(axis=0)) <= 5 * spread + 1e-12)


@pytest.mark.parametrize("kind", ["skewed", "discrete"])
def test_coverage_of_the_95_percent_interval(kind):
    # True mean of the population each dataset is drawn from.
    truth = {"skewed": np.exp(0.5), "discrete": -0.25 + 0.30}[kind]
    hits = 0
    reps = 400
    for rep in range(reps):
        x = _data(kind, 60, seed=10_000 + rep)
        r = bca_interval(x, seed=rep, n_resamples=1000)
        hits += r.lower <= truth <= r.upper
    # Nominal 0.95; BCa under-covers a little for skewed data at n = 60. sd of the estimate 0.011.
    assert 0.90 <= hits / reps <= 0.985


def test_seed_none_draws_fresh_entropy():
    x = _data("continuous", 50, seed=1)
    a = bca_interval(x, n_resamples=300, keep_distribution=True)
    b = bca_interval(x, n_resamples=300, keep_distribution=True)
    assert not np.array_equal(a.distribution, b.distribution)
    assert bca_interval(x, n_resamples=300).distribution is None


# ---- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(data=[1.0]), ValueError, "data: expected at least 2 values, got 1"),
    (dict(data=[]), ValueError, "data: expected at least 2 values"),
    (dict(data=[1.0, np.nan, 2.0]), ValueError, "data: expected finite values, got nan at index 1"),
    (dict(data=[1.0, 2.0, np.inf]), ValueError, "data: expected finite values, got inf at index 2"),
    (dict(data=np.ones((3, 2))), ValueError, "data: expected a 1-D array"),
    (dict(data=["a", "b"]), TypeError, "data: expected real numbers"),
    (dict(data=[1 + 2j, 3j]), TypeError, "data: expected real numbers"),
    (dict(paired_with=[1.0, 2.0]), ValueError, "paired_with: expected 3 values"),
    (dict(paired_with=[1.0, np.nan, 2.0]), ValueError, "paired_with: expected finite"),
    (dict(data=[1e308, -1e308, 0.0], paired_with=[-1e308, 1e308, 0.0]), ValueError,
     "data - paired_with: expected finite"),
    (dict(confidence=1.0), ValueError, "confidence: expected a float in \\(0, 1\\)"),
    (dict(confidence=0), ValueError, "confidence"),
    (dict(confidence=True), TypeError, "confidence"),
    (dict(n_resamples=0), ValueError, "n_resamples: expected an int >= 1, got 0"),
    (dict(n_resamples=10.0), TypeError, "n_resamples: expected an int"),
    (dict(n_resamples=True), TypeError, "n_resamples"),
    (dict(seed=-1), ValueError, "seed: expected an int >= 0"),
    (dict(seed=1.5), TypeError, "seed: expected an int"),
    (dict(statistic="median"), ValueError, "statistic: expected one of 'mean'"),
    (dict(statistic=3), TypeError, "statistic: expected 'mean' or a callable"),
    (dict(statistic=np.mean, weights=[1.0, 1.0, 1.0]), ValueError, "weights: only supported"),
    (dict(weights=[1.0, 0.0, 1.0]), ValueError, "weights: expected values > 0, got 0.0 at index 1"),
    (dict(weights=[1.0, 1.0]), ValueError, "weights: expected 3 values"),
    (dict(statistic=lambda s, axis=-1: np.zeros(3)), ValueError,
     "statistic: expected a vectorised callable returning shape \\(\\)"),
    (dict(statistic=lambda s, axis=-1: np.mean(s)), ValueError,
     "statistic: expected a vectorised callable returning shape \\(10000,\\)"),
    (dict(keep_distribution=1), TypeError, "keep_distribution: expected a bool"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    args = dict(data=[0.5, 1.5, -2.0])
    args.update(kwargs)
    data = args.pop("data")
    with pytest.raises(error, match=message):
        bca_interval(data, **args)
