"""Page-Hinkley change detection with river 0.26.1's semantics and defaults (a CUSUM of the
deviations from the running mean, with a forgetting factor, testing increases, decreases or both)."""
from __future__ import annotations

from typing import Any

from bem.online.drift.base import DriftDetector, check_value, decode_float, encode_float

MODES = ("up", "down", "both")


class PageHinkley(DriftDetector):
    """Page-Hinkley test.

    Per observation x (n = count, x̄ = running mean including x): dev = x − x̄;
    S⁺ ← α·S⁺ + dev − δ, S⁻ ← α·S⁻ + dev + δ; m⁺ = min S⁺ so far, M⁻ = max S⁻ so far (starting
    at +inf and −1, river's initial values). Once n ≥ min_instances, a drift is an increase when
    S⁺ − m⁺ > threshold and a decrease when M⁻ − S⁻ > threshold (mode "up", "down" or "both").

    >>> import random
    >>> rng = random.Random(12345)
    >>> ph = PageHinkley()
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> for i, x in enumerate(stream):
    ...     ph.update(x)
    ...     if ph.drift_detected:
    ...         print(i)
    1006
    """

    name = "page_hinkley"

    def __init__(self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0,
                 alpha: float = 1 - 0.0001, mode: str = "both"):
        super().__init__()
        if isinstance(min_instances, bool) or not isinstance(min_instances, int) or min_instances < 1:
            raise ValueError(f"min_instances: expected an int >= 1, got {min_instances!r}")
        self.min_instances = min_instances
        self.delta = check_value(delta, "delta")
        self.threshold = check_value(threshold, "threshold")
        self.alpha = check_value(alpha, "alpha")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha: expected a forgetting factor in (0, 1], got {alpha!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self._reset()

    def params(self) -> dict[str, Any]:
        return {"min_instances": self.min_instances, "delta": self.delta,
                "threshold": self.threshold, "alpha": self.alpha, "mode": self.mode}

    def _reset(self) -> None:
        super()._reset()
        self.n = 0.0
        self.mean = 0.0
        self.sum_increase = 0.0
        self.sum_decrease = 0.0
        self.min_increase = float("inf")
        self.max_decrease = -1.0

    def _step(self, x: float) -> bool:
        # River's running mean (West 1979) in the same order of operations, so that detections
        # fall on the same index.
        self.n += 1.0
        self.mean += (1.0 / self.n) * (x - self.mean)
        dev = x - self.mean
        self.sum_increase = self.alpha * self.sum_increase + dev - self.delta
        self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta
        self.min_increase = min(self.min_increase, self.sum_increase)
        self.max_decrease = max(self.max_decrease, self.sum_decrease)
        if self.n < self.min_instances:
            return False
        up = self.sum_increase - self.min_increase > self.threshold
        down = self.max_decrease - self.sum_decrease > self.threshold
        return {"up": up, "down": down, "both": up or down}[self.mode]

    def _state(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "sum_increase": self.sum_increase,
                "sum_decrease": self.sum_decrease,
                "min_increase": encode_float(self.min_increase),
                "max_decrease": encode_float(self.max_decrease)}

    def _load(self, state: dict[str, Any]) -> None:
        values = {k: decode_float(state[k], k) for k in ("n", "mean", "sum_increase",
                                                          "sum_decrease", "min_increase",
                                                          "max_decrease")}
        for k, v in values.items():
            setattr(self, k, v)
