"""What `bem serve` serves: named models (a base model, or one with a bem adapter and a pinned
expert or bem's own per-chunk routing), and how the command builds them — the embedded default's
pre-trained base (`bem-base`, from the cache or pre-trained now), a tiny random-init model for
tests (`bem-tiny`), and adapters saved with bem.serialization.save_pretrained."""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bem.model import BemForCausalLM, TransformerConfig
from bem.tasks import ByteTokenizer

log = logging.getLogger("bem")

PRESETS = ("default", "quick", "tiny")
BASE_NAME = "bem-base"
TINY_NAME = "bem-tiny"
# The tiny preset: the default's layout at a quarter of the width, randomly initialised (seed 0);
# its outputs are noise, but deterministic — for tests and smoke checks.
TINY_CONFIG = TransformerConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                max_positions=320, positions="learned")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ServedModel:
    """One name of the `model` field.

    name: what clients pass as `model` (letters, digits and `._:/-`, at most 128 characters).
    model: the BemForCausalLM that generates (several names may share one model: one engine
        serves them all). experts: None — the model's own routing (its router picks each 64-token
        chunk's expert; a base model has none), an expert id pinned for every chunk, or −1 for
        the base weights without the adapter. description: shown by /v1/models."""

    name: str
    model: BemForCausalLM
    experts: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"name: expected 1-128 letters, digits or '._:/-', got {self.name!r}")
        if not isinstance(self.model, BemForCausalLM):
            raise TypeError(f"model: expected BemForCausalLM, got {type(self.model).__name__}")
        if self.model.config.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"model: vocab_size {self.model.config.vocab_size} is smaller than "
                             f"the byte tokenizer's {ByteTokenizer.vocab_size}")
        ctl = getattr(self.model, "bem_controller", None)
        if self.experts is not None:
            if isinstance(self.experts, bool) or not isinstance(self.experts, int):
                raise TypeError(f"experts: expected an int or None, got "
                                f"{type(self.experts).__name__}")
            if ctl is None:
                raise ValueError(f"experts: model {self.name!r} has no chunk-routed bem modules")
            if not -1 <= self.experts < ctl.num_experts:
                raise ValueError(f"experts: expected an id in [-1, {ctl.num_experts}), got "
                                 f"{self.experts}")
        elif ctl is not None and ctl.num_experts > 1 and ctl.router is None and \
                getattr(ctl, "macro_router", None) is None:
            raise ValueError(f"experts: model {self.name!r} has {ctl.num_experts} experts and no "
                             f"router; pin one (experts=0..{ctl.num_experts - 1})")
        if not isinstance(self.description, str):
            raise TypeError(f"description: expected str, got {type(self.description).__name__}")

    @property
    def expert_label(self) -> str:
        """How the expert-usage metric labels this model's tokens."""
        if self.experts is not None:
            return "none" if self.experts == -1 else str(self.experts)
        return "router" if getattr(self.model, "bem_controller", None) is not None else "none"


def as_served_models(models) -> list[ServedModel]:
    """A BemForCausalLM (served as `bem-base`), a ServedModel, a sequence of them, or a mapping
    name → BemForCausalLM | ServedModel → the list of ServedModels (names unique)."""
    if isinstance(models, (BemForCausalLM, ServedModel)):
        models = [models]
    if isinstance(models, Mapping):
        items = []
        for name, m in models.items():
            if isinstance(m, ServedModel):
                if m.name != name:
                    raise ValueError(f"models: key {name!r} names a ServedModel called {m.name!r}")
                items.append(m)
            else:
                items.append(ServedModel(name, m))
        models = items
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or not models:
        raise TypeError("models: expected a BemForCausalLM, a ServedModel, or a non-empty list "
                        "or dict of them")
    out = [m if isinstance(m, ServedModel) else ServedModel(BASE_NAME, m) for m in models]
    bad = [type(m).__name__ for m in models if not isinstance(m, (ServedModel, BemForCausalLM))]
    if bad:
        raise TypeError(f"models: expected BemForCausalLM or ServedModel entries, got {bad[0]}")
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"models: duplicate names {dup}")
    return out


def base_model(preset: str, *, device: str | torch.device = "cpu",
               progress: bool = True) -> ServedModel:
    """The model `bem serve --preset` serves: "default" / "quick" — the pre-trained base of that
    `bem run` preset, from bem's cache or pre-trained now (minutes; cached afterwards), named
    `bem-base`; "tiny" — TINY_CONFIG randomly initialised (seed 0), named `bem-tiny`."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
    if preset == "tiny":
        torch.manual_seed(0)
        model = BemForCausalLM(TINY_CONFIG).to(device).eval()
        return ServedModel(TINY_NAME, model, description="tiny random-init model (tests)")
    from bem.experiments.base_model import load_or_pretrain
    from bem.experiments.config import RunConfig

    cfg = RunConfig.preset(preset)
    model, manifest = load_or_pretrain(cfg.model, cfg.pretrain, suite_seed=cfg.suite_seed,
                                       device=device, progress=progress)
    how = "cached" if manifest.get("cached") else "pre-trained now"
    log.info("bem serve: %s = the %s preset's base (%s, %s)", BASE_NAME, preset, how,
             manifest.get("path"))
    return ServedModel(BASE_NAME, model,
                       description=f"the embedded default's pre-trained base ({preset} preset)")


def adapter_models(base: BemForCausalLM, name: str, directory: str | Path) -> list[ServedModel]:
    """The names an adapter saved by bem.serialization.save_pretrained serves on a copy of
    `base`: `name` with the adapter's own routing, or — an adapter of E > 1 experts without a
    router — `name:expert-0` … `name:expert-{E-1}`, one per pinned expert."""
    from bem.serialization import from_pretrained

    model = from_pretrained(copy.deepcopy(base), directory).eval()
    ctl = getattr(model, "bem_controller", None)
    if ctl is not None and ctl.num_experts > 1 and ctl.router is None and \
            getattr(ctl, "macro_router", None) is None:
        return [ServedModel(f"{name}:expert-{e}", model, experts=e,
                            description=f"adapter {directory}, expert {e}")
                for e in range(ctl.num_experts)]
    return [ServedModel(name, model, description=f"adapter {directory}")]
