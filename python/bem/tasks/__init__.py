"""The embedded default: a seeded, versioned task suite generated in code (the pre-training
mixture and the adaptation domains), its chunk layout, its byte tokenizer and its per-example
metrics (exact match, token F1, format validity)."""
from bem.tasks.domains import DOMAINS, generate_adaptation
from bem.tasks.layout import CHUNK_TOKENS, part_chunks, prompt_tokens, sequence_tokens
from bem.tasks.metrics import FORMATS, exact_match, format_valid, normalize, score, token_f1
from bem.tasks.suite import SPLITS, SUITE_VERSION, TASKS, Example, generate
from bem.tasks.tokenizer import ByteTokenizer

__all__ = ["CHUNK_TOKENS", "DOMAINS", "FORMATS", "SPLITS", "SUITE_VERSION", "TASKS", "ByteTokenizer", "Example", "exact_match",
           "format_valid", "generate", "generate_adaptation", "normalize", "part_chunks", "prompt_tokens",
           "sequence_tokens", "score", "token_f1"]
