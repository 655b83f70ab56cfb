"""The seed's top-level API, `BEMv13System`: run the experiments of the embedded default,
validate their statistical significance, deploy the promoted variants and keep adapting online
(a thin facade over bem.experiments, bem.stats, bem.deploy and bem.online)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from bem.deploy import DeploymentStatus, RolloutPlan, deploy_production
from bem.experiments import RunConfig, RunOutcome, run_experiment
from bem.stats import AcceptanceReport, AcceptanceThresholds, validate


class BEMv13System:
    """config: a RunConfig (default: the "default" preset). device: "auto", "cpu" or "cuda".

    >>> system = BEMv13System(RunConfig.preset("quick"))
    >>> outcome = system.run_experiments(["V1", "V3"])       # baseline + V1 + V3
    >>> report = system.validate_statistical_significance(outcome.results_path)
    >>> report.promoted
    >>> status = system.deploy_production(report.promoted)   # into the deployment registry
    """

    def __init__(self, config: RunConfig | None = None, *, device: str = "auto",
                 progress: bool = True):
        if config is not None and not isinstance(config, RunConfig):
            raise TypeError(f"config: expected RunConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else RunConfig.preset("default")
        self.device = device
        self.progress = progress
        self.last_run: RunOutcome | None = None

    def run_experiments(self, experiments: Sequence[str] | None = None, *,
                        out: str | os.PathLike | None = None) -> RunOutcome:
        """Train and evaluate the baseline and the given variants (names from
        bem.experiments.VARIANTS; None: all), validate and report, in `out` (default: a new
        folder under ./bem-runs). Returns the run's folder, results path and acceptance report."""
        cfg = self.config if experiments is None else dataclasses.replace(
            self.config, variants=tuple(experiments) if not isinstance(experiments, str)
            else experiments)
        self.last_run = run_experiment(cfg, out=out, device=self.device, progress=self.progress)
        return self.last_run

    def validate_statistical_significance(
            self, results, thresholds: AcceptanceThresholds | Mapping | None = None
            ) -> AcceptanceReport:
        """The acceptance report (PROMOTE/REJECT with reasons) of a results.json path, a decoded
        results dict, or a RunOutcome."""
        if isinstance(results, RunOutcome):
            results = results.results_path
        return validate(results, thresholds)

    def deploy_production(self, selected_variants: Sequence[str], *,
                          run: RunOutcome | str | os.PathLike | None = None,
                          registry: str | os.PathLike | None = None,
                          names: Mapping[str, str] | None = None, acceptance=None,
                          plan: RolloutPlan | Mapping | None = None,
                          partial: bool = False) -> DeploymentStatus:
        """Deploy the selected variants of a finished run (`run`: a RunOutcome or run folder;
        default: this system's last run_experiments) into the local deployment registry that
        `bem serve` reads (default: $BEM_DEPLOYMENTS, else bem's cache). Only variants the run's
        acceptance report PROMOTEd are deployed; others raise bem.deploy.DeploymentRefused with
        the report's reasons (partial=True: deploy the promoted ones, list the rest in
        status.refused). A new version of an existing deployment starts as a canary rolled out
        by `plan` (default 10% → 50% → 100% of the traffic, judged live by `bem serve`). See
        bem.deploy.deploy_production."""
        if run is None:
            if self.last_run is None:
                raise ValueError("run: no run_experiments() yet; pass the run folder to deploy "
                                 "from")
            run = self.last_run
        if isinstance(run, RunOutcome):
            run = run.folder
        return deploy_production(selected_variants, run, registry=registry, names=names,
                                 acceptance=acceptance, plan=plan, partial=partial)

    def learn_online(self, config=None, *, out: str | os.PathLike | None = None,
                     resume: bool | str | os.PathLike = False) -> dict:
        """Run `bem online` (bem.online): adapt the embedded default's base to a drifting
        feedback stream with EWC/prox/replay learners, drift detectors, the canary gate and
        checkpointed rollback; returns the results (also results.json, report.md and plots in
        the run folder). config: a bem.online.experiment.OnlineConfig (default preset) or None
        when resuming. See docs/online.md."""
        from bem.experiments.runner import resolve_device
        from bem.online.experiment import OnlineConfig, execute, prepare_run

        if config is None and not resume:
            config = OnlineConfig.preset("default")
        run = prepare_run(config, out=out, resume=resume)
        return execute(run, device=resolve_device(self.device), progress=self.progress)

