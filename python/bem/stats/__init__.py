"""bem.stats — the statistics behind every promotion decision.

BCa bootstrap intervals with a C++ resampling core (:func:`bca_interval`), false discovery rate
control (:func:`fdr`), paired tests (:func:`paired_test`), and the acceptance validator that turns
an experiment's results file into PROMOTE / REJECT per variant (:func:`validate`, `bem validate`).
See docs/stats.md.
"""
from __future__ import annotations

from bem.stats.acceptance import (AcceptanceReport, AcceptanceThresholds, GateResult, MetricResult,
                                  VariantDecision, load_thresholds, validate, write_report)
from bem.stats.acceptance_schema import (ExperimentResults, ResultsSchemaError, load_results,
                                         parse_results)
from bem.stats.bootstrap import BCaInterval, DegenerateDataWarning, bca_interval
from bem.stats.fdr import FDRResult, fdr
from bem.stats.paired import paired_test

__all__ = [
    "AcceptanceReport", "AcceptanceThresholds", "BCaInterval", "DegenerateDataWarning",
    "ExperimentResults", "FDRResult", "GateResult", "MetricResult", "ResultsSchemaError",
    "VariantDecision", "bca_interval", "fdr", "load_results", "load_thresholds", "paired_test",
    "parse_results", "validate", "write_report",
]
