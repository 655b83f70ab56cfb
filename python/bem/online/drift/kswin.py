"""KSWIN (Kolmogorov-Smirnov windowing, Raab et al. 2020) with river 0.26.1's semantics, defaults
and sampling: the newest `stat_size` observations against as many drawn from the older part of a
sliding window."""
from __future__ import annotations

import collections
import itertools
import random
import warnings
from typing import Any

import scipy.stats

from bem.online.drift.base import DriftDetector, check_value


class KSWIN(DriftDetector):
    """Sliding window Ψ of the last `window_size` observations. Once full, every update compares
    R = the newest `stat_size` of Ψ with W = `stat_size` observations drawn without replacement
    from the first window_size − stat_size of Ψ, by the two-sample KS test
    (scipy.stats.ks_2samp(W, R, method="auto")): a drift when p ≤ alpha and the statistic > 0.1.

    Sampling (what makes runs repeatable, and equal to river's for the same seed): W's positions
    are ``rng.sample(range(window_size - stat_size), stat_size)`` with ``rng =
    random.Random(seed)``, one draw per full-window update. The update after a detection starts
    from an empty window and a generator re-seeded with `seed`, as river's does. seed=None draws
    fresh entropy (not repeatable). The generator's state is part of :meth:`state_dict`.

    >>> import random
    >>> rng = random.Random(12345)
    >>> kswin = KSWIN(alpha=0.0001, seed=42)
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> for i, x in enumerate(stream):
    ...     kswin.update(x)
    ...     if kswin.drift_detected:
    ...         print(i)
    1016
    """

    name = "kswin"

    def __init__(self, alpha: float = 0.005, window_size: int = 100, stat_size: int = 30,
                 seed: int | None = None):
        super().__init__()
        self.alpha = check_value(alpha, "alpha")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha: expected a probability in [0, 1], got {alpha!r}")
        for name, v in (("window_size", window_size), ("stat_size", stat_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if window_size - stat_size < stat_size:
            raise ValueError(f"stat_size: expected at most window_size / 2 = {window_size // 2} "
                             f"(the older part must hold stat_size observations to draw), got "
                             f"{stat_size}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        self.window_size, self.stat_size, self.seed = window_size, stat_size, seed
        self._reset()

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "window_size": self.window_size,
                "stat_size": self.stat_size, "seed": self.seed}

    def _reset(self) -> None:
        super()._reset()
        self.n = 0
        self.p_value = 0.0
        self.window: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self._rng = random.Random(self.seed)

    def _step(self, x: float) -> bool:
        self.n += 1
        self.window.append(x)
        if len(self.window) < self.window_size:
            return False
        older = self.window_size - self.stat_size
        drawn = [self.window[i] for i in self._rng.sample(range(older), self.stat_size)]
        newest = list(itertools.islice(self.window, older, self.window_size))
        with warnings.catch_warnings():  # ks_2samp warns when "auto" falls back to asymptotic
            warnings.simplefilter("ignore", category=RuntimeWarning)
            statistic, self.p_value = scipy.stats.ks_2samp(drawn, newest, method="auto")
        self.p_value = float(self.p_value)
        return bool(self.p_value <= self.alpha and statistic > 0.1)

    def _state(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"n": self.n, "p_value": self.p_value, "window": list(self.window),
                "rng": [version, list(internal), gauss]}

    def _load(self, state: dict[str, Any]) -> None:
        window = state["window"]
        if not isinstance(window, list) or len(window) > self.window_size:
            raise ValueError(f"window: expected a list of at most {self.window_size} numbers")
        version, internal, gauss = state["rng"]
        rng = random.Random()
        rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
        self.window = collections.deque((check_value(v, "window") for v in window),
                                        maxlen=self.window_size)
        self.n, self.p_value, self._rng = int(state["n"]), float(state["p_value"]), rng
