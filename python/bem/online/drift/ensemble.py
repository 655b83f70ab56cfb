"""The seed's drift ensemble, repaired: a Welch t-test and a KS test of a current window against a
reference window, and a Page-Hinkley test, with a true majority vote (2 of 3)."""
from __future__ import annotations

import collections
import math
import warnings
from typing import Any

import numpy as np
import scipy.stats

from bem.online.drift.base import DriftDetector, check_value
from bem.online.drift.page_hinkley import PageHinkley


class DriftEnsemble(DriftDetector):
    """Three signals over a stream of a monitored metric (e.g. per-request correctness):

    1. Welch's t-test of the current window against the reference window (p < alpha);
    2. the two-sample KS test of the same windows (p < alpha) — catches changes of spread that a
       location test misses;
    3. Page-Hinkley (river's, parameters `page_hinkley`) on the stream since the reference was
       fixed; its alarm stays raised until the ensemble restarts.

    The first `window_size` observations fill the reference window; later ones enter the current
    window (the last `window_size`). Once the current window holds `min_current` observations
    (default window_size // 2), every `check_every`-th update tests it; a drift is declared when at
    least `votes` of the three signals agree (default 2: a majority). The seed counted
    ``sum(signals) >= len(signals) // 2`` — one signal of three — and never filled its reference
    window; both are fixed here. After a detection the next update starts from the new regime:
    the current window becomes the reference, Page-Hinkley restarts.

    A window that is constant on both sides has no variance for the t-test: its signal is then
    "the two constants differ".

    >>> import random
    >>> rng = random.Random(7)
    >>> ens = DriftEnsemble(window_size=50)
    >>> stream = [float(rng.random() < 0.9) for _ in range(300)] + \\
    ...          [float(rng.random() < 0.4) for _ in range(300)]
    >>> alarms = []
    >>> for i, x in enumerate(stream):
    ...     ens.update(x)
    ...     if ens.drift_detected:
    ...         alarms.append(i)
    >>> alarms[0] >= 300, alarms[0] < 360
    (True, True)
    """

    name = "ensemble"

    def __init__(self, window_size: int = 100, alpha: float = 0.01, votes: int = 2,
                 min_current: int | None = None, check_every: int = 1,
                 page_hinkley: dict[str, Any] | None = None):
        super().__init__()
        for name, v, low in (("window_size", window_size, 4), ("votes", votes, 1),
                             ("check_every", check_every, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
        if votes > 3:
            raise ValueError(f"votes: expected at most 3 (there are three signals), got {votes}")
        min_current = window_size // 2 if min_current is None else min_current
        if isinstance(min_current, bool) or not isinstance(min_current, int) or \
                not 2 <= min_current <= window_size:
            raise ValueError(f"min_current: expected an int in [2, window_size], got {min_current!r}")
        self.alpha = check_value(alpha, "alpha")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a significance level in (0, 1), got {alpha!r}")
        self.window_size, self.votes, self.check_every = window_size, votes, check_every
        self.min_current = min_current
        self.ph_params = dict(page_hinkley or {})
        self.ph = PageHinkley(**self.ph_params)
        self.ph_params = self.ph.params()
        self.last_signals: dict[str, bool] = {}
        self._reset()

    def params(self) -> dict[str, Any]:
        return {"window_size": self.window_size, "alpha": self.alpha, "votes": self.votes,
                "min_current": self.min_current, "check_every": self.check_every,
                "page_hinkley": self.ph_params}

    def _reset(self) -> None:
        super()._reset()
        self.reference: list[float] = []
        self._fresh_regime()

    def _fresh_regime(self) -> None:
        self.current: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self.ph = PageHinkley(**self.ph_params)
        self.ph_alarm = False
        self.since_check = 0
        self.last_signals = {}

    def _restart(self) -> None:
        self._drift_detected = False
        self.reference = list(self.current)
        self._fresh_regime()

    def _step(self, x: float) -> bool:
        if len(self.reference) < self.window_size:
            self.reference.append(x)
            return False
        self.current.append(x)
        self.ph.update(x)
        self.ph_alarm = self.ph_alarm or self.ph.drift_detected
        self.since_check += 1
        if len(self.current) < self.min_current or self.since_check < self.check_every:
            return False
        self.since_check = 0
        self.last_signals = self.signals()
        return sum(self.last_signals.values()) >= self.votes

    def signals(self) -> dict[str, bool]:
        """The three signals for the windows as they are now."""
        ref, cur = np.asarray(self.reference), np.asarray(self.current)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            if ref.std() == 0 and cur.std() == 0:
                welch = bool(ref[0] != cur[0])
            else:
                p = scipy.stats.ttest_ind(cur, ref, equal_var=False).pvalue
                welch = bool(math.isfinite(p) and p < self.alpha)
            ks = bool(scipy.stats.ks_2samp(cur, ref).pvalue < self.alpha)
        return {"welch": welch, "ks": ks, "page_hinkley": self.ph_alarm}

    def _state(self) -> dict[str, Any]:
        return {"reference": list(self.reference), "current": list(self.current),
                "page_hinkley": self.ph.state_dict(), "ph_alarm": self.ph_alarm,
                "since_check": self.since_check}

    def _load(self, state: dict[str, Any]) -> None:
        ref = [check_value(v, "reference") for v in state["reference"]]
        cur = [check_value(v, "current") for v in state["current"]]
        if len(ref) > self.window_size or len(cur) > self.window_size:
            raise ValueError(f"windows: expected at most {self.window_size} values each")
        ph = PageHinkley(**self.ph_params)
        ph.load_state_dict(state["page_hinkley"])
        if not isinstance(state["ph_alarm"], bool):
            raise ValueError("ph_alarm: expected a bool")
        self.reference, self.ph, self.ph_alarm = ref, ph, state["ph_alarm"]
        self.current = collections.deque(cur, maxlen=self.window_size)
        self.since_check = int(state["since_check"])
