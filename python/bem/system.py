"""The seed's top-level API, `BEMv13System`: run the experiments of the embedded default and
validate their statistical significance (a thin facade over bem.experiments and bem.stats)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from bem.experiments import RunConfig, RunOutcome, run_experiment
from bem.stats import AcceptanceReport, AcceptanceThresholds, validate


class BEMv13System:
    """config: a RunConfig (default: the "default" preset). device: "auto", "cpu" or "cuda".

    >>> system = BEMv13System(RunConfig.preset("quick"))
    >>> outcome = system.run_experiments(["V1", "V3"])       # baseline + V1 + V3
    >>> report = system.validate_statistical_significance(outcome.results_path)
    >>> report.promoted
    """

    def __init__(self, config: RunConfig | None = None, *, device: str = "auto",
                 progress: bool = True):
        if config is not None and not isinstance(config, RunConfig):
            raise TypeError(f"config: expected RunConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else RunConfig.preset("default")
        self.device = device
        self.progress = progress

    def run_experiments(self, experiments: Sequence[str] | None = None, *,
                        out: str | os.PathLike | None = None) -> RunOutcome:
        """Train and evaluate the baseline and the given variants (names from
        bem.experiments.VARIANTS; None: all), validate and report, in `out` (default: a new
        folder under ./bem-runs). Returns the run's folder, results path and acceptance report."""
        cfg = self.config if experiments is None else dataclasses.replace(
            self.config, variants=tuple(experiments) if not isinstance(experiments, str)
            else experiments)
        return run_experiment(cfg, out=out, device=self.device, progress=self.progress)

    def validate_statistical_significance(
            self, results, thresholds: AcceptanceThresholds | Mapping | None = None
            ) -> AcceptanceReport:
        """The acceptance report (PROMOTE/REJECT with reasons) of a results.json path, a decoded
        results dict, or a RunOutcome."""
        if isinstance(results, RunOutcome):
            results = results.results_path
        return validate(results, thresholds)
