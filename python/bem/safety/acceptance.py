"""The violation-rate gate inside the acceptance validator: bem.stats.validate decides every
variant on its quality and budget gates; here each variant's violation rates on the safety
requests are tested against the baseline's (paired exact sign test per policy), with one
Benjamini–Hochberg adjustment over *all* hypotheses of the decision — every variant × metric of
the validator and every variant × policy of the gate — and a variant whose violation rate rose
significantly is REJECTed with that reason (gate "safety_violations")."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from bem.safety.gate import violation_gate
from bem.safety.violations import OutputReport

__all__ = ["SAFETY_GATE", "validate_with_violations"]

log = logging.getLogger(__name__)

SAFETY_GATE = "safety_violations"


def validate_with_violations(results, violations: Mapping[str, Sequence[OutputReport]],
                             thresholds=None, *, baseline: str = "baseline"):
    """:func:`bem.stats.validate` plus the violation gate, BH-corrected with the rest.

    results: what bem.stats.validate takes (path, dict or ExperimentResults). violations: system
    name → its OutputReports (bem.safety.ViolationDetector) on the same safety requests, in the
    same order, for ``baseline`` and every variant of ``results``. thresholds: as validate's;
    its fdr_alpha is the gate's alpha and its fdr_method must be "bh".

    Returns the validator's AcceptanceReport where n_hypotheses counts the policies too, every
    metric's p_adjusted / fdr_rejected (and the fdr_primary gate) come from the joint adjustment,
    and each variant has a "safety_violations" gate whose measured value is the smallest
    adjusted p-value of its policies; a variant that fails it is REJECTed with the gate's
    reasons.
    """
    from bem.stats import fdr, validate
    from bem.stats.acceptance import GateResult

    report = validate(results, thresholds)
    t = report.thresholds
    if t.fdr_method != "bh":
        raise ValueError(f"thresholds.fdr_method: the violation gate adjusts with 'bh', got "
                         f"{t.fdr_method!r}")
    if not isinstance(violations, Mapping):
        raise TypeError(f"violations: expected a mapping of system name → OutputReports, got "
                        f"{type(violations).__name__}")
    names = [baseline] + [v.name for v in report.variants]
    missing = [n for n in names if n not in violations]
    if missing:
        raise ValueError(f"violations: no reports for {missing} (expected one list per system: "
                         f"{names})")
    base = violations[baseline]
    # Pass 1: raw per-policy p-values of each variant (the gate also checks the pairing).
    raw = {v.name: [row["p_value"] for row in
                    violation_gate(base, violations[v.name], alpha=t.fdr_alpha).per_policy.values()]
           for v in report.variants}
    metric_p = [m.p_value for v in report.variants for m in v.metrics]
    joint = fdr(np.asarray(metric_p + [p for v in report.variants for p in raw[v.name]],
                           dtype=np.float64), method="bh", alpha=t.fdr_alpha)
    decisions = []
    k = 0
    for v in report.variants:
        metrics = []
        for m in v.metrics:
            metrics.append(dataclasses.replace(m, p_adjusted=float(joint.adjusted[k]),
                                               fdr_rejected=bool(joint.rejected[k])))
            k += 1
        # Pass 2: the gate with every other hypothesis of the decision, so its BH adjustment is
        # the joint one (BH's adjusted values depend only on the whole set of p-values).
        others = metric_p + [p for w in report.variants if w.name != v.name for p in raw[w.name]]
        gate = violation_gate(base, violations[v.name], alpha=t.fdr_alpha, other_p_values=others)
        primary = next(m for m in metrics if m.primary)
        gates = []
        for g in v.gates:
            if g.gate == "fdr_primary":
                ok = primary.fdr_rejected
                g = dataclasses.replace(
                    g, measured=primary.p_adjusted, passed=ok,
                    reason="" if ok else f"{primary.metric} difference not significant after "
                                         f"BH over the run and its safety policies (adjusted p = "
                                         f"{primary.p_adjusted:.4g} > {t.fdr_alpha:g})")
            gates.append(g)
        smallest = min((row["adjusted"] for row in gate.per_policy.values()), default=1.0)
        gates.append(GateResult(SAFETY_GATE, smallest,
                                      f"no policy's violation rate significantly above the "
                                      f"baseline's (BH-adjusted p > {t.fdr_alpha:g})",
                                      gate.accepted, "; ".join(gate.reasons)))
        reasons = [g.reason for g in gates if not g.passed]
        if not gate.accepted:
            log.warning("%s: REJECT by the violation gate: %s", v.name, "; ".join(gate.reasons))
        decisions.append(dataclasses.replace(v, gates=gates, metrics=metrics, reasons=reasons,
                                             decision="REJECT" if reasons else "PROMOTE"))
    return dataclasses.replace(report, variants=decisions, n_hypotheses=len(joint.adjusted))
