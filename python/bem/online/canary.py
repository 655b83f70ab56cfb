"""The canary judge: before an update ships, the candidate and the current adapter answer the same
canary set, and two judgements must both pass — bem's paired statistics per slice of the canary
set (mean difference with a BCa interval, one-sided sign-flip test, BH across slices), and a
Kayenta-style classifier for unpaired metrics such as latency (Mann-Whitney with a Hodges-Lehmann
interval, High/Low/Pass by direction, a KS distribution check, critical metrics, a weighted score
with pass/marginal thresholds)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.stats
from scipy.special import ndtr, ndtri

from bem.online._checks import nonneg_float

DIRECTIONS = ("increase", "decrease", "either")
LABELS = ("Pass", "High", "Low", "Shape", "NoData")


def _vector(values: Any, name: str, min_size: int = 1) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1) if not isinstance(values, np.ndarray) \
        else values.astype(np.float64).reshape(-1)
    if x.size < min_size:
        raise ValueError(f"{name}: expected at least {min_size} values, got {x.size}")
    if not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x))[0])
        raise ValueError(f"{name}: value {x[i]} at index {i} is not finite")
    return x


def mann_whitney(x: Any, y: Any, alternative: str = "two-sided") -> tuple[float, float]:
    """(U of x, p-value) of the Mann-Whitney U test: midranks for ties, the normal approximation
    with tie-corrected variance and continuity correction — scipy.stats.mannwhitneyu(x, y,
    alternative=..., method="asymptotic")'s result. x, y: (n,), (m,) finite values, n, m ≥ 1."""
    a, b = _vector(x, "x"), _vector(y, "y")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative: expected 'two-sided', 'greater' or 'less', got "
                         f"{alternative!r}")
    n, m = a.size, b.size
    ranks = scipy.stats.rankdata(np.concatenate([a, b]))
    u = float(ranks[:n].sum() - n * (n + 1) / 2)
    total = n + m
    _, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    tie = float((counts**3 - counts).sum())
    sd = math.sqrt(n * m / 12 * ((total + 1) - tie / (total * (total - 1)))) if total > 1 else 0.0
    mean = n * m / 2
    if alternative == "two-sided":
        stat = max(u, n * m - u)
    elif alternative == "greater":
        stat = u
    else:
        stat = n * m - u
    if sd == 0:
        return u, 1.0
    z = (stat - mean - 0.5) / sd
    p = float(ndtr(-z))
    if alternative == "two-sided":
        p = 2 * p
    return u, min(1.0, max(0.0, p))


def hodges_lehmann(x: Any, y: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """(estimate, lower, upper): the Hodges-Lehmann shift of x over y — the median of the n·m
    differences x_i − y_j — and its distribution-free interval [d_(k), d_(nm−k+1)] over the sorted
    differences, k = ⌊nm/2 − z_{(1+c)/2}·√(nm(n+m+1)/12)⌋ (the normal approximation of the
    Mann-Whitney quantile, Hollander & Wolfe; k clipped to ≥ 1, so tiny samples give the range
    of the differences)."""
    a, b = _vector(x, "x"), _vector(y, "y")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence!r}")
    d = np.sort((a[:, None] - b[None, :]).reshape(-1))
    nm = d.size
    z = float(ndtri((1 + confidence) / 2))
    k = math.floor(nm / 2 - z * math.sqrt(a.size * b.size * (a.size + b.size + 1) / 12))
    k = min(max(k, 1), (nm + 1) // 2)
    return float(np.median(d)), float(d[k - 1]), float(d[nm - k])


@dataclass(frozen=True)
class MetricSpec:
    """One unpaired canary metric. direction: the change that is bad ("increase" for latency,
    "decrease" for a success rate, "either"). critical: a failure scores the whole canary 0.
    group: metrics are scored per group, groups weighted by the judge's `group_weights`.
    fraction: Kayenta's tolerance — a shift counts only when its Hodges-Lehmann interval lies
    beyond ±fraction·|estimate|. confidence: of that interval (Netflix's judge: 0.98).
    ks_alpha: the distribution check (None: off): a metric that passes the location test fails
    as "Shape" when the KS test rejects at ks_alpha and the candidate's tail on the bad side (90th
    percentile for "increase", 10th for "decrease") is worse — the variance blow-up a location
    test misses (kayenta #780)."""

    name: str
    direction: str = "increase"
    critical: bool = False
    group: str = "default"
    fraction: float = 0.25
    confidence: float = 0.98
    ks_alpha: float | None = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MetricSpec: name: expected a non-empty str, got {self.name!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"MetricSpec {self.name}: direction: expected one of {DIRECTIONS}, "
                             f"got {self.direction!r}")
        nonneg_float(self.fraction, f"MetricSpec {self.name}: fraction")
        if not 0 < self.confidence < 1:
            raise ValueError(f"MetricSpec {self.name}: confidence: expected (0, 1), got "
                             f"{self.confidence!r}")
        if self.ks_alpha is not None and not 0 < self.ks_alpha < 1:
            raise ValueError(f"MetricSpec {self.name}: ks_alpha: expected (0, 1) or None, got "
                             f"{self.ks_alpha!r}")


@dataclass(frozen=True)
class MetricClassification:
    """label: Pass, High, Low, Shape or NoData; failed: whether it counts against the canary."""

    name: str
    label: str
    failed: bool
    estimate: float
    lower: float
    upper: float
    p_value: float
    ks_p_value: float
    ratio: float
    reason: str


def classify_metric(candidate: Any, current: Any, spec: MetricSpec) -> MetricClassification:
    """Kayenta's Mann-Whitney classification of one metric (candidate = experiment, current =
    control), plus the KS distribution check of `spec`."""
    cand = np.asarray(candidate, dtype=np.float64).reshape(-1)
    cur = np.asarray(current, dtype=np.float64).reshape(-1)
    nan = math.nan
    if cand.size == 0 or cur.size == 0:
        return MetricClassification(spec.name, "NoData", False, nan, nan, nan, nan, nan, nan,
                                    "no data for the candidate or the current adapter")
    cand = _vector(cand, f"candidate[{spec.name!r}]")
    cur = _vector(cur, f"current[{spec.name!r}]")
    mean_cur = float(cur.mean())
    ratio = float(cand.mean()) / mean_cur if mean_cur != 0 else nan
    if np.array_equal(np.sort(cand), np.sort(cur)) or np.unique(np.concatenate([cand, cur])).size == 1:
        return MetricClassification(spec.name, "Pass", False, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0,
                                    "identical data")
    _, p = mann_whitney(cand, cur)
    est, lo, hi = hodges_lehmann(cand, cur, spec.confidence)
    bound = spec.fraction * abs(est)
    ks_p = nan
    if spec.direction in ("increase", "either") and lo > bound:
        label, reason = "High", f"{spec.name} higher: shift {est:+.4g} [{lo:+.4g}, {hi:+.4g}]"
    elif spec.direction in ("decrease", "either") and hi < -bound:
        label, reason = "Low", f"{spec.name} lower: shift {est:+.4g} [{lo:+.4g}, {hi:+.4g}]"
    else:
        label, reason = "Pass", ""
        if spec.ks_alpha is not None:
            ks_p = float(scipy.stats.ks_2samp(cand, cur).pvalue)
            worse_tail = {"increase": np.quantile(cand, 0.9) > np.quantile(cur, 0.9),
                          "decrease": np.quantile(cand, 0.1) < np.quantile(cur, 0.1),
                          "either": True}[spec.direction]
            if ks_p < spec.ks_alpha and worse_tail:
                label = "Shape"
                reason = (f"{spec.name} distribution changed (KS p={ks_p:.2g}) with a worse tail, "
                          f"although its median shift {est:+.4g} passes")
    return MetricClassification(spec.name, label, label != "Pass", est, lo, hi, p, ks_p, ratio,
                                reason)


@dataclass(frozen=True)
class SliceJudgement:
    """Paired judgement of one slice of the canary set: mean of candidate − current, its BCa
    interval, the one-sided sign-flip p-value of "candidate worse" and its BH-adjusted value."""

    name: str
    n: int
    mean_delta: float
    ci_lower: float
    ci_upper: float
    p_worse: float
    p_adjusted: float
    failed: bool
    reason: str


@dataclass(frozen=True)
class CanaryVerdict:
    """ship: whether the candidate may ship; reasons: why not (empty when it ships)."""

    ship: bool
    reasons: list[str]
    slices: list[SliceJudgement]
    metrics: list[MetricClassification]
    score: float
    kayenta: str
    group_scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v
        return clean(asdict(self))


class CanaryJudge:
    """Judges a candidate against the current adapter on one canary set.

    Paired part (per slice, e.g. per domain; scores such as per-example correctness, higher is
    better): a slice fails when its BH-adjusted one-sided p-value of "candidate worse"
    (bem.stats.paired_test, sign-flip permutation) is ≤ alpha, or when its mean difference is
    below −tolerance (a drop too large to ship even when n is too small to make it significant).
    Intervals: bem.stats.bca_interval of the paired difference.
    Unpaired part (Kayenta): each metric of `metrics` is classified (classify_metric); a group
    scores 100·passed/classified; the score is the weighted mean over groups (group_weights,
    default equal), 0 when a critical metric fails; "pass" at ≥ pass_threshold, "marginal" at
    ≥ marginal_threshold, else "fail". The candidate ships only when no slice fails and the
    Kayenta verdict is "pass".
    """

    def __init__(self, *, tolerance: float = 0.05, alpha: float = 0.05,
                 metrics: Sequence[MetricSpec] = (), group_weights: Mapping[str, float] | None = None,
                 pass_threshold: float = 95.0, marginal_threshold: float = 75.0,
                 confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0):
        self.tolerance = nonneg_float(tolerance, "tolerance")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha: expected a level in (0, 1), got {alpha!r}")
        self.alpha, self.confidence = alpha, confidence
        self.metrics = {m.name: m for m in metrics}
        if len(self.metrics) != len(metrics):
            raise ValueError("metrics: duplicate metric names")
        self.group_weights = dict(group_weights or {})
        for g, w in self.group_weights.items():
            nonneg_float(w, f"group_weights[{g!r}]")
        if not 0 <= marginal_threshold <= pass_threshold <= 100:
            raise ValueError(f"pass_threshold, marginal_threshold: expected 0 <= marginal <= pass "
                             f"<= 100, got {pass_threshold}, {marginal_threshold}")
        self.pass_threshold, self.marginal_threshold = pass_threshold, marginal_threshold
        self.n_resamples, self.seed = n_resamples, seed

    def _slices(self, paired: Mapping[str, tuple[Any, Any]]) -> list[SliceJudgement]:
        from bem.stats import bca_interval, fdr, paired_test

        rows = []
        for name, pair in paired.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"paired[{name!r}]: expected (candidate, current) score arrays")
            cand = _vector(pair[0], f"paired[{name!r}] candidate", min_size=2)
            cur = _vector(pair[1], f"paired[{name!r}] current", min_size=2)
            if cand.size != cur.size:
                raise ValueError(f"paired[{name!r}]: candidate has {cand.size} scores, current "
                                 f"{cur.size}; paired scores must align")
            d = cand - cur
            if not d.any():
                lo = hi = 0.0
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ci = bca_interval(cand, paired_with=cur, confidence=self.confidence,
                                      n_resamples=self.n_resamples, seed=self.seed)
                lo, hi = ci.lower, ci.upper
            p = paired_test(cand, cur, method="permutation", alternative="less",
                            n_resamples=self.n_resamples, seed=self.seed)
            rows.append((name, cand.size, float(d.mean()), lo, hi, p))
        if not rows:
            return []
        adjusted = fdr([r[5] for r in rows], method="bh", alpha=self.alpha).adjusted
        out = []
        for (name, n, mean, lo, hi, p), padj in zip(rows, adjusted):
            reasons = []
            if padj <= self.alpha:
                reasons.append(f"{name}: significantly worse (Δ {mean:+.3f}, BH p={padj:.3g})")
            elif mean < -self.tolerance:
                reasons.append(f"{name}: drop Δ {mean:+.3f} beyond the tolerance "
                               f"{self.tolerance:.3f}")
            out.append(SliceJudgement(name, n, mean, lo, hi, p, float(padj), bool(reasons),
                                      "; ".join(reasons)))
        return out

    def judge(self, paired: Mapping[str, tuple[Any, Any]],
              unpaired: Mapping[str, tuple[Any, Any]] | None = None) -> CanaryVerdict:
        """paired: slice → (candidate scores, current scores), aligned per canary example, higher
        is better. unpaired: metric name (one of the judge's MetricSpecs) → (candidate values,
        current values). ValueError naming the slice or metric for NaN, misaligned or unknown
        input."""
        if not isinstance(paired, Mapping) or not paired:
            raise ValueError("paired: expected at least one slice of paired canary scores")
        unpaired = dict(unpaired or {})
        unknown = sorted(set(unpaired) - set(self.metrics))
        if unknown:
            raise ValueError(f"unpaired: metrics {unknown} have no MetricSpec in this judge")
        slices = self._slices(paired)
        metrics = [classify_metric(*unpaired[name], spec) for name, spec in self.metrics.items()
                   if name in unpaired]
        groups: dict[str, list[MetricClassification]] = {}
        for m in metrics:
            if m.label != "NoData":
                groups.setdefault(self.metrics[m.name].group, []).append(m)
        group_scores = {g: 100.0 * sum(not m.failed for m in ms) / len(ms)
                        for g, ms in groups.items()}
        if group_scores:
            weights = {g: self.group_weights.get(g, 1.0) for g in group_scores}
            total = sum(weights.values())
            score = (sum(weights[g] * s for g, s in group_scores.items()) / total if total > 0
                     else 100.0)
        else:
            score = 100.0
        if any(m.failed and self.metrics[m.name].critical for m in metrics):
            score = 0.0
        kayenta = ("pass" if score >= self.pass_threshold else
                   "marginal" if score >= self.marginal_threshold else "fail")
        reasons = [s.reason for s in slices if s.failed]
        reasons += [m.reason for m in metrics if m.failed]
        if kayenta != "pass":
            reasons.append(f"canary score {score:.0f} ({kayenta}; pass needs "
                           f"{self.pass_threshold:.0f})")
        return CanaryVerdict(not reasons, reasons, slices, metrics, score, kayenta, group_scores)
