"""Greedy generation for :class:`MultimodalLM`, without a cache (the reference: every step
recomputes the whole sequence) or through bem.kv's routing-keyed paged KV cache.

KV keys of image requests: the visual block (chunk 0) is keyed by the expert −1, and a digest of
the model's weights *and of the image's pixels* (:func:`visual_routing_key`); its 64 token ids are
a fixed placeholder, so the image digest is what tells two images apart. Two requests with the same
text and different images therefore never share the visual block, nor — since the manager chains
every block to its parent — any text block after it; the same image (and prefix) reuses them all.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from bem.kv import KVCache, RoutingKey, weights_digest
from bem.modules.control import CHUNK_SIZE
from bem.multimodal.model import MultimodalLM
from bem.multimodal.vision import NUM_VISUAL_TOKENS, image_digest

# Token id standing for every visual token in the KV manager (a byte never seen alone 64 times
# at a chunk start in text; the routing key's image digest is what identifies the image).
IMAGE_PLACEHOLDER = 0
_PERSON = b"bem.mm.kvkey"


def model_digest(model: MultimodalLM) -> bytes:
    """16-byte digest of everything a block's K/V depends on beyond tokens and image: all weights
    and buffers (base, adapters, vision tower, router centroids) and the bem config."""
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    h.update(weights_digest(model))
    cfg = getattr(model.lm, "bem_config", None)
    h.update(cfg.to_json().encode() if cfg is not None else b"")
    return h.digest()


def visual_routing_key(model_key: bytes, image_key: bytes, version: int = 0) -> RoutingKey:
    """Key of a visual block: expert −1, digest of (model digest, image digest)."""
    if not isinstance(image_key, bytes) or len(image_key) != 16:
        raise ValueError("image_key: expected the 16-byte image_digest of the image")
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    h.update(b"visual")
    h.update(model_key)
    h.update(image_key)
    return RoutingKey(-1, h.digest(), version)


def text_routing_key(model_key: bytes, expert: int, version: int = 0) -> RoutingKey:
    """Key of a text block computed under `expert` (−1: no adapter)."""
    return RoutingKey(int(expert), model_key, version)


def block_keys(model: MultimodalLM, model_key: bytes, image_key: bytes | None,
               experts: torch.Tensor | None, num_blocks: int) -> list[RoutingKey]:
    """Routing key of each of a request's first `num_blocks` blocks. experts: (C,) the request's
    chunk experts (None: −1 for text-only models without modules, 0 for static adapters)."""
    version = getattr(getattr(model.lm, "bem_config", None), "version", 0)
    default = 0 if getattr(model.lm, "bem_config", None) is not None else -1
    keys = []
    for c in range(num_blocks):
        if c == 0 and image_key is not None:
            keys.append(visual_routing_key(model_key, image_key, version))
        else:
            e = int(experts[c]) if experts is not None else default
            keys.append(text_routing_key(model_key, e, version))
    return keys


def _check_prompts(model: MultimodalLM, prompts) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    V = model.config.vocab_size
    out = []
    for i, p in enumerate(prompts):
        p = list(p)
        if not p or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in p):
            raise ValueError(f"prompts[{i}]: expected a non-empty list of ints in [0, {V})")
        out.append(p)
    return out


class _RowKV:
    """AttentionBatch.kv of one request (batch of one) over a KVCache."""

    def __init__(self, cache: KVCache, seq: int, slots: torch.Tensor):
        self.cache, self.seq, self.slots = cache, seq, slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))

    def read(self, layer: int):
        k, v = self.cache.read(layer, self.seq)           # (H, L, D)
        L = k.shape[1]
        pos = torch.arange(L, device=k.device)[None]
        ok = torch.ones(1, L, dtype=torch.bool, device=k.device)
        return k[None], v[None], pos, ok                   # head-major (1, H, L, D)


@torch.no_grad()
def generate(model: MultimodalLM, prompts: Sequence[Sequence[int]], images=None, *,
             max_new_tokens: int, cache: KVCache | None = None, eos_token_id: int | None = None,
             experts: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids after the image) by up to max_new_tokens.

    images: None (text only) or (B, 3, 32, 32) floats in [0, 1], one per prompt. cache: a
    bem.kv.KVCache (bem.model.new_kv_cache(model.lm, n)) kept across calls to reuse prefixes
    (visual blocks keyed by the image digest); None: recompute every step. experts: (B,) to
    override the image router's expert. Returns B lists of new token ids."""
    if not isinstance(model, MultimodalLM):
        raise TypeError(f"model: expected MultimodalLM, got {type(model).__name__}")
    rows = _check_prompts(model, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    imgs = model.check_images(images, len(rows))
    if imgs is None and model.router is not None:
        raise ValueError("images: required (the model routes its experts by the image)")
    offset = NUM_VISUAL_TOKENS if imgs is not None else 0
    longest = offset + max(len(r) for r in rows) + max_new_tokens
    if longest > model.config.max_positions:
        raise ValueError(f"max_new_tokens: image, prompt and new tokens reach {longest} positions, "
                         f"more than max_positions={model.config.max_positions}")
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a bem.kv.KVCache, got {type(cache).__name__}")
    was = model.training
    model.eval()
    try:
        if cache is None:
            return _uncached(model, rows, imgs, max_new_tokens, eos_token_id, experts)
        key = model_digest(model)
        return [_cached_row(model, cache, key, r, None if imgs is None else imgs[b:b + 1],
                            max_new_tokens, eos_token_id,
                            None if experts is None else experts[b:b + 1])
                for b, r in enumerate(rows)]
    finally:
        model.train(was)


def _uncached(model, rows, imgs, max_new, eos, experts):
    device = model.lm.lm_head.weight.device
    outs: list[list[int]] = [[] for _ in rows]
    while True:
        live = [b for b in range(len(rows)) if len(outs[b]) < max_new and
                not (eos is not None and outs[b] and outs[b][-1] == eos)]
        if not live:
            return outs
        hist = [rows[b] + outs[b] for b in live]
        T = max(len(h) for h in hist)
        ids = torch.zeros(len(live), T, dtype=torch.int64, device=device)
        valid = torch.zeros(len(live), T, dtype=torch.bool, device=device)
        for i, h in enumerate(hist):
            ids[i, :len(h)] = torch.tensor(h)
            valid[i, :len(h)] = True
        logits = model(ids, None if imgs is None else imgs[live], valid=valid,
                       experts=None if experts is None else experts[live])
        last = torch.tensor([len(h) - 1 for h in hist], device=device)
        for b, t in zip(live, logits[torch.arange(len(live)), last].argmax(-1).tolist()):
            outs[b].append(t)


def _cached_row(model: MultimodalLM, cache: KVCache, model_key: bytes, prompt: list[int],
                image: torch.Tensor | None, max_new: int, eos: int | None,
                experts: torch.Tensor | None) -> list[int]:
    device = model.lm.lm_head.weight.device
    visual = model.visual_tokens(image) if image is not None else None
    offset = NUM_VISUAL_TOKENS if visual is not None else 0
    reach = -(-(offset + len(prompt) + max_new) // CHUNK_SIZE)
    chunk_exp = model.chunk_experts(visual, reach, experts)
    keys = block_keys(model, model_key, image_digest(image) if image is not None else None,
                      None if chunk_exp is None else chunk_exp[0], reach)
    tokens = [IMAGE_PLACEHOLDER] * offset + prompt
    pre = cache.prefill(tokens, keys[:-(-len(tokens) // CHUNK_SIZE)])
    out: list[int] = []
    try:
        start = pre.cached_tokens
        slots = pre.slots
        while True:
            ids = torch.tensor([tokens[offset:]], dtype=torch.int64, device=device)
            emb = model.embeddings(ids, visual)
            n = emb.shape[1]
            pos = torch.arange(start, n, device=device)[None]
            control = model.control(emb, pos, visual, experts)
            logits = model.run(emb[:, start:], pos, torch.ones_like(pos, dtype=torch.bool),
                               control, _RowKV(cache, pre.seq, slots))
            t = int(logits[0, -1].argmax())
            out.append(t)
            if len(out) >= max_new or (eos is not None and t == eos):
                return out
            tokens.append(t)
            start = n
            slots = cache.extend(pre.seq, [t], keys[n // CHUNK_SIZE])
    finally:
        cache.free(pre.seq)
