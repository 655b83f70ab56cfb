"""Pure-Python twin of the C++ block manager (bem._C.KVBlockManager): same methods, same
allocation and eviction order, same errors. It is the test oracle, the benchmark baseline, and the
backend when the compiled core is missing. Cached blocks are found by exact dict keys
(parent block, its generation, routing key, token tuple), so it needs no hash."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from bem import _ext

MIXED_KEY = -2  # key of a block whose tokens were appended under more than one routing key
_MAX_TOKEN = 2**31 - 1

if _ext.available():
    KVCacheFullError = _ext.C().KVCacheFullError
else:  # pragma: no cover - only without the compiled core
    class KVCacheFullError(RuntimeError):
        """An allocation needs more blocks than are free or evictable; nothing was changed."""

_STAT_FIELDS = ("lookups", "tokens_queried", "tokens_hit", "tokens_appended", "blocks_committed",
                "blocks_duplicate", "blocks_uncacheable", "evictions")
_KEY_FIELDS = ("tokens_queried", "tokens_hit", "blocks_committed", "evictions")


def _checked_array(obj, arg: str, dtype: type) -> np.ndarray:
    """The binding's array check: a 1-D contiguous numpy array of exactly ``dtype``."""
    want = np.dtype(dtype).name
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"{arg}: expected a 1-D numpy {want} array, got {type(obj).__name__}")
    if obj.dtype != dtype:
        raise TypeError(f"{arg}: expected dtype {want}, got {obj.dtype}")
    if obj.ndim != 1:
        raise ValueError(f"{arg}: expected a 1-D array, got {obj.ndim} dimensions")
    if not obj.flags.c_contiguous:
        raise ValueError(f"{arg}: expected a contiguous array")
    return obj


class _Sequence:
    __slots__ = ("num_tokens", "blocks", "canonical")

    def __init__(self) -> None:
        self.num_tokens = 0
        self.blocks: list[int] = []
        self.canonical: list[int] = []  # per full block: its cached twin (or itself), -1: none


class ReferenceBlockManager:
    """Block manager over ``num_blocks`` blocks of ``block_size`` tokens; see bem.kv.KVBlockManager
    for the semantics. Token arrays are 1-D int64 numpy arrays, key id arrays int32."""

    def __init__(self, num_blocks: int, block_size: int = 64, hash_bits: int = 64) -> None:
        if not 1 <= num_blocks <= 2**31 - 1:
            raise ValueError(f"num_blocks: expected an int in [1, 2147483647], got {num_blocks}")
        if not 1 <= block_size <= 2**20:
            raise ValueError(f"block_size: expected an int in [1, 1048576], got {block_size}")
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"hash_bits: expected an int in [1, 64], got {hash_bits}")
        self.num_blocks, self.block_size, self.hash_bits = num_blocks, block_size, hash_bits
        n = num_blocks
        self._ref = [0] * n
        self._gen = [0] * n
        self._key = [-1] * n
        self._filled = [0] * n
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._cache_entry: list[tuple | None] = [None] * n  # cached block's index key, else None
        self._cache: dict[tuple, int] = {}  # (parent, parent generation, key, tokens) → block
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable, oldest first
        self._free = list(range(n - 1, -1, -1))  # pop() gives block 0 first
        self._in_use = 0
        self._seqs: dict[int, _Sequence] = {}
        self._next_seq = 0
        self._keys: list[tuple[int, bytes, int]] = []
        self._key_index: dict[tuple[int, bytes, int], int] = {}
        self._counters = dict.fromkeys(_STAT_FIELDS, 0)
        self._key_stats: list[dict[str, int]] = []

    # ---- routing keys -------------------------------------------------------------------------

    def intern_key(self, expert: int, weights_digest: bytes, version: int) -> int:
        if len(weights_digest) != 16:
            raise ValueError(f"weights_digest: expected 16 bytes, got {len(weights_digest)}")
        if expert < -1:
            raise ValueError(f"expert: expected an int >= -1, got {expert}")
        if version < 0:
            raise ValueError(f"version: expected an int >= 0, got {version}")
        k = (expert, bytes(weights_digest), version)
        kid = self._key_index.get(k)
        if kid is None:
            kid = self._key_index[k] = len(self._keys)
            self._keys.append(k)
            self._key_stats.append(dict.fromkeys(_KEY_FIELDS + ("blocks_cached",), 0))
        return kid

    def routing_key(self, key_id: int) -> tuple[int, bytes, int]:
        self._check_key(key_id, "key_id", -1)
        return self._keys[key_id]

    def num_keys(self) -> int:
        return len(self._keys)

    # ---- checks -------------------------------------------------------------------------------

    def _seq(self, seq: int, arg: str) -> _Sequence:
        s = self._seqs.get(seq)
        if s is None:
            raise IndexError(f"{arg}: no live sequence with id {seq}")
        return s

    def _check_key(self, key_id: int, arg: str, index: int) -> None:
        if not 0 <= key_id < len(self._keys):
            where = f" at index {index}" if index >= 0 else ""
            raise IndexError(f"{arg}: routing key id {key_id}{where} is not an interned key "
                             f"(have {len(self._keys)})")

    @staticmethod
    def _check_tokens(tokens: list[int], arg: str) -> None:
        if tokens and (min(tokens) < 0 or max(tokens) > _MAX_TOKEN):
            i = next(i for i, t in enumerate(tokens) if not 0 <= t <= _MAX_TOKEN)
            raise ValueError(f"{arg}: token ids must be in [0, 2147483647], got {tokens[i]} "
                             f"at index {i}")

    def _blocks_needed(self, num_tokens: int, held: int, n: int) -> int:
        return max(0, -(-(num_tokens + n) // self.block_size) - held)

    def _throw_full(self, needed: int, what: str) -> None:
        raise KVCacheFullError(
            f"KV cache full: {what} needs {needed} new blocks but only {len(self._free)} free + "
            f"{len(self._lru)} evictable of {self.num_blocks} are available ({self._in_use} in "
            "use); free finished sequences or use a larger pool")

    def num_available_blocks(self) -> int:
        return len(self._free) + len(self._lru)

    # ---- reference counts, allocation ---------------------------------------------------------

    def _acquire(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._lru[b]
            self._in_use += 1
        self._ref[b] += 1

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b]:
            return
        self._in_use -= 1
        if self._cache_entry[b] is not None:
            self._lru[b] = None
        else:
            self._key[b] = -1
            self._filled[b] = 0
            self._tokens[b] = []
            self._free.append(b)

    def _allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._lru.popitem(last=False)
            del self._cache[self._cache_entry[b]]
            self._cache_entry[b] = None
            self._counters["evictions"] += 1
            ks = self._key_stats[self._key[b]]
            ks["evictions"] += 1
            ks["blocks_cached"] -= 1
        self._gen[b] += 1
        self._ref[b] = 1
        self._key[b] = -1
        self._filled[b] = 0
        self._tokens[b] = []
        self._in_use += 1
        return b

    # ---- sequences ----------------------------------------------------------------------------

    def create(self) -> int:
        seq = self._next_seq
        self._seqs[seq] = _Sequence()
        self._next_seq += 1
        return seq

    def _match(self, s: _Sequence, tokens: list[int], key_ids: list[int]) -> int:
        bs = self.block_size
        c = self._counters
        c["lookups"] += 1
        c["tokens_queried"] += len(tokens)
        parent, parent_gen, matching, hits = -1, 0, True, 0
        for i, key in enumerate(key_ids):
            ks = self._key_stats[key]
            ks["tokens_queried"] += bs
            if not matching:
                continue
            hit = self._cache.get((parent, parent_gen, key, tuple(tokens[i * bs:(i + 1) * bs])))
            if hit is None:
                matching = False
                continue
            self._acquire(hit)
            s.blocks.append(hit)
            s.canonical.append(hit)
            parent, parent_gen = hit, self._gen[hit]
            hits += 1
            ks["tokens_hit"] += bs
        s.num_tokens = hits * bs
        c["tokens_hit"] += s.num_tokens
        return s.num_tokens

    def match_prefix(self, seq: int, tokens: np.ndarray, key_ids: np.ndarray) -> int:
        tokens = _checked_array(tokens, "tokens", np.int64).tolist()
        key_ids = _checked_array(key_ids, "key_ids", np.int32).tolist()
        s = self._seq(seq, "seq")
        if s.num_tokens:
            raise ValueError(f"seq: match_prefix needs an empty sequence; sequence {seq} holds "
                             f"{s.num_tokens} tokens")
        want = len(tokens) // self.block_size
        if len(key_ids) != want:
            raise ValueError(f"key_ids: expected one routing key per full block ({want} for "
                             f"{len(tokens)} tokens), got {len(key_ids)}")
        for i, k in enumerate(key_ids):
            self._check_key(k, "key_ids", i)
        self._check_tokens(tokens, "tokens")
        return self._match(s, tokens, key_ids)

    def match_many(self, tokens: np.ndarray, offsets: np.ndarray,
                   key_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = _checked_array(tokens, "tokens", np.int64).tolist()
        offsets = _checked_array(offsets, "offsets", np.int64).tolist()
        key_ids = _checked_array(key_ids, "key_ids", np.int32).tolist()
        if len(offsets) < 1:
            raise ValueError("offsets: expected at least 1 entry")
        if offsets[-1] != len(tokens):
            raise ValueError(f"offsets: last offset {offsets[-1]} != number of tokens "
                             f"{len(tokens)}")
        if offsets[0] != 0:
            raise ValueError(f"offsets: must start at 0, got {offsets[0]}")
        count = len(offsets) - 1
        want = 0
        for i in range(count):
            if offsets[i + 1] < offsets[i]:
                raise ValueError(f"offsets: must be non-decreasing; offsets[{i + 1}] < "
                                 f"offsets[{i}]")
            want += (offsets[i + 1] - offsets[i]) // self.block_size
        if len(key_ids) != want:
            raise ValueError(f"key_ids: expected one routing key per full block of every item "
                             f"({want}), got {len(key_ids)}")
        for i, k in enumerate(key_ids):
            self._check_key(k, "key_ids", i)
        self._check_tokens(tokens, "tokens")
        seqs, cached, k0 = [], [], 0
        for i in range(count):
            t = tokens[offsets[i]:offsets[i + 1]]
            seq = self.create()
            nk = len(t) // self.block_size
            seqs.append(seq)
            cached.append(self._match(self._seqs[seq], t, key_ids[k0:k0 + nk]))
            k0 += nk
        return np.array(seqs, dtype=np.int64), np.array(cached, dtype=np.int64)

    def _commit(self, s: _Sequence, i: int) -> None:
        b = s.blocks[i]
        key = self._key[b]
        parent = -1 if i == 0 else s.canonical[i - 1]
        c = self._counters
        if key == MIXED_KEY or (i > 0 and parent < 0):
            s.canonical.append(-1)
            c["blocks_uncacheable"] += 1
            return
        entry = (parent, 0 if parent < 0 else self._gen[parent], key, tuple(self._tokens[b]))
        existing = self._cache.get(entry)
        if existing is not None:
            self._acquire(existing)
            s.canonical.append(existing)
            c["blocks_duplicate"] += 1
            return
        self._cache[entry] = b
        self._cache_entry[b] = entry
        s.canonical.append(b)
        c["blocks_committed"] += 1
        ks = self._key_stats[key]
        ks["blocks_committed"] += 1
        ks["blocks_cached"] += 1

    def _fill(self, s: _Sequence, tokens: list[int], key: int, slots: list[int]) -> None:
        bs, i, n = self.block_size, 0, len(tokens)
        while i < n:
            bi, off = divmod(s.num_tokens, bs)
            b = s.blocks[bi]
            if off == 0:
                self._key[b] = key
            elif self._key[b] != key:
                self._key[b] = MIXED_KEY
            run = min(n - i, bs - off)
            self._tokens[b].extend(tokens[i:i + run])
            slots.extend(range(b * bs + off, b * bs + off + run))
            self._filled[b] += run
            s.num_tokens += run
            i += run
            if off + run == bs:
                self._commit(s, bi)
        self._counters["tokens_appended"] += n

    def _append_many(self, seqs: list[int], tokens: list[int], offsets: list[int],
                     key_ids: list[int], what: str) -> np.ndarray:
        if offsets[0] != 0:
            raise ValueError(f"offsets: must start at 0, got {offsets[0]}")
        projected: dict[int, list[int]] = {}
        needed = 0
        for i, seq in enumerate(seqs):
            s = self._seq(seq, "seqs")
            self._check_key(key_ids[i], "key_ids", i)
            n = offsets[i + 1] - offsets[i]
            if n < 0:
                raise ValueError(f"offsets: must be non-decreasing; offsets[{i + 1}] < "
                                 f"offsets[{i}]")
            p = projected.setdefault(seq, [s.num_tokens, len(s.blocks)])
            add = self._blocks_needed(p[0], p[1], n)
            needed += add
            p[1] += add
            p[0] += n
        self._check_tokens(tokens, "tokens")
        if needed > self.num_available_blocks():
            self._throw_full(needed, what)
        # Every new block is taken before any is filled (as the C++ manager does).
        for seq in projected:
            projected[seq][0] = self._seqs[seq].num_tokens
        for i, seq in enumerate(seqs):
            s, p = self._seqs[seq], projected[seq]
            n = offsets[i + 1] - offsets[i]
            for _ in range(self._blocks_needed(p[0], len(s.blocks), n)):
                s.blocks.append(self._allocate())
            p[0] += n
        slots: list[int] = []
        for i, seq in enumerate(seqs):
            self._fill(self._seqs[seq], tokens[offsets[i]:offsets[i + 1]], key_ids[i], slots)
        return np.array(slots, dtype=np.int64)

    def append(self, seq: int, tokens: np.ndarray, key_id: int) -> np.ndarray:
        t = _checked_array(tokens, "tokens", np.int64).tolist()
        self._seq(seq, "seq")
        self._check_key(key_id, "key_id", -1)
        return self._append_many([seq], t, [0, len(t)], [key_id], "append")

    def append_many(self, seqs: np.ndarray, tokens: np.ndarray, offsets: np.ndarray,
                    key_ids: np.ndarray) -> np.ndarray:
        seqs = _checked_array(seqs, "seqs", np.int64).tolist()
        tokens = _checked_array(tokens, "tokens", np.int64).tolist()
        offsets = _checked_array(offsets, "offsets", np.int64).tolist()
        key_ids = _checked_array(key_ids, "key_ids", np.int32).tolist()
        if len(offsets) != len(seqs) + 1:
            raise ValueError(f"offsets: expected {len(seqs) + 1} entries, got {len(offsets)}")
        if offsets[-1] != len(tokens):
            raise ValueError(f"offsets: last offset {offsets[-1]} != number of tokens "
                             f"{len(tokens)}")
        if len(key_ids) != len(seqs):
            raise ValueError(f"key_ids: expected one key per item ({len(seqs)}), got "
                             f"{len(key_ids)}")
        return self._append_many(seqs, tokens, offsets, key_ids,
                                 "append" if len(seqs) == 1 else "append_many")

    def fork(self, seq: int) -> tuple[int, int, int]:
        parent = self._seq(seq, "seq")
        bs = self.block_size
        full = parent.num_tokens // bs
        partial = parent.num_tokens % bs != 0
        if partial and self.num_available_blocks() < 1:
            self._throw_full(1, "fork")
        child = _Sequence()
        child.num_tokens = parent.num_tokens
        child.blocks = parent.blocks[:full]
        child.canonical = list(parent.canonical)
        for b, c in zip(child.blocks, child.canonical):
            self._acquire(b)
            if c >= 0 and c != b:
                self._acquire(c)
        src = dst = -1
        if partial:
            src = parent.blocks[-1]
            dst = self._allocate()
            self._key[dst] = self._key[src]
            self._filled[dst] = self._filled[src]
            self._tokens[dst] = list(self._tokens[src])
            child.blocks.append(dst)
        cid = self._next_seq
        self._next_seq += 1
        self._seqs[cid] = child
        return cid, src, dst

    def _free_seq(self, s: _Sequence) -> None:
        for i in range(len(s.blocks) - 1, -1, -1):
            b = s.blocks[i]
            self._release(b)
            if i < len(s.canonical):
                c = s.canonical[i]
                if c >= 0 and c != b:
                    self._release(c)

    def free(self, seq: int) -> None:
        self._free_seq(self._seq(seq, "seq"))
        del self._seqs[seq]

    def free_many(self, seqs: np.ndarray) -> None:
        seqs = _checked_array(seqs, "seqs", np.int64).tolist()
        seen: set[int] = set()
        for seq in seqs:
            self._seq(seq, "seqs")
            if seq in seen:
                raise ValueError(f"seqs: sequence {seq} appears twice")
            seen.add(seq)
        for seq in seqs:
            self.free(seq)

    # ---- queries ------------------------------------------------------------------------------

    def num_tokens(self, seq: int) -> int:
        return self._seq(seq, "seq").num_tokens

    def block_table(self, seq: int) -> np.ndarray:
        return np.array(self._seq(seq, "seq").blocks, dtype=np.int64)

    def sequences(self) -> list[int]:
        return sorted(self._seqs)

    def stats(self) -> dict[str, int]:
        d = dict(self._counters)
        d.update(blocks_in_use=self._in_use, blocks_evictable=len(self._lru),
                 blocks_free=len(self._free), blocks_cached=len(self._cache),
                 sequences=len(self._seqs))
        return d

    def key_stats(self) -> list[dict[str, int]]:
        return [dict(k) for k in self._key_stats]

    def reset_stats(self) -> None:
        self._counters = dict.fromkeys(_STAT_FIELDS, 0)
        for k in self._key_stats:
            k.update(dict.fromkeys(_KEY_FIELDS, 0))

    def state(self) -> dict:
        """Same layout as the C++ manager's state(), with hash None (this twin has none)."""
        seqs = {i: (s.num_tokens, tuple(s.blocks), tuple(s.canonical))
                for i, s in sorted(self._seqs.items())}
        blocks = []
        for b in range(self.num_blocks):
            entry = self._cache_entry[b]
            blocks.append((self._ref[b], self._gen[b], entry is not None, self._key[b],
                           entry[0] if entry is not None else -1, self._filled[b],
                           tuple(self._tokens[b]), None))
        return {"sequences": seqs, "blocks": blocks, "lru": tuple(self._lru),
                "free": tuple(reversed(self._free)), "stats": self.stats(),
                "num_keys": len(self._keys)}

    def check_invariants(self) -> None:
        """Raises RuntimeError naming the first broken structural invariant."""
        def fail(what: str) -> None:
            raise RuntimeError(f"ReferenceBlockManager invariant violated: {what}")

        refs = [0] * self.num_blocks
        for sid, s in self._seqs.items():
            if len(s.blocks) != -(-s.num_tokens // self.block_size):
                fail(f"sequence {sid} block count")
            if len(s.canonical) != s.num_tokens // self.block_size:
                fail(f"sequence {sid} canonical count")
            for i, b in enumerate(s.blocks):
                refs[b] += 1
                if i < len(s.canonical) and s.canonical[i] not in (-1, b):
                    refs[s.canonical[i]] += 1
        if refs != self._ref:
            fail("reference counts differ from the references sequences hold")
        if self._in_use != sum(r > 0 for r in self._ref):
            fail("in-use counter")
        if any(self._ref[b] or self._cache_entry[b] is None for b in self._lru):
            fail("LRU holds a referenced or uncached block")
        if any(self._ref[b] or self._cache_entry[b] is not None for b in self._free):
            fail("free list holds a referenced or cached block")
        if self._in_use + len(self._lru) + len(self._free) != self.num_blocks:
            fail("in use + evictable + free != num_blocks")
        for entry, b in self._cache.items():
            parent, parent_gen = entry[0], entry[1]
            if self._cache_entry[b] != entry:
                fail(f"cache index entry of block {b}")
            if parent >= 0 and (self._cache_entry[parent] is None or
                                self._gen[parent] != parent_gen):
                fail(f"cached block {b} lost its parent")
