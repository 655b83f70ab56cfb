"""What one `bem run` does, as a validated, JSON round-tripping configuration: the base model and
its pre-training, the adapter training, the evaluation, the budget and the variants; presets
"default" (≤ 15 min on 2 CPU cores) and "quick" (≤ 3 min, the CI run)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bem.model import TransformerConfig

# The systems bem run compares against the static-LoRA baseline.
VARIANTS = ("V1", "V2", "V3", "V4", "full", "AR1", "full_AR1", "per_request", "oracle")
# The routed systems: the same four LoRA experts, routed by AR1, per request, or by the oracle.
ROUTED = ("AR1", "per_request", "oracle")
# References reported next to AR1 but not validated (not candidates for promotion): per-request
# routing shares AR1's experts without its policy (so it is under budget), the oracle reads the
# true domains.
REFERENCES = ("per_request", "oracle")
# The systems routed by AR1's macro-policy (plan-length and monotonicity gates apply): the LoRA
# experts, and the full stack whose dynamic-rank LoRA has one expert per domain.
AR1_SYSTEMS = ("AR1", "full_AR1")
VARIANT_TITLES = {"V1": "PT1 + dynamic-rank LoRA", "V2": "PT1 + gate shaping",
                  "V3": "Kronecker adapter (MLP down)", "V4": "residual FiLM (MLP)",
                  "full": "full stack (PT1 + V1 + V2 + V3 + V4)",
                  "AR1": "4 LoRA experts routed per chunk by AR1 (TRPO)",
                  "full_AR1": "full stack, its dynamic-rank LoRA with 4 experts routed by AR1",
                  "per_request": "4 LoRA experts, one per request (classifier on the prompt)",
                  "oracle": "4 LoRA experts, causal-oracle routing (ceiling)"}
BASELINE = "baseline"


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training of the built-in base on the suite mixture (the result is cached by a hash of
    this and the model config). Each task's batches hold about `batch_tokens` tokens;
    `evidence_qa_turns` batches of evidence QA per round of the other tasks' one (its retrieval is
    the slowest skill to learn); prompt_weight: loss weight of prompt tokens (answers weigh 1)."""

    steps: int = 10_000
    batch_tokens: int = 2048
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    prompt_weight: float = 0.1
    evidence_qa_turns: int = 2
    n_per_task: int = 3000
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """One experiment. The base is pre-trained on the suite's general skills; the adapters are
    trained and evaluated on the adaptation domains: `*_single` one-part sequences and `*_switch`
    two-part sequences that switch domain (bem.tasks.generate_adaptation). `budget_fraction` sets
    every system's trainable adapter parameters, routers included, to that fraction of the base
    model's (±5%). ar1_*: TRPO iterations and sequences per iteration of AR1's policy;
    trust_region: τ of the routed experts' ‖ΔW‖_F ≤ τ, relative to each layer's ‖W‖_F."""

    model: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        vocab_size=260, d_model=64, n_layers=2, n_heads=4, d_ff=168, max_positions=320,
        positions="learned"))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0
    suite_seed: int = 0
    train_steps: int = 800
    train_batch_size: int = 16
    train_lr: float = 1e-2
    train_single: int = 1500
    train_switch: int = 750
    eval_single: int = 100
    eval_switch: int = 50
    max_new_tokens: int = 24
    budget_fraction: float = 0.03
    flops_seq_len: int = 256
    n_resamples: int = 10_000
    ar1_iterations: int = 200
    ar1_batch_size: int = 64
    trust_region: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, TransformerConfig):
            raise TypeError(f"RunConfig: model: expected TransformerConfig, got "
                            f"{type(self.model).__name__}")
        if self.model.vocab_size < 260:
            raise ValueError(f"RunConfig: model.vocab_size: expected >= 260 (the byte tokenizer), "
                             f"got {self.model.vocab_size}")
        if not isinstance(self.pretrain, PretrainConfig):
            raise TypeError(f"RunConfig: pretrain: expected PretrainConfig, got "
                            f"{type(self.pretrain).__name__}")
        _check_variants(self.variants)
        object.__setattr__(self, "variants", tuple(self.variants))
        for owner, obj, names in (
                ("RunConfig", self, ("train_steps", "train_batch_size", "train_single",
                                     "train_switch", "eval_single", "eval_switch",
                                     "max_new_tokens", "flops_seq_len", "n_resamples",
                                     "ar1_iterations", "ar1_batch_size")),
                ("PretrainConfig", self.pretrain, ("steps", "batch_tokens", "n_per_task",
                                                     "evidence_qa_turns"))):
            for name in names:
                v = getattr(obj, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{owner}: {name}: expected a positive int, got {v!r}")
        for owner, obj, names in (("RunConfig", self, ("seed", "suite_seed")),
                                  ("PretrainConfig", self.pretrain, ("seed", "warmup"))):
            for name in names:
                v = getattr(obj, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"{owner}: {name}: expected an int >= 0, got {v!r}")
        for owner, obj, names in (("RunConfig", self, ("train_lr", "budget_fraction",
                                                       "trust_region")),
                                  ("PretrainConfig", self.pretrain, ("lr",))):
            for name in names:
                _positive_float(owner, name, getattr(obj, name))
        for name in ("weight_decay", "prompt_weight"):
            v = getattr(self.pretrain, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"PretrainConfig: {name}: expected a finite number >= 0, got {v!r}")
        if self.budget_fraction >= 1:
            raise ValueError(f"RunConfig: budget_fraction: expected < 1, got {self.budget_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise TypeError(f"RunConfig: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RunConfig: unknown fields {unknown}")
        data = dict(data)
        if "model" in data:
            data["model"] = TransformerConfig.from_dict(data["model"])
        if "pretrain" in data:
            p = data["pretrain"]
            if not isinstance(p, dict):
                raise TypeError(f"RunConfig: pretrain: expected a dict, got {type(p).__name__}")
            unknown = sorted(set(p) - {f.name for f in dataclasses.fields(PretrainConfig)})
            if unknown:
                raise ValueError(f"PretrainConfig: unknown fields {unknown}")
            data["pretrain"] = PretrainConfig(**p)
        if "variants" in data:
            data["variants"] = tuple(_check_variants(data["variants"]))
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RunConfig:
        """"default" or "quick" (a smaller base, fewer steps and examples), with overrides."""
        if name == "default":
            return dataclasses.replace(cls(), **overrides)
        if name == "quick":
            quick = cls(pretrain=PretrainConfig(steps=3000, warmup=50, evidence_qa_turns=1),
                        train_steps=160, train_batch_size=16, train_single=300, train_switch=150,
                        eval_single=24, eval_switch=12, max_new_tokens=16, budget_fraction=0.05,
                        n_resamples=2000, ar1_iterations=10, ar1_batch_size=32)
            return dataclasses.replace(quick, **overrides)
        raise ValueError(f"preset: expected 'default' or 'quick', got {name!r}")


def _positive_float(owner: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{owner}: {name}: expected a finite number > 0, got {v!r}")


def _check_variants(variants: Any) -> list[str]:
    if isinstance(variants, str) or not isinstance(variants, (list, tuple)) or not variants:
        raise ValueError(f"variants: expected a non-empty list drawn from {list(VARIANTS)}, got "
                         f"{variants!r}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants: unknown {bad}; expected names from {list(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants: duplicates in {list(variants)}")
    return list(variants)
