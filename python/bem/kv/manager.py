"""bem.kv.KVBlockManager: the public block manager — sequences, prefix matching keyed by routing,
append, fork, free, statistics — over the C++ core (or its pure-Python twin)."""
from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from bem import _ext
from bem.kv.reference import ReferenceBlockManager
from bem.kv.routing_key import RoutingKey

log = logging.getLogger("bem")
_warned_fallback = False

Routing = RoutingKey | Sequence[RoutingKey]


def _int_arg(value, name: str) -> int:
    if type(value) is int:  # the common case, checked first: this runs on every call
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected int, got {type(value).__name__}") from None


def as_token_array(tokens, name: str = "tokens") -> np.ndarray:
    """Token ids as a 1-D contiguous int64 numpy array.

    ``tokens``: a 1-D integer numpy array, integer torch tensor (any device), or a list/tuple/range
    of ints. Floating, boolean and object data raise TypeError; other shapes raise ValueError.
    Values are range-checked by the manager ([0, 2**31 − 1]).
    """
    if type(tokens) is np.ndarray and tokens.dtype == np.int64 and tokens.ndim == 1 \
            and tokens.flags.c_contiguous:
        return tokens  # already what the manager takes
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
        arr = tokens.detach().to("cpu", torch.int64).numpy()
    elif isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
        arr = tokens
    elif isinstance(tokens, (list, tuple, range)):
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.int64)
        arr = np.asarray(tokens)
        if arr.dtype.kind not in "iu":
            what = f"dtype {arr.dtype}" if arr.dtype.kind != "O" else "mixed type"
            raise TypeError(f"{name}: expected a sequence of ints, got elements of {what}")
    else:
        raise TypeError(f"{name}: expected a 1-D integer array, tensor or list, got "
                        f"{type(tokens).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: token ids must be in [0, 2147483647], got {arr.max()}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class Fork(NamedTuple):
    """Result of :meth:`KVBlockManager.fork`: the new sequence, and the block whose K/V must be
    copied (copy_src → copy_dst, the parent's partial last block) or None when nothing must."""

    child: int
    copy_src: int | None
    copy_dst: int | None


@dataclass(frozen=True)
class KeyStats:
    """Prefix-cache counters of one routing key (tokens_queried counts full blocks only)."""

    tokens_queried: int
    tokens_hit: int
    blocks_committed: int
    evictions: int
    blocks_cached: int

    @property
    def hit_rate(self) -> float:
        """tokens_hit / tokens_queried (0.0 when nothing was queried)."""
        return self.tokens_hit / self.tokens_queried if self.tokens_queried else 0.0


@dataclass(frozen=True)
class KVStats:
    """Prefix-cache counters like vLLM's (lookups, tokens queried and hit) plus the pool's
    occupancy. Counters run since construction or reset_stats(); occupancy is current."""

    lookups: int
    tokens_queried: int
    tokens_hit: int
    tokens_appended: int
    blocks_committed: int
    blocks_duplicate: int
    blocks_uncacheable: int
    evictions: int
    blocks_in_use: int
    blocks_evictable: int
    blocks_free: int
    blocks_cached: int
    sequences: int
    per_key: dict[RoutingKey, KeyStats] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """tokens_hit / tokens_queried (0.0 when nothing was queried)."""
        return self.tokens_hit / self.tokens_queried if self.tokens_queried else 0.0


class KVBlockManager:
    """Paged KV block manager with prefix reuse keyed by each block's routing decision.

    A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens (default 64, bem's routing
    chunk). Each sequence has a block table; token ``p`` of a sequence lives in slot
    ``table[p // block_size] * block_size + p % block_size`` of the K/V storage. A full block is
    cached under (its prefix, its token ids, its :class:`RoutingKey`); a later sequence reuses it
    only when all three are equal — compared exactly, not by hash. Only full blocks are shared;
    the partial last block is private. Unreferenced cached blocks are evicted in LRU order, a
    finished sequence's tail first. A call that raises (bad input, :class:`KVCacheFullError`)
    leaves the manager unchanged.

    ``backend``: "cpp" (the compiled core), "python" (the pure-Python twin) or "auto" (cpp when
    built). ``hash_bits`` < 64 truncates the C++ index hash, to exercise collision handling.
    Not thread-safe across calls; the C++ backend serialises concurrent calls.
    """

    def __init__(self, num_blocks: int, block_size: int = 64, *, backend: str = "auto",
                 hash_bits: int = 64) -> None:
        global _warned_fallback
        num_blocks = _int_arg(num_blocks, "num_blocks")
        block_size = _int_arg(block_size, "block_size")
        hash_bits = _int_arg(hash_bits, "hash_bits")
        if not 1 <= num_blocks <= 2**31 - 1:
            raise ValueError(f"num_blocks: expected an int in [1, 2**31 - 1], got {num_blocks}")
        if not 1 <= block_size <= 2**20:
            raise ValueError(f"block_size: expected an int in [1, 2**20], got {block_size}")
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"hash_bits: expected an int in [1, 64], got {hash_bits}")
        if backend not in ("auto", "cpp", "python"):
            raise ValueError(f"backend: expected 'auto', 'cpp' or 'python', got {backend!r}")
        if backend == "auto":
            backend = "cpp" if _ext.available() else "python"
            if backend == "python" and not _warned_fallback:
                log.warning("bem.kv: compiled core unavailable (%s); using the pure-Python block "
                            "manager", _ext.load_error())
                _warned_fallback = True
        if backend == "cpp":
            self._impl = _ext.C().KVBlockManager(num_blocks, block_size, hash_bits)
        else:
            self._impl = ReferenceBlockManager(num_blocks, block_size, hash_bits)
        self.backend = backend
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._key_ids: dict[RoutingKey, int] = {}
        self._keys: list[RoutingKey] = []
        self._intern_lock = threading.Lock()
        self._repeated: dict[int, np.ndarray] = {}  # key id → int32 array of it, read-only use

    # ---- routing keys -------------------------------------------------------------------------

    def key_id(self, key: RoutingKey) -> int:
        """The interned id of ``key`` in this manager (ids count up from 0)."""
        kid = self._key_ids.get(key) if isinstance(key, RoutingKey) else None
        if kid is None:
            if not isinstance(key, RoutingKey):
                raise TypeError(f"routing: expected a RoutingKey, got {type(key).__name__}")
            with self._intern_lock:  # ids and self._keys must stay in step across threads
                kid = self._impl.intern_key(key.expert, key.weights_digest, key.version)
                if kid == len(self._keys):
                    self._keys.append(key)
                self._key_ids[key] = kid
        return kid

    @property
    def routing_keys(self) -> list[RoutingKey]:
        """Interned keys, by id."""
        return list(self._keys)

    def _block_key_ids(self, routing: Routing, n_blocks: int, n_max: int) -> np.ndarray:
        """int32 ids of the keys of ``n_blocks`` consecutive blocks.

        ``routing``: one key for all, or a sequence with one key per block and between n_blocks
        and ``n_max`` entries (the extra ones are ignored)."""
        if isinstance(routing, RoutingKey):
            kid = self.key_id(routing)
            ids = self._repeated.get(kid)
            if ids is None or len(ids) < n_blocks:  # grown geometrically, sliced per call
                ids = self._repeated[kid] = np.full(max(64, 2 * n_blocks), kid, dtype=np.int32)
            return ids[:n_blocks]
        if isinstance(routing, (str, bytes)) or not isinstance(routing, Sequence):
            raise TypeError("routing: expected a RoutingKey or a sequence of RoutingKey (one per "
                            f"block), got {type(routing).__name__}")
        if not n_blocks <= len(routing) <= n_max:
            want = str(n_blocks) if n_max == n_blocks else f"{n_blocks} to {n_max}"
            raise ValueError(f"routing: expected {want} keys (one per block), got {len(routing)}")
        for i, k in enumerate(routing):
            if not isinstance(k, RoutingKey):
                raise TypeError(f"routing[{i}]: expected a RoutingKey, got {type(k).__name__}")
        return np.fromiter((self.key_id(k) for k in routing[:n_blocks]), dtype=np.int32,
                           count=n_blocks)

    # ---- sequences ----------------------------------------------------------------------------

    def new_sequence(self) -> int:
        """A new empty sequence; ids count up from 0 and are never reused."""
        return self._impl.create()

    def match_prefix(self, seq: int, tokens, routing: Routing) -> int:
        """Reuse the longest cached prefix of ``tokens`` for the empty sequence ``seq``.

        ``tokens``: (n,) token ids (see :func:`as_token_array`). ``routing``: the key every full
        block is computed under, or a sequence with one key per block (n // block_size of them;
        a trailing key for the partial block is allowed). Matched blocks join ``seq``'s table with
        a reference taken. Returns the number of cached tokens, a multiple of block_size: the
        caller computes K/V only for tokens[cached:]. Pass ``tokens[:-1]`` when the model needs
        at least one token to run (to get the next-token logits).
        """
        seq = _int_arg(seq, "seq")
        t = as_token_array(tokens)
        bs = self.block_size
        keys = self._block_key_ids(routing, len(t) // bs, -(-len(t) // bs))
        return self._impl.match_prefix(seq, t, keys)

    def append(self, seq: int, tokens, routing: Routing) -> np.ndarray:
        """Append ``tokens`` to ``seq``; returns their K/V slots, (n,) int64.

        ``routing``: the key all these tokens are computed under, or a sequence with one key per
        block the tokens fall in (blocks num_tokens // B to (num_tokens + n − 1) // B), for
        routing that changes at block boundaries inside the call. Blocks that fill enter the
        prefix cache at once: write their K/V (KVStorage.write) before another sequence reads
        them. A block whose tokens were appended under different keys is never shared.
        """
        seq = _int_arg(seq, "seq")
        t = as_token_array(tokens)
        if isinstance(routing, RoutingKey):
            return self._impl.append(seq, t, self.key_id(routing))
        start = self._impl.num_tokens(seq)
        bs = self.block_size
        first, last = start // bs, (start + len(t) - 1) // bs
        n_blocks = last - first + 1 if len(t) else 0
        keys = self._block_key_ids(routing, n_blocks, n_blocks)
        # One item per block touched, applied atomically by append_many.
        bounds = [0] + [min(len(t), (b + 1) * bs - start) for b in range(first, first + n_blocks)]
        if not n_blocks:
            bounds = [0]
        return self._impl.append_many(np.full(n_blocks, seq, dtype=np.int64), t,
                                      np.asarray(bounds, dtype=np.int64), keys)

    def append_many(self, seqs: Sequence[int], tokens: Sequence, routing: Sequence[RoutingKey]
                    ) -> list[np.ndarray]:
        """Batched :meth:`append` (decode steps of a batch): item i appends tokens[i] under
        routing[i] to seqs[i]; all or nothing. Returns each item's slots."""
        if not (len(seqs) == len(tokens) == len(routing)):
            raise ValueError(f"seqs, tokens, routing: expected equal lengths, got {len(seqs)}, "
                             f"{len(tokens)}, {len(routing)}")
        ids = np.fromiter((_int_arg(s, "seqs") for s in seqs), dtype=np.int64, count=len(seqs))
        arrays = [as_token_array(t) for t in tokens]
        for i, k in enumerate(routing):
            if not isinstance(k, RoutingKey):
                raise TypeError(f"routing[{i}]: expected a RoutingKey, got {type(k).__name__}")
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        keys = np.fromiter((self.key_id(k) for k in routing), dtype=np.int32, count=len(routing))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        slots = self._impl.append_many(ids, flat, offsets, keys)
        return np.split(slots, offsets[1:-1])

    def match_many(self, tokens: Sequence, routing: Sequence[Routing]) -> list[tuple[int, int]]:
        """Batched :meth:`new_sequence` + :meth:`match_prefix`: one new sequence per prompt.
        Returns (seq, cached_tokens) per prompt."""
        if len(tokens) != len(routing):
            raise ValueError(f"tokens, routing: expected equal lengths, got {len(tokens)}, "
                             f"{len(routing)}")
        arrays = [as_token_array(t) for t in tokens]
        bs = self.block_size
        keys = [self._block_key_ids(r, len(a) // bs, -(-len(a) // bs))
                for a, r in zip(arrays, routing)]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        flat_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int32)
        seqs, cached = self._impl.match_many(flat, offsets, flat_keys)
        return list(zip(seqs.tolist(), cached.tolist()))

    def fork(self, seq: int) -> Fork:
        """A new sequence continuing ``seq``'s tokens; shares its full blocks. When ``seq`` ends
        in a partial block, the child gets a private copy of its tokens and the caller must copy
        that block's K/V (``KVStorage.copy_blocks(fork.copy_src, fork.copy_dst)``)."""
        child, src, dst = self._impl.fork(_int_arg(seq, "seq"))
        return Fork(child, None, None) if src < 0 else Fork(child, src, dst)

    def free(self, seq: int) -> None:
        """Release ``seq``: its cached blocks stay reusable until evicted."""
        self._impl.free(_int_arg(seq, "seq"))

    def free_many(self, seqs: Sequence[int]) -> None:
        """Release distinct sequences; all or nothing."""
        self._impl.free_many(np.fromiter((_int_arg(s, "seqs") for s in seqs), dtype=np.int64,
                                         count=len(seqs)))

    # ---- queries ------------------------------------------------------------------------------

    def num_tokens(self, seq: int) -> int:
        return self._impl.num_tokens(_int_arg(seq, "seq"))

    def block_table(self, seq: int) -> np.ndarray:
        """(ceil(num_tokens / block_size),) int64 block indices of ``seq``."""
        return self._impl.block_table(_int_arg(seq, "seq"))

    @property
    def sequences(self) -> list[int]:
        """Live sequence ids, ascending."""
        return self._impl.sequences()

    def num_available_blocks(self) -> int:
        """Blocks an allocation can take now (free + evictable)."""
        return self._impl.num_available_blocks()

    def stats(self) -> KVStats:
        per_key = {self._keys[i]: KeyStats(**d) for i, d in enumerate(self._impl.key_stats())}
        return KVStats(**self._impl.stats(), per_key=per_key)

    def reset_stats(self) -> None:
        """Zero the counters (occupancy and per-key blocks_cached are current state, kept)."""
        self._impl.reset_stats()

    def state(self) -> dict:
        """Full state as plain Python data (for inspection and tests): ``sequences`` {id:
        (num_tokens, blocks, canonical)}, ``blocks`` [(ref_count, generation, cached, key id,
        parent, filled, tokens, hash)], ``lru`` (next evicted first), ``free`` (next allocated
        first), ``stats``, ``num_keys``. ``hash`` is None on the Python backend."""
        return self._impl.state()

    def check_invariants(self) -> None:
        """Raise RuntimeError naming the first broken structural invariant (tests, debugging)."""
        self._impl.check_invariants()
