"""The embedded default: a seeded, versioned task suite generated in code, its byte tokenizer and
its per-example metrics (exact match, token F1, format validity)."""
from bem.tasks.metrics import FORMATS, exact_match, format_valid, normalize, score, token_f1
from bem.tasks.suite import SPLITS, SUITE_VERSION, TASKS, Example, generate
from bem.tasks.tokenizer import ByteTokenizer

__all__ = ["FORMATS", "SPLITS", "SUITE_VERSION", "TASKS", "ByteTokenizer", "Example", "exact_match",
           "format_valid", "generate", "normalize", "score", "token_f1"]
