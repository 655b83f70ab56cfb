"""`bem run`: pre-train (or load) the base, plan equal-budget systems, train and evaluate the
baseline and each variant, write results.json (bem.acceptance.results), validate it and write the
report, in a run folder whose state file is rewritten atomically after every completed stage, so
an interrupted run is continued by `bem run --resume`."""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bem.experiments.base_model import load_or_pretrain
from bem.experiments.ar1 import routing_telemetry, train_full_ar1, train_routed
from bem.experiments.config import AR1_SYSTEMS, BASELINE, REFERENCES, ROUTED, RunConfig
from bem.experiments.evaluation import METRICS, Evaluation, evaluate, per_task
from bem.experiments.routing import answer_correct, oracle_experts
from bem.experiments.systems import BudgetRow, SystemSpec, build, plan_systems, trainable
from bem.experiments.training import train_lm
from bem.model import BemForCausalLM
from bem.serialization import atomic_write, load_file, save_file
from bem.stats import AcceptanceReport, validate, write_report
from bem.tasks import generate, generate_adaptation

log = logging.getLogger("bem")

STATE = "state.json"
STATE_FORMAT = "bem.run.state"
STATE_VERSION = 1
RESULTS = "results.json"
PRIMARY_METRIC = "exact_match"
DEFAULT_RUNS_DIR = "bem-runs"


@dataclass
class RunOutcome:
    """What a finished run produced: its folder, results.json, the acceptance report and the
    report.md path."""

    folder: Path
    results_path: Path
    report: AcceptanceReport
    report_path: Path


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"; a CUDA device that torch
    cannot use is refused."""
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested, but torch sees no CUDA device (torch "
                         f"{torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def _write_json(path: Path, doc: Any) -> None:
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None


def new_run_folder(root: Path, seed: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = root / f"run-{stamp}-seed{seed}"
    n = 1
    while folder.exists():
        n += 1
        folder = root / f"run-{stamp}-seed{seed}-{n}"
    return folder


def latest_unfinished(root: Path) -> Path:
    """The most recently started run folder under `root` that has not completed its report."""
    candidates = []
    for state in root.glob(f"*/{STATE}"):
        try:
            doc = _read_json(state)
        except ValueError:
            continue
        if isinstance(doc, dict) and "report" not in doc.get("completed", []):
            candidates.append((doc.get("created", ""), state.parent))
    if not candidates:
        raise ValueError(f"--resume: no unfinished run folder under {root}")
    return max(candidates)[1]


class Run:
    """One run folder and its state. Every stage writes its own files first and then the state
    file (atomically), so after any interruption the folder holds complete stages only."""

    def __init__(self, folder: Path, state: dict):
        self.folder, self.state = folder, state

    @classmethod
    def create(cls, folder: Path, config: RunConfig) -> Run:
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"--out: {folder} exists and is not empty (use --resume to continue "
                             f"a run there)")
        folder.mkdir(parents=True, exist_ok=True)
        run = cls(folder, {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                           "created": datetime.now(timezone.utc).isoformat(),
                           "config": config.to_dict(), "completed": [], "seconds": {}})
        run.save()
        return run

    @classmethod
    def open(cls, folder: Path) -> Run:
        path = folder / STATE
        if not path.is_file():
            raise ValueError(f"--resume: {folder} is not a bem run folder (no {STATE})")
        state = _read_json(path)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or \
                state.get("format_version") != STATE_VERSION:
            raise ValueError(f"--resume: {path}: not a bem run state of version {STATE_VERSION}")
        RunConfig.from_dict(state["config"])
        return cls(folder, state)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.state["config"])

    def done(self, stage: str) -> bool:
        return stage in self.state["completed"]

    def complete(self, stage: str, seconds: float, **fields: Any) -> None:
        self.state.update(fields)
        self.state["completed"].append(stage)
        self.state["seconds"][stage] = seconds
        self.save()

    def save(self) -> None:
        _write_json(self.folder / STATE, self.state)


def _save_adapter(model: BemForCausalLM, path: Path) -> None:
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
               if p.requires_grad}
    save_file(tensors, path, {"format": "bem-run-adapter"})


def _load_adapter(model: BemForCausalLM, path: Path) -> None:
    tensors, _ = load_file(path)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(f"{path}: adapter tensors do not match the system's modules")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def _system_entry(name: str, budget: BudgetRow, ev: Evaluation) -> dict:
    return {"name": name, "scores": {m: ev.scores[m] for m in METRICS},
            "trainable_parameters": budget.trainable_parameters,
            "flops_per_token": budget.flops_per_token,
            "latency_p50_ms": ev.latency_p50_ms, "peak_memory_bytes": ev.peak_memory_bytes,
            "kv_cache_hit_rate": ev.kv_cache_hit_rate}


def _variant_entry(name: str, budget: BudgetRow, ev: Evaluation, routing: dict | None) -> dict:
    entry = {**_system_entry(name, budget, ev), "kind": "adapter"}
    if name in AR1_SYSTEMS:
        entry["kind"] = "router"
        entry["router"] = {"avg_plan_length": routing["avg_plan_length"],
                           "index_swap_monotonic": routing["index_swap_monotonic"]}
    return entry


def results_document(experiment: str, examples, budgets: dict[str, BudgetRow],
                     evals: dict[str, Evaluation], variants: list[str],
                     routing: dict[str, dict | None] | None = None) -> dict:
    """results.json in the bem.acceptance.results schema (version 1). The references — per-request
    routing and the oracle (a ceiling that reads the true domains) — share AR1's experts and are
    reported next to it, not validated: they are left out here."""
    routing = routing or {}
    return {"schema": "bem.acceptance.results", "schema_version": 1, "experiment": experiment,
            "example_ids": [f"{ex.task}-{i:04d}" for i, ex in enumerate(examples)],
            "metrics": {m: {"higher_is_better": True} for m in METRICS},
            "primary_metric": PRIMARY_METRIC,
            "baseline": _system_entry(BASELINE, budgets[BASELINE], evals[BASELINE]),
            "variants": [_variant_entry(v, budgets[v], evals[v], routing.get(v))
                         for v in variants if v not in REFERENCES]}


def execute(run: Run, *, device: torch.device, progress: bool = True,
            on_stage: Callable[[str], None] | None = None, cache: Path | None = None
            ) -> RunOutcome:
    """Run every stage of `run` not completed yet. `on_stage(name)` is called before each stage
    starts (progress reporting; an exception raised there interrupts the run cleanly)."""
    from bem.experiments.report import write_report_folder

    cfg = run.config
    folder = run.folder
    examples = generate_adaptation("test", cfg.eval_single, cfg.eval_switch, seed=cfg.suite_seed)
    warmup = generate_adaptation("validation", 1, 0, seed=cfg.suite_seed)

    def stage(name: str) -> float:
        if on_stage is not None:
            on_stage(name)
        log.info("stage %s", name)
        return time.perf_counter()

    base, manifest = None, run.state.get("base")
    if not run.done("base"):
        t = stage("base")
        base, manifest = load_or_pretrain(cfg.model, cfg.pretrain, suite_seed=cfg.suite_seed,
                                          device=device, progress=progress, cache=cache)
        run.complete("base", time.perf_counter() - t, base=manifest)

    def base_model() -> BemForCausalLM:
        nonlocal base
        if base is None:
            base, _ = load_or_pretrain(cfg.model, cfg.pretrain, suite_seed=cfg.suite_seed,
                                       device=device, progress=progress, cache=cache)
        return base

    if not run.done("base_eval"):
        t = stage("base_eval")
        ev = evaluate(base_model(), examples, max_new_tokens=cfg.max_new_tokens, warmup=warmup,
                      desc="evaluate base", progress=progress)
        general = generate("test", 40, seed=cfg.suite_seed)
        ok = answer_correct(base_model(), general)
        _write_json(folder / "base_eval.json", {
            **ev.to_dict(), "per_task": per_task(examples, ev.scores),
            "general_teacher_forced": {task: float(np.mean([o for o, ex in zip(ok, general)
                                                            if ex.task == task]))
                                       for task in dict.fromkeys(ex.task for ex in general)}})
        run.complete("base_eval", time.perf_counter() - t)

    if not run.done("plan"):
        t = stage("plan")
        specs, budgets, target = plan_systems(base_model(), cfg.variants, cfg.budget_fraction,
                                              cfg.flops_seq_len, cfg.trust_region)
        run.complete("plan", time.perf_counter() - t, target_parameters=target,
                     systems=[s.to_dict() for s in specs],
                     budgets={k: vars(b) for k, b in budgets.items()})
    specs = [SystemSpec.from_dict(d) for d in run.state["systems"]]
    budgets = {k: BudgetRow(**b) for k, b in run.state["budgets"].items()}

    train_examples = generate_adaptation("train", cfg.train_single, cfg.train_switch,
                                         seed=cfg.suite_seed)
    routed = [s for s in specs if s.name in ROUTED]
    experts_file = folder / "systems" / "experts" / "adapter.safetensors"
    if routed and not run.done("train:experts"):
        t = stage("train:experts")
        model = build(base_model(), SystemSpec("oracle", routed[0].config), cfg.seed)
        losses = train_lm(model, train_examples, steps=cfg.train_steps,
                          batch_size=cfg.train_batch_size, lr=cfg.train_lr, seed=cfg.seed,
                          warmup=max(1, cfg.train_steps // 20), desc="train experts",
                          progress=progress, route=oracle_experts)
        experts_file.parent.mkdir(parents=True, exist_ok=True)
        _save_adapter(model, experts_file)
        _write_json(experts_file.parent / "train.json", {"losses": losses})
        run.complete("train:experts", time.perf_counter() - t)

    evals: dict[str, Evaluation] = {}
    routing: dict[str, dict | None] = {}
    for spec in specs:
        sdir = folder / "systems" / spec.name
        model = None
        if not run.done(f"train:{spec.name}"):
            t = stage(f"train:{spec.name}")
            model = build(base_model(), spec, cfg.seed)
            if spec.name in ROUTED:
                record = train_routed(model, spec.name, experts_file, train_examples, cfg,
                                      progress)
            elif spec.name in AR1_SYSTEMS:
                record = train_full_ar1(model, train_examples, cfg, progress)
            else:
                record = {"losses": train_lm(
                    model, train_examples, steps=cfg.train_steps,
                    batch_size=cfg.train_batch_size, lr=cfg.train_lr, seed=cfg.seed,
                    warmup=max(1, cfg.train_steps // 20), desc=f"train {spec.name}",
                    progress=progress)}
            sdir.mkdir(parents=True, exist_ok=True)
            _save_adapter(model, sdir / "adapter.safetensors")
            _write_json(sdir / "train.json", {**record, "trainable_parameters": trainable(model)})
            run.complete(f"train:{spec.name}", time.perf_counter() - t)
        if not run.done(f"eval:{spec.name}"):
            t = stage(f"eval:{spec.name}")
            if model is None:
                model = build(base_model(), spec, cfg.seed)
                _load_adapter(model, sdir / "adapter.safetensors")
            route = ((lambda ex, n: oracle_experts([ex], n)) if spec.name == "oracle" else None)
            ev = evaluate(model, examples, max_new_tokens=cfg.max_new_tokens, warmup=warmup,
                          desc=f"evaluate {spec.name}", progress=progress, route=route)
            doc = ev.to_dict()
            if spec.name in ROUTED or spec.name in AR1_SYSTEMS:
                doc["routing"] = routing_telemetry(model, spec.name, examples)
            _write_json(sdir / "eval.json", doc)
            run.complete(f"eval:{spec.name}", time.perf_counter() - t)
        doc = _read_json(sdir / "eval.json")
        routing[spec.name] = doc.pop("routing", None)
        evals[spec.name] = Evaluation.from_dict(doc)

    variants = [s.name for s in specs if s.name != BASELINE]
    results_path = folder / RESULTS
    if not run.done("results"):
        t = stage("results")
        _write_json(results_path, results_document(folder.name, examples, budgets, evals,
                                                   variants, routing))
        run.complete("results", time.perf_counter() - t)

    # Validation is deterministic (seeded), so a resumed run recomputes the same report.
    thresholds = {"n_resamples": cfg.n_resamples, "seed": cfg.seed}
    if not run.done("validate"):
        t = stage("validate")
        report = validate(results_path, thresholds)
        write_report(report, json_path=folder / "acceptance.json",
                     markdown_path=folder / "acceptance.md")
        run.complete("validate", time.perf_counter() - t)
    else:
        report = validate(results_path, thresholds)

    report_path = folder / "report.md"
    if not run.done("report"):
        t = stage("report")
        write_report_folder(folder, run.state, report, examples,
                            _read_json(folder / "base_eval.json"), evals, budgets,
                            machine=machine_description(device), routing=routing,
                            n_resamples=cfg.n_resamples, seed=cfg.seed)
        run.complete("report", time.perf_counter() - t)
    return RunOutcome(folder, results_path, report, report_path)


def machine_description(device: torch.device) -> str:
    """CPU model and core count (or the CUDA device), for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device.type == "cuda":
        desc += f", {torch.cuda.get_device_name(device)}"
    return desc


def prepare_run(config: RunConfig | None = None, *, out: str | os.PathLike | None = None,
                resume: bool | str | os.PathLike = False) -> Run:
    """Create a run folder (in `out`, or a new folder under ./bem-runs) or open one to resume.

    resume: False; True (continue `out`, or the latest unfinished run under ./bem-runs); or a
    run folder. A resumed run keeps the configuration it was started with (`config` must then be
    None). Raises ValueError for a folder that cannot be used."""
    if resume:
        if config is not None:
            raise ValueError("resume: a resumed run keeps the options it was started with; do not "
                             "pass a configuration")
        if resume is True:
            folder = Path(out) if out is not None else latest_unfinished(Path(DEFAULT_RUNS_DIR))
        else:
            folder = Path(resume)
        return Run.open(folder)
    cfg = config if config is not None else RunConfig.preset("default")
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"config: expected RunConfig, got {type(cfg).__name__}")
    folder = Path(out) if out is not None else new_run_folder(Path(DEFAULT_RUNS_DIR), cfg.seed)
    return Run.create(folder, cfg)


def run_experiment(config: RunConfig | None = None, *, out: str | os.PathLike | None = None,
                   resume: bool | str | os.PathLike = False, device: str = "auto",
                   progress: bool = True, on_stage: Callable[[str], None] | None = None,
                   cache: str | os.PathLike | None = None) -> RunOutcome:
    """Start or continue a run (see :func:`prepare_run`) and execute its remaining stages.
    cache: the base-model cache root (default: bem's user cache directory)."""
    dev = resolve_device(device)
    return execute_logged(prepare_run(config, out=out, resume=resume), device=dev,
                          progress=progress, on_stage=on_stage,
                          cache=Path(cache) if cache is not None else None)


def execute_logged(run: Run, **kwargs: Any) -> RunOutcome:
    """:func:`execute`, logging where to resume from when interrupted."""
    log.info("run folder %s on %s", run.folder, kwargs["device"])
    try:
        return execute(run, **kwargs)
    except KeyboardInterrupt:
        log.warning("interrupted: %s holds every completed stage; continue with "
                    "`bem run --resume %s`", run.folder, run.folder)
        raise
