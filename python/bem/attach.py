"""bem.attach: inject bem modules into a model by target-module patterns (bem's built-in
transformer, Hugging Face Llama, GPT-2 and BERT naming), detach them, merge the mergeable ones,
and save/load the adapters (safetensors + JSON)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bem.modules.base import LinearAdapter
from bem.modules.control import ChunkController, optional_control, pop_control, push_control
from bem.modules.dynamic_rank import DynamicRankLoRA
from bem.modules.gate_shaping import GateShaping
from bem.modules.head_gating import HeadGating
from bem.modules.kronecker import KroneckerAdapter
from bem.modules.lora import LoRA
from bem.modules.residual_film import ResidualFiLM

KINDS = ("lora", "dynamic_rank", "kronecker", "head_gating", "film")

# Target patterns of each role, per module-naming family ("llama" covers bem's built-in model).
ROLES: dict[str, dict[str, list[str]]] = {
    "llama": {"attn_in": ["self_attn.q_proj", "self_attn.v_proj"], "attn_out": ["self_attn.o_proj"],
              "mlp_down": ["mlp.down_proj"], "mlp": ["mlp"]},
    "gpt2": {"attn_in": ["attn.c_attn"], "attn_out": ["attn.c_proj"], "mlp_down": ["mlp.c_proj"],
             "mlp": ["mlp"]},
    "bert": {"attn_in": ["attention.self.query", "attention.self.value"],
             "attn_out": ["attention.output.dense"], "mlp_down": [r"re:.*layer\.\d+\.output\.dense"],
             "mlp": ["intermediate"]},
}
PRESETS = ("lora", "PT1", "V1", "V2", "V3", "V4")


@dataclass
class AdapterSpec:
    """One kind of bem module on the modules matching `targets`.

    kind: one of KINDS. targets: module-name patterns — "q_proj" matches a name equal to it or
    ending in ".q_proj" (PEFT's rule); "re:<regex>" must match the whole name.
    options: keyword arguments of the module (e.g. rank, alpha for "lora"; rank, active, mode
    for "dynamic_rank"; budget, scale for "kronecker"; num_groups, bound for "head_gating";
    gamma_bound, beta_bound for "film").
    """

    kind: str
    targets: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AdapterSpec: kind: expected one of {KINDS}, got {self.kind!r}")
        if (not isinstance(self.targets, (list, tuple)) or not self.targets or
                not all(isinstance(t, str) and t for t in self.targets)):
            raise ValueError(f"AdapterSpec: targets: expected a non-empty list of names, got "
                             f"{self.targets!r}")
        self.targets = list(self.targets)
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(f"AdapterSpec: options: expected a dict of keyword arguments, got "
                             f"{self.options!r}")

    def matches(self, name: str) -> bool:
        for t in self.targets:
            if t.startswith("re:"):
                if re.fullmatch(t[3:], name):
                    return True
            elif name == t or name.endswith("." + t):
                return True
        return False


@dataclass
class BemConfig:
    """What bem.attach injects. adapters: AdapterSpec list. num_experts: experts of the LoRA
    modules, routed per 64-token chunk. gate_shaping: add V2's GateShaping (needs head gating).
    version: bump it whenever anything else that changes the K/V changes (part of the KV routing
    key). Round-trips through JSON (to_json / from_json)."""

    adapters: list[AdapterSpec]
    num_experts: int = 1
    gate_shaping: bool = False
    version: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, (list, tuple)) or not self.adapters:
            raise ValueError("BemConfig: adapters: expected a non-empty list of AdapterSpec")
        self.adapters = [a if isinstance(a, AdapterSpec) else AdapterSpec(**a) for a in self.adapters]
        for name in ("num_experts",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BemConfig: {name}: expected a positive int, got {v!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"BemConfig: version: expected an int >= 0, got {self.version!r}")
        if not isinstance(self.gate_shaping, bool):
            raise ValueError(f"BemConfig: gate_shaping: expected a bool, got {self.gate_shaping!r}")
        if self.gate_shaping and not any(a.kind == "head_gating" for a in self.adapters):
            raise ValueError("BemConfig: gate_shaping needs a head_gating adapter (V2 = PT1 + "
                             "gate shaping)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BemConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"BemConfig: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"BemConfig: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BemConfig: unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"BemConfig: {exc}") from None

    @classmethod
    def preset(cls, name: str, family: str = "llama", *, rank: int = 8, alpha: float = 16.0,
               num_experts: int = 1, **options: Any) -> BemConfig:
        """A variant's config for a naming family ("llama" (also bem's model), "gpt2", "bert"):
        "lora" (static LoRA on attn_in), "PT1" (head gating), "V1" (PT1 + dynamic-rank LoRA on
        attn_in, k = rank // 2 of rank), "V2" (PT1 + gate shaping), "V3" (Kronecker on the MLP
        down projection), "V4" (residual FiLM on the MLP). Extra options go to the main module."""
        if family not in ROLES:
            raise ValueError(f"BemConfig.preset: family: expected one of {sorted(ROLES)}, got "
                             f"{family!r}")
        roles = ROLES[family]
        gating = AdapterSpec("head_gating", roles["attn_out"])
        if name == "lora":
            return cls([AdapterSpec("lora", roles["attn_in"], {"rank": rank, "alpha": alpha,
                                                               **options})], num_experts)
        if name == "PT1":
            return cls([AdapterSpec("head_gating", roles["attn_out"], options)], num_experts)
        if name == "V1":
            dyn = {"rank": rank, "active": max(1, rank // 2), "alpha": alpha, **options}
            return cls([gating, AdapterSpec("dynamic_rank", roles["attn_in"], dyn)], num_experts)
        if name == "V2":
            return cls([AdapterSpec("head_gating", roles["attn_out"], options)], num_experts,
                       gate_shaping=True)
        if name == "V3":
            return cls([AdapterSpec("kronecker", roles["mlp_down"], options)], num_experts)
        if name == "V4":
            return cls([AdapterSpec("film", roles["mlp"], options)], num_experts)
        raise ValueError(f"BemConfig.preset: name: expected one of {PRESETS}, got {name!r}")


BEM_MODULES = (LinearAdapter, ResidualFiLM)


def family(model: nn.Module) -> str:
    """The module-naming family of a model: "llama" (bem's built-in model too), "gpt2" or "bert"."""
    names = [n for n, _ in model.named_modules()]
    for fam, probe in (("llama", "self_attn.o_proj"), ("gpt2", "attn.c_attn"),
                       ("bert", "attention.self.query")):
        if any(n.endswith(probe) for n in names):
            return fam
    raise ValueError(f"model: cannot tell its naming family ({type(model).__name__}); expected "
                     "Llama-, GPT-2- or BERT-style module names")


def _model_dims(model: nn.Module) -> tuple[int, int]:
    """(d_model, num_heads) from bem's or a Hugging Face config."""
    cfg = getattr(model, "config", None)
    d = next((getattr(cfg, a) for a in ("d_model", "hidden_size", "n_embd")
              if isinstance(getattr(cfg, a, None), int)), None)
    h = next((getattr(cfg, a) for a in ("n_heads", "num_attention_heads", "n_head")
              if isinstance(getattr(cfg, a, None), int)), None)
    if d is None or h is None:
        raise ValueError(f"model: expected a config with the model width and head count, got "
                         f"{type(cfg).__name__}")
    return d, h


def _build(spec: AdapterSpec, target: nn.Module, cfg: BemConfig, d_model: int, heads: int):
    o = dict(spec.options)
    try:
        if spec.kind == "lora":
            return LoRA(target, num_experts=cfg.num_experts, **o)
        if spec.kind == "dynamic_rank":
            return DynamicRankLoRA(target, d_ctrl=d_model, num_experts=cfg.num_experts, **o)
        if spec.kind == "kronecker":
            return KroneckerAdapter(target, **o)
        if spec.kind == "head_gating":
            return HeadGating(target, num_heads=heads, d_ctrl=d_model, **o)
        return ResidualFiLM(target, d_ctrl=d_model, **o)
    except TypeError as exc:
        raise ValueError(f"AdapterSpec({spec.kind!r}): options: {exc}") from None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def bem_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → bem module (LoRA, DynamicRankLoRA, HeadGating, KroneckerAdapter, ResidualFiLM)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BEM_MODULES)}


_CACHE_KEYS = ("cache", "past_key_values")


@dataclass
class _Call:
    """What the post-hook needs of one hooked forward: the control token to pop, and for a
    whole-sequence forward the ids and real-token mask that seed the cache's row history."""

    token: Any = None
    ids: torch.Tensor | None = None
    real: torch.Tensor | None = None
    legacy: bool = False
    history: Any = None


def _find_cache(kwargs) -> tuple[str | None, Any]:
    for key in _CACHE_KEYS:
        if kwargs.get(key) is not None:
            return key, kwargs[key]
    return None, None


def _control_pre_hook(model, args, kwargs):
    """Compute the per-chunk controls of a forward and make them active for its bem modules.

    Whole sequences (no cache, or an empty one): from input_ids, positions counted in the real
    tokens of the 2-D attention_mask. A continuation of a transformers Cache (or legacy tuple)
    that bem saw from its start: from the row history kept on the cache (bem.hf.generation),
    computing chunk c's controls when its first token arrives. Controls already active (bem's own
    generation) are left alone."""
    call = _Call()
    model._bem_control_tokens.append(call)
    if optional_control() is not None or kwargs.get("control") is not None:
        return None
    from bem.hf import generation as hfgen

    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("bem: the attached modules need input_ids (B, T) to compute their "
                         "per-chunk controls")
    if kwargs.get("batch") is not None:
        raise ValueError("bem: per-chunk controls need the whole sequence; generate with "
                         "bem.model.generate (bem's model) or with use_cache=False")
    key, cache = _find_cache(kwargs)
    emb = model.get_input_embeddings().weight
    controller = model.bem_controller
    past = hfgen.cache_length(cache)
    hist = hfgen.get_history(cache)
    if cache is not None and (past > 0 or hist is not None):
        hist = hfgen.check_continuation(hist, cache, controller)
        if hfgen._is_legacy(cache):
            hist = hist.clone()                  # the caller may branch from this tuple again
            cache = hfgen.to_dynamic(cache)
            hfgen.set_history(cache, hist)
            kwargs = {**kwargs, key: cache}
            call.legacy = True
        real = hfgen.new_tokens_mask(kwargs.get("attention_mask"), ids, past)
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].shape[1] != \
                past + ids.shape[1]:
            raise hfgen.CacheStateError(
                f"bem: attention_mask: expected {past + ids.shape[1]} columns ({past} cached + "
                f"{ids.shape[1]} new tokens), got {kwargs['attention_mask'].shape[1]}")
        call.history = hist
        call.token = push_control(hist.advance(ids, real, emb))
        return (args, kwargs) if call.legacy else None
    real = hfgen.new_tokens_mask(kwargs.get("attention_mask"), ids, 0)
    pos = hfgen.real_positions(real)
    given = kwargs.get("position_ids")
    if isinstance(given, torch.Tensor) and given.dim() == 2 and given.shape == ids.shape:
        first = real.to(torch.int64).argmax(1, keepdim=True)       # each row's first real token
        if bool((given.to(ids.device).gather(1, first)[real.any(1)] != 0).any()):
            raise ValueError("bem: per-chunk controls need the whole sequence (position_ids do "
                             "not start at 0 and there is no cache bem saw from its start); "
                             "generate with use_cache=True from an empty cache, or with "
                             "use_cache=False")
    history_ids = ids if bool(real.all()) else hfgen.compact(ids, real)
    call.token = push_control(controller.control(history_ids, pos, emb))
    if cache is not None and hfgen._is_legacy(cache):      # an empty legacy tuple
        kwargs = {**kwargs, key: None}
        call.legacy = True
    call.ids, call.real = ids, real
    return (args, kwargs) if call.legacy else None


def _output_cache(output):
    """(key or tuple index, cache) of a forward's output cache, or (None, None). Only keys the
    output holds are read (transformers logs a deprecation for the old names)."""
    if isinstance(output, dict):
        for key in _CACHE_KEYS:
            if key in output.keys() and output[key] is not None:
                return key, output[key]
    elif isinstance(output, tuple):
        for i, value in enumerate(output):
            if hasattr(value, "get_seq_length"):
                return i, value
    return None, None


def _control_post_hook(model, args, kwargs, output):
    call = model._bem_control_tokens.pop() if model._bem_control_tokens else None
    if call is None:
        return None
    if call.token is not None:
        pop_control(call.token)
    key, cache = _output_cache(output)
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    from bem.hf import generation as hfgen

    hist = call.history
    if call.ids is not None:
        hist = hfgen.RowHistory.pending(model.bem_controller, call.ids, call.real,
                                        model.get_input_embeddings().weight)
    if hist is None:
        return None
    if call.legacy:
        legacy = hfgen.to_legacy(cache)
        hfgen.set_history(legacy, hist)
        if isinstance(key, int):
            return output[:key] + (legacy,) + output[key + 1:]
        output[key] = legacy
    else:
        hfgen.set_history(cache, hist)
    return output


def attach(model: nn.Module, config: BemConfig, *, freeze_base: bool = True) -> nn.Module:
    """Inject bem modules into `model` in place (and return it).

    Each AdapterSpec wraps every module whose name matches its targets (inner modules first, so
    a FiLM around an MLP may hold a Kronecker-adapted down projection). When a module reads
    per-chunk controls, a :class:`ChunkController` is added as ``model.bem_controller`` and a
    forward hook computes the controls from ``input_ids`` — for whole sequences, and for
    Hugging Face cached forwards (``generate(use_cache=True)``, decode loops over a Cache or a
    legacy tuple) from the row history it keeps on the cache (:mod:`bem.hf.generation`,
    docs/hf.md); with ``gate_shaping`` a
    :class:`GateShaping` is added as ``model.bem_gate_shaper``. ``freeze_base`` turns off the
    gradients of every parameter that is not bem's.

    Raises ValueError when the model already has bem modules, a spec matches no module, or two
    specs of linear kind match the same module.
    """
    if not isinstance(config, BemConfig):
        raise TypeError(f"config: expected BemConfig, got {type(config).__name__}")
    if getattr(model, "bem_config", None) is not None or bem_modules(model):
        raise ValueError("model: bem modules are already attached; detach() first")
    d_model, heads = _model_dims(model)
    names = [n for n, _ in model.named_modules() if n]
    plan: list[tuple[str, AdapterSpec]] = []
    owner: dict[str, str] = {}
    for spec in config.adapters:
        hits = [n for n in names if spec.matches(n)]
        if not hits:
            raise ValueError(f"AdapterSpec({spec.kind!r}): targets {spec.targets} match no module "
                             f"of {type(model).__name__}")
        for n in hits:
            if n in owner:
                raise ValueError(f"module {n!r}: matched by both {owner[n]!r} and {spec.kind!r}")
            owner[n] = spec.kind
            plan.append((n, spec))
    # Build everything first (nothing in the model changes if a module refuses its target), then
    # replace the inner modules before the outer ones that may contain them.
    plan.sort(key=lambda t: -t[0].count("."))
    built = [_build(spec, model.get_submodule(name), config, d_model, heads) for name, spec in plan]
    groups = {m.num_groups for m in built if isinstance(m, HeadGating)}
    if config.gate_shaping and len(groups) != 1:
        raise ValueError(f"BemConfig: gate_shaping needs one head-group count, got {groups}")
    ref = next(model.parameters())
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for (name, _), module in zip(plan, built):
        _set_submodule(model, name, module)
    if any(m.needs_control for m in built):
        model.bem_controller = ChunkController(d_model, config.num_experts).to(ref.dtype).to(ref.device)
        model._bem_control_tokens = []
        model._bem_hooks = [
            model.register_forward_pre_hook(_control_pre_hook, with_kwargs=True),
            model.register_forward_hook(_control_post_hook, with_kwargs=True, always_call=True)]
    if config.gate_shaping:
        model.bem_gate_shaper = GateShaping(d_model, groups.pop()).to(ref.dtype).to(ref.device)
    model.bem_config = config
    return model


def _unattach(model: nn.Module) -> None:
    for h in getattr(model, "_bem_hooks", []):
        h.remove()
    for attr in ("bem_controller", "bem_gate_shaper", "_bem_hooks", "_bem_control_tokens",
                 "bem_config", "bem_peft_experts"):
        if hasattr(model, attr):
            delattr(model, attr)


def detach(model: nn.Module) -> nn.Module:
    """Remove every bem module (restoring the original layers, unchanged) and bem's controller,
    shaper and hooks. Returns the model."""
    for name, module in sorted(bem_modules(model).items(), key=lambda t: -t[0].count(".")):
        _set_submodule(model, name, module.base_layer)   # inner first: outer names stay valid
    _unattach(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every bem module into its base layer's weight (single-expert LoRA, Kronecker) and
    remove bem from the model. Raises ValueError, changing nothing, when a module cannot be
    merged (routed experts, dynamic rank, gating, FiLM: their effect depends on the input)."""
    found = bem_modules(model)
    if not found:
        raise ValueError("model: no bem modules to merge")
    bad = [n for n, m in found.items() if not (isinstance(m, LinearAdapter) and m.mergeable)]
    if bad:
        raise ValueError(f"merge: modules {bad} cannot be merged (their delta depends on the "
                         "input or the routing); detach() them or merge a static-LoRA/Kronecker "
                         "config")
    for name, module in sorted(found.items(), key=lambda t: -t[0].count(".")):
        _set_submodule(model, name, module.merged_base())
    _unattach(model)
    return model
