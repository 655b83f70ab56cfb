"""KVCache: a KVBlockManager and a KVStorage together — the object an attention layer uses for
cached generation (prefill with prefix reuse, decode, fork, free)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bem.kv.manager import KVBlockManager, Routing, _int_arg, as_token_array
from bem.kv.routing_key import RoutingKey
from bem.kv.storage import KVStorage


@dataclass(frozen=True)
class Prefill:
    """What :meth:`KVCache.prefill` decided: the model computes K/V (and hidden states) for
    positions [cached_tokens, num_tokens) only, and writes that K/V to ``slots``."""

    seq: int
    cached_tokens: int    # K/V of positions [0, cached_tokens) reused from the cache
    num_tokens: int       # prompt length
    slots: torch.Tensor   # (num_tokens − cached_tokens,) int64 on the storage device


class KVCache:
    """Paged, routing-keyed KV cache for a causal transformer.

    Per step: :meth:`prefill` (new prompt) or :meth:`extend` (decode / continuation) gives the
    slots of the new tokens; every attention layer then calls :meth:`write` with its new K/V and
    :meth:`read` for the sequence's full K/V. Blocks are shared as soon as they fill, so within a
    step write a layer's K/V for all sequences before any of them reads that layer (the natural
    order of a batched forward, and of a forward that handles one sequence at a time).
    """

    def __init__(self, manager: KVBlockManager, storage: KVStorage) -> None:
        if not isinstance(manager, KVBlockManager):
            raise TypeError(f"manager: expected a KVBlockManager, got {type(manager).__name__}")
        if not isinstance(storage, KVStorage):
            raise TypeError(f"storage: expected a KVStorage, got {type(storage).__name__}")
        if (manager.num_blocks, manager.block_size) != (storage.num_blocks, storage.block_size):
            raise ValueError(f"storage: expected num_blocks={manager.num_blocks}, block_size="
                             f"{manager.block_size} (the manager's), got num_blocks="
                             f"{storage.num_blocks}, block_size={storage.block_size}")
        self.manager = manager
        self.storage = storage
        self._tables: dict[int, torch.Tensor] = {}  # seq → block table on the storage device

    @classmethod
    def allocate(cls, *, layers: int, heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 64, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", backend: str = "auto") -> KVCache:
        """A manager and a zeroed storage of matching geometry."""
        manager = KVBlockManager(num_blocks, block_size, backend=backend)
        return cls(manager, KVStorage(layers, num_blocks, heads, head_dim, block_size,
                                      dtype=dtype, device=device))

    def _refresh(self, seq: int) -> None:
        self._tables[seq] = torch.from_numpy(self.manager.block_table(seq)).to(self.storage.device)

    def prefill(self, tokens, routing: Routing) -> Prefill:
        """Start a sequence for ``tokens`` (n ≥ 1), reusing the longest cached prefix.

        ``routing``: the key of every block, or one key per block (ceil(n / block_size)). The
        last token is never taken from the cache, so the model always runs at least one position
        and gets next-token logits. On KVCacheFullError the new sequence is freed again.
        """
        t = as_token_array(tokens)
        n, bs = len(t), self.manager.block_size
        if n < 1:
            raise ValueError("tokens: expected at least 1 token")
        if not isinstance(routing, RoutingKey) and len(routing) != -(-n // bs):
            raise ValueError(f"routing: expected one key per block ({-(-n // bs)}), got "
                             f"{len(routing)}")
        seq = self.manager.new_sequence()
        try:
            match_routing = routing if isinstance(routing, RoutingKey) else \
                routing[:-(-(n - 1) // bs)]
            cached = self.manager.match_prefix(seq, t[:n - 1], match_routing)
            rest = routing if isinstance(routing, RoutingKey) else routing[cached // bs:]
            slots = self.manager.append(seq, t[cached:], rest)
        except BaseException:
            self.manager.free(seq)
            raise
        self._refresh(seq)
        return Prefill(seq, cached, n, self.storage.slots(slots))

    def extend(self, seq: int, tokens, routing: Routing) -> torch.Tensor:
        """Append tokens (one per decode step, or a continuation) to ``seq``; returns their slots
        on the storage device. ``routing`` as in KVBlockManager.append."""
        seq = _int_arg(seq, "seq")
        slots = self.manager.append(seq, tokens, routing)
        self._refresh(seq)
        return self.storage.slots(slots)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V, ``k``, ``v``: (heads, n, head_dim), at ``slots`` (from prefill/extend)."""
        self.storage.write(layer, slots, k, v)

    def read(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of all of ``seq``'s tokens at ``layer``: k, v (heads, num_tokens, head_dim)."""
        seq = _int_arg(seq, "seq")
        table = self._tables.get(seq)
        if table is None:
            raise IndexError(f"seq: no live sequence with id {seq} in this cache")
        return self.storage.read(layer, table, self.manager.num_tokens(seq))

    def num_tokens(self, seq: int) -> int:
        return self.manager.num_tokens(seq)

    def fork(self, seq: int) -> int:
        """A new sequence continuing ``seq`` (beam search, parallel sampling); full blocks are
        shared and the partial last block's K/V is copied. Returns the new sequence id."""
        f = self.manager.fork(seq)
        if f.copy_src is not None:
            self.storage.copy_blocks(f.copy_src, f.copy_dst)
        self._refresh(f.child)
        return f.child

    def free(self, seq: int) -> None:
        """Release ``seq``; its full blocks stay reusable by later prompts until evicted."""
        seq = _int_arg(seq, "seq")
        self.manager.free(seq)
        self._tables.pop(seq, None)
