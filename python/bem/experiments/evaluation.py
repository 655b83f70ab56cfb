"""Evaluation of one system on held-out examples: greedy generation by bem.engine through the
routing-keyed KV cache, one request at a time (so questions over the same passages reuse the cached prefix),
per-example metrics, latency per generated token (p50/p95), peak memory and KV hit rate."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from bem.experiments.training import TOKENIZER, prompt_ids, query_start, shape_gates
from bem.engine import Engine, SamplingParams
from bem.model import new_kv_cache
from bem.modules.control import CHUNK_SIZE
from bem.tasks import Example, score

log = logging.getLogger("bem")

METRICS = ("exact_match", "token_f1", "format_valid")
# Blocks of the evaluation cache: enough for hundreds of 4-chunk prompts, so LRU eviction is rare.
KV_BLOCKS = 512


@dataclass
class Evaluation:
    """Per-example results (aligned with the examples) and the system's measurements.

    latency_ms_per_token: wall time of each request's decode steps (every token after the first)
    divided by their number, for the requests that generated ≥ 2 tokens — the cost the adapter
    adds to each generated token, not confounded by how long the answer is. ttft_ms: (n,) time
    to the first token of each request (V2's gate shaping, prefill, the first sampling).
    peak_memory_bytes: peak accelerator memory on CUDA; on CPU the bytes of parameters, buffers
    and KV-cache pool (see docs/run.md)."""

    predictions: list[str]
    scores: dict[str, list[float]]
    latency_ms_per_token: list[float]
    generated_tokens: int
    peak_memory_bytes: int
    kv_cache_hit_rate: float
    ttft_ms: list[float] = field(default_factory=list)

    @property
    def latency_p50_ms(self) -> float:
        return float(np.percentile(self.latency_ms_per_token, 50))

    @property
    def latency_p95_ms(self) -> float:
        return float(np.percentile(self.latency_ms_per_token, 95))

    @property
    def ttft_p50_ms(self) -> float:
        return float(np.percentile(self.ttft_ms, 50)) if self.ttft_ms else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Evaluation:
        return cls(**d)


def _static_bytes(model: nn.Module, cache) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    pool = cache.storage.data
    return n + pool.numel() * pool.element_size()


def _request(model: nn.Module, ex: Example, engine: Engine, max_new_tokens: int,
             route: Callable[[Example, int], torch.Tensor] | None = None,
             clock: Callable[[], float] = time.perf_counter) -> tuple[list[int], float, float]:
    """(generated tokens, seconds to the first token, seconds of the decode steps after it)."""
    start = clock()
    shaped = shape_gates(model, [ex])
    temp = shaped.temperature if shaped is not None else None
    ids = prompt_ids(ex)
    experts = None
    if route is not None:
        experts = route(ex, -(-(len(ids) + max_new_tokens) // CHUNK_SIZE))[0].tolist()
    params = SamplingParams(max_tokens=max_new_tokens, stop_token_ids=(TOKENIZER.EOS,))
    rid = engine.add_request(ids, params, experts=experts,
                             head_temperature=temp[0] if temp is not None else None,
                             temperature_from=query_start(ex) if temp is not None else None)
    first = None
    out: list[int] = []
    try:
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id != rid:
                    continue
                if first is None:
                    first = clock()
                if o.finished:
                    out = o.token_ids
    except BaseException:
        if engine.has_unfinished():
            engine.abort(rid)
        raise
    end = clock()
    return out, first - start, end - first


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], *, max_new_tokens: int,
             warmup: Sequence[Example] = (), desc: str = "evaluate", progress: bool = True,
             route: Callable[[Example, int], torch.Tensor] | None = None) -> Evaluation:
    """Greedy answers of `model` to `examples`, in order, with one KV cache kept across requests.

    `warmup` examples run first on a separate cache and are not measured. Latency is measured
    per request with a synchronised wall clock; the KV hit rate is bem.kv's (cached prompt tokens
    of full blocks / queried). `route(ex, num_chunks) -> (1, num_chunks)` int64 gives the experts of
    every chunk of a request explicitly (oracle routing); otherwise the model routes itself."""
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("examples: expected at least one example")
    model.eval()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if warmup:
        scratch = Engine(model, cache=new_kv_cache(model, KV_BLOCKS), max_batch_size=1)
        for ex in warmup:
            _request(model, ex, scratch, max_new_tokens, route)
        del scratch
    cache = new_kv_cache(model, KV_BLOCKS)
    engine = Engine(model, cache=cache, max_batch_size=1)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    preds: list[str] = []
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    latency: list[float] = []
    ttft: list[float] = []
    total = 0

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for ex in tqdm(examples, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out, first, decode = _request(model, ex, engine, max_new_tokens, route, clock)
        total += len(out)
        ttft.append(1000.0 * first)
        if len(out) >= 2:
            latency.append(1000.0 * decode / (len(out) - 1))
        text = TOKENIZER.decode(out)
        preds.append(text)
        for m, v in score(text, ex.answer, ex.fmt).items():
            scores[m].append(v)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _static_bytes(model, cache))
    hit = cache.manager.stats().hit_rate
    log.info("%s: %d examples, EM %.3f, latency p50 %.2f ms/token, KV hit rate %.3f", desc,
             len(examples), float(np.mean(scores["exact_match"])),
             float(np.percentile(latency, 50)), hit)
    if not latency:        # every answer was one token: no decode step to time
        log.warning("%s: every request stopped after its first token; latency per token is the "
                    "time to the first token", desc)
        latency = list(ttft)
    return Evaluation(preds, scores, latency, total, int(peak), float(hit), ttft)


def slice_of(ex: Example) -> str:
    """The report's slice of an example: its adaptation domain, or its task for general skills."""
    return ex.domain or ex.task


def per_task(examples: Sequence[Example], scores: dict[str, list[float]]) -> dict[str, dict]:
    """Slice (domain, "switched" for the parts after a domain switch, or task) → metric → mean
    (and "n")."""
    out: dict[str, dict] = {}
    slices = {s: [i for i, ex in enumerate(examples) if slice_of(ex) == s]
              for s in dict.fromkeys(slice_of(ex) for ex in examples)}
    switched = [i for i, ex in enumerate(examples) if ex.part > 0 and ex.domain]
    if switched:
        slices["switched"] = switched
    for task, idx in slices.items():
        out[task] = {m: float(np.mean([scores[m][i] for i in idx])) for m in scores}
        out[task]["n"] = len(idx)
    return out
