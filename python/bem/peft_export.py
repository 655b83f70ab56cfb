"""Export bem's plain LoRA experts in Hugging Face PEFT's adapter format (adapter_config.json +
adapter_model.safetensors), loadable by ``peft.PeftModel.from_pretrained`` and by vLLM."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from bem.attach import bem_modules
from bem.modules.lora import LoRA
from bem.serialization import atomic_write, save_file

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def export_peft(model: nn.Module, directory: str | os.PathLike, *, expert: int = 0,
                base_model_name_or_path: str | None = None) -> list[str]:
    """Write expert `expert` of every LoRA module of `model` as a PEFT LoRA adapter.

    PEFT's conventions: keys ``base_model.model.<module>.lora_A.weight`` (r, d_in) and
    ``.lora_B.weight`` (d_out, r); scaling lora_alpha / r (bem's LoRA scale); GPT-2's Conv1D
    layers need ``fan_in_fan_out``. Different ranks or alphas per module go to rank_pattern /
    alpha_pattern. Returns the exported module names.

    Experts loaded from PEFT adapters with :func:`bem.hf.peft_experts.load_peft_experts` are
    written as the adapter they came from: its own ranks (the zero padding dropped), alphas,
    scale convention (use_rslora) and dtype, and its adapter_config.json's other fields.

    Raises ValueError when the model has bem modules other than LoRA (their effect has no PEFT
    equivalent), none at all, `expert` out of range, or a mix of Linear and Conv1D targets.
    """
    found = bem_modules(model)
    others = sorted(n for n, m in found.items() if not isinstance(m, LoRA))
    if others:
        raise ValueError(f"export_peft: only plain LoRA modules export to PEFT; the model also has "
                         f"{others[:5]}")
    loras = {n: m for n, m in found.items() if isinstance(m, LoRA)}
    if not loras:
        raise ValueError("export_peft: the model has no bem LoRA modules")
    experts = {m.num_experts for m in loras.values()}
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < min(experts):
        raise ValueError(f"expert: expected an int in [0, {min(experts)}), got {expert!r}")
    transposed = {m.transposed for m in loras.values()}
    if len(transposed) != 1:
        raise ValueError("export_peft: PEFT's fan_in_fan_out is per adapter; the LoRA targets mix "
                         "nn.Linear and Conv1D layers")
    names = sorted(loras)
    from bem.hf.peft_experts import expert_tensors

    original = expert_tensors(model, expert)
    if original is not None:
        tensors, config = original
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
        _write(directory, tensors, config)
        return names
    first = loras[names[0]]
    tensors = {}
    for n in names:
        m = loras[n]
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lora_A[expert].detach().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lora_B[expert].detach().contiguous()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": names, "fan_in_fan_out": transposed.pop(), "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {n: loras[n].rank for n in names if loras[n].rank != first.rank},
        "alpha_pattern": {n: loras[n].alpha for n in names if loras[n].alpha != first.alpha},
    }
    _write(directory, tensors, config)
    return names


def _write(directory, tensors, config) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / PEFT_WEIGHTS, {"format": "pt"})
    atomic_write(directory / PEFT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
