"""bem.online.drift — drift detectors over a stream of numbers (river's PageHinkley, ADWIN and
KSWIN semantics, and the seed's Welch/KS/Page-Hinkley ensemble), each ``update(x)`` then
``.drift_detected``, with JSON state for checkpoints (:func:`detector_from_state`), and the
measurements of a detector on a stream (detection delays, false-alarm rates)."""
from __future__ import annotations

from typing import Any

from bem.online.drift.adwin import ADWIN
from bem.online.drift.base import STATE_FORMAT, DriftDetector
from bem.online.drift.ensemble import DriftEnsemble
from bem.online.drift.evaluation import alarms_of, detection_delays, false_alarm_rate
from bem.online.drift.kswin import KSWIN
from bem.online.drift.page_hinkley import PageHinkley

DETECTORS: dict[str, type[DriftDetector]] = {
    cls.name: cls for cls in (PageHinkley, ADWIN, KSWIN, DriftEnsemble)}

__all__ = ["ADWIN", "DETECTORS", "DriftDetector", "DriftEnsemble", "KSWIN", "PageHinkley",
           "alarms_of", "detection_delays", "detector_from_state", "false_alarm_rate"]


def detector_from_state(doc: dict[str, Any]) -> DriftDetector:
    """A detector rebuilt from :meth:`DriftDetector.state_dict` (its class and parameters from the
    document); ValueError naming what is wrong for anything else."""
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError(f"state: not a {STATE_FORMAT} document")
    cls = DETECTORS.get(doc.get("detector"))
    if cls is None:
        raise ValueError(f"state: detector: expected one of {sorted(DETECTORS)}, got "
                         f"{doc.get('detector')!r}")
    params = doc.get("params")
    if not isinstance(params, dict):
        raise ValueError("state: params: expected an object")
    try:
        detector = cls(**params)
    except TypeError as exc:
        raise ValueError(f"state: params: {exc}") from None
    detector.load_state_dict(doc)
    return detector
