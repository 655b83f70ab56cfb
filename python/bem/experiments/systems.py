"""The systems of a run, with equal budgets: each variant (V1–V4, the full stack) is sized so its
trainable adapter parameters are closest to a common target, and the static-LoRA baseline is
sized to the same target. A system is a JSON spec that rebuilds exactly
the same modules on the base model."""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bem.attach import ROLES, AdapterSpec, BemConfig, attach
from bem.budget import count
from bem.experiments.config import AR1_SYSTEMS, BASELINE, REFERENCES, ROUTED
from bem.model import BemForCausalLM
from bem.modules.gate_shaping import GateShaping

log = logging.getLogger("bem")
_ROLES = ROLES["llama"]


@dataclass(frozen=True)
class SystemSpec:
    """name; config: the BemConfig attached; shaper_hidden: width of V2's cross-encoder (the
    gate shaper is rebuilt with it, since attach uses a fixed width)."""

    name: str
    config: BemConfig
    shaper_hidden: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_json(),
                "shaper_hidden": self.shaper_hidden}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SystemSpec:
        return cls(d["name"], BemConfig.from_json(d["config"]), d["shaper_hidden"])


def build(base: BemForCausalLM, spec: SystemSpec, seed: int) -> BemForCausalLM:
    """A copy of `base` with the spec's modules attached (base frozen), initialised from `seed`;
    a routed system (AR1, full_AR1, per_request, oracle) gets its router (bem.experiments.ar1)."""
    from bem.experiments.ar1 import attach_router

    torch.manual_seed(seed)
    model = attach(copy.deepcopy(base), spec.config)
    if spec.name in ROUTED or spec.name in AR1_SYSTEMS:
        attach_router(model, "AR1" if spec.name in AR1_SYSTEMS else spec.name)
    if spec.shaper_hidden is not None:
        ref = model.lm_head.weight
        groups = model.bem_gate_shaper.num_groups
        model.bem_gate_shaper = GateShaping(base.config.d_model, groups,
                                            d_hidden=spec.shaper_hidden).to(ref.dtype).to(ref.device)
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _params(base: BemForCausalLM, spec: SystemSpec) -> int:
    return trainable(build(base, spec, 0))


def _pattern(name: str) -> str:
    return "re:" + name.replace(".", "[.]")


def _spread(total: int, names: list[str]) -> list[tuple[str, int]]:
    """`total` units spread evenly over `names` (the first ones get one more); zeros dropped."""
    k = len(names)
    return [(n, total // k + (1 if i < total % k else 0)) for i, n in enumerate(names)
            if total // k + (1 if i < total % k else 0) > 0]


def _attn_in(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")]


def _variant(name: str, layers: int, *, rank: int = 2, shaper: int = 8,
             kron: list | None = None, film: int = 4) -> SystemSpec:
    """rank: total rank of the dynamic-rank LoRA over the 2·layers attention-input projections
    (k = r // 2 active per module); kron: per-layer (out_factors, in_factors). "full_AR1" is the
    full stack with one dynamic-rank expert per adaptation domain (routed by AR1)."""
    gating = AdapterSpec("head_gating", _ROLES["attn_out"])
    dyn = [AdapterSpec("dynamic_rank", [_pattern(n)],
                       {"rank": r, "active": max(1, r // 2), "alpha": float(2 * r)})
           for n, r in _spread(rank, _attn_in(layers))]
    kron_specs = ([AdapterSpec("kronecker", _ROLES["mlp_down"])] if kron is None else
                  [AdapterSpec("kronecker", [_pattern(f"model.layers.{i}.mlp.down_proj")],
                               {"out_factors": list(o), "in_factors": list(f)})
                   for i, (o, f) in enumerate(kron)])
    film_spec = AdapterSpec("film", _ROLES["mlp"], {"d_hidden": film})
    if name == "V1":
        return SystemSpec(name, BemConfig([gating, *dyn]))
    if name == "V2":
        return SystemSpec(name, BemConfig([gating], gate_shaping=True), shaper)
    if name == "V3":
        return SystemSpec(name, BemConfig(kron_specs))
    if name == "V4":
        return SystemSpec(name, BemConfig([film_spec]))
    return SystemSpec(name, BemConfig([gating, *dyn, *kron_specs, film_spec], gate_shaping=True,
                                      num_experts=_experts(name)), shaper)


def _experts(name: str) -> int:
    from bem.experiments.ar1 import NUM_EXPERTS

    return NUM_EXPERTS if name == "full_AR1" else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _kron_choices(base: BemForCausalLM) -> list[tuple[int, tuple, tuple]]:
    """(parameters per layer, out_factors, in_factors) of every Kronecker factorisation of the MLP
    down projection."""
    d_out, d_in = base.config.d_model, base.config.d_ff
    return sorted((o1 * i1 + (d_out // o1) * (d_in // i1), (o1, d_out // o1), (i1, d_in // i1))
                  for o1 in _divisors(d_out) for i1 in _divisors(d_in))


def _fit_affine(f: Callable[[int], int], target: int) -> int:
    """The knob k ≥ 1 whose count f(k) (affine in k) is closest to target."""
    a1, a2 = f(1), f(2)
    slope = a2 - a1
    k = max(1, round((target - a1) / slope)) if slope > 0 else 1
    return min((max(1, k + d) for d in (-1, 0, 1)), key=lambda c: abs(f(c) - target))


def _kron_layers(base: BemForCausalLM, target: int) -> list:
    """Per-layer Kronecker factorisations whose parameters sum closest to `target` (exact: a
    dynamic programme over the reachable sums, those beyond 1.05 × target pruned)."""
    by_count: dict[int, tuple] = {}
    for n, o, f in _kron_choices(base):
        by_count.setdefault(n, (o, f))
    reach: dict[int, list] = {0: []}
    for _ in range(base.config.n_layers):
        nxt: dict[int, list] = {}
        for total, picks in reach.items():
            for n, choice in by_count.items():
                s = total + n
                if s not in nxt and (s <= 1.05 * target or not nxt):
                    nxt[s] = picks + [choice]
        reach = nxt
    return reach[min(reach, key=lambda s: abs(s - target))]


def variant_spec(base: BemForCausalLM, name: str, target: int) -> SystemSpec:
    """The spec of variant `name` whose trainable parameters are closest to `target`."""
    L = base.config.n_layers
    if name == "V1":
        return _variant("V1", L, rank=_fit_affine(
            lambda r: _params(base, _variant("V1", L, rank=r)), target))
    if name == "V2":
        return _variant("V2", L, shaper=_fit_affine(
            lambda h: _params(base, _variant("V2", L, shaper=h)), target))
    if name == "V4":
        return _variant("V4", L, film=_fit_affine(
            lambda h: _params(base, _variant("V4", L, film=h)), target))
    if name == "V3":
        return _variant("V3", L, kron=_kron_layers(base, target))
    if name not in ("full", "full_AR1"):
        raise ValueError(f"name: expected one of V1-V4, full, full_AR1, got {name!r}")
    # Full stack: shares of what the smallest full stack leaves for the shaper (1/4), the
    # dynamic-rank LoRA (1/3, all its experts) and the Kronecker adapter (1/6); the FiLM width
    # fills the rest. full_AR1's floor includes AR1's router.
    smallest = min(_kron_choices(base))
    floor = _params(base, _variant(name, L, rank=1, shaper=1, kron=[smallest[1:]] * L, film=1))
    spare = max(0, target - floor)
    shaper = _fit_affine(lambda h: _params(base, _variant("V2", L, shaper=h)),
                         _params(base, _variant("V2", L, shaper=1)) + spare // 4)
    E = _experts(name)
    rank = _fit_affine(lambda r: E * _params(base, _variant("V1", L, rank=r)),
                       E * _params(base, _variant("V1", L, rank=1)) + spare // 3)
    kron = _kron_layers(base, smallest[0] * L + spare // 6)
    film = _fit_affine(lambda h: _params(base, _variant(name, L, rank=rank, shaper=shaper,
                                                        kron=kron, film=h)), target)
    return _variant(name, L, rank=rank, shaper=shaper, kron=kron, film=film)


@dataclass(frozen=True)
class BudgetRow:
    """Measured budget of a system: trainable parameters, whole-model FLOPs per token."""

    name: str
    trainable_parameters: int
    flops_per_token: float


def baseline_spec(base: BemForCausalLM, target: int) -> SystemSpec:
    """Static LoRA on the attention input (q and v projections of every layer) whose parameters
    are closest to `target`: a total rank spread evenly over the 2·n_layers projections (one rank
    step costs d_in + d_out parameters, about 1% of a typical target)."""
    names = _attn_in(base.config.n_layers)

    def spec(total: int) -> SystemSpec:
        return SystemSpec(BASELINE, BemConfig([
            AdapterSpec("lora", [_pattern(n)], {"rank": r, "alpha": float(2 * r)})
            for n, r in _spread(total, names)]))

    return spec(_fit_affine(lambda total: _params(base, spec(total)), target))


def experts_spec(base: BemForCausalLM, name: str, target: int, trust_region: float
                 ) -> SystemSpec:
    """The routed systems' four LoRA experts on the attention input (q, v), sized so that the
    AR1 system (experts + policy, value and Q heads) is closest to `target`; each module's trust
    region is `trust_region` × its base weight's Frobenius norm."""
    from bem.experiments.ar1 import NUM_EXPERTS

    names = _attn_in(base.config.n_layers)
    tau = {n: trust_region * float(base.get_submodule(n).weight.detach().norm()) for n in names}

    def spec(total: int, system: str = "AR1") -> SystemSpec:
        return SystemSpec(system, BemConfig([
            AdapterSpec("lora", [_pattern(n)], {"rank": r, "alpha": float(2 * r),
                                                "trust_region": round(tau[n], 6)})
            for n, r in _spread(total, names)], num_experts=NUM_EXPERTS))

    return spec(_fit_affine(lambda total: _params(base, spec(total)), target), name)


def plan_systems(base: BemForCausalLM, variants: tuple[str, ...], budget_fraction: float,
                 flops_seq_len: int, trust_region: float = 1.0
                 ) -> tuple[list[SystemSpec], dict[str, BudgetRow], int]:
    """Specs of the baseline and the variants, each sized to a common target of
    the parameters of the baseline (a static LoRA sized to budget_fraction × the base's
    parameters), and their measured budgets (bem.budget.count:
    trainable parameters, whole-model FLOPs per token of a flops_seq_len-token forward). A
    variant that cannot get within ±5% of the baseline is kept and logged: the budget gate then
    rejects it. Returns (specs, name → budget, target)."""
    baseline = baseline_spec(base, max(1, round(budget_fraction * sum(
        p.numel() for p in base.parameters()))))
    target = _params(base, baseline)
    specs = [baseline] + [experts_spec(base, v, target, trust_region) if v in ROUTED else
                          variant_spec(base, v, target) for v in variants]
    budgets = {}
    for s in specs:
        m = build(base, s, 0)
        budgets[s.name] = BudgetRow(s.name, trainable(m), count(m, flops_seq_len).model_flops_per_token)
    ref = budgets[BASELINE]
    for s in specs[1:]:
        if s.name in REFERENCES:         # reported, not validated: no budget gate applies
            continue
        b = budgets[s.name]
        for what, a, r in (("trainable parameters", b.trainable_parameters,
                            ref.trainable_parameters),
                           ("FLOPs per token", b.flops_per_token, ref.flops_per_token)):
            if abs(a / r - 1) > 0.05:
                log.warning("%s: %s %.4g, %.3fx the baseline's: outside ±5%%; the budget gate "
                            "will reject it", s.name, what, a, a / r)
    return specs, budgets, target
