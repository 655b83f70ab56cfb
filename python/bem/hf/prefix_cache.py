"""Prefix reuse across ``generate`` calls of a Hugging Face model, backed by bem.kv.

:class:`PrefixStore` keeps the K/V of the prompts' full 64-token blocks in bem's paged,
routing-keyed KV pool (:class:`bem.kv.KVBlockManager` + :class:`bem.kv.KVStorage`). For a new
prompt it finds the longest cached prefix whose blocks have the same token ids **and** the same
routing keys, and hands ``generate`` a :class:`BemPrefixCache` (a transformers ``DynamicCache``)
already holding that prefix's K/V, with bem's row history for it, so the model computes only the
rest of the prompt. After generation the prompt's new full blocks are written to the pool.

Routing key of block c of a row (bem.kv's rule: equal keys are the only licence to reuse K/V):
``RoutingKey(expert of chunk c (0 without experts), digest, bem_config.version)``, where the
digest covers the base model's weights (hashed once, when the store is made), bem's adapter
weights (hashed on every call, so a retrained or reloaded adapter never reuses stale K/V) and
chunk c's other routing actions (AR1's rank budget and bias scale). The controls of chunk c are
a function of the tokens of chunks < c (the cache rule), so equal prefixes under equal weights
route alike.

Served: batches of unpadded prompts (rows of equal length, or ``attention_mask`` all ones),
greedy or sampling, ``num_beams == 1`` and ``num_return_sequences == 1``; other calls are
refused with a ValueError naming the argument (padded batches run without reuse).
"""
from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch
from torch import nn

from bem.hf import generation as hfgen
from bem.kv import KVBlockManager, KVStats, KVStorage, RoutingKey, weights_digest
from bem.modules.control import CHUNK_SIZE

log = logging.getLogger("bem.hf")

try:
    from transformers import DynamicCache
except ImportError:  # pragma: no cover - transformers is a test extra
    DynamicCache = object


class BemPrefixCache(DynamicCache):
    """A DynamicCache handed to ``generate`` by :meth:`PrefixStore.cache_for`: it starts with
    the K/V of the prompt's reused prefix (``reused_tokens`` positions of every row)."""

    reused_tokens: int = 0
    _bem_rows_plan: list | None = None


class PrefixStore:
    """A pool of ``num_blocks`` K/V blocks of 64 tokens for `model` (a Hugging Face causal LM,
    bem attached or not), shared by every :meth:`generate` call made through it.

    ``device``/``dtype`` of the pool default to the model's. The base model's weights are hashed
    once here: make a new store (or call :meth:`reset`) if they change."""

    def __init__(self, model: nn.Module, num_blocks: int = 1024, *, backend: str = "auto"):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
        if not hasattr(model, "generate") or not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"model: expected a Hugging Face causal LM, got {type(model).__name__}")
        controller = getattr(model, "bem_controller", None)
        if controller is not None and controller.chunk_size != CHUNK_SIZE:
            raise ValueError(f"model: bem's chunk size {controller.chunk_size} differs from the "
                             f"KV block size {CHUNK_SIZE}")
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = CHUNK_SIZE
        self._backend = backend
        self._base_digest = weights_digest(self._base_weights())
        self.reset()

    # ---- weights and keys ----
    def _base_weights(self) -> dict[str, torch.Tensor]:
        from bem.serialization import adapter_state_dict

        adapter = set(adapter_state_dict(self.model)) if self._has_bem() else set()
        return {k: v for k, v in self.model.state_dict().items() if k not in adapter}

    def _has_bem(self) -> bool:
        return getattr(self.model, "bem_config", None) is not None

    def _digest(self) -> bytes:
        h = hashlib.blake2b(self._base_digest, digest_size=16, person=b"bem.hf.prefix")
        if self._has_bem():
            from bem.serialization import adapter_state_dict

            h.update(weights_digest(adapter_state_dict(self.model)))
        return h.digest()

    def _keys(self, ids: torch.Tensor, real: torch.Tensor) -> list[list[RoutingKey]]:
        """Routing keys of every block of every row (one per 64-token chunk)."""
        B, n = ids.shape
        nb = math.ceil(n / self.block_size)
        digest = self._digest()
        version = self.model.bem_config.version if self._has_bem() else 0
        controller = getattr(self.model, "bem_controller", None)
        fields: dict[str, torch.Tensor | None] = {}
        if controller is not None:
            hist = hfgen.RowHistory(controller, B, ids.device,
                                    self.model.get_input_embeddings().weight.dtype)
            hist.advance(ids, real, self.model.get_input_embeddings().weight)
            fields = {k: (None if v is None else v[:, :nb].cpu()) for k, v in hist.fields.items()}
        experts = fields.get("experts")
        extra = [fields.get("rank_budget"), fields.get("delta_scale")]
        keys = []
        for b in range(B):
            row = []
            for c in range(nb):
                d = digest
                if any(x is not None for x in extra):
                    h = hashlib.blake2b(digest, digest_size=16, person=b"bem.hf.action")
                    for x in extra:
                        h.update(b"-" if x is None else x[b, c].double().numpy().tobytes())
                    d = h.digest()
                row.append(RoutingKey(0 if experts is None else int(experts[b, c]), d, version))
            keys.append(row)
        return keys

    # ---- the pool ----
    def reset(self) -> None:
        """Forget every cached block (and the statistics)."""
        self.manager = KVBlockManager(self.num_blocks, self.block_size, backend=self._backend)
        self.storage: KVStorage | None = None

    def stats(self) -> KVStats:
        """bem.kv's prefix-cache counters (hit_rate = tokens hit / tokens queried)."""
        return self.manager.stats()

    def cache_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> BemPrefixCache:
        """A cache for ``generate(input_ids, cache=...)`` holding the K/V of the longest prefix
        (whole blocks, the same length for every row) found in the pool. Call :meth:`commit`
        after generate (or :meth:`release` if it failed)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
                input_ids.dtype != torch.int64 or input_ids.shape[1] < 1:
            raise ValueError("input_ids: expected a (B, n ≥ 1) int64 tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        B, n = input_ids.shape
        cache = BemPrefixCache(config=getattr(self.model, "config", None))
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            log.info("bem: PrefixStore: a padded batch runs without prefix reuse")
            cache._bem_rows_plan = None
            return cache
        real = torch.ones(B, n, dtype=torch.bool, device=input_ids.device)
        keys = self._keys(input_ids, real)
        bs = self.block_size
        plan = []
        try:
            for b in range(B):
                seq = self.manager.new_sequence()
                tokens = input_ids[b].cpu().numpy()
                plan.append([seq, tokens, keys[b], 0])
                # As KVCache.prefill: the last token is always computed (next-token logits).
                match_keys = keys[b][:math.ceil((n - 1) / bs)] if n > 1 else []
                plan[-1][3] = self.manager.match_prefix(seq, tokens[:n - 1], match_keys) \
                    if n > 1 else 0
        except BaseException:
            for p in plan:
                self.manager.free(p[0])
            raise
        reused = min(p[3] for p in plan)
        cache._bem_rows_plan = plan
        cache.reused_tokens = reused
        if reused and self.storage is not None:
            layers = []
            for layer in range(self.storage.layers):
                ks, vs = [], []
                for seq, *_ in plan:
                    table = self.manager.block_table(seq)[: math.ceil(reused / bs)]
                    k, v = self.storage.read(layer, table, reused)
                    ks.append(k)
                    vs.append(v)
                layers.append((torch.stack(ks), torch.stack(vs)))
            filled = BemPrefixCache(ddp_cache_data=layers, config=getattr(self.model, "config",
                                                                          None))
            filled._bem_rows_plan, filled.reused_tokens = plan, reused
            cache = filled
            controller = getattr(self.model, "bem_controller", None)
            if controller is not None:
                hist = hfgen.RowHistory(controller, B, input_ids.device,
                                        self.model.get_input_embeddings().weight.dtype)
                hist.advance(input_ids[:, :reused], real[:, :reused],
                             self.model.get_input_embeddings().weight)
                hfgen.set_history(cache, hist)
        elif reused:
            cache.reused_tokens = 0            # nothing stored yet (cannot happen: no blocks)
        return cache

    def release(self, cache: BemPrefixCache) -> None:
        """Give back a cache's sequences without storing anything (generate failed)."""
        for p in cache._bem_rows_plan or []:
            self.manager.free(p[0])
        cache._bem_rows_plan = None

    def commit(self, cache: BemPrefixCache, prompt_length: int) -> None:
        """Write the K/V of every row's prompt positions the pool lacks (from the cache that
        generate filled) and release the rows: their full blocks stay reusable."""
        plan = cache._bem_rows_plan
        if plan is None:
            return
        try:
            layers = cache.layers
            if self.storage is None:
                k0 = layers[0].keys
                self.storage = KVStorage(len(layers), self.num_blocks, k0.shape[1], k0.shape[3],
                                         self.block_size, dtype=k0.dtype, device=k0.device)
            for b, (seq, tokens, keys, cached) in enumerate(plan):
                rest = tokens[cached:prompt_length]
                if len(rest) == 0:
                    continue
                slots = self.manager.append(seq, rest, keys[cached // self.block_size:])
                s = self.storage.slots(np.asarray(slots))
                for li, layer in enumerate(layers):
                    k = layer.keys[b, :, cached:prompt_length].to(self.storage.dtype)
                    v = layer.values[b, :, cached:prompt_length].to(self.storage.dtype)
                    self.storage.write(li, s, k.contiguous(), v.contiguous())
        finally:
            self.release(cache)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs):
        """``model.generate(input_ids, ...)`` reusing cached prompt prefixes; returns what
        generate returns. Refuses num_beams / num_return_sequences other than 1 and a `cache`
        (or past_key_values) argument."""
        for name in ("num_beams", "num_return_sequences"):
            if kwargs.get(name, 1) != 1:
                raise ValueError(f"{name}: PrefixStore.generate serves 1 (got {kwargs[name]!r}); "
                                 "call model.generate directly for beam search")
        for name in ("cache", "past_key_values"):
            if name in kwargs:
                raise ValueError(f"{name}: PrefixStore.generate makes the cache itself")
        if kwargs.get("use_cache") is False:
            raise ValueError("use_cache: PrefixStore.generate needs the cache (use_cache=True)")
        cache = self.cache_for(input_ids, attention_mask)
        try:
            out = self.model.generate(input_ids, attention_mask=attention_mask, cache=cache,
                                      use_cache=True, **kwargs)
        except BaseException:
            self.release(cache)
            raise
        self.commit(cache, input_ids.shape[1])
        return out
