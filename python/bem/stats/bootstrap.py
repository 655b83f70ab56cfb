"""BCa bootstrap confidence intervals with scipy.stats.bootstrap(method="BCa") semantics; the mean
(and weighted mean) resample in bem's C++ core, any other statistic through a vectorised callable."""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import DegenerateDataWarning

from bem import _ext
from bem.stats import _checks, _reference

log = logging.getLogger("bem")

__all__ = ["BCaInterval", "DegenerateDataWarning", "bca_interval"]

# Elements (resamples × n) drawn at once on the callable path: two float64/int64 buffers of this
# size bound its memory at about 32 MB whatever n_resamples is.
_BATCH_ELEMENTS = 1 << 21

_fallback_warned = False


@dataclass(frozen=True)
class BCaInterval:
    """A bias-corrected and accelerated bootstrap confidence interval.

    lower, upper: the interval (NaN, with a DegenerateDataWarning, when BCa is undefined, e.g. all
    values equal). observed: the statistic of the data. bias_correction: z0 = Φ⁻¹ of the share of
    resamples below the observed statistic, ties counting one half. acceleration: from the
    leave-one-out jackknife. standard_error: sample standard deviation (ddof=1) of the resamples.
    distribution: (n_resamples,) float64 statistics of the resamples, in draw order, when
    ``keep_distribution=True`` was passed; otherwise None.
    """

    lower: float
    upper: float
    observed: float
    bias_correction: float
    acceleration: float
    confidence: float
    n_resamples: int
    standard_error: float
    distribution: np.ndarray | None = None


def bca_interval(data, *, statistic: str | Callable = "mean", paired_with=None, weights=None,
                 confidence: float = 0.95, n_resamples: int = 10_000, seed: int | None = None,
                 keep_distribution: bool = False) -> BCaInterval:
    """Two-sided BCa bootstrap confidence interval of a statistic of ``data``.

    data: (n,) real numbers, n >= 2, all finite (else ValueError). paired_with: optional (n,)
    second sample; the statistic is then of ``data - paired_with``, so pairs are resampled
    together (and the jackknife leaves out whole pairs). statistic: "mean" (fast path, bem's C++
    core) or a vectorised callable ``f(x, axis=-1)`` mapping a (k, n) float64 array to (k,)
    statistics and a (n,) array to a scalar, as scipy.stats.bootstrap takes it. weights:
    optional (n,) finite positive weights, with statistic="mean" only: the weighted mean
    Σwx/Σw, resampling (x, w) pairs. confidence: in (0, 1). n_resamples: >= 1. seed: None (fresh
    entropy) or an int >= 0; the same seed gives the same interval on any thread count.

    Semantics are scipy.stats.bootstrap(method="BCa")'s: z0 counts resamples equal to the
    observed statistic as one half; acceleration from the jackknife (closed form for the mean);
    bounds are type-7 (linearly interpolated) quantiles of the resamples at the adjusted levels;
    a NaN level gives a NaN bound and a DegenerateDataWarning. With a callable and a given seed
    the resamples are exactly scipy's for ``rng=seed``. The mean's resamples are computed in
    exact fixed point, so resamples that are permutations of the data tie with the observed mean
    exactly (see docs/stats.md).
    """
    x = _checks.float_vector(data, "data")
    if paired_with is not None:
        other = _checks.float_vector(paired_with, "paired_with")
        _checks.check_length(other, "paired_with", x.size, "data")
        with np.errstate(over="ignore"):
            x = x - other
        _checks.check_finite(x, "data - paired_with")
    confidence = _checks.open_unit_float(confidence, "confidence")
    n_resamples = _checks.integer(n_resamples, "n_resamples", minimum=1)
    seed = _checks.seed_value(seed)
    if not isinstance(keep_distribution, bool):
        raise TypeError(f"keep_distribution: expected a bool, got {type(keep_distribution).__name__}")

    if isinstance(statistic, str):
        _checks.choice(statistic, "statistic", ("mean",))
        w = None if weights is None else _checks.float_vector(weights, "weights")
        if w is not None:
            _checks.check_length(w, "weights", x.size, "data")
            if np.any(w <= 0):
                index = int(np.flatnonzero(w <= 0)[0])
                raise ValueError(f"weights: expected values > 0, got {w[index]} at index {index}")
        distribution, observed, acceleration = _bootstrap_linear(x, w, n_resamples, seed)
    elif callable(statistic):
        if weights is not None:
            raise ValueError("weights: only supported with statistic='mean'; a callable statistic "
                             "can apply its own weights")
        distribution, observed, acceleration = _bootstrap_callable(statistic, x, n_resamples, seed)
    else:
        raise TypeError(f"statistic: expected 'mean' or a callable, got {type(statistic).__name__}")

    return _bca(distribution, observed, acceleration, confidence, keep_distribution)


def _bootstrap_linear(x: np.ndarray, w: np.ndarray | None, n_resamples: int,
                      seed: int | None) -> tuple[np.ndarray, float, float]:
    """The (weighted) mean in the C++ core, or its bit-identical NumPy twin without bem._C."""
    global _fallback_warned
    seed64 = _checks.seed_to_uint64(seed)
    if _ext.available():
        C = _ext.C()
        distribution, observed = C.bootstrap_linear(x, w, n_resamples, seed64)
        return distribution, observed, C.jackknife_acceleration(x, w)
    if not _fallback_warned:
        log.warning("bem.stats: compiled core unavailable (%s); bootstrapping the mean with the "
                    "slow NumPy reference", _ext.load_error())
        _fallback_warned = True
    distribution, observed = _reference.bootstrap_linear(x, w, n_resamples, seed64)
    return distribution, observed, _reference.jackknife_acceleration(x, w)


def _evaluate(statistic: Callable, sample: np.ndarray, rows: int | None) -> np.ndarray:
    """statistic(sample, axis=-1), checked to give `rows` values (a scalar when rows is None)."""
    value = np.asarray(statistic(sample, axis=-1), dtype=np.float64)
    expected = () if rows is None else (rows,)
    if value.shape != expected:
        raise ValueError(f"statistic: expected a vectorised callable returning shape {expected} for "
                         f"input of shape {sample.shape} with axis=-1, got shape {value.shape}")
    return value


def _bootstrap_callable(statistic: Callable, x: np.ndarray, n_resamples: int,
                        seed: int | None) -> tuple[np.ndarray, float, float]:
    """Resamples drawn in batches of at most _BATCH_ELEMENTS elements with
    np.random.default_rng(seed), in the order scipy.stats.bootstrap draws them."""
    n = x.size
    observed = float(_evaluate(statistic, x, None))
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_ELEMENTS // n)
    distribution = np.empty(n_resamples)
    for start in range(0, n_resamples, batch):
        rows = min(batch, n_resamples - start)
        distribution[start:start + rows] = _evaluate(statistic, x[rng.integers(0, n, (rows, n))], rows)

    if np.all(x == x[0]):
        # Every jackknife statistic is the same number: the acceleration is 0/0. Float noise in
        # the statistic (np.mean of 0.3s) would otherwise make it a meaningless finite value.
        return distribution, observed, math.nan
    # Leave-one-out jackknife, also batched: row i of a batch drops observation first + i.
    leave_out = np.empty(n)
    columns = np.arange(n - 1)
    for first in range(0, n, batch):
        dropped = np.arange(first, min(n, first + batch))
        index = columns[None, :] + (columns[None, :] >= dropped[:, None])
        leave_out[dropped] = _evaluate(statistic, x[index], dropped.size)
    # scipy's expression (Efron & Tibshirani eq. 14.15) in scipy's order of operations.
    u = (n - 1) * (leave_out.mean() - leave_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        acceleration = float(np.sum(u**3) / n**3 / 6 / (np.sum(u**2) / n**2) ** 1.5)
    return distribution, observed, acceleration


def _type7_quantiles(distribution: np.ndarray, levels: tuple[float, float]) -> list[float]:
    """Linearly interpolated (Hyndman–Fan type 7) quantiles, with scipy.stats.quantile's
    arithmetic, using a partial sort; a NaN level gives NaN."""
    size = distribution.size
    plan = []
    for p in levels:
        if math.isnan(p):
            plan.append(None)
            continue
        position = p * size + (1 - p)  # 1-based fractional rank
        upper = math.floor(position)
        lower = upper - 1
        fraction = 0.0 if lower < 0 else position % 1
        plan.append((min(max(lower, 0), size - 1), min(max(upper, 0), size - 1), fraction))
    ranks = sorted({r for item in plan if item is not None for r in item[:2]})
    ordered = np.partition(distribution, ranks) if ranks else distribution
    return [math.nan if item is None
            else (1 - item[2]) * float(ordered[item[0]]) + item[2] * float(ordered[item[1]])
            for item in plan]


def _bca(distribution: np.ndarray, observed: float, acceleration: float, confidence: float,
         keep_distribution: bool) -> BCaInterval:
    size = distribution.size
    share = (np.count_nonzero(distribution < observed)
             + np.count_nonzero(distribution <= observed)) / (2 * size)
    z0 = float(ndtri(share))
    z_alpha = float(ndtri((1 - confidence) / 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = []
        for z in (z_alpha, -z_alpha):
            num = z0 + z
            levels.append(float(ndtr(z0 + num / (1 - acceleration * num))))
    lower, upper = _type7_quantiles(distribution, (levels[0], levels[1]))
    if math.isnan(lower) or math.isnan(upper):
        warnings.warn(DegenerateDataWarning(
            "The BCa confidence interval cannot be calculated: the bootstrap distribution is "
            f"degenerate (bias correction {z0}, acceleration {acceleration}), e.g. all values "
            "are equal."), stacklevel=3)
    return BCaInterval(
        lower=lower, upper=upper, observed=float(observed), bias_correction=z0,
        acceleration=float(acceleration), confidence=confidence, n_resamples=size,
        standard_error=float(np.std(distribution, ddof=1)) if size > 1 else math.nan,
        distribution=distribution if keep_distribution else None)
