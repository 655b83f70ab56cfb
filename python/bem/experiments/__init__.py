"""bem's experiments: the pre-trained tiny base of the embedded default, equal-budget training of
the baseline and the variants, evaluation through the KV cache, acceptance validation and the
report — what `bem run` does (docs/run.md)."""
from bem._lazy import lazy_exports

_EXPORTS = {
    "cache_dir": "base_model", "cache_key": "base_model", "load_or_pretrain": "base_model",
    "BASELINE": "config", "VARIANTS": "config", "PretrainConfig": "config", "RunConfig": "config",
    "Evaluation": "evaluation", "evaluate": "evaluation",
    "RunOutcome": "runner", "resolve_device": "runner", "run_experiment": "runner",
}
__all__ = sorted(_EXPORTS)
# Imported on first use, so that the `bem` command line loads the trainer only for `bem run`.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
