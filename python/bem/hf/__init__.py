"""bem on Hugging Face transformers models (docs/hf.md):

- :mod:`bem.hf.generation` — cached ``generate`` with per-chunk controls (the row history the
  attach hook keeps on the generation's cache object);
- :mod:`bem.hf.peft_experts` — PEFT LoRA adapters as the routed experts of bem's LoRA;
- :mod:`bem.hf.trainer` — ``BemTrainer``, transformers.Trainer with bem adapter checkpoints;
- :mod:`bem.hf.prefix_cache` — ``PrefixStore``, prefix reuse across generate calls on bem.kv;
- :mod:`bem.hf.ddp_check` — torchrun DDP vs one process, as a command.

Importing this package does not import transformers; the submodules that need it do."""
from bem.hf.generation import CacheStateError, RowHistory

__all__ = ["CacheStateError", "RowHistory"]
