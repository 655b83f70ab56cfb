"""bem.online.drift: PageHinkley, ADWIN and KSWIN against river 0.26.1 (same detection indices on
the same streams), JSON state round trips that continue identically, the repaired seed ensemble,
false-alarm rates on stable streams, and bad input."""
from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

from bem.online import drift
from bem.online.drift import (ADWIN, KSWIN, DriftEnsemble, PageHinkley, alarms_of,
                              detection_delays, detector_from_state, false_alarm_rate)

river_drift = pytest.importorskip("river.drift")


def _streams():
    rng = np.random.default_rng(20261127)
    yield "normal-shifts", (list(rng.normal(0, 1, 1200)) + list(rng.normal(1.5, 1, 1200)) +
                            list(rng.normal(-0.5, 2, 1200)))
    yield "bernoulli", [float(v) for v in rng.random(3000) < np.repeat([0.9, 0.3, 0.8], 1000)]
    yield "integers", list(rng.integers(0, 5, 1500).astype(float)) + \
        list(rng.integers(3, 9, 1500).astype(float))
    yield "gradual", [float(rng.random() < 0.9 - 0.6 * min(1, max(0, (i - 1000) / 800)))
                      for i in range(3000)]


def _river_alarms(det, stream):
    out = []
    for i, x in enumerate(stream):
        det.update(x)
        if det.drift_detected:
            out.append(i)
    return out


PAIRS = [
    ("page_hinkley", lambda: river_drift.PageHinkley(), lambda: PageHinkley()),
    ("page_hinkley_up", lambda: river_drift.PageHinkley(mode="up", threshold=20, alpha=0.999),
     lambda: PageHinkley(mode="up", threshold=20, alpha=0.999)),
    ("page_hinkley_down", lambda: river_drift.PageHinkley(mode="down", threshold=10, delta=0.01),
     lambda: PageHinkley(mode="down", threshold=10, delta=0.01)),
    ("adwin", lambda: river_drift.ADWIN(), lambda: ADWIN()),
    ("adwin_clock1", lambda: river_drift.ADWIN(delta=0.05, clock=1, min_window_length=3),
     lambda: ADWIN(delta=0.05, clock=1, min_window_length=3)),
    ("kswin", lambda: river_drift.KSWIN(seed=7), lambda: KSWIN(seed=7)),
    ("kswin_small", lambda: river_drift.KSWIN(alpha=0.01, window_size=60, stat_size=20, seed=3),
     lambda: KSWIN(alpha=0.01, window_size=60, stat_size=20, seed=3)),
]


@pytest.mark.parametrize("label, make_river, make_bem", PAIRS, ids=[p[0] for p in PAIRS])
def test_detections_match_river(label, make_river, make_bem):
    total = 0
    for name, stream in _streams():
        if label.startswith("kswin"):   # a KS test per update: every 4th value keeps it fast
            stream = stream[::4]
        expected = _river_alarms(make_river(), stream)
        assert alarms_of(make_bem(), stream) == expected, name
        total += len(expected)
    assert total > 0          # the streams do drift: the comparison is not vacuous


def test_docstring_examples_match_river():
    # The doctests print river's documented indices (1006, 1023, 1016).
    for module in (drift.page_hinkley, drift.adwin, drift.kswin, drift.ensemble):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize("make", [
    lambda: PageHinkley(threshold=15), lambda: ADWIN(delta=0.01, clock=4),
    lambda: KSWIN(seed=11), lambda: DriftEnsemble(window_size=40, check_every=3)])
def test_state_round_trip_continues_identically(make):
    _, stream = list(_streams())[1]
    stream = stream[800:2200]
    det = make()
    for x in stream[:150]:
        det.update(x)
    doc = json.loads(json.dumps(det.state_dict(), allow_nan=False))
    twin = detector_from_state(doc)
    assert type(twin) is type(det) and twin.params() == det.params()
    a = [(det.update(x), det.drift_detected)[1] for x in stream[150:]]
    b = [(twin.update(x), twin.drift_detected)[1] for x in stream[150:]]
    assert a == b and any(a)


def test_reset_after_detection_like_river():
    ph = PageHinkley(threshold=5, min_instances=5)
    stream = [0.0] * 50 + [5.0] * 50
    hits = alarms_of(ph, stream)
    assert hits, "expected a detection"
    ph2 = PageHinkley(threshold=5, min_instances=5)
    for x in stream[:hits[0] + 1]:
        ph2.update(x)
    assert ph2.drift_detected and ph2.n == hits[0] + 1
    ph2.update(5.0)                         # the next update starts from a fresh state
    assert ph2.n == 1 and not ph2.drift_detected


def test_ensemble_majority_vote_and_reference_filled():
    rng = np.random.default_rng(3)
    stable = [float(v) for v in rng.random(400) < 0.8]
    ens = DriftEnsemble(window_size=50)
    assert alarms_of(ens, stable) == []
    assert len(ens.reference) == 50          # the seed never filled its reference window
    # One signal alone is not a drift: a PH alarm with equal windows does not vote it through.
    ens = DriftEnsemble(window_size=50, votes=2)
    for x in stable[:120]:
        ens.update(x)
    ens.ph_alarm = True
    assert sum(ens.signals().values()) == 1
    ens.update(stable[120])
    assert not ens.drift_detected
    # A real drop is detected, and the next update adopts the new regime as reference.
    dropped = stable + [float(v) for v in rng.random(200) < 0.2]
    ens = DriftEnsemble(window_size=50)
    hits = alarms_of(ens, dropped)
    assert hits and 400 <= hits[0] < 450
    ens = DriftEnsemble(window_size=50)
    for x in dropped[:hits[0] + 2]:
        ens.update(x)
    assert np.mean(ens.reference) < 0.5 and len(ens.current) == 1


def test_ensemble_constant_windows():
    ens = DriftEnsemble(window_size=10, min_current=5)
    hits = alarms_of(ens, [1.0] * 20 + [0.0] * 10)
    assert hits and hits[0] >= 20


def test_detection_delays_and_false_alarms():
    delays, false = detection_delays([5, 120, 130, 260], [100, 250], 400)
    assert delays == [20, 10] and false == [5, 130]
    delays, false = detection_delays([], [100], 200)
    assert delays == [None] and false == []
    with pytest.raises(ValueError, match="change_points"):
        detection_delays([], [300, 100], 400)


def test_false_alarm_rates_on_stable_streams():
    # Measured, and bounded: documented in docs/online.md (bem online measures them at scale).
    def bern(rng):
        return [float(v) for v in rng.random(1000) < 0.7]
    for make, bound in ((PageHinkley, 0.5), (ADWIN, 1.0), (lambda: KSWIN(seed=0), 10.0)):
        rate, alarms, n = false_alarm_rate(make, bern, n_streams=3, seed=1)
        assert n == 3000 and rate == 1000 * alarms / n and rate <= bound


@pytest.mark.parametrize("det", [PageHinkley(), ADWIN(), KSWIN(seed=0), DriftEnsemble()])
def test_bad_values_rejected_without_changing_state(det):
    for x in (0.0, 1.0, 1.0):
        det.update(x)
    before = json.dumps(det.state_dict())
    with pytest.raises(ValueError, match="x: expected a finite number"):
        det.update(float("nan"))
    with pytest.raises(ValueError, match="x: expected a finite number"):
        det.update(float("inf"))
    with pytest.raises(TypeError, match="x: expected a real number"):
        det.update("0.5")
    assert json.dumps(det.state_dict()) == before


def test_bad_parameters_and_states():
    with pytest.raises(ValueError, match="mode"):
        PageHinkley(mode="sideways")
    with pytest.raises(ValueError, match="delta"):
        ADWIN(delta=0)
    with pytest.raises(ValueError, match="stat_size"):
        KSWIN(window_size=50, stat_size=30)
    with pytest.raises(ValueError, match="votes"):
        DriftEnsemble(votes=4)
    doc = ADWIN().state_dict()
    with pytest.raises(ValueError, match="saved by detector"):
        PageHinkley().load_state_dict(doc)
    with pytest.raises(ValueError, match="parameters"):
        ADWIN(delta=0.1).load_state_dict(doc)
    doc["state"]["rows"] = [[[1.0, 0.0]] * 9]
    det = ADWIN()
    det.update(1.0)
    with pytest.raises(ValueError, match="malformed adwin state"):
        det.load_state_dict(doc)
    assert det.width == 1.0                 # unchanged by the refused state
    with pytest.raises(ValueError, match="detector"):
        detector_from_state({"format": "bem.drift-detector", "detector": "cusum", "params": {}})
