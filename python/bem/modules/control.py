"""Per-chunk controls shared by bem modules: the cache-safety rule, the context that carries the
controls of one forward pass to every module, and the controller that computes them from token ids.

Cache-safety rule: the controls of chunk c (expert, rank mask, gates, γ/β) are a function of the
token ids of chunks < c only (plus request-level values fixed before generation). They are thus
known when chunk c's first token is decoded, and the K/V of a token never changes later.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_SIZE = 64
_TOKEN_EXPERTS = object()     # ChunkMemo key of ChunkControl.token_experts

_current: contextvars.ContextVar[ChunkControl | None] = contextvars.ContextVar("bem_control",
                                                                              default=None)


@dataclass(frozen=True)
class ChunkControl:
    """The controls of one forward pass.

    features: (B, C, d_ctrl) float — feature of chunk c, computed from tokens of chunks < c.
    token_chunk: (B, T) int64 — the chunk (index into C) of each token of the current input.
    experts: (B, C) int64 or None — expert of each chunk; −1 = no adapter (every chunk-routed
        module is the identity there).
    head_temperature: (B, G) float or None — V2's per-group gate temperatures, fixed per request.
    rank_budget: (B, C) int64 or None — AR1's rank budget k of each chunk: routed LoRA experts use
        their k most important rank components there (None: all of them).
    delta_scale: (B, C) float or None — AR1's bias scale of each chunk, multiplying the routed
        experts' delta (None: 1).
    temperature_from_chunk: (B,) int64 or None — first chunk where head_temperature applies
        (V2: the chunk of the query's first token; earlier chunks are unshaped). None: every chunk.
    memo: ChunkMemo or None — set by bem.engine on decode steps: modules keep their per-chunk
        values (gates, rank masks, γ/β) per row there and recompute them only when a row enters a
        new chunk (see :meth:`cached`).
    """

    features: torch.Tensor
    token_chunk: torch.Tensor
    experts: torch.Tensor | None = None
    head_temperature: torch.Tensor | None = None
    rank_budget: torch.Tensor | None = None
    delta_scale: torch.Tensor | None = None
    temperature_from_chunk: torch.Tensor | None = None
    memo: ChunkMemo | None = None

    def cached(self, module: nn.Module, name: str, compute):
        """``compute()`` — a module's per-token values derived from the controls only (a tensor
        or a tuple of tensors, each with the rows first) — or, on an engine decode step whose
        rows are all inside an already seen chunk, the values kept from that chunk's first step.
        Within a chunk they are constant (the cache-safety rule), so the result is the same."""
        if self.memo is None:
            return compute()
        return self.memo.get(module, name, compute)

    def per_token(self, per_chunk: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) → (B, T, ...): each token takes the value of its chunk."""
        B, T = self.token_chunk.shape
        idx = self.token_chunk.reshape(B, T, *([1] * (per_chunk.dim() - 2)))
        return torch.gather(per_chunk, 1, idx.expand(B, T, *per_chunk.shape[2:]))

    def token_experts(self) -> torch.Tensor | None:
        """(B·T,) int64 expert of every token, or None when no experts were chosen."""
        if self.experts is None:
            return None
        if self.memo is not None:
            return self.memo.get(_TOKEN_EXPERTS, "experts",
                                 lambda: self.per_token(self.experts).reshape(-1))
        return self.per_token(self.experts).reshape(-1)

    def keep_base(self, per_chunk: torch.Tensor, identity: float) -> torch.Tensor:
        """per_chunk (B, C, ...) with chunks routed to expert −1 ("no adapter") set to `identity`."""
        if self.experts is None:
            return per_chunk
        off = (self.experts[:, : per_chunk.shape[1]] < 0).reshape(
            *self.experts.shape[:1], per_chunk.shape[1], *([1] * (per_chunk.dim() - 2)))
        return per_chunk.masked_fill(off, identity)


class ChunkMemo:
    """Per-row store of modules' per-chunk values across decode steps (bem.engine).

    Before each decode forward the engine calls :meth:`begin` with the rows' slots (B,) and
    whether any row needs fresh values (it entered a new chunk, or its slot is new); then every
    :meth:`get` computes and stores (refresh) or returns the stored rows. Values are indexed by
    slot, so rows may join and leave between steps. Inference only: stored values carry no
    autograd graph."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ChunkMemo: capacity: expected a positive int, got {capacity!r}")
        self.capacity = capacity
        self._store: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._last: dict[tuple[int, str], object] = {}
        self.slots: torch.Tensor | None = None
        self.refresh = True
        self.same_rows = False

    def begin(self, slots: torch.Tensor, refresh: bool, same_rows: bool = False) -> None:
        """slots: (B,) the step's rows; refresh: recompute every value; same_rows: the rows are
        those of the previous step, in the same order (its values are returned as they are)."""
        self.slots, self.refresh = slots, bool(refresh)
        self.same_rows = bool(same_rows) and not self.refresh
        if not self.same_rows:
            self._last.clear()

    def clear(self) -> None:
        self._store.clear()
        self._last.clear()

    def get(self, key_owner: object, name: str, compute):
        key = (id(key_owner), name)
        if self.same_rows:
            last = self._last.get(key)
            if last is not None:
                return last
        bufs = self._store.get(key)
        if not self.refresh and bufs is not None:
            out = [b.index_select(0, self.slots) for b in bufs]
            value = out[0] if len(out) == 1 else tuple(out)
            self._last[key] = value
            return value
        value = compute()
        values = value if isinstance(value, tuple) else (value,)
        if bufs is None or any(b.shape[1:] != v.shape[1:] or b.dtype != v.dtype
                               for b, v in zip(bufs, values)):
            bufs = [v.new_zeros((self.capacity, *v.shape[1:])) for v in values]
            self._store[key] = bufs
        for b, v in zip(bufs, values):
            b.index_copy_(0, self.slots, v.detach())
        self._last[key] = value
        return value


@contextlib.contextmanager
def use_control(control: ChunkControl | None) -> Iterator[None]:
    """Make `control` the controls seen by bem modules inside the block (thread/task local)."""
    token = _current.set(control)
    try:
        yield
    finally:
        _current.reset(token)


def push_control(control: ChunkControl) -> contextvars.Token:
    """Make `control` active until :func:`pop_control` with the returned token (for hooks that
    open and close around a forward; prefer :func:`use_control`)."""
    return _current.set(control)


def pop_control(token: contextvars.Token) -> None:
    _current.reset(token)


def current_control(module: str, x: torch.Tensor) -> ChunkControl:
    """The active controls, checked against x (B, T, d); raises when none are set."""
    ctrl = _current.get()
    if ctrl is None:
        raise RuntimeError(f"{module}: needs per-chunk controls; call the model attached with "
                           "bem.attach (or run inside bem.modules.use_control(...))")
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(ctrl.token_chunk.shape):
        raise ValueError(f"{module}: x: expected shape (B, T, d) with (B, T) = "
                         f"{tuple(ctrl.token_chunk.shape)} (the controls' tokens), got {tuple(x.shape)}")
    return ctrl


def optional_control() -> ChunkControl | None:
    return _current.get()


class ChunkController(nn.Module):
    """Computes per-chunk features (and experts) from token ids, following the cache-safety rule.

    feature[c] = rms_norm(mean of the input embeddings of chunk c−1's tokens) for c ≥ 1, and a
    learned default for chunk 0. With ``num_experts > 1`` a linear router picks each chunk's expert
    as the argmax over its feature.

    Args:
        d_model: width of the input embeddings (= d_ctrl of the features).
        num_experts: experts to route between (1: no router).
        chunk_size: tokens per chunk (64: the KV block).
    """

    def __init__(self, d_model: int, num_experts: int = 1, chunk_size: int = CHUNK_SIZE):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_experts", num_experts), ("chunk_size", chunk_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ChunkController: {name}: expected a positive int, got {v!r}")
        self.d_model, self.num_experts, self.chunk_size = d_model, num_experts, chunk_size
        self.default = nn.Parameter(torch.zeros(d_model))
        self.router = nn.Linear(d_model, num_experts) if num_experts > 1 else None

    def features(self, ids: torch.Tensor, embedding: torch.Tensor, num_chunks: int) -> torch.Tensor:
        """ids: (B, S) int64 token history (anything past a sequence's end is ignored where it
        matters: it only feeds chunks after the sequence's last one); embedding: (V, d) weight.
        Returns (B, num_chunks, d) features in the embedding's dtype."""
        B, S = ids.shape
        cs = self.chunk_size
        need = (num_chunks - 1) * cs  # chunk c ≥ 1 reads tokens [(c−1)·cs, c·cs)
        if need > S:
            raise ValueError(f"ChunkController: ids: {num_chunks} chunks need the first {need} "
                             f"tokens, got {S}")
        default = self.default.to(embedding.dtype).expand(B, 1, self.d_model)
        if num_chunks == 1:
            return default
        rest = self.chunk_features(ids[:, :need].reshape(B * (num_chunks - 1), cs), embedding)
        return torch.cat([default, rest.reshape(B, num_chunks - 1, -1)], dim=1)

    def chunk_features(self, chunk_ids: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """(N, chunk_size) token ids of N chunks → (N, d) the features of the chunks that follow
        them (the same computation as :meth:`features`, for one new chunk at a time)."""
        emb = F.embedding(chunk_ids, embedding).mean(1)
        return F.rms_norm(emb, (emb.shape[-1],))

    def set_macro_router(self, router: nn.Module | None) -> None:
        """Route with `router` instead of the linear argmax router (which is removed): a module
        mapping features (B, C, d) to (experts (B, C) int64, rank_budget (B, C) int64 or None,
        delta_scale (B, C) or None), deterministic and causal over chunks (chunk c's action may
        only read features of chunks ≤ c), e.g. bem.router's AR1 router. Its parameters become
        part of the model's (budget, weights digest). None: no router at all (the experts must
        then be given explicitly, e.g. oracle routing)."""
        self.router = None
        self.macro_router = router

    def route(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                     torch.Tensor | None]:
        """(B, C, d) → (experts (B, C) int64 or None with one expert, rank_budget, delta_scale)."""
        macro = getattr(self, "macro_router", None)
        if macro is not None:
            return macro(features)
        if self.router is None:
            return None, None, None
        return self.router(features).argmax(-1), None, None

    def control(self, ids: torch.Tensor, positions: torch.Tensor, embedding: torch.Tensor, *,
                experts: torch.Tensor | int | None = None,
                head_temperature: torch.Tensor | None = None,
                temperature_from_chunk: torch.Tensor | None = None) -> ChunkControl:
        """Controls for the tokens at `positions` (B, T) of sequences whose history is `ids` (B, S)
        (S ≥ the start of each token's chunk). `experts` overrides the router: an int for every
        chunk, or (B, C) per chunk. `head_temperature` (B, G) and `temperature_from_chunk` (B,)
        are passed through to the ChunkControl."""
        num_chunks = int(positions.max()) // self.chunk_size + 1
        feats = self.features(ids, embedding, num_chunks)
        rank_budget = delta_scale = None
        if experts is None:
            chosen, rank_budget, delta_scale = self.route(feats)
        elif isinstance(experts, int):
            chosen = torch.full(feats.shape[:2], experts, dtype=torch.int64, device=ids.device)
        else:
            chosen = experts[:, :num_chunks].to(torch.int64)
        if chosen is not None and chosen.shape[1] < num_chunks:
            raise ValueError(f"experts: expected at least {num_chunks} chunks per row, got "
                             f"{tuple(chosen.shape)}")
        return ChunkControl(feats, (positions // self.chunk_size).to(torch.int64), chosen,
                            head_temperature, rank_budget=rank_budget, delta_scale=delta_scale,
                            temperature_from_chunk=temperature_from_chunk)
