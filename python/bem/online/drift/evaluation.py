"""What a drift detector does on a stream: the indices of its alarms, the delay from each true
change point to the first alarm after it, and its false alarms per 1,000 observations on streams
without a change."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from bem.online.drift.base import DriftDetector


def alarms_of(detector: DriftDetector, stream: Iterable[float]) -> list[int]:
    """Indices of `stream` at which `detector` (updated in order) reported a drift."""
    out = []
    for i, x in enumerate(stream):
        detector.update(x)
        if detector.drift_detected:
            out.append(i)
    return out


def detection_delays(alarms: Sequence[int], change_points: Sequence[int], length: int
                     ) -> tuple[list[int | None], list[int]]:
    """(delays, false alarms). delays[k]: observations from change point k to the first alarm at or
    after it and before the next change point (None: missed). An alarm before the first change
    point, or after the first alarm of its segment, is a false alarm."""
    bounds = list(change_points) + [length]
    if sorted(bounds) != bounds or (change_points and change_points[0] < 0):
        raise ValueError(f"change_points: expected increasing indices in [0, {length}], got "
                         f"{list(change_points)}")
    delays: list[int | None] = []
    false: list[int] = [a for a in alarms if not change_points or a < change_points[0]]
    for k, start in enumerate(change_points):
        inside = [a for a in alarms if start <= a < bounds[k + 1]]
        delays.append(inside[0] - start if inside else None)
        false += inside[1:]
    return delays, sorted(false)


def false_alarm_rate(make_detector: Callable[[], DriftDetector],
                     make_stream: Callable[[np.random.Generator], Sequence[float]], *,
                     n_streams: int, seed: int = 0) -> tuple[float, int, int]:
    """(alarms per 1,000 observations, alarms, observations) of fresh detectors on `n_streams`
    stationary streams drawn by make_stream(rng) from np.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    alarms = observations = 0
    for _ in range(n_streams):
        stream = make_stream(rng)
        alarms += len(alarms_of(make_detector(), stream))
        observations += len(stream)
    return 1000.0 * alarms / max(observations, 1), alarms, observations
