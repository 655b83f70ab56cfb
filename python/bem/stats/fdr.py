"""False discovery rate control: Benjamini–Hochberg and Benjamini–Yekutieli adjusted p-values,
equal to scipy.stats.false_discovery_control, plus the rejections at a level alpha."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bem.stats import _checks

__all__ = ["FDRResult", "fdr"]


@dataclass(frozen=True)
class FDRResult:
    """adjusted: (m,) float64 adjusted p-values in the input order; rejected: (m,) bool,
    adjusted <= alpha; method and alpha as given."""

    adjusted: np.ndarray
    rejected: np.ndarray
    method: str
    alpha: float


def fdr(p_values, *, method: str = "bh", alpha: float = 0.05) -> FDRResult:
    """Adjusts the (m,) p-values of m hypotheses tested together for the false discovery rate.

    method "bh": Benjamini–Hochberg step-up (independent or positively dependent tests);
    "by": Benjamini–Yekutieli (any dependence; BH times Σ_{i≤m} 1/i). The adjusted p-value of
    the i-th smallest p is min over j >= i of p_(j)·m/j (times the BY factor), clipped to 1 —
    what scipy.stats.false_discovery_control returns. A hypothesis is rejected when its adjusted
    p-value is <= alpha (alpha in (0, 1)). p-values must lie in [0, 1]; NaN raises ValueError.
    An empty input gives empty results.
    """
    _checks.choice(method, "method", ("bh", "by"))
    alpha = _checks.open_unit_float(alpha, "alpha")
    p = _checks.float_vector(p_values, "p_values", min_size=0)
    outside = (p < 0) | (p > 1)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise ValueError(f"p_values: expected values in [0, 1], got {p[index]} at index {index}")
    m = p.size
    if m == 0:
        return FDRResult(np.zeros(0), np.zeros(0, dtype=bool), method, alpha)
    order = np.argsort(p, kind="stable")
    ranks = np.arange(1, m + 1, dtype=np.float64)
    scaled = p[order] * (m / ranks)
    if method == "by":
        scaled *= np.sum(1 / ranks)
    # Step-up: the running minimum from the largest p-value down.
    scaled = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.clip(scaled, 0.0, 1.0)
    return FDRResult(adjusted, adjusted <= alpha, method, alpha)
