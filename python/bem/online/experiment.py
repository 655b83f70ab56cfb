"""`bem online` on the embedded default: the cached base with a LoRA adapter learns from a feedback
stream that moves between the suite's adaptation domains, holds a segment of poisoned feedback and
a slow gradual drift. Four arms share the stream: "guarded" (EWC + proximal term, a canary judge
before every release, rollback to the last good checkpoint, drift detectors), "unguarded" (the
same learner, every round released), and, on the clean domain sequence, "ewc" vs "plain" (λ = 0)
for forgetting at equal plasticity. This module sits at the experiments layer (it uses
bem.experiments' base model and batching); the learner, detectors, judge and checkpoints below it
do not."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bem.attach import BemConfig, attach
from bem.experiments.base_model import load_or_pretrain
from bem.experiments.config import RunConfig
from bem.experiments.routing import answer_spans
from bem.experiments.training import lm_batch, token_nll
from bem.online.canary import CanaryJudge, MetricSpec
from bem.online.checkpoints import CheckpointRing
from bem.online.drift import ADWIN, KSWIN, DriftEnsemble, PageHinkley, detector_from_state
from bem.online.ewc import EWC
from bem.online.learner import OnlineLearner
from bem.online.replay import ReplayBuffer
from bem.online.stream import (Segment, StreamItem, build_stream, change_points, default_segments,
                               held_out_sets, selection_sets)
from bem.serialization import atomic_write
from bem.tasks import Example

log = logging.getLogger("bem")

STATE = "state.json"
STATE_FORMAT = "bem.online.run"
STATE_VERSION = 1
DEFAULT_RUNS_DIR = "bem-runs"
ARMS = ("select", "guarded", "unguarded", "ewc", "plain", "replay", "shadow")
GATED = ("guarded", "shadow")
VALIDATION_SEED_OFFSET = 10_000   # the λ-selection stream and sets: seed + this
DETECTOR_NAMES = ("page_hinkley", "adwin", "kswin", "ensemble")


@dataclass(frozen=True)
class OnlineConfig:
    """One `bem online` run. Stream: `clean_items` per clean segment, `poison_items` poisoned,
    `gradual_items` of gradual drift, in batches of `batch_size`; a release round is
    `round_batches` updates. Learner: LoRA of `rank` on the attention inputs, Adam `lr`,
    `steps_per_update`, EWC (online mode, γ `ewc_gamma`, consolidated with the per-sample Fisher on
    `fisher_samples` items at the end of each segment — `ewc_consolidate` "segment" — or after
    every released round — "round") and proximal μ `prox_mu`; the guarded, unguarded and replay
    arms also replay `replay_batch` items per step from a reservoir of `replay_capacity` (0: off).
    λ: `ewc_lambda`, or None to select it on a validation stream (:func:`select_lambda`) from
    `lambda_grid`, keeping the validation plasticity within `plasticity_margin` of λ = 0. Sets per domain: `heldout`
    examples (test split, what regressions and forgetting are measured on) and `canary` examples
    (validation split, what the judge sees). Judge: per-domain tolerance and BH level."""

    seed: int = 0
    suite_seed: int = 0
    clean_items: int = 192
    poison_items: int = 64
    gradual_items: int = 128
    batch_size: int = 8
    round_batches: int = 4
    rank: int = 4
    lr: float = 1e-2
    steps_per_update: int = 4
    ewc_lambda: float | None = None
    ewc_gamma: float = 0.9
    ewc_consolidate: str = "segment"
    lambda_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    plasticity_margin: float = 0.05
    replay_capacity: int = 256
    replay_batch: int = 8
    prox_mu: float = 0.0
    fisher_samples: int = 32
    heldout: int = 48
    canary: int = 32
    tolerance: float = 0.05
    alpha: float = 0.05
    n_resamples: int = 2000
    checkpoints: int = 3

    def __post_init__(self) -> None:
        if self.ewc_consolidate not in ("segment", "round"):
            raise ValueError(f"ewc_consolidate: expected 'segment' or 'round', got "
                             f"{self.ewc_consolidate!r}")
        if self.ewc_lambda is not None and not (isinstance(self.ewc_lambda, (int, float))
                                                and self.ewc_lambda >= 0):
            raise ValueError(f"ewc_lambda: expected a float >= 0 or None, got {self.ewc_lambda!r}")
        if not self.lambda_grid or any(not isinstance(v, (int, float)) or not v > 0
                                       for v in self.lambda_grid) or \
                list(self.lambda_grid) != sorted(self.lambda_grid):
            raise ValueError(f"lambda_grid: expected increasing values > 0, got "
                             f"{self.lambda_grid!r}")
        for name in ("replay_capacity", "replay_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lambda_grid"] = list(self.lambda_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"OnlineConfig: unknown fields {unknown}")
        d = dict(d)
        if "lambda_grid" in d:
            d["lambda_grid"] = tuple(float(v) for v in d["lambda_grid"])
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> OnlineConfig:
        """"default" (about 5.5 CPU-minutes) or "quick" (a smoke test: half the stream, a
        three-value λ grid; too short for the adapter to learn much)."""
        if name == "default":
            return dataclasses.replace(cls(), **overrides)
        if name == "quick":
            return dataclasses.replace(cls(clean_items=96, poison_items=32, gradual_items=64,
                                           heldout=24, canary=16, fisher_samples=16,
                                           n_resamples=1000, lambda_grid=(0.01, 1.0, 100.0)),
                                       **overrides)
        raise ValueError(f"preset: expected 'default' or 'quick', got {name!r}")

    def segments(self) -> list[Segment]:
        return default_segments(self.clean_items, self.poison_items, self.gradual_items)


# ---- model-side helpers ----------------------------------------------------------------------
def answer_nll(model, items: Sequence[Example]) -> torch.Tensor:
    """(B,) negative log-likelihood of each item's current answer and EOS (a sum over its tokens)."""
    device = model.lm_head.weight.device
    ids, valid, targets, _ = lm_batch(items, 0.0, device)
    logits = model(ids, valid=valid)[:, :-1]
    ce = token_nll(logits, targets)
    mask = torch.zeros_like(ce)
    for b, ex in enumerate(items):
        start, end = answer_spans(ex)[-1]
        mask[b, start:end] = 1.0
    return (ce * mask).sum(1)


@torch.no_grad()
def correct(model, items: Sequence[Example], batch_size: int = 32,
            latencies: list[float] | None = None) -> np.ndarray:
    """(n,) float: 1 where greedy decoding reproduces the item's answer (teacher-forced argmax over
    the answer and EOS). `latencies` gets the forward time per example (ms) of each batch."""
    device = model.lm_head.weight.device
    out = []
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        ids, valid, targets, _ = lm_batch(batch, 0.0, device)
        start = time.perf_counter()
        pred = model(ids, valid=valid)[:, :-1].argmax(-1)
        if latencies is not None:
            latencies.append(1000.0 * (time.perf_counter() - start) / len(batch))
        for b, ex in enumerate(batch):
            s, e = answer_spans(ex)[-1]
            out.append(float((pred[b, s:e] == targets[b, s:e]).all()))
    return np.array(out)


def encode_example(ex: Example) -> dict[str, Any]:
    return dataclasses.asdict(ex)


def decode_example(d: dict[str, Any]) -> Example:
    return Example(**{**d, "history": tuple(tuple(h) for h in d["history"])})


def make_detectors(seed: int) -> dict[str, Any]:
    """River's defaults, KSWIN seeded; the ensemble over windows of 64."""
    return {"page_hinkley": PageHinkley(), "adwin": ADWIN(), "kswin": KSWIN(seed=seed),
            "ensemble": DriftEnsemble(window_size=64)}


# ---- run folder ------------------------------------------------------------------------------
def _write_json(path: Path, doc: Any) -> None:
    atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


class OnlineRun:
    """A run folder: state.json (config, completed arms), one checkpoint ring per arm, results."""

    def __init__(self, folder: Path, state: dict):
        self.folder, self.state = folder, state

    @classmethod
    def create(cls, folder: Path, config: OnlineConfig) -> OnlineRun:
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"--out: {folder} exists and is not empty (use --resume to continue "
                             "a run there)")
        folder.mkdir(parents=True, exist_ok=True)
        run = cls(folder, {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                           "created": datetime.now(timezone.utc).isoformat(),
                           "config": config.to_dict(), "completed": [], "seconds": {}})
        run.save()
        return run

    @classmethod
    def open(cls, folder: Path) -> OnlineRun:
        path = folder / STATE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--resume: {path}: not a bem online run ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or \
                state.get("format_version") != STATE_VERSION:
            raise ValueError(f"--resume: {path}: not a bem online run state of version "
                             f"{STATE_VERSION}")
        OnlineConfig.from_dict(state["config"])
        return cls(folder, state)

    @property
    def config(self) -> OnlineConfig:
        return OnlineConfig.from_dict(self.state["config"])

    def save(self) -> None:
        _write_json(self.folder / STATE, self.state)


def prepare_run(config: OnlineConfig | None = None, *, out: str | os.PathLike | None = None,
                resume: bool | str | os.PathLike = False) -> OnlineRun:
    """Create a run folder (`out`, or a new one under ./bem-runs) or open one to resume (True:
    `out` or the latest unfinished online run under ./bem-runs; or a folder)."""
    if resume:
        if config is not None:
            raise ValueError("resume: a resumed run keeps the options it was started with")
        if resume is True:
            if out is not None:
                return OnlineRun.open(Path(out))
            candidates = []
            for p in Path(DEFAULT_RUNS_DIR).glob(f"online-*/{STATE}"):
                try:
                    run = OnlineRun.open(p.parent)
                except ValueError:
                    continue
                if "report" not in run.state["completed"]:
                    candidates.append((run.state["created"], p.parent))
            if not candidates:
                raise ValueError(f"--resume: no unfinished online run under {DEFAULT_RUNS_DIR}")
            return OnlineRun.open(max(candidates)[1])
        return OnlineRun.open(Path(resume))
    cfg = config or OnlineConfig.preset("default")
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(DEFAULT_RUNS_DIR) / f"online-{stamp}-seed{cfg.seed}"
        n = 1
        while folder.exists():
            n += 1
            folder = Path(DEFAULT_RUNS_DIR) / f"online-{stamp}-seed{cfg.seed}-{n}"
    else:
        folder = Path(out)
    return OnlineRun.create(folder, cfg)


# ---- one arm ---------------------------------------------------------------------------------
class Arm:
    """One pass over the stream. guarded: judge each round before it is served; a rejected
    round is rolled back (the learner returns to the served state, bit for bit) — or, with
    shadow, the learner keeps training from the rejected candidate while the served adapter
    stays the last released one. Otherwise every round is released. monitor: feed the served
    adapter's prequential correctness to the detectors. evaluate_every_release: held-out
    evaluation after each release (regression accounting); otherwise only at segment ends
    (forgetting). Held-out numbers are always the served adapter's."""

    def __init__(self, name: str, cfg: OnlineConfig, base, segments: list[Segment],
                 stream: list[StreamItem], heldout: dict[str, list[Example]], canary: dict[str, list[Example]],
                 folder: Path, *, ewc_lambda: float, guarded: bool, monitor: bool,
                 evaluate_every_release: bool, replay: bool = False, shadow: bool = False):
        self.name, self.cfg, self.segments, self.stream = name, cfg, segments, stream
        self.heldout, self.canary = heldout, canary
        self.guarded, self.monitor, self.shadow = guarded, monitor, shadow
        if shadow and not guarded:
            raise ValueError("shadow: only a guarded arm has a served adapter apart from the learner")
        self.served: dict[str, torch.Tensor] | None = None
        self.evaluate_every_release = evaluate_every_release
        torch.manual_seed(cfg.seed)
        self.model = attach(copy.deepcopy(base), BemConfig.preset("lora", rank=cfg.rank,
                                                                   alpha=2.0 * cfg.rank))
        use_replay = replay and cfg.replay_capacity > 0 and cfg.replay_batch > 0
        self.learner = OnlineLearner(self.model, answer_nll, lr=cfg.lr,
                                     steps_per_update=cfg.steps_per_update,
                                     ewc=EWC(ewc_lambda, "online", cfg.ewc_gamma),
                                     prox_mu=cfg.prox_mu,
                                     replay=ReplayBuffer(cfg.replay_capacity, seed=cfg.seed)
                                     if use_replay else None,
                                     replay_batch=cfg.replay_batch if use_replay else 0)
        self.judge = CanaryJudge(tolerance=cfg.tolerance, alpha=cfg.alpha,
                                 metrics=[MetricSpec("latency_ms", direction="increase",
                                                     group="latency")],
                                 n_resamples=cfg.n_resamples, seed=cfg.seed)
        self.ring = CheckpointRing(folder / "checkpoints", capacity=cfg.checkpoints)
        self.detectors = make_detectors(cfg.seed)
        self.position = 0
        self.log: dict[str, Any] = {"rounds": [], "alarms": {n: [] for n in DETECTOR_NAMES},
                                    "prequential": [], "segment_ends": []}
        self.released_heldout: dict[str, list[float]] | None = None

    # state
    def checkpoint(self) -> None:
        tensors, learner_doc = self.learner.state_dict(encode_example)
        if self.served is not None:
            tensors.update({f"served.{k}": v for k, v in self.served.items()})
        self.ring.save(tensors, {"learner": learner_doc, "position": self.position,
                                 "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
                                 "log": self.log, "released_heldout": self.released_heldout})

    def restore(self) -> bool:
        """Continue from the newest checkpoint, if any (resume after an interruption)."""
        if not self.ring.sequence():
            return False
        _, tensors, doc = self.ring.latest()
        self.learner.load_state_dict(tensors, doc["learner"], decode_example)
        self.served = ({k: tensors[f"served.{k}"].clone() for k in self.learner.params}
                       if f"served.{next(iter(self.learner.params))}" in tensors else None)
        self.position = doc["position"]
        self.detectors = {n: detector_from_state(d) for n, d in doc["detectors"].items()}
        self.log, self.released_heldout = doc["log"], doc["released_heldout"]
        return True

    def rollback(self) -> None:
        """Back to the last released state, bit for bit (adapter, optimiser, EWC, replay buffer:
        the rejected round's feedback leaves the replay memory too)."""
        _, tensors, doc = self.ring.latest()
        self.learner.load_state_dict(tensors, doc["learner"], decode_example)

    # measurements
    def seen_domains(self, upto: int) -> list[str]:
        return list(dict.fromkeys(it.domain for it in self.stream[:upto] if not it.poisoned))

    def _serving(self) -> dict[str, torch.Tensor] | None:
        """Load the served adapter into the model if the learner differs from it; returns the
        learner's weights to put back (None: nothing was swapped)."""
        if self.served is None or not self.guarded:
            return None
        live = {k: p.detach().clone() for k, p in self.learner.params.items()}
        self._load_params(self.served)
        return live

    def evaluate_heldout(self, domains: list[str]) -> dict[str, list[float]]:
        live = self._serving()
        try:
            return self._evaluate_heldout(domains)
        finally:
            if live is not None:
                self._load_params(live)

    def _evaluate_heldout(self, domains: list[str]) -> dict[str, list[float]]:
        return {d: correct(self.model, self.heldout[d]).tolist() for d in domains}

    def _regression(self, new: dict[str, list[float]]) -> list[dict]:
        from bem.stats import bca_interval

        rows = []
        if self.released_heldout is None:
            return rows
        for d, scores in new.items():
            old = self.released_heldout.get(d)
            if old is None:
                continue
            a, b = np.array(scores), np.array(old)
            delta = float((a - b).mean())
            if (a == b).all():
                lo = hi = 0.0
            else:
                ci = bca_interval(a, paired_with=b, n_resamples=self.cfg.n_resamples,
                                  seed=self.cfg.seed)
                lo, hi = ci.lower, ci.upper
            rows.append({"domain": d, "delta": delta, "ci_lower": lo, "ci_upper": hi,
                         "regression": bool(hi < 0)})
        return rows

    @torch.no_grad()
    def _load_params(self, values: dict[str, torch.Tensor]) -> None:
        for k, p in self.learner.params.items():
            p.copy_(values[k])

    def _fisher_sample(self, items: list[StreamItem], salt: int) -> list[Example]:
        rng = np.random.default_rng(self.cfg.seed + salt)
        pick = rng.choice(len(items), size=min(self.cfg.fisher_samples, len(items)), replace=False)
        return [items[j].example for j in sorted(pick.tolist())]

    # the loop
    def run(self, progress: bool) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if not self.restore():
            self.learner.promote()
            self.served = {k: p.detach().clone() for k, p in self.learner.params.items()}
            self.released_heldout = self.evaluate_heldout(self.seen_domains(1))
            self.checkpoint()
        bounds = set(change_points(self.segments) + [len(self.stream)])
        round_size = cfg.batch_size * cfg.round_batches
        bar = tqdm(total=len(self.stream), initial=self.position, desc=f"bem online: {self.name}",
                   disable=not progress, leave=False, dynamic_ncols=True, unit="item")
        current_canary: dict[str, np.ndarray] = {}
        while self.position < len(self.stream):
            start = self.position
            # A round ends after round_batches batches or at a segment boundary.
            end = min(start + round_size, len(self.stream))
            end = min([b for b in bounds if b > start] + [end])
            round_items = self.stream[start:end]
            for i in range(0, len(round_items), cfg.batch_size):
                batch = round_items[i:i + cfg.batch_size]
                examples = [it.example for it in batch]
                if self.monitor:
                    live = self._serving()          # what users get: the served adapter
                    ok = correct(self.model, examples)
                    if live is not None:
                        self._load_params(live)
                    for k, v in enumerate(ok.tolist()):
                        idx = start + i + k
                        self.log["prequential"].append(v)
                        for name, det in self.detectors.items():
                            det.update(v)
                            if det.drift_detected:
                                self.log["alarms"][name].append(idx)
                self.learner.update(examples)
                bar.update(len(batch))
            self.position = end
            record: dict[str, Any] = {"start": start, "end": end,
                                      "segment": self.stream[start].segment}
            seen = self.seen_domains(end)
            released = True
            if self.guarded:
                # Candidate (live weights) and current (last shipped) answer the same canary
                # batches, interleaved A-B, B-A batch by batch, so that a change of machine
                # load hits both latency samples alike (measured one after the other, a busy
                # shared CPU made identical-cost adapters fail the latency metric).
                states = {"cand": {k: p.detach().clone() for k, p in self.learner.params.items()},
                          "cur": self.served}
                latency: dict[str, list[float]] = {"cand": [], "cur": []}
                scores: dict[str, dict[str, list[np.ndarray]]] = {"cand": {}, "cur": {}}
                j = 0
                for d in seen:
                    items = self.canary[d]
                    for i in range(0, len(items), 8):
                        order = ("cand", "cur") if j % 2 == 0 else ("cur", "cand")
                        j += 1
                        for which in order:
                            self._load_params(states[which])
                            scores[which].setdefault(d, []).append(correct(
                                self.model, items[i:i + 8], batch_size=8,
                                latencies=latency[which]))
                self._load_params(states["cand"])
                cand = {d: np.concatenate(v) for d, v in scores["cand"].items()}
                current_canary = {d: np.concatenate(v) for d, v in scores["cur"].items()}
                latency_cand, latency_cur = latency["cand"], latency["cur"]
                verdict = self.judge.judge({d: (cand[d], current_canary[d]) for d in seen},
                                           {"latency_ms": (latency_cand, latency_cur)})
                released = verdict.ship
                record["verdict"] = verdict.to_dict()
            record["released"] = released
            if released:
                # The proximal anchor follows every release; EWC consolidates per round only in
                # the "round" mode (measured to stop learning, see docs/online.md).
                self.learner.promote(self._fisher_sample(round_items, start)
                                     if cfg.ewc_consolidate == "round" else ())
                self.served = {k: p.detach().clone() for k, p in self.learner.params.items()}
            elif self.shadow:
                record["rolled_back"] = False       # the served adapter stays; learning goes on
            else:
                self.rollback()
                record["rolled_back"] = True
            if released and self.evaluate_every_release:
                new = self.evaluate_heldout(seen)
                record["heldout"] = {d: float(np.mean(v)) for d, v in new.items()}
                record["regressions"] = self._regression(new)
                self.released_heldout = new
            if end in bounds:
                accs = {d: float(np.mean(v)) for d, v in self.evaluate_heldout(
                    list(self.heldout)).items()}
                self.log["segment_ends"].append({"end": end, "segment": record["segment"],
                                                 "heldout": accs})
                if cfg.ewc_consolidate == "segment" and end < len(self.stream):
                    # A task (segment) is finished: consolidate the live adapter with the Fisher
                    # on a sample of that segment's feedback.
                    seg = record["segment"]
                    self.learner.consolidate(self._fisher_sample(
                        [it for it in self.stream if it.segment == seg], end))
            self.log["rounds"].append(record)
            self.checkpoint()
        bar.close()
        return self.log


# ---- the experiment --------------------------------------------------------------------------
def _forgetting(segment_ends: list[dict], segments: list[Segment]) -> dict[str, Any]:
    """Forgetting per domain: the best held-out accuracy it reached at the end of its own or a
    later segment, minus its accuracy at the end of the stream; plasticity: the mean held-out
    accuracy of each segment's domain at the end of that segment."""
    final = segment_ends[-1]["heldout"]
    per_domain, plastic = {}, []
    for k, row in enumerate(segment_ends):
        d = segments[row["segment"]].domain
        plastic.append(row["heldout"][d])
    last_domain = segments[segment_ends[-1]["segment"]].domain
    for k, row in enumerate(segment_ends[:-1]):
        d = segments[row["segment"]].domain
        if d == last_domain or d in per_domain:
            continue
        best = max(r["heldout"][d] for r in segment_ends[k:-1])
        per_domain[d] = best - final[d]
    return {"per_domain": per_domain,
            "mean": float(np.mean(list(per_domain.values()))) if per_domain else 0.0,
            "plasticity": float(np.mean(plastic)), "final": final}


def clean_sequence(segments: list[Segment]) -> list[Segment]:
    """The clean domain segments of a stream (no poison, no gradual drift), in order."""
    return [s for s in segments if s.kind == "clean"]


def choose_lambda(rows: list[dict], margin: float) -> dict[str, Any]:
    """The pre-declared rule (docs/online.md): rows are validation runs {"lambda", "forgetting",
    "plasticity"} in increasing λ, the first with λ = 0. Eligible: λ > 0 whose plasticity is at
    least plasticity(λ = 0) − margin ("equal plasticity"). Chosen: the eligible λ with the least
    forgetting, ties to the smaller λ; if none is eligible, the smallest λ run (and
    equal_plasticity false)."""
    if len(rows) < 2 or rows[0]["lambda"] != 0:
        raise ValueError("rows: expected the λ = 0 run first and at least one λ > 0")
    floor = rows[0]["plasticity"] - margin
    eligible = [r for r in rows[1:] if r["plasticity"] >= floor]
    if eligible:
        best = min(eligible, key=lambda r: (r["forgetting"], r["lambda"]))
        return {"lambda": best["lambda"], "equal_plasticity": True, "plasticity_floor": floor}
    return {"lambda": rows[1]["lambda"], "equal_plasticity": False, "plasticity_floor": floor}


def select_lambda(run: OnlineRun, cfg: OnlineConfig, base, progress: bool) -> dict[str, Any]:
    """Choose λ on a validation stream (the clean domain sequence drawn with seed +
    VALIDATION_SEED_OFFSET from the train split, evaluated on the suite's validation split — no
    test data): run λ = 0, then the grid in increasing order, stopping after the first λ whose
    plasticity falls below the floor (plasticity is assumed not to rise with λ), then apply
    :func:`choose_lambda`. Each run resumes from its checkpoints."""
    segments = clean_sequence(cfg.segments())
    vseed = cfg.seed + VALIDATION_SEED_OFFSET
    vstream = build_stream(segments, vseed)
    vsets = selection_sets(cfg.heldout, vseed)
    rows = []
    for lam in (0.0,) + tuple(cfg.lambda_grid):
        tag = f"lambda-{lam:g}"
        folder = run.folder / "select" / tag
        if f"select:{tag}" not in run.state["completed"]:
            arm = Arm(f"select λ={lam:g}", cfg, base, segments, vstream, vsets, {}, folder,
                      ewc_lambda=lam, guarded=False, monitor=False, evaluate_every_release=False)
            _write_json(folder / "log.json", arm.run(progress))
            run.state["completed"].append(f"select:{tag}")
            run.save()
        f = _forgetting(json.loads((folder / "log.json").read_text())["segment_ends"], segments)
        rows.append({"lambda": lam, "forgetting": f["mean"], "plasticity": f["plasticity"],
                     "per_domain": f["per_domain"]})
        log.info("bem online: validation λ=%g: forgetting %.3f, plasticity %.3f", lam,
                 f["mean"], f["plasticity"])
        if lam > 0 and f["plasticity"] < rows[0]["plasticity"] - cfg.plasticity_margin:
            break
    return dict(choose_lambda(rows, cfg.plasticity_margin), rows=rows,
                margin=cfg.plasticity_margin, grid=list(cfg.lambda_grid), stream_seed=vseed)


def execute(run: OnlineRun, *, device: torch.device, progress: bool = True,
            cache: Path | None = None, on_arm: Callable[[str], None] | None = None) -> dict:
    """Choose λ (unless the config fixes it), run every arm not completed yet (each resumes from
    its newest checkpoint), then write results.json, report.md and the plots."""
    from bem.online.report import write_report

    cfg = run.config
    base_cfg = RunConfig.preset("default")
    base, manifest = load_or_pretrain(base_cfg.model, base_cfg.pretrain, suite_seed=cfg.suite_seed,
                                      device=device, progress=progress, cache=cache)
    segments = cfg.segments()
    stream = build_stream(segments, cfg.seed)
    clean_segments = clean_sequence(segments)
    clean_stream = build_stream(clean_segments, cfg.seed)
    heldout, canary = held_out_sets(cfg.heldout, cfg.canary, cfg.seed)
    for name in ARMS:
        if name in run.state["completed"]:
            continue
        if on_arm is not None:
            on_arm(name)
        t = time.perf_counter()
        if name == "select":
            run.state["selection"] = (select_lambda(run, cfg, base, progress)
                                      if cfg.ewc_lambda is None else
                                      {"lambda": float(cfg.ewc_lambda), "given": True})
        else:
            lam = run.state["selection"]["lambda"]
            specs = {"guarded": (segments, stream, lam, True, True, True, True),
                     "shadow": (segments, stream, lam, True, True, True, True),
                     "unguarded": (segments, stream, lam, False, True, True, True),
                     "ewc": (clean_segments, clean_stream, lam, False, False, False, False),
                     "plain": (clean_segments, clean_stream, 0.0, False, False, False, False),
                     "replay": (clean_segments, clean_stream, 0.0, False, False, False, True)}
            arm_segments, arm_stream, lam, guarded, monitor, every, replay = specs[name]
            arm = Arm(name, cfg, base, arm_segments, arm_stream, heldout, canary,
                      run.folder / name, ewc_lambda=lam, guarded=guarded, monitor=monitor,
                      evaluate_every_release=every, replay=replay, shadow=name == "shadow")
            _write_json(run.folder / name / "log.json", arm.run(progress))
        run.state["completed"].append(name)
        run.state["seconds"][name] = run.state["seconds"].get(name, 0.0) + time.perf_counter() - t
        run.save()
        log.info("bem online: arm %s done in %.1f s", name, time.perf_counter() - t)
    logs = {n: json.loads((run.folder / n / "log.json").read_text()) for n in ARMS
            if n != "select"}
    results = summarise(cfg, segments, clean_segments, logs, stream)
    results["selection"] = run.state["selection"]
    results["base_model"] = {k: manifest.get(k) for k in ("key", "path", "cached")}
    results["seconds"] = run.state["seconds"]
    _write_json(run.folder / "results.json", results)
    write_report(run.folder, results, logs, segments, stream)
    if "report" not in run.state["completed"]:
        run.state["completed"].append("report")
        run.save()
    return results


def _reason_keys(verdict: dict) -> list[str]:
    """A rejected verdict's reasons as categories: "<slice>: significantly worse", "<slice>: drop
    beyond the tolerance", "<metric>: <label>", "canary score <verdict>"."""
    keys = []
    for sl in verdict["slices"]:
        if sl["failed"]:
            keys.append(f"{sl['name']}: " + ("significantly worse" if "significantly" in
                                              sl["reason"] else "drop beyond the tolerance"))
    keys += [f"{m['name']}: {m['label']}" for m in verdict["metrics"] if m["failed"]]
    if verdict["kayenta"] != "pass":
        keys.append(f"canary score {verdict['kayenta']}")
    return keys


def summarise(cfg: OnlineConfig, segments: list[Segment], clean_segments: list[Segment],
              logs: dict[str, dict], stream: list[StreamItem]) -> dict:
    """The headline numbers of a run from the arms' logs."""
    from bem.online.drift import detection_delays

    out: dict[str, Any] = {"config": cfg.to_dict(), "segments": [dataclasses.asdict(s)
                                                                   for s in segments]}
    cps = change_points(segments)
    for name in ("guarded", "unguarded", "shadow"):
        rounds = logs[name]["rounds"]
        released = [r for r in rounds if r["released"]]
        regressions = [dict(reg, round_start=r["start"]) for r in released
                       for reg in r.get("regressions", []) if reg["regression"]]
        out[name] = {"rounds": len(rounds), "released": len(released),
                     "rejected": len(rounds) - len(released),
                     "rollbacks": sum(1 for r in rounds if r.get("rolled_back")),
                     "regressions_shipped": len(regressions), "regressions": regressions,
                     "final_heldout": logs[name]["segment_ends"][-1]["heldout"]}
        if name in GATED:
            reasons: dict[str, int] = {}
            for r in rounds:
                if not r["released"]:
                    for key in _reason_keys(r["verdict"]):
                        reasons[key] = reasons.get(key, 0) + 1
            out[name]["rejections_by_reason"] = reasons
            poison_seg = next(k for k, s in enumerate(segments) if s.kind == "poison")
            out[name]["poison_rounds"] = sum(1 for r in rounds if r["segment"] == poison_seg)
            out[name]["poison_rounds_released"] = sum(
                1 for r in rounds if r["segment"] == poison_seg and r["released"])
    delays = {}
    for det, alarms in logs["guarded"]["alarms"].items():
        d, false = detection_delays(alarms, cps, len(stream))
        delays[det] = {"delays": d, "alarms": alarms, "unmatched_alarms": false}
    out["detectors"] = {"change_points": cps, "per_detector": delays}
    # The unguarded learner adapts at every change, so its prequential accuracy drops and
    # recovers at each one: the detectors' delays on it (None: not monitored in older runs).
    if logs["unguarded"].get("prequential"):
        out["detectors"]["unguarded"] = {}
        for det, alarms in logs["unguarded"]["alarms"].items():
            d, false = detection_delays(alarms, cps, len(stream))
            out["detectors"]["unguarded"][det] = {"delays": d, "alarms": alarms,
                                                  "unmatched_alarms": false}
    plain = _forgetting(logs["plain"]["segment_ends"], clean_segments)
    out["forgetting"] = {"plain": plain}
    for name in ("ewc", "replay"):
        f = _forgetting(logs[name]["segment_ends"], clean_segments)
        out["forgetting"][name] = f
        out["forgetting"][f"{name}_reduction"] = ((1 - f["mean"] / plain["mean"])
                                                 if plain["mean"] > 0 else None)
        out["forgetting"][f"{name}_equal_plasticity"] = bool(
            f["plasticity"] >= plain["plasticity"] - cfg.plasticity_margin)
    out["forgetting"]["reduction"] = out["forgetting"]["ewc_reduction"]
    return out


def run_experiment(config: OnlineConfig | None = None, *, out: str | os.PathLike | None = None,
                   resume: bool | str | os.PathLike = False, device: str = "auto",
                   progress: bool = True, cache: str | os.PathLike | None = None) -> tuple[OnlineRun, dict]:
    """Start or continue a `bem online` run; returns (run, results)."""
    from bem.experiments.runner import resolve_device

    run = prepare_run(config, out=out, resume=resume)
    results = execute(run, device=resolve_device(device), progress=progress,
                      cache=Path(cache) if cache is not None else None)
    return run, results
