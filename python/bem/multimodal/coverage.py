"""Coverage analysis: how much of the model's attention, while it produces an answer, falls on the
evidence that holds the answer (the image patches of the asked cell or bar; the passage line with
the asked price) versus the distractors (the other cells or bars; the other lines).

Two measures are computed per example, teacher-forced on the reference answer:

* attention (chosen as the reported measure and the feature): the attention probabilities of the
  positions that predict the answer tokens (SEP … last answer token), averaged over those
  positions, the heads and the layers. coverage = mass(evidence) / (mass(evidence) +
  mass(distractors)); chance = the evidence's share of those tokens (0.25 here);
* gradient × input on the visual tokens: |∂ Σ log p(answer) / ∂v · v| summed per visual token,
  the evidence's share of the evidence + distractor total.

Attention is read by forward hooks on each layer's attention module (the model is not changed):
the hook recomputes q and k from the module's input under the same controls (adapters included),
so the probabilities are the ones the forward uses. :func:`region_mass` gives the per-region
attention of a batch, (B, regions), usable as a router or gate-shaper feature.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from bem.model.transformer import _rotate
from bem.multimodal.images import ImageExample
from bem.multimodal.model import MultimodalLM
from bem.multimodal.vision import NUM_VISUAL_TOKENS
from bem.tasks import ByteTokenizer

TOKENIZER = ByteTokenizer()


def example_tokens(ex: ImageExample) -> tuple[list[int], int, int]:
    """(ids, first answer-predicting index, end): BOS prompt SEP answer EOS, and the index range
    of the text positions whose next token is an answer token or EOS."""
    prompt = TOKENIZER.encode(ex.prompt, bos=True) + [TOKENIZER.SEP]
    ids = prompt + TOKENIZER.encode(ex.answer, eos=True)
    return ids, len(prompt) - 1, len(ids) - 1


def line_spans(ex: ImageExample, offset: int) -> list[tuple[int, int]]:
    """Absolute position range of each passage line (offset: position of the text's BOS)."""
    spans, at = [], offset + 1
    for line in ex.passage_lines:
        n = len(line.encode())
        spans.append((at, at + n))
        at += n + 1
    return spans


class _Capture:
    """Forward hooks that record each layer's attention probabilities (B, H, T, L)."""

    def __init__(self, model: MultimodalLM):
        self.probs: list[torch.Tensor] = []
        self.handles = [layer.self_attn.register_forward_hook(self._call, with_kwargs=True)
                        for layer in model.lm.model.layers]

    def _call(self, attn, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        batch = args[1] if len(args) > 1 else kwargs["batch"]
        self._hook(attn, (x, batch), output)

    def _hook(self, attn, args, output):
        x, batch = args
        cfg = attn.cfg
        B, T, _ = x.shape
        H, D = cfg.n_heads, cfg.head_dim
        q = attn.q_proj(x).view(B, T, H, D)
        k = attn.k_proj(x).view(B, T, H, D)
        if cfg.positions == "rotary":
            cos, sin = batch.rope(cfg.rope_theta, D, q.dtype)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        allowed = batch.valid[:, None, :] & (batch.positions[:, None, :] <=
                                             batch.positions[:, :, None])
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) / math.sqrt(D)
        self.probs.append(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).detach())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _batch(model: MultimodalLM, examples: Sequence[ImageExample]):
    device = model.lm.lm_head.weight.device
    rows = [example_tokens(ex) for ex in examples]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), TOKENIZER.PAD, dtype=torch.int64)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (r, _, _) in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        valid[b, :len(r)] = True
    images = torch.from_numpy(np.stack([ex.image() for ex in examples]))
    return ids.to(device), valid.to(device), images.to(device), rows


def _regions(ex: ImageExample) -> tuple[list[int], list[int]]:
    return list(ex.evidence_patches), list(ex.distractor_patches)


@torch.no_grad()
def region_mass(model: MultimodalLM, examples: Sequence[ImageExample]) -> torch.Tensor:
    """(B, 4) attention mass of the answer positions on the image's evidence patches, its
    distractor patches, the passage's evidence line and its other lines (mean over answer
    positions, heads and layers) — a per-request feature for a router or gate shaper."""
    if model.vision is None:
        raise ValueError("model: coverage of image evidence needs a vision tower")
    ids, valid, images, rows = _batch(model, examples)
    cap = _Capture(model)
    try:
        model(ids, images, valid=valid)
    finally:
        cap.close()
    probs = torch.stack(cap.probs).mean((0, 2))       # (B, L_query, L_key): layers, heads averaged
    out = torch.zeros(len(examples), 4)
    for b, (ex, (_, lo, hi)) in enumerate(zip(examples, rows)):
        p = probs[b, NUM_VISUAL_TOKENS + lo: NUM_VISUAL_TOKENS + hi].mean(0)   # (L,)
        ev, dis = _regions(ex)
        out[b, 0] = p[ev].sum()
        out[b, 1] = p[dis].sum()
        spans = line_spans(ex, NUM_VISUAL_TOKENS)
        for i, (s, e) in enumerate(spans):
            out[b, 2 if i == ex.evidence_line else 3] += p[s:e].sum().cpu()
    return out


def gradient_share(model: MultimodalLM, examples: Sequence[ImageExample]) -> np.ndarray:
    """(B,) share of gradient × input attribution on the evidence patches (of evidence +
    distractors)."""
    ids, valid, images, rows = _batch(model, examples)
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            visual = model.visual_tokens(images).detach().requires_grad_(True)
            emb = model.embeddings(ids, visual)
            B, L, _ = emb.shape
            pos = torch.arange(L, device=ids.device).expand(B, L)
            ok = torch.cat([torch.ones(B, NUM_VISUAL_TOKENS, dtype=torch.bool,
                                       device=ids.device), valid], 1)
            logits = model.run(emb, pos, ok, model.control(emb, pos, visual))
            logp = logits[:, NUM_VISUAL_TOKENS:].float().log_softmax(-1)
            total = logp.new_zeros(())
            for b, (r, lo, hi) in enumerate(rows):
                tgt = torch.tensor(r[lo + 1: hi + 1], device=ids.device)
                total = total + logp[b, lo:hi].gather(-1, tgt[:, None]).sum()
            (grad,) = torch.autograd.grad(total, visual)
    finally:
        model.train(was)
    attr = (grad * visual).sum(-1).abs().detach().cpu()       # (B, 64)
    out = []
    for b, ex in enumerate(examples):
        ev, dis = _regions(ex)
        e, d = float(attr[b, ev].sum()), float(attr[b, dis].sum())
        out.append(e / (e + d) if e + d > 0 else float("nan"))
    return np.array(out)


def coverage(model: MultimodalLM, examples: Sequence[ImageExample], *, batch_size: int = 32,
             correct: Sequence[float] | None = None) -> dict:
    """Per-example and aggregated coverage of `examples` (see the module docstring). correct:
    per-example exact match, to compare the coverage of right and wrong answers."""
    per: list[dict] = []
    for i in range(0, len(examples), batch_size):
        batch = list(examples[i:i + batch_size])
        mass = region_mass(model, batch)
        grad = gradient_share(model, batch)
        for b, ex in enumerate(batch):
            ev, dis, lev, ldis = (float(v) for v in mass[b])
            n_ev, n_dis = len(ex.evidence_patches), len(ex.distractor_patches)
            row = {"kind": ex.kind, "image_mass": ev + dis,
                   "image_coverage": ev / (ev + dis) if ev + dis > 0 else float("nan"),
                   "image_chance": n_ev / (n_ev + n_dis), "gradient_coverage": float(grad[b])}
            if ex.passage_lines:
                spans = line_spans(ex, 0)
                n_line = spans[ex.evidence_line][1] - spans[ex.evidence_line][0]
                n_all = sum(e - s for s, e in spans)
                row.update(text_coverage=lev / (lev + ldis) if lev + ldis > 0 else float("nan"),
                           text_chance=n_line / n_all)
            per.append(row)

    def mean(key, rows=per):
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else None

    agg = {"n": len(per), "image_coverage": mean("image_coverage"),
           "image_chance": mean("image_chance"), "gradient_coverage": mean("gradient_coverage"),
           "image_mass": mean("image_mass"), "text_coverage": mean("text_coverage"),
           "text_chance": mean("text_chance"),
           "above_chance": float(np.mean([r["image_coverage"] > r["image_chance"] for r in per])),
           "by_kind": {k: {"image_coverage": mean("image_coverage", [r for r in per
                                                                    if r["kind"] == k]),
                           "gradient_coverage": mean("gradient_coverage",
                                                     [r for r in per if r["kind"] == k])}
                       for k in dict.fromkeys(r["kind"] for r in per)}}
    if correct is not None:
        right = [r for r, c in zip(per, correct) if c >= 0.5]
        wrong = [r for r, c in zip(per, correct) if c < 0.5]
        agg["image_coverage_correct"] = mean("image_coverage", right)
        agg["image_coverage_wrong"] = mean("image_coverage", wrong)
    return {"per_example": per, "aggregate": agg}
