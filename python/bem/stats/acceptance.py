"""The acceptance validator: every gate a variant must pass to be promoted over the baseline
(budget parity, BCa interval on the primary metric, FDR over all variant × metric hypotheses of the
run, latency, memory, KV-cache hit rate, router plan length and monotonicity), with the measured
value, threshold and verdict of each, as JSON and Markdown."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bem.stats import _checks
from bem.stats.acceptance_schema import (ExperimentResults, SystemResults, load_results,
                                         parse_results, read_json)
from bem.stats.bootstrap import DegenerateDataWarning, bca_interval
from bem.stats.fdr import fdr
from bem.stats.paired import paired_test

__all__ = ["REPORT_SCHEMA_NAME", "REPORT_SCHEMA_VERSION", "AcceptanceReport",
           "AcceptanceThresholds", "GateResult", "MetricResult", "VariantDecision",
           "load_thresholds", "validate", "write_report"]

REPORT_SCHEMA_NAME = "bem.acceptance.report"
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class AcceptanceThresholds:
    """Gate thresholds and the statistics behind them; every field can be overridden.

    budget_tolerance: parameters and FLOPs per token within ±this fraction of the baseline.
    confidence: level of the two-sided BCa interval; ci_lower_bound_min: its lower bound on the
    primary metric's mean improvement must exceed this. n_resamples: bootstrap resamples, and
    Monte Carlo sign flips of the permutation test. fdr_method / fdr_alpha: the FDR procedure
    over all variant × metric hypotheses. p_value_test / p_value_alternative: the paired test
    whose p-values feed the FDR. latency_ratio_max / memory_ratio_max: latency p50 and peak
    memory at most this multiple of the baseline's. kv_hit_rate_min_delta: KV-cache hit rate at
    least the baseline's plus this. plan_length_max: router variants' mean plan length at most
    this; require_monotonic: router variants must pass the index-swap monotonicity check.
    seed: base seed; each (variant, metric) derives its own from it and the two names.
    """

    budget_tolerance: float = 0.05
    confidence: float = 0.95
    ci_lower_bound_min: float = 0.0
    n_resamples: int = 10_000
    fdr_method: str = "bh"
    fdr_alpha: float = 0.05
    p_value_test: str = "permutation"
    p_value_alternative: str = "two-sided"
    latency_ratio_max: float = 1.15
    memory_ratio_max: float = 1.05
    kv_hit_rate_min_delta: float = 0.0
    plan_length_max: float = 3.0
    require_monotonic: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget_tolerance", "ci_lower_bound_min", "latency_ratio_max",
                     "memory_ratio_max", "kv_hit_rate_min_delta", "plan_length_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name}: expected a finite number, got {type(value).__name__} {value!r}")
        for name in ("budget_tolerance", "latency_ratio_max", "memory_ratio_max", "plan_length_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        _checks.open_unit_float(self.confidence, "confidence")
        _checks.open_unit_float(self.fdr_alpha, "fdr_alpha")
        _checks.integer(self.n_resamples, "n_resamples", minimum=1)
        _checks.integer(self.seed, "seed", minimum=0)
        _checks.choice(self.fdr_method, "fdr_method", ("bh", "by"))
        _checks.choice(self.p_value_test, "p_value_test", ("t", "wilcoxon", "permutation"))
        _checks.choice(self.p_value_alternative, "p_value_alternative",
                       ("two-sided", "greater", "less"))
        if not isinstance(self.require_monotonic, bool):
            raise TypeError(f"require_monotonic: expected a bool, got "
                            f"{type(self.require_monotonic).__name__}")

    @classmethod
    def from_mapping(cls, overrides: Mapping) -> AcceptanceThresholds:
        """Defaults with ``overrides`` applied; an unknown key is a ValueError naming it."""
        if not isinstance(overrides, Mapping):
            raise TypeError(f"thresholds: expected an object, got {type(overrides).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"thresholds.{key}: unknown threshold (expected one of "
                                 f"{', '.join(sorted(known))})")
        return cls(**overrides)


def load_thresholds(path: str | os.PathLike) -> AcceptanceThresholds:
    """Thresholds from a JSON object of overrides (unknown keys rejected)."""
    return AcceptanceThresholds.from_mapping(read_json(path))


@dataclass(frozen=True)
class GateResult:
    """One gate of one variant: measured value, the threshold in words, and the verdict."""

    gate: str
    measured: float | bool | None
    threshold: str
    passed: bool
    reason: str  # why it failed, empty when it passed


@dataclass(frozen=True)
class MetricResult:
    """Paired statistics of one metric: improvement = variant − baseline (baseline − variant when
    lower is better), its BCa interval, the paired-test p-value and its FDR adjustment."""

    metric: str
    primary: bool
    higher_is_better: bool
    mean_improvement: float
    ci_lower: float
    ci_upper: float
    p_value: float
    p_adjusted: float
    fdr_rejected: bool


@dataclass(frozen=True)
class VariantDecision:
    name: str
    kind: str
    decision: str  # "PROMOTE" when every gate passed, else "REJECT"
    reasons: list[str]
    gates: list[GateResult]
    metrics: list[MetricResult]


@dataclass(frozen=True)
class AcceptanceReport:
    experiment: str
    n_examples: int
    primary_metric: str
    thresholds: AcceptanceThresholds
    n_hypotheses: int
    variants: list[VariantDecision]

    @property
    def promoted(self) -> list[str]:
        """Names of the variants to promote."""
        return [v.name for v in self.variants if v.decision == "PROMOTE"]

    def to_dict(self) -> dict:
        """The report as JSON-ready data (schema "bem.acceptance.report"; NaN becomes null)."""
        return _json_ready({
            "schema": REPORT_SCHEMA_NAME,
            "schema_version": REPORT_SCHEMA_VERSION,
            "experiment": self.experiment,
            "n_examples": self.n_examples,
            "primary_metric": self.primary_metric,
            "thresholds": dataclasses.asdict(self.thresholds),
            "n_hypotheses": self.n_hypotheses,
            "promoted": self.promoted,
            "variants": [dataclasses.asdict(v) for v in self.variants],
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        return _markdown(self)


def _json_ready(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


# ---- the gates -----------------------------------------------------------------------------------

def _derived_seed(base: int, variant: str, metric: str) -> int:
    """A seed per (variant, metric) that does not depend on the order of either in the file."""
    words = [base, zlib.crc32(variant.encode()), zlib.crc32(metric.encode())]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def _improvement_pair(variant: SystemResults, baseline: SystemResults, metric: str,
                      higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a − b the per-example improvement of the variant."""
    v, b = variant.scores[metric], baseline.scores[metric]
    return (v, b) if higher_is_better else (b, v)


def _ratio_gate(gate: str, label: str, value: float, reference: float, limit: float) -> GateResult:
    ratio = value / reference
    passed = ratio <= limit
    return GateResult(gate, ratio, f"<= {limit:g}x baseline", passed,
                      "" if passed else f"{label} is {ratio:.3f}x the baseline's (limit {limit:g}x)")


def _budget_gate(gate: str, label: str, value: float, reference: float,
                 tolerance: float) -> GateResult:
    ratio = value / reference
    passed = 1.0 - tolerance <= ratio <= 1.0 + tolerance
    return GateResult(gate, ratio, f"within {1 - tolerance:g}-{1 + tolerance:g}x baseline", passed,
                      "" if passed else f"{label} is {ratio:.3f}x the baseline's (allowed ±"
                                        f"{tolerance:.0%})")


def _variant_gates(variant: SystemResults, baseline: SystemResults, primary: MetricResult,
                   t: AcceptanceThresholds) -> list[GateResult]:
    gates = [
        _budget_gate("budget_parameters", "trainable parameters", variant.trainable_parameters,
                     baseline.trainable_parameters, t.budget_tolerance),
        _budget_gate("budget_flops", "FLOPs per token", variant.flops_per_token,
                     baseline.flops_per_token, t.budget_tolerance),
    ]
    lower = primary.ci_lower
    ok = lower > t.ci_lower_bound_min  # False for NaN
    why = (f"BCa {t.confidence:.0%} interval of the {primary.metric} improvement is undefined "
           "(every paired difference is equal)" if math.isnan(lower) else
           f"BCa {t.confidence:.0%} interval lower bound of the {primary.metric} improvement is "
           f"{lower:.4g}, not > {t.ci_lower_bound_min:g}")
    gates.append(GateResult("primary_ci_lower", lower, f"> {t.ci_lower_bound_min:g}", ok,
                            "" if ok else why))
    ok = primary.fdr_rejected
    gates.append(GateResult(
        "fdr_primary", primary.p_adjusted, f"adjusted p <= {t.fdr_alpha:g} ({t.fdr_method.upper()})",
        ok, "" if ok else f"{primary.metric} difference not significant after "
                          f"{t.fdr_method.upper()} over the run (adjusted p = "
                          f"{primary.p_adjusted:.4g} > {t.fdr_alpha:g})"))
    gates.append(_ratio_gate("latency_p50", "latency p50", variant.latency_p50_ms,
                             baseline.latency_p50_ms, t.latency_ratio_max))
    gates.append(_ratio_gate("peak_memory", "peak memory", variant.peak_memory_bytes,
                             baseline.peak_memory_bytes, t.memory_ratio_max))
    needed = baseline.kv_cache_hit_rate + t.kv_hit_rate_min_delta
    ok = variant.kv_cache_hit_rate >= needed
    margin = f" {t.kv_hit_rate_min_delta:+g}" if t.kv_hit_rate_min_delta else ""
    gates.append(GateResult(
        "kv_cache_hit_rate", variant.kv_cache_hit_rate,
        f">= {needed:.4g} (baseline {baseline.kv_cache_hit_rate:.4g}{margin})", ok,
        "" if ok else f"KV-cache hit rate {variant.kv_cache_hit_rate:.4g} is below {needed:.4g}"))
    if variant.router is not None:
        length = variant.router.avg_plan_length
        ok = length <= t.plan_length_max
        gates.append(GateResult("router_plan_length", length, f"<= {t.plan_length_max:g}", ok,
                                "" if ok else f"mean plan length {length:.3g} exceeds "
                                              f"{t.plan_length_max:g}"))
        monotonic = variant.router.index_swap_monotonic
        ok = monotonic or not t.require_monotonic
        gates.append(GateResult("router_monotonicity", monotonic,
                                "true" if t.require_monotonic else "not required", ok,
                                "" if ok else "index-swap monotonicity check failed"))
    return gates


def validate(results, thresholds: AcceptanceThresholds | Mapping | None = None) -> AcceptanceReport:
    """Runs every gate for every variant of ``results`` and decides PROMOTE or REJECT.

    results: a path to a results JSON file, a decoded results dict, or ExperimentResults (schema
    in docs/stats.md; ResultsSchemaError names a bad field). thresholds: AcceptanceThresholds, a
    mapping of overrides, or None for the defaults.

    For every (variant, metric) hypothesis the improvement over the baseline gets a paired BCa
    interval and a paired-test p-value; the p-values of all hypotheses of the run are adjusted
    together (BH by default). A variant is promoted only when all its gates pass: budget parity,
    primary-metric interval lower bound, FDR significance of the primary metric, latency,
    memory, KV-cache hit rate, and for routers plan length and monotonicity.
    """
    if isinstance(results, ExperimentResults):
        run = results
    elif isinstance(results, (str, os.PathLike)):
        run = load_results(results)
    elif isinstance(results, Mapping):
        run = parse_results(results)
    else:
        raise TypeError("results: expected a path, a results dict or ExperimentResults, got "
                        f"{type(results).__name__}")
    if thresholds is None:
        t = AcceptanceThresholds()
    elif isinstance(thresholds, AcceptanceThresholds):
        t = thresholds
    elif isinstance(thresholds, Mapping):
        t = AcceptanceThresholds.from_mapping(thresholds)
    else:
        raise TypeError("thresholds: expected AcceptanceThresholds, a mapping or None, got "
                        f"{type(thresholds).__name__}")

    # Every hypothesis of the run, variant-major, then one FDR adjustment over all of them.
    rows = []
    for variant in run.variants:
        for metric, higher in run.metrics.items():
            a, b = _improvement_pair(variant, run.baseline, metric, higher)
            seed = _derived_seed(t.seed, variant.name, metric)
            with warnings.catch_warnings():
                # Equal differences everywhere give a NaN interval; the gate reports it.
                warnings.simplefilter("ignore", DegenerateDataWarning)
                ci = bca_interval(a, paired_with=b, confidence=t.confidence,
                                  n_resamples=t.n_resamples, seed=seed)
            p = paired_test(a, b, method=t.p_value_test, alternative=t.p_value_alternative,
                            n_resamples=t.n_resamples, seed=seed)
            rows.append((variant, metric, higher, ci, p))
    adjusted = fdr([row[4] for row in rows], method=t.fdr_method, alpha=t.fdr_alpha)

    decisions = []
    for i, variant in enumerate(run.variants):
        metrics = []
        for j in range(len(run.metrics)):
            k = i * len(run.metrics) + j
            _, metric, higher, ci, p = rows[k]
            metrics.append(MetricResult(
                metric=metric, primary=metric == run.primary_metric, higher_is_better=higher,
                mean_improvement=ci.observed, ci_lower=ci.lower, ci_upper=ci.upper, p_value=p,
                p_adjusted=float(adjusted.adjusted[k]), fdr_rejected=bool(adjusted.rejected[k])))
        primary = next(m for m in metrics if m.primary)
        gates = _variant_gates(variant, run.baseline, primary, t)
        reasons = [g.reason for g in gates if not g.passed]
        decisions.append(VariantDecision(name=variant.name, kind=variant.kind,
                                         decision="REJECT" if reasons else "PROMOTE",
                                         reasons=reasons, gates=gates, metrics=metrics))
    return AcceptanceReport(experiment=run.experiment, n_examples=len(run.example_ids),
                            primary_metric=run.primary_metric, thresholds=t,
                            n_hypotheses=len(rows), variants=decisions)


# ---- output --------------------------------------------------------------------------------------

_GATE_COLUMNS = [("budget_parameters", "params"), ("budget_flops", "FLOPs"),
                 ("primary_ci_lower", "CI lower"), ("fdr_primary", "FDR p"),
                 ("latency_p50", "latency"), ("peak_memory", "memory"),
                 ("kv_cache_hit_rate", "KV hit"), ("router_plan_length", "plan length"),
                 ("router_monotonicity", "monotonic")]


def _format_measured(gate: GateResult) -> str:
    value = gate.measured
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    if gate.gate in ("budget_parameters", "budget_flops", "latency_p50", "peak_memory"):
        return f"{value:.3f}x"
    return f"{value:.4g}"


def _markdown(report: AcceptanceReport) -> str:
    t = report.thresholds
    lines = [
        f"# Acceptance report: {report.experiment}",
        "",
        f"{report.n_examples} paired examples; primary metric **{report.primary_metric}**; "
        f"{report.n_hypotheses} hypotheses (variant × metric) adjusted together by "
        f"{t.fdr_method.upper()} at α = {t.fdr_alpha:g}; p-values from the paired "
        f"{t.p_value_test} test ({t.p_value_alternative}); BCa {t.confidence:.0%} intervals, "
        f"{t.n_resamples} resamples.",
        "",
        "| variant | decision | " + " | ".join(label for _, label in _GATE_COLUMNS) + " |",
        "|---|---|" + "---|" * len(_GATE_COLUMNS),
    ]
    for v in report.variants:
        by_name = {g.gate: g for g in v.gates}
        cells = []
        for gate, _ in _GATE_COLUMNS:
            g = by_name.get(gate)
            cells.append("—" if g is None else
                         f"{_format_measured(g)} {'pass' if g.passed else '**FAIL**'}")
        lines.append(f"| {v.name} | **{v.decision}** | " + " | ".join(cells) + " |")
    for v in report.variants:
        lines += ["", f"## {v.name} ({v.kind}): {v.decision}", ""]
        lines += [f"- {reason}" for reason in v.reasons] or ["- every gate passed"]
        lines += ["", "| gate | measured | threshold | result |", "|---|---|---|---|"]
        lines += [f"| {g.gate} | {_format_measured(g)} | {g.threshold} | "
                  f"{'pass' if g.passed else '**FAIL**'} |" for g in v.gates]
        lines += ["", f"| metric | mean improvement | BCa {t.confidence:.0%} interval | p | "
                      "adjusted p | significant |", "|---|---|---|---|---|---|"]
        for m in v.metrics:
            name = f"{m.metric} (primary)" if m.primary else m.metric
            lines.append(f"| {name} | {m.mean_improvement:.4g} | [{m.ci_lower:.4g}, "
                         f"{m.ci_upper:.4g}] | {m.p_value:.4g} | {m.p_adjusted:.4g} | "
                         f"{'yes' if m.fdr_rejected else 'no'} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes text to path through a temporary file in the same folder and os.replace, so a
    reader never sees a half-written report."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_report(report: AcceptanceReport, *, json_path: str | os.PathLike | None = None,
                 markdown_path: str | os.PathLike | None = None) -> None:
    """Writes the report as JSON and/or Markdown, each atomically."""
    if json_path is not None:
        _write_atomic(json_path, report.to_json())
    if markdown_path is not None:
        _write_atomic(markdown_path, report.to_markdown())
