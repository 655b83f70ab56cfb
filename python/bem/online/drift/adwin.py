"""ADWIN (adaptive windowing, Bifet & Gavaldà 2007) with river 0.26.1's semantics and defaults:
an exponential histogram of the stream, checked for a cut every `clock` updates."""
from __future__ import annotations

import math
from typing import Any

from bem.online.drift.base import DriftDetector, check_value


class ADWIN(DriftDetector):
    """ADWIN2 over an exponential histogram: row i holds up to `max_buckets` summaries of 2^i
    observations each (total, and sum of squared deviations), newest last in row 0, oldest first
    in the last row; a row that overflows merges its two oldest summaries into the next row.

    Every `clock`-th update, once the window holds more than `grace_period` observations, every
    split W = W₀ (older) · W₁ (newer) at a summary boundary with |W₀|, |W₁| ≥ min_window_length is
    tested: a cut when |μ₀ − μ₁| > √(2·m⁻¹·σ²_W·δ′) + (2/3)·δ′·m⁻¹, δ′ = ln(2·ln|W| / δ),
    m⁻¹ = 1/(|W₀| − mwl + 1) + 1/(|W₁| − mwl + 1), σ²_W the window's variance. On a cut the oldest
    summary is dropped and the scan repeats; the update reports a drift. As in river 0.26.1, the
    update after a detection starts from an empty window. The arithmetic follows river's order of
    operations, so detections fall on the same indices.

    >>> import random
    >>> rng = random.Random(12345)
    >>> adwin = ADWIN()
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> for i, x in enumerate(stream):
    ...     adwin.update(x)
    ...     if adwin.drift_detected:
    ...         print(i)
    1023
    """

    name = "adwin"

    def __init__(self, delta: float = 0.002, clock: int = 32, max_buckets: int = 5,
                 min_window_length: int = 5, grace_period: int = 10):
        super().__init__()
        self.delta = check_value(delta, "delta")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta: expected a significance level in (0, 1), got {delta!r}")
        for name, v, low in (("clock", clock, 1), ("max_buckets", max_buckets, 2),
                             ("min_window_length", min_window_length, 1),
                             ("grace_period", grace_period, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
        self.clock, self.max_buckets = clock, max_buckets
        self.min_window_length, self.grace_period = min_window_length, grace_period
        self._reset()

    def params(self) -> dict[str, Any]:
        return {"delta": self.delta, "clock": self.clock, "max_buckets": self.max_buckets,
                "min_window_length": self.min_window_length, "grace_period": self.grace_period}

    def _reset(self) -> None:
        super()._reset()
        self.rows: list[list[list[float]]] = [[]]   # row i: [total, variance] summaries of 2^i
        self.width = 0.0
        self.total = 0.0
        self.variance = 0.0      # sum of squared deviations from the window mean
        self.tick = 0
        self.n_detections = 0

    @property
    def estimation(self) -> float:
        """Mean of the current window (0 when empty)."""
        return self.total / self.width if self.width else 0.0

    def _step(self, x: float) -> bool:
        self._insert(x)
        return self._detect()

    def _insert(self, x: float) -> None:
        self.rows[0].append([x, 0.0])
        self.width += 1.0
        increment = 0.0
        if self.width > 1.0:
            d = x - self.total / (self.width - 1.0)
            increment = (self.width - 1.0) * d * d / self.width
        self.variance += increment
        self.total += x
        self._compress()

    def _compress(self) -> None:
        i = 0
        while len(self.rows[i]) == self.max_buckets + 1:
            size = float(1 << i)
            (t0, v0), (t1, v1) = self.rows[i][0], self.rows[i][1]
            mu0, mu1 = t0 / size, t1 / size
            merged = [t0 + t1, v0 + v1 + size * 0.5 * (mu0 - mu1) * (mu0 - mu1)]
            if i + 1 == len(self.rows):
                self.rows.append([])
            self.rows[i + 1].append(merged)
            del self.rows[i][:2]
            if len(self.rows[i + 1]) <= self.max_buckets:
                break
            i += 1

    def _drop_oldest(self) -> None:
        last = len(self.rows) - 1
        size = float(1 << last)
        total, var = self.rows[last][0]
        mu = total / size
        self.width -= size
        self.total -= total
        mu_window = self.total / self.width
        self.variance -= var + size * self.width * (mu - mu_window) * (mu - mu_window) / (
            size + self.width)
        del self.rows[last][0]
        if not self.rows[last]:
            self.rows.pop()

    def _cut(self, n0: float, n1: float, mean_gap: float) -> bool:
        delta_prime = math.log(2.0 * math.log(self.width) / self.delta)
        m_recip = (1.0 / (n0 - self.min_window_length + 1.0) +
                   1.0 / (n1 - self.min_window_length + 1.0))
        spread = 2.0 * m_recip * (self.variance / self.width) * delta_prime
        if spread < 0:          # rounding left a tiny negative variance: river's sqrt gives NaN
            return False
        return abs(mean_gap) > math.sqrt(spread) + 2.0 / 3.0 * delta_prime * m_recip

    def _detect(self) -> bool:
        detected = False
        self.tick += 1
        if self.tick % self.clock != 0 or self.width <= self.grace_period:
            return False
        mwl = self.min_window_length
        shrinking = True
        while shrinking:
            shrinking = False
            n0, n1, u0, u1 = 0.0, self.width, 0.0, self.total
            for i in range(len(self.rows) - 1, -1, -1):       # oldest summaries first
                size = float(1 << i)
                row = self.rows[i]
                cut = False
                for k, (t, _) in enumerate(row):
                    n0 += size
                    n1 -= size
                    u0 += t
                    u1 -= t
                    if i == 0 and k == len(row) - 1:           # W₁ would be empty
                        break
                    if n1 >= mwl and n0 >= mwl and self._cut(n0, n1, u0 / n0 - u1 / n1):
                        shrinking = detected = True
                        if self.width > 0:
                            self._drop_oldest()
                            cut = True
                            break
                if cut:
                    break
        if detected:
            self.n_detections += 1
        return detected

    def _state(self) -> dict[str, Any]:
        return {"rows": [[list(s) for s in row] for row in self.rows], "width": self.width,
                "total": self.total, "variance": self.variance, "tick": self.tick,
                "n_detections": self.n_detections}

    def _load(self, state: dict[str, Any]) -> None:
        rows = state["rows"]
        if not isinstance(rows, list) or not rows or any(
                not isinstance(r, list) or len(r) > self.max_buckets or
                any(not isinstance(s, list) or len(s) != 2 or
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s)
                    for s in r) for r in rows):
            raise ValueError("rows: expected a list of rows of [total, variance] summaries")
        width = float(state["width"])
        if width != sum(len(r) * (1 << i) for i, r in enumerate(rows)):
            raise ValueError("width does not match the summaries")
        self.rows = [[[float(t), float(v)] for t, v in r] for r in rows]
        self.width, self.total, self.variance = width, float(state["total"]), float(state["variance"])
        self.tick, self.n_detections = int(state["tick"]), int(state["n_detections"])
