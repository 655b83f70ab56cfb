"""V2 gate shaping: before generation, a tiny cross-encoder re-ranks the evidence passages of each
query; the margin and entropy of its scores set per-group positive temperatures for PT1's gates.
Runs once per request (no per-token cost); also gives the margin-alignment loss."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bem.modules import base


class TinyCrossEncoder(nn.Module):
    """Scores (query, passage) pairs jointly: each passage token attends to the query tokens (one
    head), the passage is mean-pooled over [token; attended query; product] and scored by an MLP.

    query: (B, Lq, d), query_mask (B, Lq) bool; passages: (B, P, Lp, d), passage_mask (B, P, Lp)
    bool → scores (B, P).
    """

    def __init__(self, d_model: int, d_hidden: int = 32):
        super().__init__()
        self.q = nn.Linear(d_model, d_hidden, bias=False)
        self.k = nn.Linear(d_model, d_hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(3 * d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, 1))

    def forward(self, query, query_mask, passages, passage_mask) -> torch.Tensor:
        B, P, Lp, d = passages.shape
        att = torch.einsum("bpld,bqd->bplq", self.q(passages), self.k(query)) / math.sqrt(
            self.q.out_features)
        att = att.masked_fill(~query_mask[:, None, None, :], float("-inf")).softmax(-1)
        ctx = torch.einsum("bplq,bqd->bpld", att, query)
        h = torch.cat([passages, ctx, passages * ctx], dim=-1)
        w = passage_mask.to(h.dtype)[..., None]
        pooled = (h * w).sum(2) / w.sum(2).clamp(min=1.0)
        return self.mlp(pooled).squeeze(-1)


@dataclass(frozen=True)
class GateShapingOutput:
    """temperature (B, G) > floor; scores (B, P) (−inf for absent passages); margin (B,) = top
    score − median score; entropy (B,) of softmax(scores); expected_margin (B,) predicted from the
    query alone; loss: the margin-alignment loss (mean squared error of expected vs actual)."""

    temperature: torch.Tensor
    scores: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor
    expected_margin: torch.Tensor
    loss: torch.Tensor


class GateShaping(nn.Module):
    """Per-request, per-group gate temperatures from evidence quality (V2).

    τ_g = floor + softplus(w_g · [margin, entropy] + b_g), initialised to τ = 1 (w = 0): positive
    with a gradient everywhere (unlike clamping a raw linear output). The temperatures are passed
    to generation (``head_temperature``) and divide PT1's gate logits in every gated layer, from
    the chunk of the query's first token on (``temperature_from``; earlier chunks stay unshaped,
    so their KV blocks are shared between questions over the same passages).

    Args:
        d_model: embedding width of the query/passage token vectors. num_groups: G (PT1 groups).
        floor: smallest temperature (> 0). d_hidden: cross-encoder width.
    """

    def __init__(self, d_model: int, num_groups: int, floor: float = 0.1, d_hidden: int = 32):
        super().__init__()
        self.d_model = base.positive_int("GateShaping", "d_model", d_model)
        self.num_groups = base.positive_int("GateShaping", "num_groups", num_groups)
        self.floor = base.positive_float("GateShaping", "floor", floor)
        if self.floor >= 1:
            raise ValueError(f"GateShaping: floor: expected < 1 (τ starts at 1), got {floor}")
        self.cross_encoder = TinyCrossEncoder(d_model, base.positive_int("GateShaping", "d_hidden",
                                                                         d_hidden))
        self.margin_predictor = nn.Linear(d_model, 1)
        self.temperature = nn.Linear(2, num_groups)
        nn.init.zeros_(self.temperature.weight)
        # softplus(b) = 1 − floor  ⇒  τ = 1 at init
        nn.init.constant_(self.temperature.bias, math.log(math.expm1(1.0 - self.floor)))

    def forward(self, query: torch.Tensor, query_mask: torch.Tensor, passages: torch.Tensor,
                passage_mask: torch.Tensor) -> GateShapingOutput:
        """query (B, Lq, d), query_mask (B, Lq) bool, passages (B, P, Lp, d), passage_mask
        (B, P, Lp) bool (a passage with no true entry is absent; each query needs one passage)."""
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"GateShaping: query: expected (B, Lq, {self.d_model}), got "
                             f"{tuple(query.shape)}")
        if passages.dim() != 4 or passages.shape[0] != query.shape[0] or \
                passages.shape[-1] != self.d_model:
            raise ValueError(f"GateShaping: passages: expected (B={query.shape[0]}, P, Lp, "
                             f"{self.d_model}), got {tuple(passages.shape)}")
        if tuple(query_mask.shape) != tuple(query.shape[:2]) or query_mask.dtype != torch.bool:
            raise ValueError(f"GateShaping: query_mask: expected bool {tuple(query.shape[:2])}, got "
                             f"{query_mask.dtype} {tuple(query_mask.shape)}")
        if tuple(passage_mask.shape) != tuple(passages.shape[:3]) or passage_mask.dtype != torch.bool:
            raise ValueError(f"GateShaping: passage_mask: expected bool {tuple(passages.shape[:3])}, "
                             f"got {passage_mask.dtype} {tuple(passage_mask.shape)}")
        present = passage_mask.any(-1)                                     # (B, P)
        if not bool(present.any(-1).all()) or not bool(query_mask.any(-1).all()):
            raise ValueError("GateShaping: every query needs at least one query token and one "
                             "passage")
        scores = self.cross_encoder(query, query_mask, passages, passage_mask)
        scores = scores.masked_fill(~present, float("-inf"))
        margin = scores.max(-1).values - _masked_median(scores, present)
        logp = scores.log_softmax(-1)
        entropy = -(logp.exp() * logp.masked_fill(~present, 0.0)).sum(-1)
        feats = torch.stack([margin, entropy], dim=-1)
        temperature = self.floor + F.softplus(self.temperature(feats))
        qm = query_mask.to(query.dtype)[..., None]
        pooled = (query * qm).sum(1) / qm.sum(1)
        expected = self.margin_predictor(pooled).squeeze(-1)
        return GateShapingOutput(temperature, scores, margin, entropy, expected,
                                 F.mse_loss(expected, margin))


def _masked_median(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Lower median of each row's present scores (torch.median's convention), batched."""
    n = present.sum(-1)
    srt = scores.masked_fill(~present, float("inf")).sort(-1).values
    return srt.gather(-1, ((n - 1) // 2)[:, None]).squeeze(-1)


def evidence_inputs(embedding: torch.Tensor, queries: list[list[int]],
                    passages: list[list[list[int]]]) -> tuple[torch.Tensor, ...]:
    """Token ids → GateShaping's inputs, embedded with `embedding` (V, d) (e.g. the model's input
    embedding weight). queries: B lists of ids; passages: per query, a list of id lists.
    Returns (query (B, Lq, d), query_mask, passages (B, P, Lp, d), passage_mask), zero-padded."""
    if len(queries) != len(passages) or not queries:
        raise ValueError(f"queries, passages: expected equal, non-zero lengths, got {len(queries)} "
                         f"and {len(passages)}")
    V = embedding.shape[0]
    for name, seqs in (("queries", queries), ("passages", [p for ps in passages for p in ps])):
        for s in seqs:
            if not s or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in s):
                raise ValueError(f"{name}: expected non-empty lists of token ids in [0, {V})")
    if any(not ps for ps in passages):
        raise ValueError("passages: every query needs at least one passage")
    B, dev = len(queries), embedding.device
    Lq = max(len(q) for q in queries)
    P = max(len(ps) for ps in passages)
    Lp = max(len(p) for ps in passages for p in ps)
    qi = torch.zeros(B, Lq, dtype=torch.int64, device=dev)
    qm = torch.zeros(B, Lq, dtype=torch.bool, device=dev)
    pi = torch.zeros(B, P, Lp, dtype=torch.int64, device=dev)
    pm = torch.zeros(B, P, Lp, dtype=torch.bool, device=dev)
    for b, (q, ps) in enumerate(zip(queries, passages)):
        qi[b, :len(q)] = torch.tensor(q)
        qm[b, :len(q)] = True
        for j, p in enumerate(ps):
            pi[b, j, :len(p)] = torch.tensor(p)
            pm[b, j, :len(p)] = True
    return F.embedding(qi, embedding), qm, F.embedding(pi, embedding), pm
