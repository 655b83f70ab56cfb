"""The generation engine: a scheduler over bem.kv's paged, routing-keyed KV cache that runs every
decoding request in one forward per step (continuous batching), prefills long prompts in pieces
so they never stall decoding rows, keeps each request's per-chunk controls in slot-indexed
buffers (computed once, when a chunk's first token is decoded), reads K/V through the block
tables with one gather per layer per step, and preempts (frees, later recomputes) a request when
the KV pool runs out."""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from bem.kv import KVCache, KVCacheFullError, RoutingKey, weights_digest
from bem.model.transformer import AttentionBatch, BemForCausalLM
from bem.modules.control import CHUNK_SIZE, ChunkControl, ChunkMemo

log = logging.getLogger("bem")

__all__ = ["Engine", "RequestOutput", "SamplingParams"]

# Rank budget and bias scale of rows without AR1 actions in a batch with some: the full rank
# (modules clamp it to their own) and 1.
_FULL_BUDGET = 2**30


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    max_tokens: new tokens at most (≥ 1). temperature: 0 → greedy (argmax); > 0 → sample from
    softmax(logits / temperature), restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (nucleus), from the request's own generator seeded by `seed` (or
    `generator`, shared with whoever passed it). stop_token_ids: the request finishes after
    producing one of them (it is included in the output)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or \
                self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an int >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or
                                       not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: expected an int >= 1 or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or
                              not 0 < p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1] or None, got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed: expected an int >= 0 or None, got {self.seed!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got "
                            f"{type(self.generator).__name__}")
        stops = self.stop_token_ids
        if isinstance(stops, int) and not isinstance(stops, bool):
            stops = (stops,)
        if isinstance(stops, (str, bytes)) or not isinstance(stops, (list, tuple)) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stops):
            raise ValueError(f"stop_token_ids: expected a tuple of token ids, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stops))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestOutput:
    """What one step produced for one request: its new tokens (`new_token_ids`, usually one),
    everything generated so far, and whether it finished ("stop": a stop token; "length":
    max_tokens; "abort": Engine.abort). `experts`: the expert each chunk of the request was
    routed to so far (−1: none), for models with chunk-routed modules (else None). A finished
    request's output is its last: the engine then forgets it (its id can be reused)."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    experts: list[int] | None = None


class _Request:
    __slots__ = ("id", "prompt", "params", "experts", "temperature", "from_chunk", "generated",
                 "state", "slot", "seq", "computed", "chunks_ready", "shaped", "generator",
                 "finish_reason", "callback", "arrival", "routes")

    def __init__(self, rid, prompt, params, experts, temperature, from_chunk, callback, arrival):
        self.id, self.prompt, self.params = rid, prompt, params
        self.experts, self.temperature, self.from_chunk = experts, temperature, from_chunk
        self.callback, self.arrival = callback, arrival
        self.generated: list[int] = []
        self.state = "waiting"
        self.slot = self.seq = None
        self.computed = 0          # tokens whose K/V is in the cache
        self.chunks_ready = 0      # chunks whose controls are in the slot buffers
        self.shaped: bytes | None = None
        self.finish_reason: str | None = None
        self.routes: list[int] | None = None     # the expert of each chunk so far
        self.generator = params.generator
        if self.generator is None and not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else
                                       torch.seed() % 2**63)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


class _PagedKV:
    """The K/V of one forward through the engine's cache: the valid new tokens' K/V go to their
    slots in one scatter per layer, and each row reads its whole context through its block table
    in one gather per layer (AttentionBatch.kv protocol)."""

    def __init__(self, data: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor | None,
                 tables: torch.Tensor, lengths: torch.Tensor, block_size: int):
        self.data, self.valid, self.bs = data, valid, block_size
        self.blocks = torch.div(slots, block_size, rounding_mode="floor")
        self.offsets = slots - self.blocks * block_size
        self.B, self.nb = tables.shape
        self.flat_tables = tables.reshape(-1)
        L = self.nb * block_size
        self.kpos = torch.arange(L, device=data.device).expand(self.B, L)
        self.kvalid = self.kpos < lengths[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        H, D = k.shape[-2:]
        if self.valid is None:
            k, v = k.reshape(-1, H, D), v.reshape(-1, H, D)
        else:
            k, v = k[self.valid], v[self.valid]
        self.data[layer][self.blocks, :, :, self.offsets] = torch.stack((k, v), 1)

    def read(self, layer: int):
        _, _, H, bs, D = self.data.shape[1:]
        kv = self.data[layer].index_select(0, self.flat_tables)      # (B·nb, 2, H, bs, D)
        kv = kv.view(self.B, self.nb, 2, H, bs, D).permute(2, 0, 3, 1, 4, 5)
        kv = kv.reshape(2, self.B, H, self.nb * bs, D)                 # head-major: one copy
        return kv[0], kv[1], self.kpos, self.kvalid


class Engine:
    """Continuous-batching generation for a BemForCausalLM (with or without bem modules).

    Args:
        model: the model; put in eval mode. Its weights must not change while requests are in
            flight (the KV routing keys hold their digest, taken here; call
            :meth:`refresh_weights` after changing them between requests).
        cache: a bem.kv.KVCache shaped for the model (bem.model.new_kv_cache), kept across
            engines to reuse prefixes; default: a new one of `num_blocks` blocks.
        num_blocks: blocks (64 tokens each) of a new cache; default: enough for max_batch_size
            requests of max_positions tokens.
        max_batch_size: requests running at once (slots); more wait in a FIFO queue.
        max_prefill_tokens: prompt tokens computed per step (chunked prefill); decoding rows run
            every step regardless.

    Use :meth:`add_request` and :meth:`step` (one scheduling step; returns each request's new
    tokens), or :meth:`generate` / :meth:`stream`. Bad requests raise in add_request and leave
    the others untouched.
    """

    def __init__(self, model: BemForCausalLM, *, cache: KVCache | None = None,
                 num_blocks: int | None = None, max_batch_size: int = 32,
                 max_prefill_tokens: int = 512):
        from bem.model.generation import _request_digest, new_kv_cache

        if not isinstance(model, BemForCausalLM):
            raise TypeError(f"model: expected BemForCausalLM, got {type(model).__name__}")
        for name, v in (("max_batch_size", max_batch_size),
                        ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        cfg = model.config
        self.model = model.eval()
        self.max_chunks = -(-cfg.max_positions // CHUNK_SIZE)
        if cache is None:
            if num_blocks is None:
                num_blocks = max_batch_size * self.max_chunks
            cache = new_kv_cache(model, num_blocks)
        elif not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a bem.kv.KVCache (see bem.model.new_kv_cache), got "
                            f"{type(cache).__name__}")
        st, p = cache.storage, model.lm_head.weight
        want = (cfg.n_layers, cfg.n_heads, cfg.head_dim, CHUNK_SIZE, p.dtype, p.device)
        have = (st.layers, st.heads, st.head_dim, st.block_size, st.dtype, st.device)
        if want != have:
            raise ValueError(f"cache: expected (layers, heads, head_dim, block_size, dtype, "
                             f"device) = {want} (the model's), got {have}")
        self.cache, self.manager = cache, cache.manager
        self.S, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.device, self.dtype = p.device, p.dtype
        self.ctl = getattr(model, "bem_controller", None)
        self._emb = model.get_input_embeddings().weight
        self._request_digest = _request_digest
        S, C = self.S, self.max_chunks
        self._tables = torch.zeros(S, C, dtype=torch.int64, device=self.device)
        if self.ctl is not None:
            d = self.ctl.d_model
            self._feats = torch.zeros(S, C, d, dtype=self._emb.dtype, device=self.device)
            self._experts = torch.zeros(S, C, dtype=torch.int64, device=self.device)
            self._budget = torch.full((S, C), _FULL_BUDGET, dtype=torch.int64, device=self.device)
            self._scale = torch.ones(S, C, dtype=self.dtype, device=self.device)
            self._from = torch.zeros(S, dtype=torch.int64, device=self.device)
        self._temp: torch.Tensor | None = None       # (S, G) once a request brings temperatures
        self._has_experts = [False] * S
        self._has_actions = [False] * S
        self._has_temp = [False] * S
        self._memo = ChunkMemo(S)
        self._memo_valid = [False] * S
        self._last_rows: list[int] = []
        self._last_decode = None
        self._free_slots = list(range(S - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.stats = {"steps": 0, "step_seconds": 0.0, "forward_seconds": 0.0,
                      "decode_tokens": 0, "prefill_tokens": 0, "preemptions": 0}
        self.refresh_weights()

    # ---- requests ---------------------------------------------------------------------------

    def refresh_weights(self) -> None:
        """Re-read the model's weights digest (after changing weights between requests)."""
        if self._running:
            raise RuntimeError("refresh_weights: requests are running; finish or abort them first")
        model = self.model
        self._weights = weights_digest(model)
        self._version = getattr(getattr(model, "bem_config", None), "version", 0)
        self._adapted = getattr(model, "bem_config", None) is not None
        self._unshaped = self._request_digest(model, self._weights, None, 0)
        self._memo.clear()
        self._last_rows = []
        self._last_decode = None

    def add_request(self, prompt, params: SamplingParams | None = None, *,
                    request_id: str | None = None, experts=None,
                    head_temperature: torch.Tensor | None = None,
                    temperature_from: int | None = None,
                    on_token: Callable[[int], None] | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError/TypeError (naming the argument) for
        a bad request, which is then not queued.

        prompt: token ids (≥ 1, each in [0, vocab)). experts: None (the model's router picks),
        an expert id for every chunk (−1: no adapter), or one id per chunk covering the prompt and
        max_tokens (e.g. oracle routing). head_temperature: (G,) V2 gate temperatures of this
        request, applied from the chunk of position `temperature_from` (default 0). on_token:
        called with each new token as it is produced (streaming)."""
        V = self.model.config.vocab_size
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise ValueError(f"prompt: expected a 1-D integer tensor, got {prompt.dtype} "
                                 f"{tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt: expected a list of token ids, got {type(prompt).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt: expected at least one token")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or
               not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt: token ids must be ints in [0, {V}), got {bad[0]!r}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if any(s >= V for s in params.stop_token_ids):
            raise ValueError(f"params.stop_token_ids: ids must be < {V}")
        reach = len(prompt) + params.max_tokens
        if reach > self.model.config.max_positions:
            raise ValueError(f"max_tokens: the prompt ({len(prompt)}) and max_tokens "
                             f"({params.max_tokens}) reach {reach} positions, more than "
                             f"max_positions={self.model.config.max_positions}")
        need = -(-reach // CHUNK_SIZE)
        if need > self.manager.num_blocks:
            raise ValueError(f"prompt: the request needs {need} KV blocks, more than the whole "
                             f"pool ({self.manager.num_blocks})")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or request_id in self._requests:
            raise ValueError(f"request_id: expected a new string id, got {request_id!r}")
        chunks = self._check_experts(experts, need)
        temp, from_chunk = self._check_temperature(head_temperature, temperature_from, prompt)
        if on_token is not None and not callable(on_token):
            raise TypeError("on_token: expected a callable or None")
        if chunks is None and self.ctl is not None and self.ctl.num_experts > 1 and \
                self.ctl.router is None and getattr(self.ctl, "macro_router", None) is None:
            raise ValueError("experts: required: the model routes between "
                             f"{self.ctl.num_experts} experts but has no router (oracle routing)")
        req = _Request(request_id, prompt, params, chunks, temp, from_chunk, on_token,
                       next(self._arrivals))
        self._requests[request_id] = req
        self._waiting.append(req)
        return request_id

    def _check_experts(self, experts, need: int) -> list[int] | None:
        if experts is None:
            return None
        if self.ctl is None:
            raise ValueError("experts: the model has no chunk-routed bem modules to route")
        E = self.ctl.num_experts
        if isinstance(experts, torch.Tensor):
            if experts.dim() != 1 or experts.dtype.is_floating_point or experts.dtype == torch.bool:
                raise ValueError(f"experts: expected an int, a 1-D integer tensor or a list, got "
                                 f"{experts.dtype} {tuple(experts.shape)}")
            experts = experts.tolist()
        if isinstance(experts, int) and not isinstance(experts, bool):
            experts = [experts] * need
        if not isinstance(experts, (list, tuple)) or any(
                isinstance(e, bool) or not isinstance(e, int) for e in experts):
            raise TypeError("experts: expected an int or a list of ints (one per chunk)")
        if len(experts) < need:
            raise ValueError(f"experts: expected at least {need} chunks (prompt and max_tokens), "
                             f"got {len(experts)}")
        bad = [e for e in experts if not -1 <= e < E]
        if bad:
            raise ValueError(f"experts: unknown expert {bad[0]}: expected ids in [-1, {E})")
        return list(experts[:need])

    def _check_temperature(self, temp, start, prompt):
        if temp is None:
            if start is not None:
                raise ValueError("temperature_from: given without head_temperature")
            return None, self.max_chunks
        if self.ctl is None:
            raise ValueError("head_temperature: the model has no gate-shaped bem modules")
        if not isinstance(temp, torch.Tensor) or temp.dim() != 1 or \
                not temp.is_floating_point() or not bool(torch.isfinite(temp).all()) or \
                not bool((temp > 0).all()):
            raise ValueError(f"head_temperature: expected a 1-D float tensor of finite positive "
                             f"temperatures, got {getattr(temp, 'shape', temp)!r}")
        if self._temp is not None and temp.numel() != self._temp.shape[1]:
            raise ValueError(f"head_temperature: expected {self._temp.shape[1]} groups (as the "
                             f"other requests), got {temp.numel()}")
        start = 0 if start is None else start
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(prompt):
            raise ValueError(f"temperature_from: expected a position in [0, {len(prompt)}], got "
                             f"{start!r}")
        return temp.detach().to(self.device, self.dtype), start // CHUNK_SIZE

    def abort(self, request_id: str) -> None:
        """Finish a request now (reason "abort"), freeing its KV blocks."""
        req = self._requests.get(request_id)
        if req is None or req.state == "finished":
            raise ValueError(f"request_id: no unfinished request {request_id!r}")
        if req.state == "waiting":
            self._waiting.remove(req)
        else:
            self._release(req)
            self._running.remove(req)
        req.state, req.finish_reason = "finished", "abort"
        del self._requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- one step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One scheduling step: admit waiting requests while slots and KV blocks allow, run one
        forward over every decoding request and one over this step's prompt pieces (at most
        max_prefill_tokens tokens), sample, and finish requests. Returns the requests that got
        tokens (or finished) in this step."""
        t0 = time.perf_counter()
        produced: dict[str, list[int]] = {}
        finished: list[_Request] = []
        decoding = [r for r in self._running if r.state == "decode"]
        if decoding:
            self._decode(decoding, produced, finished)
        pieces = self._schedule_prefill()
        if pieces:
            self._prefill(pieces, produced, finished)
        outs = []
        for rid, toks in produced.items():
            req = self._requests[rid]
            outs.append(RequestOutput(rid, toks, list(req.generated), req.state == "finished",
                                      req.finish_reason,
                                      None if req.routes is None else list(req.routes)))
        for req in finished:
            self._running.remove(req)
            del self._requests[req.id]
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - t0
        return outs

    def _schedule_prefill(self) -> list[tuple[_Request, int, int, torch.Tensor]]:
        """This step's prompt pieces (request, start, end, slots), at most max_prefill_tokens
        tokens, appended to the cache: first the requests already prefilling, then new ones
        admitted (in FIFO order) while slots, KV blocks and the token budget allow. A request
        admitted after another one's piece was appended may reuse that piece's full blocks: the
        prefill forward writes every row's K/V of a layer before any row reads it."""
        budget = self.max_prefill_tokens
        pieces: list = []
        for req in [r for r in self._running if r.state == "prefill"]:
            budget = self._schedule(req, budget, pieces)
            if budget <= 0:
                return pieces
        while budget > 0 and self._waiting and self._free_slots:
            req = self._waiting[0]
            if -(-(len(req.tokens) + 1) // CHUNK_SIZE) > self.manager.num_available_blocks() \
                    and self._running:
                break                            # wait for running requests to free blocks
            self._waiting.popleft()
            self._admit(req)
            budget = self._schedule(req, budget, pieces)
        return pieces

    def _admit(self, req: _Request) -> None:
        tokens = req.tokens
        req.slot = self._free_slots.pop()
        req.arrival = next(self._arrivals)       # admission order: preemption takes the newest
        self._memo_valid[req.slot] = False
        self._start_controls(req, tokens)
        req.seq = self.manager.new_sequence()
        n = len(tokens)
        keys = [self._key(req, c) for c in range(-(-(n - 1) // CHUNK_SIZE))]
        try:
            req.computed = self.manager.match_prefix(req.seq, tokens[:n - 1], keys)
        except BaseException:
            self.manager.free(req.seq)
            self._free_slots.append(req.slot)
            req.seq = req.slot = None
            raise
        self._refresh_table(req)
        req.state = "prefill"
        self._running.append(req)

    def _schedule(self, req: _Request, budget: int, pieces: list) -> int:
        """Append the request's next piece (≤ budget tokens); returns the budget left (0 when the
        pool is full and the request itself was preempted)."""
        tokens = req.tokens
        a = req.computed
        b = min(len(tokens), a + budget)
        keys = [self._key(req, c) for c in range(a // CHUNK_SIZE, (b - 1) // CHUNK_SIZE + 1)]
        while True:
            try:
                slots = self.manager.append(req.seq, tokens[a:b], keys)
                break
            except KVCacheFullError:
                victim = self._preempt(keep_alone=req)
                if victim is None:
                    raise
                if victim is req:                # the newest: the pool is full for now
                    return 0
        self._refresh_table(req)
        pieces.append((req, a, b, torch.from_numpy(slots).to(self.device)))
        return budget - (b - a)

    def _prefill(self, pieces, produced, finished) -> None:
        P = len(pieces)
        T = max(b - a for _, a, b, _ in pieces)
        ids = torch.zeros(P, T, dtype=torch.int64)
        pos = torch.zeros(P, T, dtype=torch.int64)
        valid = torch.zeros(P, T, dtype=torch.bool)
        for i, (req, a, b, _) in enumerate(pieces):
            ids[i, :b - a] = torch.tensor(req.tokens[a:b])
            pos[i] = torch.arange(a, a + T).clamp(max=b - 1)
            valid[i, :b - a] = True
        ids, pos, valid = ids.to(self.device), pos.to(self.device), valid.to(self.device)
        slots_rows = torch.tensor([r.slot for r, _, _, _ in pieces], device=self.device)
        ends = [b for _, _, b, _ in pieces]
        nb = -(-max(ends) // CHUNK_SIZE)
        kv = _PagedKV(self.cache.storage.data, torch.cat([s for *_, s in pieces]), valid,
                      self._tables.index_select(0, slots_rows)[:, :nb],
                      torch.tensor(ends, device=self.device), CHUNK_SIZE)
        reqs = [r for r, _, _, _ in pieces]
        control = self._control(reqs, slots_rows, pos, nb, memo=False)
        t = time.perf_counter()
        logits = self.model(ids, control=control, batch=AttentionBatch(pos, valid, kv))
        self.stats["forward_seconds"] += time.perf_counter() - t
        self.stats["prefill_tokens"] += int(valid.sum())
        done = [i for i, (req, a, b, _) in enumerate(pieces) if b == len(req.tokens)]
        for i, (req, a, b, _) in enumerate(pieces):
            req.computed = b
        if done:
            last = logits[torch.tensor(done), torch.tensor([pieces[i][2] - pieces[i][1] - 1
                                                            for i in done])]
            toks = self._sample([pieces[i][0] for i in done], last)
            for i, tok in zip(done, toks):
                req = pieces[i][0]
                req.state = "decode"
                self._emit(req, tok, produced, finished)

    def _decode(self, rows: list[_Request], produced, finished) -> None:
        # New chunks: their controls, computed once (the cache rule makes them final).
        fresh = [r for r in rows if r.computed // CHUNK_SIZE >= r.chunks_ready]
        if fresh:
            self._extend_controls(fresh)
        while True:
            try:
                slots = self.manager.append_many(
                    [r.seq for r in rows], [[r.generated[-1]] for r in rows],
                    [self._key(r, r.computed // CHUNK_SIZE) for r in rows])
                break
            except KVCacheFullError:
                victim = self._preempt()
                if victim is None:
                    raise
                rows = [r for r in rows if r is not victim]
                if not rows:
                    return
        for r in rows:
            if r.computed % CHUNK_SIZE == 0:
                self._refresh_table(r)
        B = len(rows)
        dev = self.device
        slots_rows = torch.tensor([r.slot for r in rows], device=dev)
        pos = torch.tensor([[r.computed] for r in rows], device=dev)
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=dev)
        nb = max(r.computed for r in rows) // CHUNK_SIZE + 1
        refresh = any(not self._memo_valid[r.slot] or r.computed % CHUNK_SIZE == 0 for r in rows)
        order = [r.slot for r in rows]
        same = order == self._last_rows
        self._memo.begin(slots_rows, refresh, same_rows=same)
        self._last_rows = order
        if same and not refresh and self._last_decode is not None:
            # The previous step's rows, none entering a chunk: its controls (features, experts,
            # budgets, token chunks) and block tables are this step's too.
            control, tables = self._last_decode
        else:
            control = self._control(rows, slots_rows, pos, nb, memo=True)
            tables = self._tables.index_select(0, slots_rows)[:, :nb]
            self._last_decode = (control, tables)
        kv = _PagedKV(self.cache.storage.data,
                      torch.from_numpy(slots[0] if B == 1 else _concat(slots)).to(dev), None,
                      tables, pos[:, 0] + 1, CHUNK_SIZE)
        t = time.perf_counter()
        logits = self.model(ids, control=control, batch=AttentionBatch(
            pos, torch.ones(B, 1, dtype=torch.bool, device=dev), kv))
        self.stats["forward_seconds"] += time.perf_counter() - t
        self.stats["decode_tokens"] += B
        for r in rows:
            self._memo_valid[r.slot] = True
            r.computed += 1
        for r, tok in zip(rows, self._sample(rows, logits[:, 0])):
            self._emit(r, tok, produced, finished)

    # ---- controls, keys, tables ------------------------------------------------------------

    def _start_controls(self, req: _Request, tokens: list[int]) -> None:
        """Controls of every chunk of the request's known tokens (at admission)."""
        s = req.slot
        C = -(-len(tokens) // CHUNK_SIZE)
        req.chunks_ready = C
        self._has_temp[s] = req.temperature is not None
        self._has_experts[s] = self._has_actions[s] = False
        if req.temperature is not None:
            if self._temp is None:
                self._temp = torch.ones(self.S, req.temperature.numel(), dtype=self.dtype,
                                        device=self.device)
            self._temp[s] = req.temperature
        if self.ctl is None:
            return
        self._from[s] = req.from_chunk
        if req.shaped is None and req.temperature is not None:
            req.shaped = self._request_digest(self.model, self._weights, req.temperature[None], 0)
        ids = torch.tensor([tokens], device=self.device)
        feats = self.ctl.features(ids, self._emb, C)
        self._feats[s, :C] = feats[0]
        if req.experts is not None:
            self._experts[s, :C] = torch.tensor(req.experts[:C], device=self.device)
            self._has_experts[s] = True
        else:
            experts, budget, scale = self.ctl.route(self._feats[s:s + 1, :C])
            self._set_route(s, slice(0, C), experts, budget, scale, 0)
        req.routes = self._experts[s, :C].tolist() if self._has_experts[s] else None

    def _extend_controls(self, rows: list[_Request]) -> None:
        """Controls of the chunk each row's next token opens (once per chunk, batched)."""
        for r in rows:
            if r.computed // CHUNK_SIZE != r.chunks_ready:
                raise AssertionError("bem.engine: a chunk's controls were skipped")
        if self.ctl is not None:
            c = [r.chunks_ready for r in rows]
            prev = torch.tensor([r.tokens[(ci - 1) * CHUNK_SIZE: ci * CHUNK_SIZE]
                                 for r, ci in zip(rows, c)], device=self.device)
            f = self.ctl.chunk_features(prev, self._emb)
            slots = torch.tensor([r.slot for r in rows], device=self.device)
            chunk = torch.tensor(c, device=self.device)
            self._feats[slots, chunk] = f
            self._route_many(rows, c)
            routed = self._experts[slots, chunk].tolist()
            for r, e in zip(rows, routed):
                if r.routes is not None:
                    r.routes.append(e)
        for r in rows:
            r.chunks_ready += 1

    def _route_many(self, rows: list[_Request], chunks: list[int]) -> None:
        routed = []
        for r, c in zip(rows, chunks):
            if r.experts is not None:
                self._experts[r.slot, c] = r.experts[c]
            else:
                routed.append((r, c))
        if not routed:
            return
        slots = torch.tensor([r.slot for r, _ in routed], device=self.device)
        Cm = max(c for _, c in routed) + 1
        experts, budget, scale = self.ctl.route(self._feats.index_select(0, slots)[:, :Cm])
        for i, (r, c) in enumerate(routed):
            self._set_route(r.slot, slice(c, c + 1), experts, budget, scale, i)

    def _set_route(self, s: int, chunks: slice, experts, budget, scale, i: int) -> None:
        self._has_experts[s] = experts is not None
        self._has_actions[s] = budget is not None or scale is not None
        if experts is not None:
            self._experts[s, chunks] = experts[i, chunks]
        if budget is not None:
            self._budget[s, chunks] = budget[i, chunks]
        if scale is not None:
            self._scale[s, chunks] = scale[i, chunks].to(self.dtype)

    def _control(self, rows: list[_Request], slots: torch.Tensor, pos: torch.Tensor, nb: int,
                 memo: bool) -> ChunkControl | None:
        if self.ctl is None:
            return None
        pick = lambda t: t.index_select(0, slots)[:, :nb]   # noqa: E731
        has = [self._has_experts[r.slot] for r in rows]
        experts = None
        if any(has):
            experts = pick(self._experts)
            if not all(has):       # one expert, no router: expert 0 is the adapter itself
                experts = torch.where(torch.tensor(has, device=self.device)[:, None], experts, 0)
        actions = any(self._has_actions[r.slot] for r in rows)
        shaped = any(self._has_temp[r.slot] for r in rows)
        return ChunkControl(
            pick(self._feats), torch.div(pos, CHUNK_SIZE, rounding_mode="floor"), experts,
            self._temp.index_select(0, slots) if shaped else None,
            rank_budget=pick(self._budget) if actions else None,
            delta_scale=pick(self._scale) if actions else None,
            temperature_from_chunk=self._from.index_select(0, slots) if shaped else None,
            memo=self._memo if memo else None)

    def _key(self, req: _Request, chunk: int) -> RoutingKey:
        if self.ctl is not None and self._has_experts[req.slot]:
            e = int(self._experts[req.slot, chunk])
        else:
            e = 0 if self._adapted else -1
        shaped = req.shaped is not None and chunk >= req.from_chunk
        return RoutingKey(e, req.shaped if shaped else self._unshaped, self._version)

    def _refresh_table(self, req: _Request) -> None:
        table = self.manager.block_table(req.seq)
        if len(table):
            self._tables[req.slot, :len(table)] = torch.from_numpy(table).to(self.device)

    # ---- sampling, finishing, preemption ---------------------------------------------------

    def _sample(self, rows: list[_Request], logits: torch.Tensor) -> list[int]:
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.greedy:
                continue
            z = logits[i].to(torch.float64) / p.temperature
            if p.top_k is not None:
                kth = z.topk(min(p.top_k, z.numel())).values[-1]
                z = z.masked_fill(z < kth, float("-inf"))
            probs = z.softmax(-1)
            if p.top_p is not None and p.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                cum = sorted_p.cumsum(0)
                drop = cum - sorted_p >= p.top_p          # keep the smallest set reaching top_p
                probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
            out[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return out

    def _emit(self, req: _Request, tok: int, produced, finished) -> None:
        req.generated.append(tok)
        produced.setdefault(req.id, []).append(tok)
        if req.callback is not None:
            req.callback(tok)
        p = req.params
        if tok in p.stop_token_ids or len(req.generated) >= p.max_tokens:
            req.finish_reason = "stop" if tok in p.stop_token_ids else "length"
            req.state = "finished"
            self._release(req)
            finished.append(req)

    def _release(self, req: _Request) -> None:
        if req.seq is not None:
            self.manager.free(req.seq)
        if req.slot is not None:
            self._memo_valid[req.slot] = False
            self._free_slots.append(req.slot)
        req.seq = req.slot = None

    def _preempt(self, keep_alone: _Request | None = None) -> _Request | None:
        """Free the most recently admitted running request and queue it first, to be recomputed
        from its prompt and generated tokens. None when nothing can be freed (no running request,
        or `keep_alone` is the only one)."""
        candidates = [r for r in self._running if r.state in ("prefill", "decode")]
        if not candidates or (len(candidates) == 1 and candidates[0] is keep_alone):
            return None
        victim = max(candidates, key=lambda r: r.arrival)
        self._release(victim)
        self._running.remove(victim)
        victim.state, victim.computed, victim.chunks_ready = "waiting", 0, 0
        self._waiting.appendleft(victim)
        self.stats["preemptions"] += 1
        log.debug("bem.engine: preempted %s (KV pool full)", victim.id)
        return victim

    # ---- conveniences ------------------------------------------------------------------------

    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams]
                 | None = None, *, experts: Sequence | None = None,
                 head_temperature: Sequence | None = None,
                 temperature_from: Sequence | None = None) -> list[list[int]]:
        """Run the prompts to completion (with whatever else is queued); returns each prompt's
        new tokens. Per-prompt params/experts/head_temperature/temperature_from may be lists."""
        n = len(prompts)

        def each(v, name):
            # one value for every prompt: None, SamplingParams, an int (expert / position) or a
            # tensor (head temperatures, or experts per chunk); else a sequence, one per prompt
            if v is None or isinstance(v, (SamplingParams, int, torch.Tensor)):
                return [v] * n
            if len(v) != n:
                raise ValueError(f"{name}: expected one per prompt ({n}), got {len(v)}")
            return list(v)

        reqs: list[_Request] = []
        try:
            for p, sp, e, t, f in zip(prompts, each(params, "params"), each(experts, "experts"),
                                      each(head_temperature, "head_temperature"),
                                      each(temperature_from, "temperature_from")):
                reqs.append(self._requests[self.add_request(p, sp, experts=e, head_temperature=t,
                                                            temperature_from=f)])
        except BaseException:
            for r in reqs:
                self.abort(r.id)
            raise
        try:
            while any(r.state != "finished" for r in reqs):
                self.step()
        except BaseException:
            for r in reqs:
                if r.state != "finished":
                    self.abort(r.id)
            raise
        return [list(r.generated) for r in reqs]

    def stream(self, prompt, params: SamplingParams | None = None, **kwargs) -> Iterator[int]:
        """Yield the request's tokens as they are produced (other queued requests progress in
        the same steps)."""
        rid = self.add_request(prompt, params, **kwargs)
        req = self._requests[rid]
        sent = 0
        try:
            while True:
                if req.state != "finished":
                    self.step()
                while sent < len(req.generated):
                    sent += 1
                    yield req.generated[sent - 1]
                if req.state == "finished":
                    return
        finally:
            if req.state != "finished":
                self.abort(rid)

    def overhead(self) -> dict[str, float]:
        """Time per step outside the model's forwards (scheduling, KV bookkeeping, controls,
        sampling), absolute and as a fraction of the step."""
        s = self.stats
        steps = max(1, s["steps"])
        outside = s["step_seconds"] - s["forward_seconds"]
        return {"steps": s["steps"], "step_ms": 1000 * s["step_seconds"] / steps,
                "overhead_ms": 1000 * outside / steps,
                "overhead_fraction": outside / s["step_seconds"] if s["step_seconds"] else 0.0}


def _concat(arrays):
    import numpy as np

    return np.concatenate(arrays)
