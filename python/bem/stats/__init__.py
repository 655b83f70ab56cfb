"""bem.stats — the statistics behind every promotion decision.

BCa bootstrap intervals with a C++ resampling core (:func:`bca_interval`), false discovery rate
control (:func:`fdr`), paired tests (:func:`paired_test`), and the acceptance validator that turns
an experiment's results file into PROMOTE / REJECT per variant (:func:`validate`, `bem validate`).
See docs/stats.md.
"""
from __future__ import annotations

from bem._lazy import lazy_exports
# Eager (numpy only): the function `fdr` shares its submodule's name, and a lazy import of the
# submodule would bind the module, not the function, to `bem.stats.fdr`.
from bem.stats.fdr import FDRResult, fdr

_EXPORTS = {
    "AcceptanceReport": "acceptance", "AcceptanceThresholds": "acceptance", "GateResult": "acceptance",
    "MetricResult": "acceptance", "VariantDecision": "acceptance", "load_thresholds": "acceptance",
    "validate": "acceptance", "write_report": "acceptance",
    "ExperimentResults": "acceptance_schema", "ResultsSchemaError": "acceptance_schema",
    "load_results": "acceptance_schema", "parse_results": "acceptance_schema",
    "BCaInterval": "bootstrap", "DegenerateDataWarning": "bootstrap", "bca_interval": "bootstrap",
    "paired_test": "paired",
}
__all__ = sorted([*_EXPORTS, "FDRResult", "fdr"])
# Imported on first use: bootstrap pulls in scipy.stats (0.7 s), which `bem info` never needs.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
