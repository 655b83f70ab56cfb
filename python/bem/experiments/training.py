"""Training on the embedded suite: token layout of an example, task-balanced batches, and the
training loop used both to pre-train the base model and to train adapters (with V2's gate
shaper, its re-ranking and margin-alignment losses)."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bem.modules.gate_shaping import GateShapingOutput, evidence_inputs
from bem.modules.control import CHUNK_SIZE, ChunkControl
from bem.tasks import ByteTokenizer, Example, prompt_tokens, sequence_tokens
from bem.tasks.layout import document_length

log = logging.getLogger("bem")
TOKENIZER = ByteTokenizer()

# Weight of V2's auxiliary losses (passage re-ranking, margin alignment) next to the LM loss.
SHAPER_LOSS_WEIGHT = 0.1


def prompt_ids(ex: Example) -> list[int]:
    """Model input of a request: BOS, the earlier parts of its sequence (bem.tasks.layout), the
    prompt's bytes, SEP (the model answers after SEP)."""
    return prompt_tokens(ex.prompt, ex.history)


def training_ids(ex: Example) -> tuple[list[int], list[bool]]:
    """The whole sequence (BOS, earlier parts, prompt SEP answer EOS) and which of its tokens are
    answers (every part's answer and EOS)."""
    return sequence_tokens(ex.prompt, ex.answer, ex.history)


def evidence(ex: Example) -> tuple[str, list[str], int]:
    """(query, passages, index of the passage that holds the answer or −1) of an example. Evidence
    QA prompts are passage lines then "Q: …"; a documented part's passage is its document (the
    first chunk of the part) and its query the question after it; other tasks have their prompt
    as the only passage."""
    if ex.task in ("documented", "domain", "switch"):
        doc_len = document_length(ex.part)
        return ex.prompt[doc_len:], [ex.prompt[:doc_len].rstrip()], -1
    if ex.task != "evidence_qa":
        return ex.prompt, [ex.prompt], -1
    lines = ex.prompt.split("\n")
    passages = [ln for ln in lines if not ln.startswith(("Q:", "A:"))]
    query = next(ln for ln in lines if ln.startswith("Q:"))
    key = query.removeprefix("Q:").strip().removesuffix("?")
    gold = [i for i, p in enumerate(passages) if p.split(":", 1)[0] == key]
    return query, passages, gold[0] if len(gold) == 1 else -1


def query_start(ex: Example) -> int:
    """Position in prompt_ids(ex) of the query's first token (where V2's temperatures start)."""
    query, _, _ = evidence(ex)
    i = ex.prompt.rindex(query)
    return len(prompt_ids(ex)) - 1 - len(ex.prompt[i:].encode())


def shape_gates(model: nn.Module, examples: Sequence[Example]) -> GateShapingOutput | None:
    """V2: run the model's gate shaper on the examples' evidence (None without a shaper)."""
    shaper = getattr(model, "bem_gate_shaper", None)
    if shaper is None:
        return None
    ev = [evidence(ex) for ex in examples]
    inputs = evidence_inputs(model.get_input_embeddings().weight,
                             [TOKENIZER.encode(q) for q, _, _ in ev],
                             [[TOKENIZER.encode(p) for p in ps] for _, ps, _ in ev])
    return shaper(*inputs)


def batch_control(model: nn.Module, batch: Sequence[Example], ids: torch.Tensor,
                  experts: torch.Tensor | None = None
                  ) -> tuple[ChunkControl | None, GateShapingOutput | None]:
    """The controls of a teacher-forced forward over `batch` (ids (B, T) from lm_batch) and V2's
    shaper output: the gate shaper's temperatures (applied from the query's chunk, as in
    generation) and `experts` (B, C) when given. (None, None) when neither applies (the model
    then computes its own controls)."""
    shaped = shape_gates(model, batch)
    if shaped is None and experts is None:
        return None, None
    device = ids.device
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    control = model.bem_controller.control(
        ids, pos, model.get_input_embeddings().weight,
        experts=experts.to(device) if experts is not None else None,
        head_temperature=shaped.temperature if shaped is not None else None,
        temperature_from_chunk=None if shaped is None else torch.tensor(
            [query_start(ex) for ex in batch], device=device) // CHUNK_SIZE)
    return control, shaped


class TaskBatches:
    """Endless task-balanced batches: tasks take turns (in a seeded order, reshuffled every
    round), and each batch holds examples of one task, so short tasks are not padded to the
    length of evidence QA prompts.

    batch_tokens: when given, each task's batch size is chosen so that its batches hold about
    that many tokens (at least one example), so a step costs about the same for every task and
    short tasks see proportionally more examples; otherwise every batch has `batch_size`.
    turns: batches per round of each task (default 1 each), e.g. {"evidence_qa": 2}."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int,
                 batch_tokens: int | None = None, turns: dict[str, int] | None = None):
        if not examples:
            raise ValueError("examples: expected at least one training example")
        self.by_task: dict[str, list[Example]] = {}
        for ex in examples:
            self.by_task.setdefault(ex.task, []).append(ex)
        self.sizes = {task: batch_size for task in self.by_task}
        if batch_tokens is not None:
            for task, pool in self.by_task.items():
                mean = sum(len(training_ids(ex)[0]) for ex in pool[:256]) / min(len(pool), 256)
                self.sizes[task] = max(1, round(batch_tokens / mean))
        turns = turns or {}
        unknown = sorted(set(turns) - set(self.by_task))
        if unknown:
            raise ValueError(f"turns: tasks {unknown} have no training examples")
        self.turns = {task: turns.get(task, 1) for task in self.by_task}
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[str] = []

    def next(self) -> list[Example]:
        if not self.order:
            tasks = [t for t in sorted(self.by_task) for _ in range(self.turns[t])]
            self.order = [tasks[i] for i in torch.randperm(len(tasks), generator=self.gen)]
        task = self.order.pop()
        pool = self.by_task[task]
        idx = torch.randint(len(pool), (self.sizes[task],), generator=self.gen)
        return [pool[i] for i in idx.tolist()]


def lm_batch(examples: Sequence[Example], prompt_weight: float, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) int64, valid (B, T) bool, targets (B, T−1) int64, weights (B, T−1) float32):
    next-token targets weighted 1 on answers and their EOS, `prompt_weight` on the other tokens."""
    rows = [training_ids(ex) for ex in examples]
    T = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), T), TOKENIZER.PAD, dtype=torch.int64)
    weights = torch.zeros(len(rows), T - 1)
    for b, (r, is_answer) in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        target_is_answer = torch.tensor(is_answer[1:], dtype=torch.bool)
        weights[b, :len(r) - 1] = torch.where(target_is_answer, 1.0, prompt_weight)
    valid = ids != TOKENIZER.PAD
    return ids.to(device), valid.to(device), ids[:, 1:].to(device), weights.to(device)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 cross-entropy of each next-token prediction: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction="none").view(targets.shape)


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """The next-token loss of lm_batch's (targets, weights): Σ w·CE / Σ w."""
    return (token_nll(logits, targets) * weights).sum() / weights.sum()


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train_lm(model: nn.Module, examples: Sequence[Example], *, steps: int, batch_size: int,
             lr: float, seed: int, warmup: int = 0, weight_decay: float = 0.0,
             prompt_weight: float = 0.0, desc: str = "train", progress: bool = True,
             on_step: Callable[[int, float], None] | None = None,
             batch_tokens: int | None = None, turns: dict[str, int] | None = None,
             route: Callable[[Sequence[Example]], torch.Tensor] | None = None) -> list[float]:
    """Train the parameters of `model` that require grad with AdamW on task-balanced batches.

    The loss is the weighted next-token cross-entropy (see :func:`lm_batch`); with a V2 gate
    shaper, its temperatures drive the head gates of the forward, and the passage re-ranking
    cross-entropy (evidence QA) plus the margin-alignment loss are added with weight
    SHAPER_LOSS_WEIGHT. Returns the loss of every step. `on_step(step, loss)` runs after each.
    `batch_tokens` sizes each task's batches by tokens instead of `batch_size`, and `turns` gives
    a task more batches per round (TaskBatches). `route(batch) -> (B, C) int64` gives the experts
    of every chunk (routed experts trained under a fixed routing, e.g. the causal oracle).
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    batches = TaskBatches(examples, batch_size, seed, batch_tokens, turns)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, warmup, lr)
        batch = batches.next()
        ids, valid, targets, weights = lm_batch(batch, prompt_weight, device)
        control, shaped = batch_control(model, batch, ids,
                                        route(batch) if route is not None else None)
        logits = model(ids, valid=valid, control=control)[:, :-1]
        loss = weighted_lm_loss(logits, targets, weights)
        if shaped is not None:
            gold = torch.tensor([evidence(ex)[2] for ex in batch], device=device)
            aux = shaped.loss
            if bool((gold >= 0).any()):
                aux = aux + F.cross_entropy(shaped.scores[gold >= 0], gold[gold >= 0])
            loss = loss + SHAPER_LOSS_WEIGHT * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    log.info("%s: %d steps, loss %.4f -> %.4f", desc, steps, losses[0], losses[-1])
    return losses
