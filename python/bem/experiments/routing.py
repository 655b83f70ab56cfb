"""Routing by domain for the adaptation suite: the causal oracle (each chunk gets the expert of the
domain stated by the most recent document before it — the best any cache-safe router can do), and
a teacher-forced exact match used for learning curves and router rewards (one forward instead of a
generation loop: greedy decoding reproduces the reference exactly when every reference token is
the argmax given the reference prefix)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bem.experiments.training import lm_batch, training_ids
from bem.modules.control import CHUNK_SIZE
from bem.tasks import DOMAINS, Example, part_chunks

EXPERT_OF = {d: i for i, d in enumerate(DOMAINS)}


def causal_oracle(ex: Example, num_chunks: int | None = None) -> list[int]:
    """Expert per chunk of `ex`'s whole sequence: −1 (no adapter) for chunk 0; chunk c ≥ 1 takes
    the domain of the part whose document fills chunk c−1, else keeps chunk c−1's expert."""
    n = num_chunks if num_chunks is not None else -(-len(training_ids(ex)[0]) // CHUNK_SIZE)
    doc_chunk = {c: EXPERT_OF.get(d, -1) for c, d in part_chunks(ex.history, ex.domain)}
    out = [-1]
    for c in range(1, n):
        out.append(doc_chunk[c - 1] if c - 1 in doc_chunk else out[-1])
    return out


def oracle_experts(examples: Sequence[Example], num_chunks: int | None = None) -> torch.Tensor:
    """(B, C) int64 causal-oracle experts of a batch, C = the longest sequence's chunks."""
    n = num_chunks or max(-(-len(training_ids(ex)[0]) // CHUNK_SIZE) for ex in examples)
    return torch.tensor([causal_oracle(ex, n) for ex in examples], dtype=torch.int64)


def answer_spans(ex: Example) -> list[tuple[int, int]]:
    """(start, end) next-token target indices of every part's answer and EOS in
    training_ids(ex), in order (the last one is the current part's)."""
    _, is_answer = training_ids(ex)
    spans, start = [], None
    for i, a in enumerate(is_answer + [False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            spans.append((start - 1, i - 1))
            start = None
    return spans


@torch.no_grad()
def answer_correct(model, examples: Sequence[Example], *, experts: torch.Tensor | None = None,
                   batch_size: int = 32) -> np.ndarray:
    """(n,) bool: whether greedy decoding would reproduce each example's reference answer and EOS
    (teacher-forced argmax over the current part's answer tokens). experts: (n, C) per-chunk
    experts (routed models), else the model's own controls."""
    device = model.lm_head.weight.device
    out = []
    was = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, valid, targets, _ = lm_batch(batch, 0.0, device)
        control = None
        ctl = getattr(model, "bem_controller", None)
        if experts is not None and ctl is not None:
            pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
            e = experts[i:i + batch_size].to(device)
            C = pos.max().item() // CHUNK_SIZE + 1
            if e.shape[1] < C:
                e = torch.cat([e, e[:, -1:].expand(-1, C - e.shape[1])], 1)
            control = ctl.control(ids, pos, model.get_input_embeddings().weight, experts=e)
        pred = model(ids, valid=valid, control=control)[:, :-1].argmax(-1)
        for b, ex in enumerate(batch):
            start, end = answer_spans(ex)[-1]
            out.append(bool((pred[b, start:end] == targets[b, start:end]).all()))
    model.train(was)
    return np.array(out)


def teacher_forced_exact_match(model, examples: Sequence[Example], *,
                               experts: torch.Tensor | None = None) -> dict[str, float]:
    """Teacher-forced exact match overall, per domain and on the parts after a domain switch."""
    ok = answer_correct(model, examples, experts=experts)
    res = {"all": float(ok.mean())}
    for d in DOMAINS:
        idx = [i for i, ex in enumerate(examples) if ex.domain == d]
        if idx:
            res[d] = float(ok[idx].mean())
    sw = [i for i, ex in enumerate(examples) if ex.part > 0]
    if sw:
        res["switched"] = float(ok[sw].mean())
    return {k: round(v, 3) for k, v in res.items()}
