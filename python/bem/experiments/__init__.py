"""bem's experiments: the pre-trained tiny base of the embedded default, equal-budget training of
the baseline and the variants, evaluation through the KV cache, acceptance validation and the
report — what `bem run` does (docs/run.md)."""
from bem.experiments.base_model import cache_dir, cache_key, load_or_pretrain
from bem.experiments.config import BASELINE, VARIANTS, PretrainConfig, RunConfig
from bem.experiments.evaluation import Evaluation, evaluate
from bem.experiments.runner import RunOutcome, resolve_device, run_experiment

__all__ = ["BASELINE", "VARIANTS", "Evaluation", "PretrainConfig", "RunConfig", "RunOutcome",
           "cache_dir", "cache_key", "evaluate", "load_or_pretrain", "resolve_device",
           "run_experiment"]
