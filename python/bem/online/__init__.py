"""bem.online — learning an adapter from a stream of feedback without shipping a regression:
the online learner (EWC with a per-sample Fisher, a proximal anchor, replay), drift detectors,
the canary judge, and a ring of atomic checkpoints for rollback. `bem online` runs the embedded
experiment (bem.online.experiment). See docs/online.md."""
from __future__ import annotations

from bem._lazy import lazy_exports

_EXPORTS = {
    "ADWIN": "drift", "DriftDetector": "drift", "DriftEnsemble": "drift", "KSWIN": "drift",
    "PageHinkley": "drift", "detector_from_state": "drift",
    "EWC": "ewc", "per_sample_fisher": "ewc",
    "ProximalAnchor": "proximal",
    "ReplayBuffer": "replay",
    "OnlineLearner": "learner", "UpdateResult": "learner",
    "CanaryJudge": "canary", "CanaryVerdict": "canary", "MetricSpec": "canary",
    "classify_metric": "canary", "hodges_lehmann": "canary",
    "CheckpointRing": "checkpoints",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
