"""bem's built-in small causal transformer (Llama-style names) and its generation through the
routing-keyed paged KV cache."""
from bem.model.config import TransformerConfig
from bem.model.generation import generate, new_kv_cache
from bem.model.transformer import AttentionBatch, BemForCausalLM

__all__ = ["AttentionBatch", "BemForCausalLM", "TransformerConfig", "generate", "new_kv_cache"]
