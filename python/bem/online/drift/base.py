"""The interface every bem drift detector shares (river's: ``update(x)``, then ``.drift_detected``;
the update after a detection starts from a fresh state) and its JSON state, for checkpoints."""
from __future__ import annotations

import math
from typing import Any, ClassVar

STATE_FORMAT = "bem.drift-detector"
STATE_VERSION = 1


def check_value(x: Any, name: str = "x") -> float:
    """`x` as a float; TypeError for non-numbers (bool included), ValueError for NaN or ±inf."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def encode_float(v: float) -> float | str:
    """JSON has no infinities: ±inf and NaN are stored as the strings "inf", "-inf", "nan"."""
    return v if math.isfinite(v) else str(v)


def decode_float(v: Any, name: str) -> float:
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"state: {name}: expected a number, got {v!r}")
    return float(v)


class DriftDetector:
    """Base class: subclasses define `name`, `params()`, `_reset()`, `_step(x)`, `_state()` and
    `_load(state)`; `update` validates x and resets after a detection, as river does."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._drift_detected = False

    @property
    def drift_detected(self) -> bool:
        """Whether the last update detected a drift."""
        return self._drift_detected

    def update(self, x: float) -> None:
        """Add one observation. ValueError (naming `x`) for NaN/inf, which would poison the
        statistics for ever; the detector is left unchanged then."""
        value = check_value(x)
        if self._drift_detected:
            self._restart()
        self._drift_detected = self._step(value)

    def reset(self) -> None:
        """Forget everything seen so far (the parameters stay)."""
        self._reset()

    def _reset(self) -> None:
        self._drift_detected = False

    def _restart(self) -> None:
        """What the update after a detection starts from: a fresh state (river's behaviour)."""
        self._reset()

    def _step(self, x: float) -> bool:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__}: no _step")

    def params(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__}: no params")

    def _state(self) -> dict[str, Any]:  # pragma: no cover
        raise TypeError(f"{type(self).__name__}: no _state")

    def _load(self, state: dict[str, Any]) -> None:  # pragma: no cover
        raise TypeError(f"{type(self).__name__}: no _load")

    def state_dict(self) -> dict[str, Any]:
        """The detector as a JSON-serialisable dict: its name, parameters and full state, so that
        :func:`bem.online.drift.detector_from_state` rebuilds one that continues identically."""
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, "detector": self.name,
                "params": self.params(),
                "state": {"drift_detected": self._drift_detected, **self._state()}}

    def load_state_dict(self, doc: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` of a detector with the same name and
        parameters; ValueError (nothing changed) for anything else."""
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or \
                doc.get("format_version") != STATE_VERSION:
            raise ValueError(f"state: not a {STATE_FORMAT} document of version {STATE_VERSION}")
        if doc.get("detector") != self.name:
            raise ValueError(f"state: saved by detector {doc.get('detector')!r}, loading into "
                             f"{self.name!r}")
        if doc.get("params") != self.params():
            raise ValueError(f"state: saved with parameters {doc.get('params')}, this detector "
                             f"has {self.params()}")
        state = doc.get("state")
        if not isinstance(state, dict) or not isinstance(state.get("drift_detected"), bool):
            raise ValueError("state: missing or malformed 'state' object")
        backup = self._state()
        try:
            self._load(state)
        except (KeyError, TypeError, ValueError) as exc:
            self._load(backup)
            raise ValueError(f"state: malformed {self.name} state ({exc})") from None
        self._drift_detected = state["drift_detected"]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
