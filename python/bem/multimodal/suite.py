"""`bem run --suite multimodal`: a text-only baseline against image-aware systems at equal adapter
budget on the embedded image task (bem.multimodal.images), on bem's pre-trained tiny base.

Systems (every one on the same frozen base, same seed, data order, steps and learning rate):

* ``text_only`` (the baseline): a static LoRA on q and v of every layer, rank ``lora_rank``; it
  sees the question (and passage) but not the image.
* ``image_lora``: vision tower (stage 1: encoder + projector trained with the base frozen, no
  adapter) and the same static LoRA (stage 2: adapters only, the tower frozen).
* ``image_routed``: the same stage-1 tower and ``num_experts`` LoRA experts of rank
  lora_rank / num_experts (the same adapter parameters), the text chunks of a request routed to an
  expert by its image (nearest k-means centroid of the image summary, fitted on the training images
  before stage 2).
* ``image_prefix`` (reference, not validated: no adapter): the stage-1 tower alone.

The run writes into its folder: config.json, the weights (safetensors: tower.safetensors and
systems/<name>/adapter.safetensors), per-system eval.json, coverage.json, results.json
(bem.acceptance.results), acceptance.json/.md (bem.stats.validate) and report.md, each atomically.
``trainable_parameters`` in results.json counts the adapter parameters (the budget being compared);
the vision tower's parameters and FLOPs are reported next to them, and its FLOPs are included in
``flops_per_token`` (amortised over a flops_seq_len-token request).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bem.attach import AdapterSpec, BemConfig, attach
from bem.budget import count
from bem.experiments.training import weighted_lm_loss
from bem.model import BemForCausalLM, new_kv_cache
from bem.multimodal.coverage import TOKENIZER, coverage, example_tokens
from bem.multimodal.generation import generate
from bem.multimodal.images import (KINDS, MULTIMODAL_VERSION, ImageExample, generate_images,
                                   render)
from bem.multimodal.model import ImageRouter, MultimodalLM
from bem.multimodal.vision import VisionTower
from bem.serialization import atomic_write, save_file
from bem.tasks import score

log = logging.getLogger("bem")

BASELINE = "text_only"
SYSTEMS = ("text_only", "image_lora", "image_routed")
REFERENCE = "image_prefix"
TITLES = {"text_only": "static LoRA, text only (no image)",
          "image_lora": "vision tower + static LoRA",
          "image_routed": "vision tower + LoRA experts routed by the image",
          "image_prefix": "vision tower only (stage 1, no adapter; reference)"}
METRICS = ("exact_match", "token_f1", "format_valid")
PRESETS = ("default", "quick")


@dataclass(frozen=True)
class MultimodalConfig:
    """One multimodal run. base: the `bem run` preset whose pre-trained base is used (cached,
    shared with `bem run`). train_images / eval_images: images per kind (2–3 questions each).
    stage1_*: the vision tower's training (base frozen); stage2_*: the adapters'. lora_rank: rank
    per projection of the static LoRA (the routed experts get lora_rank // num_experts each)."""

    base: str = "default"
    seed: int = 0
    suite_seed: int = 0
    train_images: int = 1500
    eval_images: int = 40
    stage1_steps: int = 1200
    stage2_steps: int = 500
    batch_size: int = 32
    stage1_lr: float = 1e-2
    stage2_lr: float = 5e-3
    lora_rank: int = 8
    num_experts: int = 2
    d_vision: int = 32
    max_new_tokens: int = 6
    n_resamples: int = 10_000
    flops_seq_len: int = 128
    kv_blocks: int = 512
    coverage_examples: int = 96

    def __post_init__(self) -> None:
        if self.base not in PRESETS:
            raise ValueError(f"MultimodalConfig: base: expected one of {PRESETS}, got "
                             f"{self.base!r}")
        for name in ("train_images", "eval_images", "stage1_steps", "stage2_steps", "batch_size",
                     "lora_rank", "num_experts", "d_vision", "max_new_tokens", "n_resamples",
                     "flops_seq_len", "kv_blocks", "coverage_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MultimodalConfig: {name}: expected a positive int, got {v!r}")
        for name in ("seed", "suite_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"MultimodalConfig: {name}: expected an int >= 0, got {v!r}")
        for name in ("stage1_lr", "stage2_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    v <= 0:
                raise ValueError(f"MultimodalConfig: {name}: expected a finite number > 0, got "
                                 f"{v!r}")
        if self.num_experts < 2 or self.lora_rank % self.num_experts:
            raise ValueError(f"MultimodalConfig: num_experts: expected >= 2 dividing lora_rank="
                             f"{self.lora_rank}, got {self.num_experts}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultimodalConfig:
        if not isinstance(d, dict):
            raise TypeError(f"MultimodalConfig: expected a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"MultimodalConfig: unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MultimodalConfig:
        """"default" (≤ 10 min on 2 CPU cores with the base cached) or "quick" (< 2 min, CI)."""
        if name == "default":
            return dataclasses.replace(cls(), **overrides)
        if name == "quick":
            return dataclasses.replace(cls(base="quick", train_images=200, eval_images=10,
                                           stage1_steps=150, stage2_steps=60, n_resamples=2000,
                                           coverage_examples=24), **overrides)
        raise ValueError(f"preset: expected one of {PRESETS}, got {name!r}")


# ---- data ----------------------------------------------------------------------------------------

class ImageBank:
    """The rendered images of a list of examples, one tensor row per distinct image."""

    def __init__(self, examples: Sequence[ImageExample]):
        index: dict[str, int] = {}
        for ex in examples:
            index.setdefault(ex.spec, len(index))
        self.row = [index[ex.spec] for ex in examples]
        specs = sorted(index, key=index.get)
        self.images = torch.from_numpy(np.stack([render(s) for s in specs]))

    def of(self, idx: Sequence[int]) -> torch.Tensor:
        return self.images[[self.row[i] for i in idx]]


def lm_batch(examples: Sequence[ImageExample], device) -> tuple[torch.Tensor, ...]:
    """(ids (B, T), valid (B, T), targets (B, T−1), weights (B, T−1)): next-token targets weighted
    1 on the answer and its EOS, 0 elsewhere."""
    rows = [example_tokens(ex) for ex in examples]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), TOKENIZER.PAD, dtype=torch.int64)
    weights = torch.zeros(len(rows), T - 1)
    for b, (r, lo, hi) in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        weights[b, lo:hi] = 1.0
    valid = ids != TOKENIZER.PAD
    return ids.to(device), valid.to(device), ids[:, 1:].to(device), weights.to(device)


def train(model: MultimodalLM, examples: Sequence[ImageExample], bank: ImageBank | None, *,
          params: list[torch.nn.Parameter], steps: int, lr: float, batch_size: int, seed: int,
          desc: str, progress: bool = True) -> list[float]:
    """AdamW on `params` (linear warm-up, cosine decay to 10%) with the answer cross-entropy;
    images from `bank` (None: text only). Returns the loss of every step."""
    from tqdm.auto import tqdm

    if not params:
        raise ValueError("params: nothing to train")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        t = (step - warmup) / max(1, steps - warmup)
        for g in opt.param_groups:
            g["lr"] = lr * (step + 1) / warmup if step < warmup else \
                lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        ids, valid, targets, weights = lm_batch([examples[i] for i in idx], device)
        images = bank.of(idx).to(device) if bank is not None else None
        logits = model(ids, images, valid=valid)[:, :-1]
        loss = weighted_lm_loss(logits, targets, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    log.info("%s: %d steps, loss %.4f -> %.4f", desc, steps, losses[0], losses[-1])
    return losses


@torch.no_grad()
def answer_correct(model: MultimodalLM, examples: Sequence[ImageExample], images: torch.Tensor
                   | None, *, experts: torch.Tensor | None = None, batch_size: int = 64
                   ) -> np.ndarray:
    """(n,) bool: teacher-forced argmax reproduces each reference answer and EOS."""
    device = model.lm.lm_head.weight.device
    out = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, valid, targets, weights = lm_batch(batch, device)
        imgs = None if images is None else images[i:i + batch_size].to(device)
        exp = None if experts is None else experts[i:i + batch_size]
        pred = model(ids, imgs, valid=valid, experts=exp)[:, :-1].argmax(-1)
        ok = ((pred == targets) | (weights == 0)).all(-1)
        out += ok.tolist()
    return np.array(out)


# ---- systems -------------------------------------------------------------------------------------

def _lora(rank: int, experts: int = 1) -> BemConfig:
    return BemConfig([AdapterSpec("lora", ["q_proj", "v_proj"],
                                  {"rank": rank, "alpha": float(2 * rank)})], num_experts=experts)


def build_system(base: BemForCausalLM, name: str, cfg: MultimodalConfig,
                 tower: VisionTower | None, router: ImageRouter | None = None) -> MultimodalLM:
    """The system `name` on a copy of `base` (frozen), seeded by cfg.seed; the tower (and router)
    are shared, frozen."""
    torch.manual_seed(cfg.seed)
    lm = copy.deepcopy(base)
    if name == REFERENCE:
        for p in lm.parameters():
            p.requires_grad_(False)
        return MultimodalLM(lm, tower)
    if name == "image_routed":
        lm = attach(lm, _lora(cfg.lora_rank // cfg.num_experts, cfg.num_experts))
        lm.bem_controller.set_macro_router(None)       # the image router chooses the experts
        lm.bem_controller.default.requires_grad_(False)  # unused by LoRA experts
        return MultimodalLM(lm, tower, router)
    lm = attach(lm, _lora(cfg.lora_rank))
    return MultimodalLM(lm, None if name == BASELINE else tower)


def adapter_parameters(model: MultimodalLM) -> int:
    return sum(p.numel() for p in model.lm.parameters() if p.requires_grad)


def flops_per_token(model: MultimodalLM, seq_len: int) -> float:
    """The language model's FLOPs per token of a seq_len-token request (bem.budget.count) plus the
    vision tower's FLOPs per image spread over those tokens."""
    lm = count(model.lm, seq_len).model_flops_per_token
    return lm + (model.vision.flops_per_image() / seq_len if model.vision is not None else 0.0)


# ---- evaluation ----------------------------------------------------------------------------------

def _static_bytes(model: MultimodalLM, cache) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    pool = cache.storage.data
    return sum(t.numel() * t.element_size() for t in tensors.values()) + \
        pool.numel() * pool.element_size()


@torch.no_grad()
def evaluate_system(model: MultimodalLM, examples: Sequence[ImageExample], *, images: bool,
                    max_new_tokens: int, kv_blocks: int, warmup: Sequence[ImageExample] = (),
                    desc: str = "evaluate", progress: bool = True) -> dict:
    """Greedy answers one request at a time through one KV cache kept across requests (an
    image's questions follow each other, so its visual block is reused). Per-example scores,
    latency per generated token, KV hit rate, static memory."""
    from tqdm.auto import tqdm

    model.eval()
    device = model.lm.lm_head.weight.device

    def request(ex, cache):
        prompt = example_tokens(ex)[0][:example_tokens(ex)[1] + 1]
        img = torch.from_numpy(ex.image())[None].to(device) if images else None
        return generate(model, [prompt], img, max_new_tokens=max_new_tokens, cache=cache,
                        eos_token_id=TOKENIZER.EOS)[0]

    if warmup:
        scratch = new_kv_cache(model.lm, kv_blocks)
        for ex in warmup:
            request(ex, scratch)
    cache = new_kv_cache(model.lm, kv_blocks)
    preds, latency = [], []
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    for ex in tqdm(examples, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        start = time.perf_counter()
        out = request(ex, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        latency.append(1000.0 * (time.perf_counter() - start) / len(out))
        text = TOKENIZER.decode(out)
        preds.append(text)
        for m, v in score(text, ex.answer, ex.fmt).items():
            scores[m].append(v)
    hit = cache.manager.stats().hit_rate
    log.info("%s: %d examples, EM %.3f, latency p50 %.2f ms/token, KV hit rate %.3f", desc,
             len(examples), float(np.mean(scores["exact_match"])),
             float(np.percentile(latency, 50)), hit)
    return {"predictions": preds, "scores": scores, "latency_ms_per_token": latency,
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "peak_memory_bytes": int(_static_bytes(model, cache)), "kv_cache_hit_rate": float(hit)}


def _nmi(a: Sequence, b: Sequence) -> float:
    """Normalised mutual information (arithmetic mean normalisation) of two labelings."""
    a, b = list(a), list(b)
    n = len(a)
    pa = {x: a.count(x) / n for x in set(a)}
    pb = {y: b.count(y) / n for y in set(b)}
    pab: dict = {}
    for x, y in zip(a, b):
        pab[(x, y)] = pab.get((x, y), 0) + 1 / n
    mi = sum(p * math.log(p / (pa[x] * pb[y])) for (x, y), p in pab.items())
    ha = -sum(p * math.log(p) for p in pa.values())
    hb = -sum(p * math.log(p) for p in pb.values())
    return 0.0 if ha + hb == 0 else 2 * mi / (ha + hb)


@torch.no_grad()
def routing_telemetry(model: MultimodalLM, examples: Sequence[ImageExample],
                      images: torch.Tensor) -> dict:
    """How the image router routes: expert per image kind, NMI(expert, kind), the mean plan
    length (distinct actions per request over its chunks: −1 for the image, the text expert) and
    the index swap (teacher-forced EM with every expert e replaced by (e + 1) mod E)."""
    device = model.lm.lm_head.weight.device
    experts = model.router(model.image_summary(model.visual_tokens(images.to(device)))).cpu()
    table: dict[str, dict[str, int]] = {}
    for ex, e in zip(examples, experts.tolist()):
        row = table.setdefault(ex.kind, {})
        row[str(e)] = row.get(str(e), 0) + 1
    routed = answer_correct(model, examples, images, experts=experts)
    swapped = answer_correct(model, examples, images,
                             experts=(experts + 1) % model.router.num_experts)
    return {"kind_expert": table, "nmi_kind_expert": _nmi([ex.kind for ex in examples],
                                                          experts.tolist()),
            "avg_plan_length": 2.0, "experts_used": sorted(set(experts.tolist())),
            "index_swap": {"routed_exact_match": float(routed.mean()),
                           "swapped_exact_match": float(swapped.mean())},
            "index_swap_monotonic": bool(routed.mean() >= swapped.mean())}


# ---- the run -------------------------------------------------------------------------------------

def _write_json(path: Path, doc: Any) -> None:
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _clean(x):
    """JSON-safe copy: NaN → None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _save(model: torch.nn.Module, path: Path, params_only: bool = True) -> None:
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
               if p.requires_grad or not params_only}
    save_file(tensors, path, {"format": "bem-multimodal"})


@dataclass
class MultimodalOutcome:
    folder: Path
    results_path: Path
    report: Any
    report_path: Path


def run_multimodal(config: MultimodalConfig, folder: str | Path, *, device: str = "auto",
                   progress: bool = True, cache: Path | None = None,
                   on_stage: Callable[[str], None] | None = None,
                   base_model: BemForCausalLM | None = None) -> MultimodalOutcome:
    """Run the whole multimodal suite into `folder` (created; must be empty or absent).
    base_model: use this base instead of the `config.base` preset's pre-trained one (tests)."""
    from bem.experiments.base_model import load_or_pretrain
    from bem.experiments.config import RunConfig
    from bem.experiments.runner import machine_description, resolve_device
    from bem.stats import validate, write_report

    if not isinstance(config, MultimodalConfig):
        raise TypeError(f"config: expected MultimodalConfig, got {type(config).__name__}")
    dev = resolve_device(device)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--out: {folder} exists and is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        if on_stage is not None:
            on_stage(name)
        log.info("stage %s", name)
        clock.append(now)

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - clock[-1]

    _write_json(folder / "config.json", {"suite": "multimodal", "version": MULTIMODAL_VERSION,
                                         "config": cfg.to_dict()})
    stage("base")
    if base_model is None:
        run_cfg = RunConfig.preset(cfg.base)
        base, manifest = load_or_pretrain(run_cfg.model, run_cfg.pretrain,
                                          suite_seed=run_cfg.suite_seed, device=dev,
                                          progress=progress, cache=cache)
    else:
        if not isinstance(base_model, BemForCausalLM):
            raise TypeError(f"base_model: expected BemForCausalLM, got "
                            f"{type(base_model).__name__}")
        base = copy.deepcopy(base_model).to(dev)
        manifest = {"key": "given", "cached": False}
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    done("base")

    train_ex = generate_images("train", cfg.train_images, seed=cfg.suite_seed)
    test_ex = generate_images("test", cfg.eval_images, seed=cfg.suite_seed)
    warm_ex = generate_images("validation", 1, seed=cfg.suite_seed)[:2]
    bank = ImageBank(train_ex)
    test_images = ImageBank(test_ex).of(range(len(test_ex)))

    stage("stage1:tower")
    torch.manual_seed(cfg.seed)
    tower = VisionTower(base.config.d_model, cfg.d_vision).to(dev)
    prefix = MultimodalLM(copy.deepcopy(base), tower)
    s1 = train(prefix, train_ex, bank, params=list(tower.parameters()), steps=cfg.stage1_steps,
               lr=cfg.stage1_lr, batch_size=cfg.batch_size, seed=cfg.seed,
               desc="stage 1: vision tower", progress=progress)
    for p in tower.parameters():
        p.requires_grad_(False)
    _save(tower, folder / "tower.safetensors", params_only=False)
    done("stage1:tower")

    stage("router")
    router = ImageRouter(cfg.num_experts, base.config.d_model).to(dev)
    with torch.no_grad():
        summaries = torch.cat([prefix.image_summary(prefix.visual_tokens(
            bank.images[i:i + 256].to(dev)))
                               for i in range(0, len(bank.images), 256)])
    sizes = router.fit(summaries, seed=cfg.seed)
    save_file({"centroids": router.centroids.detach().cpu().contiguous()},
              folder / "router.safetensors", {"format": "bem-multimodal-router"})
    log.info("image router: %d clusters of %s training images", cfg.num_experts, sizes)
    done("router")

    systems: dict[str, MultimodalLM] = {}
    train_logs = {"stage1": {"losses": s1}, "router_cluster_sizes": sizes}
    for name in SYSTEMS:
        stage(f"stage2:{name}")
        model = build_system(base, name, cfg, tower, router).to(dev)
        params = [p for p in model.lm.parameters() if p.requires_grad]
        losses = train(model, train_ex, None if name == BASELINE else bank, params=params,
                       steps=cfg.stage2_steps, lr=cfg.stage2_lr, batch_size=cfg.batch_size,
                       seed=cfg.seed, desc=f"stage 2: {name}", progress=progress)
        (folder / "systems" / name).mkdir(parents=True, exist_ok=True)
        _save(model.lm, folder / "systems" / name / "adapter.safetensors")
        train_logs[name] = {"losses": losses}
        systems[name] = model
        done(f"stage2:{name}")
    systems[REFERENCE] = build_system(base, REFERENCE, cfg, tower).to(dev)
    _write_json(folder / "train.json", train_logs)

    evals: dict[str, dict] = {}
    for name, model in systems.items():
        stage(f"eval:{name}")
        ev = evaluate_system(model, test_ex, images=name != BASELINE,
                             max_new_tokens=cfg.max_new_tokens, kv_blocks=cfg.kv_blocks,
                             warmup=warm_ex, desc=f"evaluate {name}", progress=progress)
        ev["trainable_parameters"] = adapter_parameters(model)
        ev["vision_parameters"] = sum(p.numel() for p in tower.parameters()) \
            if model.vision is not None else 0
        ev["flops_per_token"] = flops_per_token(model, cfg.flops_seq_len)
        ev["per_kind"] = {k: {m: float(np.mean([ev["scores"][m][i] for i, ex in enumerate(test_ex)
                                                if ex.kind == k])) for m in METRICS}
                          for k in KINDS}
        if name == "image_routed":
            ev["routing"] = routing_telemetry(model, test_ex, test_images)
        _write_json(folder / "systems" / name / "eval.json" if name != REFERENCE else
                    folder / f"{REFERENCE}.eval.json", _clean(ev))
        evals[name] = ev
        done(f"eval:{name}")

    stage("coverage")
    n_cov = min(cfg.coverage_examples, len(test_ex))
    cov = {name: coverage(systems[name], test_ex[:n_cov],
                          correct=evals[name]["scores"]["exact_match"][:n_cov])
           for name in ("image_lora", "image_routed", REFERENCE)}
    _write_json(folder / "coverage.json", _clean(cov))
    done("coverage")

    stage("validate")
    results_path = folder / "results.json"

    def entry(name: str) -> dict:
        ev = evals[name]
        e = {"name": name, "scores": {m: ev["scores"][m] for m in METRICS},
             "trainable_parameters": ev["trainable_parameters"],
             "flops_per_token": ev["flops_per_token"], "latency_p50_ms": ev["latency_p50_ms"],
             "peak_memory_bytes": ev["peak_memory_bytes"],
             "kv_cache_hit_rate": ev["kv_cache_hit_rate"]}
        if name != BASELINE:
            e["kind"] = "adapter"
        if name == "image_routed":
            r = ev["routing"]
            e["kind"] = "router"
            e["router"] = {"avg_plan_length": r["avg_plan_length"],
                           "index_swap_monotonic": r["index_swap_monotonic"]}
        return e

    _write_json(results_path, {
        "schema": "bem.acceptance.results", "schema_version": 1,
        "experiment": f"multimodal-{folder.name}",
        "example_ids": [f"{ex.kind}-{i:04d}" for i, ex in enumerate(test_ex)],
        "metrics": {m: {"higher_is_better": True} for m in METRICS},
        "primary_metric": "exact_match", "baseline": entry(BASELINE),
        "variants": [entry(n) for n in SYSTEMS if n != BASELINE]})
    report = validate(results_path, {"n_resamples": cfg.n_resamples, "seed": cfg.seed})
    write_report(report, json_path=folder / "acceptance.json",
                 markdown_path=folder / "acceptance.md")
    done("validate")
    report_path = folder / "report.md"
    atomic_write(report_path, render_report(folder, cfg, manifest, report, test_ex, evals, cov,
                                            seconds, machine_description(dev)).encode())
    return MultimodalOutcome(folder, results_path, report, report_path)


def _f(v, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def render_report(folder: Path, cfg: MultimodalConfig, manifest: dict, report, examples,
                  evals: dict, cov: dict, seconds: dict, machine: str) -> str:
    """report.md of a multimodal run."""
    lines = [f"# bem run --suite multimodal `{folder.name}`", "",
             f"Machine: {machine}. Base: `{cfg.base}` preset (cache key `{manifest['key']}`, "
             f"{'from the cache' if manifest.get('cached') else 'pre-trained in this run'}). "
             f"Image task v{MULTIMODAL_VERSION}, seed {cfg.seed}, suite seed {cfg.suite_seed}: "
             f"{len(examples)} held-out questions on {3 * cfg.eval_images} test images; "
             f"{cfg.train_images} training images per kind. Stage 1: {cfg.stage1_steps} steps; "
             f"stage 2: {cfg.stage2_steps} steps of {cfg.batch_size}. Stage times (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".", "",
             "## Verdicts (bem.stats acceptance validator, baseline: text_only)", "",
             "| variant | decision | reasons |", "|---|---|---|"]
    for v in report.variants:
        lines.append(f"| {v.name} | **{v.decision}** | {'; '.join(v.reasons) or '—'} |")
    lines += ["", "## Systems", "",
              "| system | what | adapter params | vision params | FLOPs/token | EM | F1 | "
              "latency p50 (ms/token) | KV hit rate |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ev in evals.items():
        lines.append(f"| {name} | {TITLES[name]} | {ev['trainable_parameters']} | "
                     f"{ev['vision_parameters']} | {ev['flops_per_token']:.4g} | "
                     f"{_f(float(np.mean(ev['scores']['exact_match'])))} | "
                     f"{_f(float(np.mean(ev['scores']['token_f1'])))} | "
                     f"{_f(ev['latency_p50_ms'], 2)} | {_f(ev['kv_cache_hit_rate'])} |")
    lines += ["", "## Exact match per kind", "", "| system | " + " | ".join(KINDS) + " |",
              "|---|" + "---:|" * len(KINDS)]
    for name, ev in evals.items():
        lines.append(f"| {name} | " + " | ".join(_f(ev["per_kind"][k]["exact_match"])
                                                 for k in KINDS) + " |")
    lines += ["", "## Coverage (attention mass on the evidence vs distractors)", "",
              "coverage = evidence / (evidence + distractors) of the attention of the answer "
              "positions (layers, heads averaged); chance = the evidence's share of the tokens; "
              "gradient = the same share of |gradient × input| on the visual tokens.", "",
              "| system | image coverage | chance | above chance | gradient coverage | "
              "image attention mass | passage coverage | passage chance | coverage right / wrong |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, c in cov.items():
        a = c["aggregate"]
        lines.append(f"| {name} | {_f(a['image_coverage'])} | {_f(a['image_chance'])} | "
                     f"{_f(a['above_chance'])} | {_f(a['gradient_coverage'])} | "
                     f"{_f(a['image_mass'])} | {_f(a['text_coverage'])} | {_f(a['text_chance'])} | "
                     f"{_f(a.get('image_coverage_correct'))} / "
                     f"{_f(a.get('image_coverage_wrong'))} |")
    r = evals["image_routed"].get("routing")
    if r:
        lines += ["", "## Routing by image (image_routed)", "",
                  f"NMI(expert, image kind) = {_f(r['nmi_kind_expert'])}; experts used "
                  f"{r['experts_used']}; teacher-forced EM routed "
                  f"{_f(r['index_swap']['routed_exact_match'])} vs experts swapped "
                  f"{_f(r['index_swap']['swapped_exact_match'])}.", "",
                  "| kind | " + " | ".join(f"expert {e}" for e in range(cfg.num_experts)) + " |",
                  "|---|" + "---:|" * cfg.num_experts]
        for kind, row in r["kind_expert"].items():
            lines.append(f"| {kind} | " + " | ".join(str(row.get(str(e), 0))
                                                    for e in range(cfg.num_experts)) + " |")
    lines += ["", "## Acceptance gates", "", report.to_markdown(), ""]
    return "\n".join(lines)
