"""Canary rollouts inside `bem serve`: a deployment name (the `model` field) splits its traffic
between the stable version and the canary in steps (e.g. 10% → 50% → 100%), collects live metrics
per version during each step — latency, error rate, violation rate, and a task metric where labels
arrive (POST /v1/feedback) — and lets the canary gate of bem.online judge them: a step that passes
moves on (the last one makes the canary stable), a step that fails rolls back to the stable version
at once and records why. Every transition is written to the deployment's rollout.json in the
registry (atomically) and shown by /metrics (`bem_canary_state`) and /v1/rollouts.

The judgement reuses bem.online.canary: latency is classified by its Kayenta-style
classify_metric (Mann-Whitney, Hodges-Lehmann interval, KS shape check; a shift counts only beyond
the plan's latency_tolerance of the stable median), and the per-request rates (errors, violations,
task score) by its one-sided Mann-Whitney test, BH-adjusted together (bem.stats.fdr): a rate
fails when it is significantly worse by more than the plan's rate_tolerance. The result is a
CanaryVerdict."""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bem.deploy import RolloutPlan, _now, read_rollout, write_rollout
from bem.online.canary import (CanaryVerdict, MetricClassification, MetricSpec, SliceJudgement,
                               classify_metric, mann_whitney)
from bem.serve.models import ServedModel

log = logging.getLogger("bem")

STATES = ("stable", "canary", "rolled_back")
_LATENCY = MetricSpec("latency_seconds", direction="increase", group="latency")


@dataclass(frozen=True)
class Ticket:
    """Which version answered a request, and in which step of the rollout (`epoch`): results of a
    request picked in an earlier step are not counted in the current one."""

    version: str
    epoch: int


@dataclass
class _Window:
    """One version's live metrics in the current step."""

    latency: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    violations: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


class Rollout:
    """The versions of one deployment and its rollout.

    name: the deployment (what clients pass as `model`). versions: version → ServedModel (named
    `<name>:<version>`; clients may pin one). stable: the version answering what the canary does
    not. candidate / state / step: the canary version, "canary" while it takes traffic (else
    "stable" or "rolled_back"), and its index in plan.steps. registry: where rollout.json is
    rewritten on every transition (None: in memory only). violation: text → whether the answer
    violates a policy (None: only feedback reports violations). history: the events so far."""

    def __init__(self, name: str, versions: Mapping[str, ServedModel], *, stable: str,
                 candidate: str | None = None, plan: RolloutPlan | None = None,
                 state: str | None = None, step: int | None = None,
                 registry: str | Path | None = None,
                 violation: Callable[[str], bool] | None = None,
                 history: list | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty str, got {name!r}")
        if not isinstance(versions, Mapping) or not all(isinstance(m, ServedModel)
                                                        for m in versions.values()):
            raise TypeError("versions: expected a mapping version → ServedModel")
        if stable not in versions:
            raise ValueError(f"stable: {stable!r} is not one of the versions {sorted(versions)}")
        if candidate is not None and (candidate not in versions or candidate == stable):
            raise ValueError(f"candidate: {candidate!r} must be another of the versions "
                             f"{sorted(versions)}")
        self.plan = plan if plan is not None else RolloutPlan()
        if not isinstance(self.plan, RolloutPlan):
            raise TypeError(f"plan: expected RolloutPlan, got {type(self.plan).__name__}")
        state = state or ("canary" if candidate is not None else "stable")
        if state not in STATES or (state == "canary") != (candidate is not None):
            raise ValueError(f"state: {state!r} does not fit candidate {candidate!r}")
        step = 0 if candidate is not None and step is None else step
        if candidate is not None and (isinstance(step, bool) or not isinstance(step, int) or
                                      not 0 <= step < len(self.plan.steps)):
            raise ValueError(f"step: expected an index into plan.steps, got {step!r}")
        if violation is not None and not callable(violation):
            raise TypeError("violation: expected a callable text → bool, or None")
        self.name, self.versions = name, dict(versions)
        self.stable, self.candidate, self.state = stable, candidate, state
        self.step = step if candidate is not None else None
        self.registry = Path(registry) if registry is not None else None
        self.violation = violation
        self.history: list[dict] = list(history or [])
        self.last_verdict: dict | None = None
        self.on_change: Callable[[Rollout, str], None] | None = None   # metrics hook
        self._lock = threading.RLock()
        self._epoch = 0
        self._picks = 0
        self._windows = {v: _Window() for v in self.versions}
        # The stable version's metrics of the last judged step: what the canary is compared with
        # once it takes all the traffic (the stable version then answers nothing).
        self._reference: _Window | None = None
        # What rollout.json held when it was last read or written here: a file that changed
        # since (`bem deploy` wrote a new version) is not overwritten.
        self._disk_mark = self._mark(self.history)

    # ---- construction from the registry --------------------------------------------------------

    @classmethod
    def from_registry(cls, registry: str | Path, name: str, *, device: Any = "cpu",
                      dtype: Any = None, violation: Callable[[str], bool] | None = None
                      ) -> Rollout:
        """Load deployment `name` from the registry: its stable version and, during a rollout,
        its canary — each verified against its manifest's SHA-256 digests first. A canary that
        fails verification (or loading) is rolled back on the spot, the reason recorded; a stable
        version that fails raises ValueError."""
        from bem.deploy import load_version

        doc = read_rollout(registry, name)
        plan = RolloutPlan.from_dict(doc["plan"])
        stable, candidate = doc["stable"], doc["candidate"]
        if stable is None:
            raise ValueError(f"deployment {name!r}: no stable version in its rollout state")
        models = {stable: load_version(registry, name, stable, device=device, dtype=dtype)[0]}
        failure = None
        if candidate is not None:
            try:
                models[candidate] = load_version(registry, name, candidate, device=device,
                                                 dtype=dtype)[0]
            except (OSError, ValueError) as exc:
                failure = f"canary {candidate} refused at load: {exc}"
                log.error("bem serve: deployment %s: %s; rolling back to %s", name, failure,
                          stable)
        versions = {v: _served(name, v, m) for v, m in models.items()}
        roll = cls(name, versions, stable=stable,
                   candidate=candidate if failure is None else None, plan=plan,
                   state=doc["state"] if failure is None else "rolled_back",
                   step=doc["step"] if failure is None else None, registry=registry,
                   violation=violation, history=doc["history"])
        if failure is not None:
            roll._record("rolled_back", candidate, failure, reasons=[failure])
            roll._save()
        return roll

    # ---- what the server asks ------------------------------------------------------------------

    @property
    def traffic(self) -> float:
        """The canary's share of the traffic now."""
        return self.plan.steps[self.step] if self.candidate is not None else 0.0

    def served_models(self) -> list[ServedModel]:
        return list(self.versions.values())

    def pick(self) -> tuple[ServedModel, Ticket]:
        """The version that answers the next request: exactly the step's share of requests (by a
        deterministic counter, k-th request to the canary when ⌊k·f⌋ grows) goes to the canary."""
        with self._lock:
            version = self.stable
            if self.candidate is not None:
                f = self.traffic
                self._picks += 1
                k = self._picks
                if math.floor(k * f + 1e-9) > math.floor((k - 1) * f + 1e-9):
                    version = self.candidate
            return self.versions[version], Ticket(version, self._epoch)

    def version_of(self, model_name: str) -> str | None:
        """The version a served name (`<name>:<version>`) stands for, else None."""
        for v, m in self.versions.items():
            if m.name == model_name:
                return v
        return None

    def record(self, ticket: Ticket, *, latency: float, error: bool,
               text: str | None = None) -> None:
        """A request answered by `ticket.version` finished (error: the server failed it — 5xx,
        not a client error); judges the step when it has enough data."""
        violated = None
        if not error and text is not None and self.violation is not None:
            try:
                violated = bool(self.violation(text))
            except Exception:     # a broken check must not break serving
                log.exception("bem serve: the violation check of %s failed", self.name)
        with self._lock:
            if ticket.epoch != self._epoch or self.candidate is None:
                return
            w = self._windows[ticket.version]
            w.latency.append(float(latency))
            w.errors.append(1.0 if error else 0.0)
            if violated is not None:
                w.violations.append(1.0 if violated else 0.0)
            self._maybe_judge()

    def feedback(self, ticket: Ticket, *, score: float | None = None,
                 violation: bool | None = None) -> bool:
        """A label for a request answered by `ticket.version`: its task score (higher is better)
        and/or whether it violated a policy. Returns whether it counted (False: it belongs to an
        earlier step, or no rollout is running)."""
        with self._lock:
            if ticket.epoch != self._epoch or self.candidate is None:
                return False
            w = self._windows[ticket.version]
            if score is not None:
                w.scores.append(float(score))
            if violation is not None:
                w.violations.append(1.0 if violation else 0.0)
            self._maybe_judge()
            return True

    def snapshot(self, history: bool = False) -> dict:
        with self._lock:
            doc = {"name": self.name, "state": self.state, "stable": self.stable,
                   "candidate": self.candidate, "step": self.step, "traffic": self.traffic,
                   "steps": list(self.plan.steps),
                   "versions": {v: m.name for v, m in self.versions.items()},
                   "window": {v: {"requests": len(w.latency), "labels": len(w.scores)}
                              for v, w in self._windows.items()},
                   "last_verdict": self.last_verdict}
            if history:
                doc["history"] = list(self.history)
            return doc

    # ---- judging (under the lock) --------------------------------------------------------------

    def _maybe_judge(self) -> None:
        cand, cur = self._windows[self.candidate], self._windows[self.stable]
        p = self.plan
        if self.traffic >= 1.0 and self._reference is not None:
            cur = self._reference
        blind = self.traffic >= 1.0 and self._reference is None
        if len(cand.latency) < p.min_requests or len(cand.scores) < p.min_labels:
            return
        if not blind and (len(cur.latency) < p.min_requests or len(cur.scores) < p.min_labels):
            return
        if blind:     # all the traffic and nothing to compare with (steps=(1.0,), or a restart)
            verdict = CanaryVerdict(True, [], [], [], 100.0, "pass")
        else:
            verdict = judge_live(cand, cur, p)
        self.last_verdict = {"version": self.candidate, "step": self.step,
                             "traffic": self.traffic, **verdict.to_dict()}
        if self.on_change is not None:
            self._notify("pass" if verdict.ship else "fail")
        if not verdict.ship:
            failed = self.candidate
            self.candidate, self.step, self.state = None, None, "rolled_back"
            self._record("rolled_back", failed,
                         f"canary gate failed at {p.steps[self.last_verdict['step']]:.0%} of the "
                         f"traffic; back to {self.stable}", reasons=verdict.reasons,
                         verdict=self.last_verdict)
            log.warning("bem serve: deployment %s: canary %s rolled back to %s: %s", self.name,
                        failed, self.stable, "; ".join(verdict.reasons))
        elif self.step + 1 < len(p.steps):
            self.step += 1
            self._record("advanced", self.candidate,
                         f"canary gate passed; {self.traffic:.0%} of the traffic to "
                         f"{self.candidate}", verdict=self.last_verdict)
            log.info("bem serve: deployment %s: canary %s passed; now %.0f%% of the traffic",
                     self.name, self.candidate, 100 * self.traffic)
        else:
            old, self.stable = self.stable, self.candidate
            self.candidate, self.step, self.state = None, None, "stable"
            self._record("promoted", self.stable,
                         f"canary gate passed at 100% of the traffic; {self.stable} replaces "
                         f"{old}", verdict=self.last_verdict)
            log.info("bem serve: deployment %s: %s is the stable version now", self.name,
                     self.stable)
        self._epoch += 1
        if self.candidate is not None and self._windows[self.stable].latency:
            self._reference = self._windows[self.stable]
        elif self.candidate is None:
            self._reference = None
        self._windows = {v: _Window() for v in self.versions}
        self._save()
        self._notify(None)

    def _record(self, event: str, version: str | None, detail: str, **extra: Any) -> None:
        self.history.append({"time": _now(), "event": event, "version": version,
                             "detail": detail, **extra})

    def _notify(self, judgement: str | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self, judgement)
            except Exception:
                log.exception("bem serve: canary metrics hook failed")

    @staticmethod
    def _mark(history: list) -> str:
        return f"{history[-1].get('time')}#{len(history)}" if history else ""

    def _save(self) -> None:
        if self.registry is None:
            return
        try:
            disk = read_rollout(self.registry, self.name)
        except ValueError:
            disk = None
        if disk is not None and self._mark(disk["history"]) != self._disk_mark:
            log.warning("bem serve: deployment %s: rollout.json changed on disk (a new "
                        "deployment?); not overwriting it — restart bem serve to serve the new "
                        "state. This server's %s is kept in memory only", self.name,
                        self.history[-1]["event"] if self.history else "state")
            self.registry = None
            return
        doc = {"format": "bem.rollout", "format_version": 1, "name": self.name,
               "stable": self.stable, "candidate": self.candidate, "state": self.state,
               "traffic": self.traffic, "step": self.step, "plan": self.plan.to_dict(),
               "updated": _now(), "history": self.history}
        try:
            write_rollout(self.registry, self.name, doc)
            self._disk_mark = self._mark(self.history)
        except OSError:
            log.exception("bem serve: deployment %s: writing its rollout state failed", self.name)


def _served(name: str, version: str, model) -> ServedModel:
    return ServedModel(f"{name}:{version}", model, description=f"deployment {name} {version}")


def judge_live(candidate: _Window, current: _Window, plan: RolloutPlan) -> CanaryVerdict:
    """The canary gate on one step's live metrics (candidate vs the stable version)."""
    from bem.stats import fdr

    rates = []          # (name, cand values, current values, worse direction: +1 higher is worse)
    rates.append(("error_rate", candidate.errors, current.errors, +1))
    if candidate.violations and current.violations:
        rates.append(("violation_rate", candidate.violations, current.violations, +1))
    if candidate.scores and current.scores:
        rates.append(("task_score", candidate.scores, current.scores, -1))
    rows = []
    for name, c, k, sign in rates:
        c, k = np.asarray(c, dtype=np.float64), np.asarray(k, dtype=np.float64)
        if not (np.isfinite(c).all() and np.isfinite(k).all()):
            raise ValueError(f"{name}: live values must be finite")
        _, p = mann_whitney(c, k, "greater" if sign > 0 else "less")
        # "Higher is better" orientation, as the paired slices of the canary judge.
        delta = -sign * float(c.mean() - k.mean())
        rows.append((name, min(c.size, k.size), delta, p))
    adjusted = fdr([r[3] for r in rows], method="bh", alpha=plan.alpha).adjusted
    slices = []
    for (name, n, delta, p), padj in zip(rows, adjusted):
        reason = ""
        if padj <= plan.alpha and delta < -plan.rate_tolerance:
            reason = (f"{name}: significantly worse (Δ {delta:+.3f} beyond the tolerance "
                      f"{plan.rate_tolerance:g}, BH p={padj:.3g})")
        slices.append(SliceJudgement(name, n, delta, math.nan, math.nan, float(p), float(padj),
                                     bool(reason), reason))
    lat = classify_metric(candidate.latency, current.latency, _LATENCY)
    if lat.failed:
        # A practical threshold on top of the statistical one: the shift (or, for a "Shape"
        # failure, the 90th percentile) must exceed latency_tolerance of the stable median.
        cur = np.asarray(current.latency)
        allowed = plan.latency_tolerance * float(np.median(cur))
        worse = (lat.lower if lat.label == "High" else
                 float(np.quantile(candidate.latency, 0.9) - np.quantile(cur, 0.9)))
        if worse <= allowed:
            lat = _passed(lat, f"within the latency tolerance "
                                 f"({plan.latency_tolerance:.0%} of the median)")
    metrics = [lat]
    score = 100.0 if not lat.failed else 0.0
    kayenta = "pass" if score >= 95 else "fail"
    reasons = [s.reason for s in slices if s.failed]
    if lat.failed:
        reasons.append(lat.reason)
    return CanaryVerdict(not reasons, reasons, slices, metrics, score, kayenta,
                         {"latency": score})


def _passed(m: MetricClassification, why: str) -> MetricClassification:
    """`m` relabelled Pass (its statistics kept), with the reason."""
    return dataclasses.replace(m, label="Pass", failed=False, reason=why)
