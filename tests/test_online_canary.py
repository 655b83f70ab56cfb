"""bem.online.canary: Mann-Whitney against scipy.stats.mannwhitneyu, a hand-checked Hodges-Lehmann
case, Kayenta's High/Low/Pass rules, the KS check that catches a variance blow-up, scoring, the
paired per-slice judgement, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from bem.online.canary import (CanaryJudge, MetricSpec, classify_metric, hodges_lehmann,
                               mann_whitney)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_mann_whitney_matches_scipy(alternative):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, m = rng.integers(3, 60, size=2)
        x = rng.normal(0.3 * (trial % 3), 1, n)
        y = rng.normal(0, 1, m)
        if trial % 2:                       # ties
            x, y = np.round(x, 0), np.round(y, 0)
        u, p = mann_whitney(x, y, alternative)
        ref = scipy.stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
        assert u == pytest.approx(ref.statistic, abs=1e-9)
        assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)


def test_hodges_lehmann_hand_checked():
    # Differences x_i - y_j of x = (5, 6, 7, 12), y = (1, 2, 4):
    # 4 3 1 | 5 4 2 | 6 5 3 | 11 10 8 → sorted 1 2 3 3 4 4 5 5 6 8 10 11, median (4 + 5) / 2.
    est, lo, hi = hodges_lehmann([5, 6, 7, 12], [1, 2, 4], confidence=0.5)
    assert est == 4.5
    # k = floor(12/2 - z_0.75 · sqrt(4·3·8/12)) = floor(6 - 0.6745·2.828) = 4 → d_(4) = 3, d_(9) = 6
    assert (lo, hi) == (3.0, 6.0)
    est, lo, hi = hodges_lehmann([5, 6, 7, 12], [1, 2, 4], confidence=0.95)
    assert (lo, hi) == (1.0, 11.0)            # k clipped to 1 on so few pairs: the full range


def test_hodges_lehmann_interval_covers_a_known_shift():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(200):
        x, y = rng.normal(1.0, 1, 40), rng.normal(0, 1, 40)
        _, lo, hi = hodges_lehmann(x, y, 0.9)
        covered += lo <= 1.0 <= hi
    assert 0.84 <= covered / 200 <= 0.96


def test_classify_high_low_pass_by_direction():
    rng = np.random.default_rng(2)
    base = rng.normal(10, 1, 200)
    slow = rng.normal(13, 1, 200)
    lat = MetricSpec("latency", direction="increase")
    assert classify_metric(slow, base, lat).label == "High"
    assert classify_metric(base, slow, lat).label == "Pass"        # faster is fine
    acc = MetricSpec("success", direction="decrease")
    assert classify_metric(base, slow, acc).label == "Low"
    assert classify_metric(base, base.copy(), lat).label == "Pass"
    assert classify_metric([], base, lat).label == "NoData"
    either = MetricSpec("x", direction="either", ks_alpha=None)
    assert classify_metric(slow, base, either).label == "High"
    assert classify_metric(base, slow, either).label == "Low"


def test_ks_check_catches_a_variance_blow_up_the_location_test_misses():
    rng = np.random.default_rng(3)
    current = rng.normal(10, 0.5, 300)
    candidate = rng.normal(10, 4.0, 300)                    # same median, 8x the spread
    no_ks = classify_metric(candidate, current, MetricSpec("latency", ks_alpha=None))
    assert no_ks.label == "Pass"
    with_ks = classify_metric(candidate, current, MetricSpec("latency"))
    assert with_ks.label == "Shape" and with_ks.failed and with_ks.ks_p_value < 0.01


def test_scoring_critical_and_thresholds():
    rng = np.random.default_rng(4)
    same = rng.normal(10, 1, 100)
    worse = same + 5
    judge = CanaryJudge(metrics=[MetricSpec("latency", group="speed"),
                                 MetricSpec("memory", group="speed"),
                                 MetricSpec("errors", group="quality", critical=True)],
                        group_weights={"speed": 1.0, "quality": 3.0})
    ok = {"a": (np.ones(20), np.ones(20))}
    v = judge.judge(ok, {"latency": (worse, same), "memory": (same, same),
                         "errors": (same, same)})
    # speed 50, quality 100 → (1·50 + 3·100) / 4 = 87.5: marginal, not shipped.
    assert v.score == 87.5 and v.kayenta == "marginal" and not v.ship
    v = judge.judge(ok, {"latency": (same, same), "memory": (same, same),
                         "errors": (worse, same)})
    assert v.score == 0 and v.kayenta == "fail"
    v = judge.judge(ok, {"latency": (same, same), "memory": (same, same), "errors": (same, same)})
    assert v.ship and v.score == 100 and v.reasons == []


def test_paired_slices_reject_significant_drops_and_large_point_drops():
    rng = np.random.default_rng(5)
    judge = CanaryJudge(tolerance=0.05, alpha=0.05, n_resamples=2000)
    cur = (rng.random(80) < 0.8).astype(float)
    better = np.maximum(cur, (rng.random(80) < 0.5).astype(float))
    worse = cur * (rng.random(80) < 0.7)
    v = judge.judge({"ok": (better, cur), "done": (cur.copy(), cur)})
    assert v.ship and all(not s.failed for s in v.slices)
    assert v.slices[1].mean_delta == 0 and v.slices[1].ci_lower == 0 and v.slices[1].p_worse == 1
    v = judge.judge({"ok": (better, cur), "done": (worse, cur)})
    assert not v.ship and v.slices[1].failed and "significantly worse" in v.reasons[0]
    assert v.slices[1].ci_upper < 0
    # A small slice whose drop is not significant but beyond the tolerance is still refused.
    small_cur, small_cand = np.ones(6), np.array([1, 1, 1, 1, 1, 0.0])
    v = judge.judge({"tiny": (small_cand, small_cur)})
    assert not v.ship and "tolerance" in v.reasons[0]
    assert v.to_dict()["slices"][0]["name"] == "tiny"


def test_judge_bad_input():
    judge = CanaryJudge(metrics=[MetricSpec("latency")])
    with pytest.raises(ValueError, match=r"paired\['ok'\] candidate: value nan at index 1"):
        judge.judge({"ok": ([1.0, float("nan")], [1.0, 1.0])})
    with pytest.raises(ValueError, match=r"paired\['ok'\]: candidate has 3 scores, current 2"):
        judge.judge({"ok": ([1.0, 0.0, 1.0], [1.0, 1.0])})
    with pytest.raises(ValueError, match="paired: expected at least one slice"):
        judge.judge({})
    with pytest.raises(ValueError, match=r"unpaired: metrics \['memory'\]"):
        judge.judge({"ok": ([1.0, 1.0], [1.0, 1.0])}, {"memory": ([1.0], [1.0])})
    with pytest.raises(ValueError, match=r"candidate\['latency'\]: value inf"):
        judge.judge({"ok": ([1.0, 1.0], [1.0, 1.0])}, {"latency": ([float("inf"), 1.0], [1.0, 2.0])})
    with pytest.raises(ValueError, match="direction"):
        MetricSpec("latency", direction="up")
