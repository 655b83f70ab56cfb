"""Greedy and sampled generation for bem's built-in transformer, batched over prompts, either
recomputing every step without a cache or through the routing-keyed paged KV cache (bem.kv):
prefill matches the cached prefix and computes only the rest; decode appends one token a step."""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

from bem.kv import KVCache, RoutingKey, weights_digest
from bem.model.transformer import AttentionBatch, BemForCausalLM
from bem.modules.control import CHUNK_SIZE, ChunkControl


def new_kv_cache(model: BemForCausalLM, num_blocks: int, *, backend: str = "auto") -> KVCache:
    """A bem.kv.KVCache shaped for `model` (its layers, heads, head width, dtype and device),
    with 64-token blocks (one routing chunk each). Keep it across generate() calls to reuse
    prefixes between requests."""
    if not isinstance(model, BemForCausalLM):
        raise TypeError(f"model: expected BemForCausalLM, got {type(model).__name__}")
    cfg = model.config
    p = model.lm_head.weight
    return KVCache.allocate(layers=cfg.n_layers, heads=cfg.n_heads, head_dim=cfg.head_dim,
                            num_blocks=num_blocks, block_size=CHUNK_SIZE, dtype=p.dtype,
                            device=p.device, backend=backend)


def _controller(model):
    return getattr(model, "bem_controller", None)


def _request_digest(model: BemForCausalLM, weights: bytes, head_temperature: torch.Tensor | None,
                    b: int) -> bytes:
    """Digest of what a chunk's K/V depends on beyond the tokens: all weights (base, adapters,
    controller; `weights` = their bem.kv.weights_digest), the bem config and row b's
    request-level controls (head_temperature None: the digest of chunks run without them)."""
    h = hashlib.blake2b(digest_size=16, person=b"bem.model.key")
    h.update(weights)
    cfg = getattr(model, "bem_config", None)
    h.update(cfg.to_json().encode() if cfg is not None else b"")
    if head_temperature is not None:
        t = head_temperature[b].detach().to("cpu", torch.float64).contiguous()
        h.update(struct.pack("<q", t.numel()))
        h.update(t.numpy().tobytes())
    return h.digest()


def _padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) int64 ids and (B, S) validity mask."""
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.int64, device=device)
    valid = torch.zeros(len(rows), S, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.int64, device=device)
        valid[b, : len(r)] = True
    return ids, valid


def _control(model, ids: torch.Tensor, positions: torch.Tensor, experts, head_temperature,
             from_chunk) -> ChunkControl | None:
    ctl = _controller(model)
    if ctl is None:
        return None
    return ctl.control(ids, positions, model.get_input_embeddings().weight, experts=experts,
                       head_temperature=head_temperature, temperature_from_chunk=from_chunk)


def _rows_of(value, live: list[int]):
    """The live rows of a per-row tensor (ints and None apply to every row as they are)."""
    return value[live] if isinstance(value, torch.Tensor) else value


def _check_temperature_from(temperature_from, rows: list[list[int]],
                            head_temperature: torch.Tensor | None, device) -> torch.Tensor | None:
    """temperature_from (B,) query positions (ints or an int tensor) → (B,) int64 chunks on
    `device`, or None."""
    if temperature_from is None:
        return None
    if head_temperature is None:
        raise ValueError("temperature_from: given without head_temperature (the temperatures it "
                         "places)")
    if isinstance(temperature_from, torch.Tensor):
        dt = temperature_from.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise TypeError(f"temperature_from: expected integer positions, got dtype {dt}")
        if temperature_from.dim() != 1:
            raise ValueError(f"temperature_from: expected shape ({len(rows)},), got "
                             f"{tuple(temperature_from.shape)}")
        values = temperature_from.tolist()
    elif isinstance(temperature_from, (list, tuple)):
        values = list(temperature_from)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TypeError("temperature_from: expected a list of int positions")
    else:
        raise TypeError(f"temperature_from: expected a list of ints or a 1-D int tensor, got "
                        f"{type(temperature_from).__name__}")
    if len(values) != len(rows):
        raise ValueError(f"temperature_from: expected one position per prompt ({len(rows)}), got "
                         f"{len(values)}")
    for b, (v, r) in enumerate(zip(values, rows)):
        if not 0 <= v <= len(r):
            raise ValueError(f"temperature_from[{b}]: expected a position in [0, {len(r)}] (the "
                             f"prompt length), got {v}")
    return torch.tensor(values, dtype=torch.int64, device=device) // CHUNK_SIZE


def _check_prompts(model, prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts: expected a (B, T) tensor or a list of token lists, got "
                             f"shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    out = []
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        p = list(p)
        if not p:
            raise ValueError(f"prompts[{i}]: expected at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in p):
            raise ValueError(f"prompts[{i}]: expected ints in [0, {V})")
        out.append(p)
    return out


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                 generator: torch.Generator | None) -> list[int]:
    """logits (B, V) → one token per row: argmax, or a sample from softmax(logits / T) restricted
    to the top_k."""
    if not do_sample:
        return logits.argmax(-1).tolist()
    z = logits.to(torch.float64) / temperature
    if top_k is not None:
        kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.multinomial(z.softmax(-1), 1, generator=generator).squeeze(-1).tolist()


@torch.no_grad()
def generate(model: BemForCausalLM, prompts, max_new_tokens: int, *, cache: KVCache | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | None = None,
             experts: int | torch.Tensor | None = None, head_temperature: torch.Tensor | None = None,
             temperature_from: Sequence[int] | torch.Tensor | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: a BemForCausalLM (with or without attached bem modules).
        prompts: list of B token-id lists (lengths may differ) or a (B, T) int tensor.
        cache: a bem.kv.KVCache from :func:`new_kv_cache` — K/V is written and read through it
            and full 64-token blocks are reused across calls when their tokens, prefix and
            routing key (expert, digest of weights + config + request controls, config version)
            match. None: recompute the whole sequence every step (the reference).
        do_sample: sample from softmax(logits / temperature), optionally top_k; else greedy.
        generator: torch.Generator for sampling (reproducible runs).
        eos_token_id: a row stops after producing it.
        experts: one expert id for every chunk (−1 = no adapter), or a (B, C) int tensor of
            per-chunk experts covering every chunk the generation can reach, overriding the
            router (e.g. oracle routing).
        head_temperature: (B, G) V2 gate temperatures (GateShaping output), fixed per request.
        temperature_from: (B,) position of each row's query's first token (ints in [0, prompt
            length]): the temperatures apply from that token's chunk (position // 64) on and
            chunks before it are unshaped and keyed without them, so requests over the same
            passages share those blocks. None: the temperatures apply to every chunk.

    Returns: B lists of new token ids.
    """
    rows = _check_prompts(model, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
    if isinstance(experts, torch.Tensor):
        reach = -(-(max(len(r) for r in rows) + max_new_tokens) // CHUNK_SIZE)
        if experts.dim() != 2 or experts.shape[0] != len(rows) or experts.shape[1] < reach or \
                experts.dtype != torch.int64 or bool((experts < -1).any()):
            raise ValueError(f"experts: expected a ({len(rows)}, >= {reach}) int64 tensor of ids "
                             f">= -1, got {experts.dtype} {tuple(experts.shape)}")
    elif experts is not None and (isinstance(experts, bool) or not isinstance(experts, int) or
                                  experts < -1):
        raise ValueError(f"experts: expected an int >= -1, a (B, C) tensor or None, got {experts!r}")
    if experts is not None and _controller(model) is None:
        raise ValueError("experts: the model has no chunk-routed bem modules to route")
    longest = max(len(r) for r in rows) + max_new_tokens
    if longest > model.config.max_positions:
        raise ValueError(f"max_new_tokens: prompts + new tokens reach {longest} positions, more "
                         f"than max_positions={model.config.max_positions}")
    if head_temperature is not None and (
            not isinstance(head_temperature, torch.Tensor) or head_temperature.dim() != 2 or
            head_temperature.shape[0] != len(rows) or not head_temperature.is_floating_point() or
            not bool((head_temperature > 0).all())):
        raise ValueError(f"head_temperature: expected a ({len(rows)}, G) float tensor of positive "
                         f"temperatures, got {getattr(head_temperature, 'shape', head_temperature)}")
    from_chunk = _check_temperature_from(temperature_from, rows, head_temperature,
                                         model.lm_head.weight.device)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a bem.kv.KVCache (see new_kv_cache), got "
                        f"{type(cache).__name__}")
    was_training = model.training
    model.eval()
    try:
        if cache is None:
            return _generate_uncached(model, rows, max_new_tokens, do_sample, temperature, top_k,
                                      generator, eos_token_id, experts, head_temperature,
                                      from_chunk)
        return _generate_cached(model, cache, rows, max_new_tokens, do_sample, temperature,
                                top_k, generator, eos_token_id, experts, head_temperature,
                                from_chunk, temperature_from)
    finally:
        model.train(was_training)


def _done(new: list[int], max_new_tokens: int, eos: int | None) -> bool:
    return len(new) >= max_new_tokens or (eos is not None and bool(new) and new[-1] == eos)


def _generate_uncached(model, rows, max_new_tokens, do_sample, temperature, top_k, generator,
                       eos, experts, head_temperature, from_chunk):
    device = model.lm_head.weight.device
    outs: list[list[int]] = [[] for _ in rows]
    while True:
        live = [b for b in range(len(rows)) if not _done(outs[b], max_new_tokens, eos)]
        if not live:
            return outs
        hist = [rows[b] + outs[b] for b in live]
        ids, valid = _padded(hist, device)
        pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
        ctrl = _control(model, ids, pos, _rows_of(experts, live), _rows_of(head_temperature, live),
                        _rows_of(from_chunk, live))
        logits = model(ids, valid=valid, control=ctrl)
        last = torch.tensor([len(h) - 1 for h in hist], device=device)
        nxt = _next_tokens(logits[torch.arange(len(live)), last], do_sample, temperature, top_k,
                           generator)
        for b, t in zip(live, nxt):
            outs[b].append(t)


def _generate_cached(model, cache, rows, max_new_tokens, do_sample, temperature, top_k,
                     generator, eos, experts, head_temperature, from_chunk, temperature_from):
    """Through bem.engine: every row is one request of an engine over `cache` (all rows run
    together; prompts are prefilled in one step)."""
    from bem.engine import Engine, SamplingParams

    engine = Engine(model, cache=cache, max_batch_size=len(rows),
                    max_prefill_tokens=sum(len(r) for r in rows))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample
                            else 0.0, top_k=top_k if do_sample else None,
                            stop_token_ids=() if eos is None else (eos,),
                            generator=generator if do_sample else None)
    n = len(rows)
    if isinstance(experts, torch.Tensor):
        per_row = [experts[b].tolist() for b in range(n)]
    else:
        per_row = [experts] * n
    temps = [None] * n if head_temperature is None else list(head_temperature)
    starts = [None] * n
    if head_temperature is not None:
        starts = (list(temperature_from.tolist() if isinstance(temperature_from, torch.Tensor)
                       else temperature_from) if temperature_from is not None else [0] * n)
    return engine.generate(rows, params, experts=per_row, head_temperature=temps,
                           temperature_from=starts)
