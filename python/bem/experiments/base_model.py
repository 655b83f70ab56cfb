"""The pre-trained tiny base model of the embedded default: pre-trained by bem itself on the
suite mixture, cached in the user cache directory under a hash of its configuration, with a
manifest of SHA-256 checksums so a corrupt or mismatched entry is detected and rebuilt."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from bem.experiments.config import PretrainConfig
from bem.experiments.training import train_lm
from bem.model import BemForCausalLM, TransformerConfig
from bem.serialization import (MODEL_CONFIG, MODEL_WEIGHTS, atomic_write, load_model, save_model,
                               sha256_file)
from bem.tasks import SUITE_VERSION, generate

log = logging.getLogger("bem")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bem.base-model"
MANIFEST_VERSION = 1


def cache_dir() -> Path:
    """bem's user cache: $BEM_CACHE_DIR, else $XDG_CACHE_HOME/bem, else ~/.cache/bem."""
    if os.environ.get("BEM_CACHE_DIR"):
        return Path(os.environ["BEM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bem"


def cache_key(model: TransformerConfig, pretrain: PretrainConfig, suite_seed: int) -> str:
    """Hash of everything the pre-trained weights depend on (config, pre-training, suite)."""
    doc = {"model": model.to_dict(), "pretrain": pretrain.__dict__, "suite_version": SUITE_VERSION,
           "suite_seed": suite_seed, "manifest_version": MANIFEST_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _load_entry(entry: Path, key: str, model_cfg: TransformerConfig) -> BemForCausalLM:
    """The cached model, or ValueError saying what is wrong with the entry."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or \
            manifest.get("format_version") != MANIFEST_VERSION or manifest.get("key") != key:
        raise ValueError("manifest of another format or key")
    files = manifest.get("sha256")
    if not isinstance(files, dict) or set(files) != {MODEL_CONFIG, MODEL_WEIGHTS}:
        raise ValueError("manifest without the checksums of the model files")
    for name, digest in files.items():
        if not (entry / name).is_file() or sha256_file(entry / name) != digest:
            raise ValueError(f"{name}: checksum mismatch")
    model = load_model(entry)
    if model.config != model_cfg:
        raise ValueError("model config differs from the requested one")
    return model


def pretrain_base(model_cfg: TransformerConfig, pretrain: PretrainConfig, *, suite_seed: int = 0,
                  device: str | torch.device = "cpu", progress: bool = True
                  ) -> tuple[BemForCausalLM, list[float]]:
    """A freshly initialised model (seed pretrain.seed) trained on the suite's train split
    (every task, pretrain.n_per_task each). Returns (model in eval mode, loss per step)."""
    torch.manual_seed(pretrain.seed)
    model = BemForCausalLM(model_cfg).to(device)
    examples = generate("train", pretrain.n_per_task, seed=suite_seed)
    losses = train_lm(model, examples, steps=pretrain.steps, batch_size=1,
                      batch_tokens=pretrain.batch_tokens,
                      turns={"evidence_qa": pretrain.evidence_qa_turns},
                      lr=pretrain.lr, seed=pretrain.seed, warmup=pretrain.warmup,
                      weight_decay=pretrain.weight_decay, prompt_weight=pretrain.prompt_weight,
                      desc="pre-train base", progress=progress)
    return model, losses


def load_or_pretrain(model_cfg: TransformerConfig, pretrain: PretrainConfig, *,
                     suite_seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = True, cache: Path | None = None
                     ) -> tuple[BemForCausalLM, dict]:
    """The base model for (model_cfg, pretrain, suite_seed): from the cache when a valid entry
    exists, else pre-trained now and stored (written to a temporary folder, then renamed). An
    entry whose manifest, checksums or config do not match is logged, removed and rebuilt.
    Returns (model on `device`, manifest dict with "cached": whether it came from the cache)."""
    root = (cache if cache is not None else cache_dir()) / "base-models"
    key = cache_key(model_cfg, pretrain, suite_seed)
    hit = cached_base(root, key, model_cfg, device, "base model")
    if hit is not None:
        return hit
    start = time.perf_counter()
    model, losses = pretrain_base(model_cfg, pretrain, suite_seed=suite_seed, device=device,
                                  progress=progress)
    return store_base(root, key, model, device, "base model", {
        "model": model_cfg.to_dict(), "pretrain": pretrain.__dict__,
        "suite_version": SUITE_VERSION, "suite_seed": suite_seed,
        "train_seconds": time.perf_counter() - start, "loss_first": losses[0],
        "loss_last": losses[-1]})


def cached_base(root: Path, key: str, model_cfg: TransformerConfig, device: str | torch.device,
                what: str) -> tuple[BemForCausalLM, dict] | None:
    """(model on `device` in eval mode, manifest with "cached": True) of the valid cache entry
    root/key, or None; an invalid entry (manifest, checksums or config) is logged and removed."""
    entry = root / key
    if not entry.exists():
        return None
    try:
        model = _load_entry(entry, key, model_cfg)
        manifest = json.loads((entry / MANIFEST).read_text())
    except ValueError as exc:
        log.warning("%s cache entry %s is invalid (%s); rebuilding it", what, entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    log.info("%s: cache hit %s", what, entry)
    return model.to(device).eval(), {**manifest, "cached": True, "path": str(entry)}


def store_base(root: Path, key: str, model: BemForCausalLM, device: str | torch.device,
               what: str, fields: dict) -> tuple[BemForCausalLM, dict]:
    """Store a freshly trained base as the cache entry root/key: the model and a manifest (`fields`
    plus format, key and the files' SHA-256) written to a temporary folder, then renamed over any
    old entry. Returns (model on `device` in eval mode, manifest with "cached": False)."""
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model.to("cpu"), tmp)
    model.to(device)
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "key": key,
                **fields,
                "sha256": {n: sha256_file(tmp / n) for n in (MODEL_CONFIG, MODEL_WEIGHTS)}}
    atomic_write(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)
    log.info("%s: pre-trained in %.1f s, cached at %s", what, fields.get("train_seconds", 0.0),
             entry)
    return model.eval(), {**manifest, "cached": False, "path": str(entry)}
