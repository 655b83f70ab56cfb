"""Existing PEFT LoRA adapters as the routed experts of bem's multi-expert LoRA.

:func:`load_peft_experts` reads N PEFT LoRA adapter directories (adapter_config.json +
adapter_model.safetensors, as ``PeftModel.save_pretrained`` writes them) that target the same
modules of the same base model, and attaches one :class:`bem.modules.LoRA` with N experts per
target module: expert e is adapter e. Ranks may differ: each target gets the largest rank R and the
smaller adapters are padded with zero rows of A / zero columns of B (which add nothing). PEFT's
scale (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) may differ too: the module's scale
is expert 0's and another expert's ratio to it is folded into its B.

``bem.peft_export.export_peft(model, dir, expert=e)`` writes expert e back in PEFT's format; for
experts loaded here it writes the adapter's own rank, alpha and config, so the round trip returns
the adapter it came from (exactly where the expert's scale equals expert 0's; otherwise within
float rounding of the folded ratio, |Δ| ≤ 1 ulp of B's dtype).

Refused with ValueError naming the directory and the problem: a missing or unreadable file, a
config that is not a plain LoRA (DoRA, trained biases, modules_to_save, embedding/conv LoRA),
adapters whose target modules differ, a target the model lacks or that is not linear, tensors
whose shapes do not fit the base layer, and A/B with different ranks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bem.attach import AdapterSpec, BemConfig, attach, bem_modules
from bem.modules.base import linear_shape
from bem.modules.lora import LoRA
from bem.serialization import load_file

log = logging.getLogger("bem.hf")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])"
                  r"(?:\.[^.]+)?\.weight$")
PROVENANCE_ATTR = "bem_peft_experts"


@dataclass
class PeftLoRA:
    """One PEFT LoRA adapter read from disk: per module (A (r, d_in), B (d_out, r), r, alpha,
    scale), its config and where it came from."""

    path: str
    config: dict[str, Any]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, int, float, float]] = field(
        default_factory=dict)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_lora(directory: str | os.PathLike) -> PeftLoRA:
    """Read and check one PEFT LoRA adapter directory (no PEFT import needed)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"adapter {str(d)!r}: not a directory")
    cfg_path = d / PEFT_CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"adapter {str(d)!r}: no {PEFT_CONFIG}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter {str(d)!r}: {PEFT_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"adapter {str(d)!r}: {PEFT_CONFIG}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter {str(d)!r}: peft_type: expected 'LORA', got "
                         f"{cfg.get('peft_type')!r}")
    for key, ok in (("use_dora", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("modules_to_save", lambda v: not v),
                    ("trainable_token_indices", lambda v: not v),
                    ("lora_bias", lambda v: not v)):
        if not ok(cfg.get(key)):
            raise ValueError(f"adapter {str(d)!r}: {key}={cfg.get(key)!r} is not supported (bem "
                             "routes plain LoRA deltas: A, B and a scale per module)")
    tensors, _ = load_file(d / PEFT_WEIGHTS, require_digests=False)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"adapter {str(d)!r}: tensor {key!r} is not a LoRA A/B weight "
                             "(embedding or conv LoRA and extra trained tensors are not supported)")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise ValueError(f"adapter {str(d)!r}: {PEFT_WEIGHTS} holds no LoRA weights")
    out = PeftLoRA(str(d), cfg)
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {str(d)!r}: module {name!r} has lora_{set(ab).pop()} only")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter {str(d)!r}: module {name!r}: lora_A {tuple(A.shape)} and "
                             f"lora_B {tuple(B.shape)} do not share a rank (expected (r, d_in) and "
                             "(d_out, r))")
        r = A.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8)))
        declared = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", r))
        if declared != r:
            raise ValueError(f"adapter {str(d)!r}: module {name!r}: rank {r} in the weights but "
                             f"{declared} in {PEFT_CONFIG}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out.modules[name] = (A, B, r, alpha, scale)
    return out


def load_peft_experts(model: nn.Module, directories, *, freeze_experts: bool = True,
                      freeze_base: bool = True) -> nn.Module:
    """Attach the PEFT LoRA adapters in `directories` (a list of N ≥ 1 paths, same targets) as
    the N experts of one bem LoRA per target module of `model` (in place; returned).

    With N > 1 the model gets bem's chunk controller, which routes every 64-token chunk to an
    expert (its router, or an AR1 router set with ``model.bem_controller.set_macro_router``);
    ``freeze_experts`` leaves only the routing trainable. ``model.bem_peft_experts`` keeps each
    expert's source (path, config, per-module rank/alpha/dtype, folded ratio) for export_peft.
    """
    if isinstance(directories, (str, os.PathLike)) or not isinstance(directories, (list, tuple)) \
            or not directories:
        raise ValueError(f"directories: expected a non-empty list of PEFT adapter directories, "
                         f"got {directories!r}")
    adapters = [read_peft_lora(d) for d in directories]
    targets = set(adapters[0].modules)
    for a in adapters[1:]:
        if set(a.modules) != targets:
            missing = sorted(targets - set(a.modules))
            extra = sorted(set(a.modules) - targets)
            raise ValueError(f"adapter {a.path!r}: targets differ from {adapters[0].path!r}: "
                             f"missing {missing[:5]}, extra {extra[:5]} (every expert must adapt "
                             "the same modules)")
    if bem_modules(model) or getattr(model, "bem_config", None) is not None:
        raise ValueError("model: bem modules are already attached; detach() first")
    names = {n for n, _ in model.named_modules()}
    plan: dict[str, tuple[int, float]] = {}                         # module → (R, scale of exp. 0)
    for name in sorted(targets):
        if name not in names:
            raise ValueError(f"adapter {adapters[0].path!r}: target {name!r} is not a module of "
                             f"{type(model).__name__}")
        layer = model.get_submodule(name)
        try:
            d_in, d_out, _ = linear_shape(layer, name)
        except TypeError as exc:
            raise ValueError(f"adapter {adapters[0].path!r}: target {name!r}: {exc}") from None
        for a in adapters:
            A, B = a.modules[name][:2]
            if A.shape[1] != d_in or B.shape[0] != d_out:
                raise ValueError(f"adapter {a.path!r}: module {name!r}: lora_A {tuple(A.shape)} / "
                                 f"lora_B {tuple(B.shape)} do not fit the base layer (d_in={d_in}, "
                                 f"d_out={d_out}): an adapter of another base model?")
        R = max(a.modules[name][2] for a in adapters)
        plan[name] = (R, adapters[0].modules[name][4])
    groups: dict[tuple[int, float], list[str]] = {}
    for name, key in plan.items():
        groups.setdefault(key, []).append(name)
    specs = [AdapterSpec("lora", ["re:" + re.escape(n) for n in members],
                         {"rank": R, "alpha": scale * R})
             for (R, scale), members in sorted(groups.items(), key=lambda t: t[1][0])]
    attach(model, BemConfig(specs, num_experts=len(adapters)), freeze_base=freeze_base)
    provenance: dict[str, Any] = {"experts": []}
    with torch.no_grad():
        for e, a in enumerate(adapters):
            record = {"path": a.path, "config": a.config, "modules": {}}
            for name in sorted(targets):
                mod: LoRA = model.get_submodule(name)
                A, B, r, alpha, scale = a.modules[name]
                ratio = scale / mod.scale
                mod.lora_A[e].zero_()
                mod.lora_B[e].zero_()
                mod.lora_A[e, :r].copy_(A)
                mod.lora_B[e, :, :r].copy_(B.to(torch.float64).mul(ratio) if ratio != 1.0 else B)
                record["modules"][name] = {"r": r, "alpha": alpha, "ratio": ratio,
                                           "dtype": str(A.dtype).removeprefix("torch.")}
            provenance["experts"].append(record)
    if freeze_experts:
        for mod in bem_modules(model).values():
            for p in mod.parameters():
                p.requires_grad_(False)
    setattr(model, PROVENANCE_ATTR, provenance)
    log.info("bem: loaded %d PEFT adapters as experts of %d LoRA modules", len(adapters),
             len(targets))
    return model


def expert_tensors(model: nn.Module, expert: int) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The PEFT tensors and config of expert `expert` as loaded by :func:`load_peft_experts`
    (its own ranks, unfolded scale, original dtype), or None when the model has no record of it
    (or its LoRA modules no longer match the record)."""
    prov = getattr(model, PROVENANCE_ATTR, None)
    if not prov or not 0 <= expert < len(prov["experts"]):
        return None
    record = prov["experts"][expert]
    loras = {n: m for n, m in bem_modules(model).items() if isinstance(m, LoRA)}
    if set(loras) != set(record["modules"]):
        return None
    tensors = {}
    for name, info in record["modules"].items():
        m, r, ratio = loras[name], info["r"], info["ratio"]
        dtype = getattr(torch, info["dtype"])
        A = m.lora_A[expert, :r].detach()
        B = m.lora_B[expert, :, :r].detach()
        if ratio != 1.0:
            B = B.to(torch.float64).div(ratio)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous()
    config = dict(record["config"])
    config["inference_mode"] = True
    return tensors, config
