"""Cached Hugging Face generation with bem's per-chunk controls.

``model.generate(..., use_cache=True)`` (greedy, sampling, beam search, left-padded batches) and
hand-written decode loops over a ``transformers`` Cache (or the legacy tuple of (key, value) pairs)
work with every bem module because the controls follow the cache rule: chunk c's controls depend
only on the tokens of chunks < c. The forward hook of :func:`bem.attach` keeps each row's token
history in a :class:`RowHistory` attached to the generation's cache object (never global state),
and computes chunk c's feature and routing when the row's first token of chunk c arrives.

Positions are counted in real tokens: a row's position p is the number of tokens before it that
the 2-D ``attention_mask`` marks as real (left padding, and pads anywhere, are skipped), so a
left-padded row gets the same chunks as the row alone. Forwards without a cache use the same rule.

Refused with :class:`CacheStateError` (never answered wrongly): a cache holding tokens bem did not
see (made before bem was attached, or by another model), a cache whose length changed outside the
hooks bem installs, a batch whose row count differs from the cache's, and a non 2-D mask.
"""
from __future__ import annotations

import logging
import weakref

import torch

from bem.modules.control import ChunkControl, ChunkController

log = logging.getLogger("bem.hf")

STATE_ATTR = "_bem_rows"
_FIELDS = ("experts", "rank_budget", "delta_scale")


class CacheStateError(ValueError):
    """A cached forward bem cannot serve correctly (see the module docstring)."""


def cache_length(cache) -> int:
    """Tokens (pads included) a transformers Cache or legacy tuple holds."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if _is_legacy(cache):
        return 0 if len(cache) == 0 else int(cache[0][0].shape[-2])
    raise CacheStateError(f"bem: cache: expected a transformers Cache or a tuple of (key, value) "
                          f"pairs, got {type(cache).__name__}")


def _is_legacy(cache) -> bool:
    return isinstance(cache, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) >= 2 and isinstance(p[0], torch.Tensor)
        for p in cache)


def real_positions(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool mask of real tokens → (B, T) int64 positions counted in real tokens from
    `start` (B,) (0 by default); a pad takes the position of the real token before it (or start)."""
    pos = mask.to(torch.int64).cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
        return torch.maximum(pos, start[:, None]) if mask.numel() else pos
    return pos.clamp(min=0)


def compact(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids (B, T) with each row's real tokens moved to the front in order (pads → 0 at the end)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return torch.where(mask.gather(1, order), ids.gather(1, order), torch.zeros_like(ids))


def new_tokens_mask(attention_mask, ids: torch.Tensor, past: int) -> torch.Tensor:
    """The real-token mask (B, t) of the forward's new tokens from a 2-D attention mask over the
    past and new tokens (None: every token is real)."""
    B, t = ids.shape
    if attention_mask is None:
        return torch.ones(B, t, dtype=torch.bool, device=ids.device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise CacheStateError(
            "bem: attention_mask: per-chunk controls need a 2-D (batch, past + new tokens) mask or "
            f"none, got {type(attention_mask).__name__} of shape "
            f"{tuple(getattr(attention_mask, 'shape', ()))}")
    if attention_mask.shape[0] != B or attention_mask.shape[1] < t:
        raise CacheStateError(f"bem: attention_mask: expected shape ({B}, {past + t}) for {past} "
                              f"cached and {t} new tokens, got {tuple(attention_mask.shape)}")
    return attention_mask[:, -t:].to(ids.device) != 0


class RowHistory:
    """Token history and per-chunk controls of the rows of one generation (kept on its cache).

    ids (B, S) real tokens, n (B,) their count, done (B,) chunks whose controls are known,
    feats (B, C, d) chunk features, fields: routing outputs per chunk (experts, rank_budget,
    delta_scale), real (B, ≥ L) which cache position holds a real token (for crop), seen: L."""

    def __init__(self, controller: ChunkController, batch: int, device, dtype):
        self._controller = weakref.ref(controller)
        self.ids = torch.zeros(batch, 0, dtype=torch.int64, device=device)
        self.n = torch.zeros(batch, dtype=torch.int64, device=device)
        self.done = torch.zeros(batch, dtype=torch.int64, device=device)
        self.feats = torch.zeros(batch, 0, controller.d_model, dtype=dtype, device=device)
        self.fields: dict[str, torch.Tensor | None] = {}
        self.real = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.seen = 0
        self._pending: tuple | None = None

    @classmethod
    def pending(cls, controller: ChunkController, ids: torch.Tensor, real: torch.Tensor,
                embedding: torch.Tensor) -> RowHistory:
        """The history of a whole-sequence forward's rows, built only if the cache is ever
        continued (a training forward that returns a cache pays nothing)."""
        hist = cls(controller, ids.shape[0], ids.device, embedding.dtype)
        hist._pending = (ids.detach(), real, embedding)
        hist.seen = ids.shape[1]
        return hist

    def _ensure(self) -> None:
        if self._pending is not None:
            ids, real, embedding = self._pending
            self._pending, self.seen = None, 0
            self.advance(ids, real, embedding)

    @property
    def batch(self) -> int:
        return self.n.shape[0]

    def owned_by(self, controller: ChunkController) -> bool:
        return self._controller() is controller

    def clone(self) -> RowHistory:
        self._ensure()
        out = RowHistory.__new__(RowHistory)
        out._controller, out._pending = self._controller, None
        for k in ("ids", "n", "done", "feats", "real"):
            setattr(out, k, getattr(self, k).clone())
        out.fields = {k: (None if v is None else v.clone()) for k, v in self.fields.items()}
        out.seen = self.seen
        return out

    # ---- row bookkeeping that follows the cache (beam search, contrastive search, crop) ----
    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam reorder: row i becomes old row index[i])."""
        self._ensure()
        index = index.to(self.n.device, torch.int64)
        for k in ("ids", "n", "done", "feats", "real"):
            setattr(self, k, getattr(self, k).index_select(0, index))
        self.fields = {k: (None if v is None else v.index_select(0, index))
                       for k, v in self.fields.items()}

    def repeat_interleave(self, repeats: int) -> None:
        self.select(torch.arange(self.batch, device=self.n.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `tokens_to_remove` cache positions (transformers' Cache.crop: a
        negative count removes that many; a positive one is the new length)."""
        self._ensure()
        keep = self.seen + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove,
                                                                             self.seen)
        keep = max(keep, 0)
        self.seen = keep
        self.n = self.real[:, :keep].sum(1)
        # Chunk c's controls read tokens of chunks < c: those still fully present stay valid.
        self.done = torch.minimum(self.done, self.n // self._cs() + 1)

    # ---- the cache rule ----
    def _cs(self) -> int:
        return self.controller.chunk_size

    @property
    def controller(self) -> ChunkController:
        c = self._controller()
        if c is None:
            raise CacheStateError("bem: the model this cache was made with is gone")
        return c

    def advance(self, ids: torch.Tensor, real: torch.Tensor, embedding: torch.Tensor
                ) -> ChunkControl:
        """Append a forward's new tokens ids (B, t) with real-token mask (B, t) and return the
        controls of exactly these tokens."""
        self._ensure()
        B, t = ids.shape
        if B != self.batch:
            raise CacheStateError(f"bem: input_ids: the cache holds {self.batch} rows, the forward "
                                  f"has {B}")
        cs = self._cs()
        ids = ids.to(self.ids.device)
        real = real.to(self.ids.device)
        pos = real_positions(real, self.n)
        new_n = self.n + real.sum(1)
        cap = int(new_n.max()) if B else 0
        if cap > self.ids.shape[1]:
            grow = max(cap, 2 * self.ids.shape[1]) - self.ids.shape[1]
            self.ids = torch.cat([self.ids, self.ids.new_zeros(B, grow)], 1)
        rows, cols = real.nonzero(as_tuple=True)
        self.ids[rows, pos[rows, cols]] = ids[rows, cols]
        self.n = new_n
        if self.seen + t > self.real.shape[1]:
            grow = max(self.seen + t, 2 * self.real.shape[1]) - self.real.shape[1]
            self.real = torch.cat([self.real, self.real.new_zeros(B, grow)], 1)
        self.real[:, self.seen:self.seen + t] = real
        self.seen += t
        chunk = pos // cs
        hi = chunk.max(1).values
        lo = chunk.min(1).values
        if bool((hi >= self.done).any()):
            self._compute(hi, embedding)
        K = int((hi - lo).max()) + 1
        idx = torch.minimum(lo[:, None] + torch.arange(K, device=lo.device), hi[:, None])  # (B, K)
        d = self.feats.shape[-1]
        feats = self.feats.gather(1, idx[..., None].expand(B, K, d))
        fields = {k: (None if v is None else v.gather(1, idx)) for k, v in self.fields.items()}
        return ChunkControl(feats, chunk - lo[:, None], fields.get("experts"),
                            rank_budget=fields.get("rank_budget"),
                            delta_scale=fields.get("delta_scale"))

    @torch.no_grad()
    def _compute(self, hi: torch.Tensor, embedding: torch.Tensor) -> None:
        """Features and routing of chunks done[b]..hi[b] of every row b (their tokens are all in
        the history: chunk c reads chunk c − 1's 64 tokens)."""
        ctl, cs = self.controller, self._cs()
        B = self.batch
        C = int(hi.max()) + 1
        dev = self.feats.device
        if C > self.feats.shape[1]:
            grow = max(C, 2 * self.feats.shape[1]) - self.feats.shape[1]
            pad = self.feats.new_zeros(B, grow, self.feats.shape[2])
            self.feats = torch.cat([self.feats, pad], 1)
            self.fields = {k: (None if v is None else torch.cat([v, v.new_zeros(B, grow)], 1))
                           for k, v in self.fields.items()}
        cols = torch.arange(C, device=dev)
        sel = (cols[None] >= self.done[:, None]) & (cols[None] <= hi[:, None])       # (B, C)
        b_idx, c_idx = sel.nonzero(as_tuple=True)
        emb = embedding.detach()
        first = c_idx == 0
        if bool(first.any()):
            self.feats[b_idx[first], 0] = ctl.default.detach().to(self.feats.dtype)
        later = ~first
        if bool(later.any()):
            start = (c_idx[later] - 1) * cs
            window = start[:, None] + torch.arange(cs, device=dev)              # (N, cs)
            chunk_ids = self.ids[b_idx[later][:, None], window]
            self.feats[b_idx[later], c_idx[later]] = ctl.chunk_features(chunk_ids, emb).to(
                self.feats.dtype)
        # Route every row (a router may be row-aware; causal routers give chunk c the same
        # action whatever follows), keeping the new chunks' actions only.
        routed = ctl.route(self.feats[:, :C])
        for name, value in zip(_FIELDS, routed):
            if value is None:
                self.fields.setdefault(name, None)
                continue
            store = self.fields.get(name)
            if store is None:
                store = torch.zeros(B, self.feats.shape[1], dtype=value.dtype, device=dev)
                self.fields[name] = store
            store[:, :C] = torch.where(sel, value.to(store.dtype), store[:, :C])
        self.done = torch.maximum(self.done, hi + 1)


# ---- attaching the history to the cache object ----------------------------------------------

def get_history(cache) -> RowHistory | None:
    if cache is None:
        return None
    if _is_legacy(cache):
        return getattr(cache[0][0], STATE_ATTR, None) if len(cache) else None
    return getattr(cache, STATE_ATTR, None)


def _follow(cache, method: str, update) -> None:
    """Wrap the cache instance's `method` so the history follows it (beam reorder, crop...)."""
    original = getattr(cache, method, None)
    if original is None or getattr(original, "_bem_follows", False):
        return
    ref = weakref.ref(cache)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        c = ref()
        hist = getattr(c, STATE_ATTR, None) if c is not None else None
        if hist is not None:
            update(hist, *args, **kwargs)
        return out

    wrapped._bem_follows = True
    setattr(cache, method, wrapped)


def set_history(cache, hist: RowHistory) -> None:
    """Keep `hist` on `cache`: an attribute of a transformers Cache (whose reorder_cache,
    batch_select_indices, batch_repeat_interleave and crop then also update it), or of the first
    key tensor of a legacy tuple."""
    if _is_legacy(cache):
        if len(cache):
            setattr(cache[0][0], STATE_ATTR, hist)
        return
    setattr(cache, STATE_ATTR, hist)
    _follow(cache, "reorder_cache", lambda h, beam_idx: h.select(beam_idx))
    _follow(cache, "batch_select_indices", lambda h, indices: h.select(
        torch.as_tensor(indices).reshape(-1) if not isinstance(indices, torch.Tensor) or
        indices.dtype != torch.bool else indices.nonzero().reshape(-1)))
    _follow(cache, "batch_repeat_interleave", lambda h, repeats: h.repeat_interleave(int(repeats)))
    _follow(cache, "crop", lambda h, tokens_to_remove: h.crop(int(tokens_to_remove)))


def to_dynamic(legacy) -> object:
    """A legacy tuple of (key, value) pairs as a transformers DynamicCache (transformers 5 models
    accept only Cache objects)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[tuple(p[:2]) for p in legacy])


def to_legacy(cache) -> tuple:
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def check_continuation(hist: RowHistory | None, cache, controller: ChunkController) -> RowHistory:
    """The history of a non-empty cache, refusing what bem cannot serve correctly."""
    length = cache_length(cache)
    if hist is None:
        raise CacheStateError(
            f"bem: this cache holds {length} tokens that bem did not see (it was filled before "
            "bem.attach, by another model, or copied/rebuilt outside bem); per-chunk controls need "
            "each row's whole history: start the generation from an empty cache (or none)")
    if not hist.owned_by(controller):
        raise CacheStateError("bem: this cache was filled by another bem-attached model")
    if hist.seen != length:
        raise CacheStateError(
            f"bem: the cache holds {length} tokens but bem saw {hist.seen}: it was changed outside "
            "bem's hooks (only reorder_cache, batch_select_indices, batch_repeat_interleave and "
            "crop are followed); start from an empty cache")
    return hist

