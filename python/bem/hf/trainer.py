"""Training a bem-attached Hugging Face model with ``transformers.Trainer`` (and torchrun DDP).

:class:`BemTrainer` is a ``transformers.Trainer`` whose checkpoints hold bem's adapter files
(bem_config.json + bem_adapter.safetensors, as :func:`bem.serialization.save_pretrained` writes
them, atomically and with SHA-256 digests) instead of the whole model, and which resumes
(``train(resume_from_checkpoint=...)``) and loads the best checkpoint from them. Only bem's
parameters train: :func:`bem.attach` freezes the base model, and the optimizer only gets
parameters with ``requires_grad``. Under ``torchrun --nproc_per_node N`` the Trainer runs DDP
(``ddp_backend="gloo"`` on CPU); see docs/hf.md.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn
from transformers import Trainer

from bem.attach import BemConfig
from bem.serialization import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, copy_adapter_tensors, load_file,
                               save_pretrained)

log = logging.getLogger("bem.hf")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the bem adapter weights saved in `directory` into `model`, which must already carry
    the same bem config (an attached model being trained). Refuses, changing nothing, a config
    that differs and tensors whose names or shapes do not match."""
    model = _unwrap(model)
    directory = Path(directory)
    config = getattr(model, "bem_config", None)
    if config is None:
        raise ValueError("model: no bem adapter attached (bem.attach first)")
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG} (not a bem checkpoint)")
    try:
        doc = json.loads(path.read_text())
        saved = BemConfig.from_json(json.dumps(doc["config"]))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a bem adapter config ({exc})") from None
    if saved != config:
        raise ValueError(f"{directory}: the checkpoint's bem config differs from the model's")
    copy_adapter_tensors(model, load_file(directory / ADAPTER_WEIGHTS)[0], directory)
    return model


class BemTrainer(Trainer):
    """``transformers.Trainer`` for a bem-attached model: checkpoints and ``save_model`` write
    bem's adapter files only; resuming and ``load_best_model_at_end`` read them back."""

    def __init__(self, model=None, *args, **kwargs):
        if model is None or getattr(_unwrap(model), "bem_config", None) is None:
            raise ValueError("BemTrainer: model: expected a model with bem attached (bem.attach "
                             "or bem.hf.peft_experts.load_peft_experts)")
        super().__init__(model, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = _unwrap(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        save_pretrained(model, output_dir)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            from bem.serialization import atomic_write

            atomic_write(Path(output_dir) / "base_config.json", config.to_json_string().encode())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        log.info("bem: saved the adapter to %s", output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None
                              ) -> None:
        load_adapter_weights(model if model is not None else self.model, resume_from_checkpoint)
        log.info("bem: resumed the adapter from %s", resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(self.model, self.state.best_model_checkpoint)
