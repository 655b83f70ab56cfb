"""Tests of bem.kv.KVBlockManager: a hypothesis state machine driving the C++ manager and its
pure-Python twin side by side against the test's own model, plus every bad-input case."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 precondition, rule)

from bem import _ext
from bem.kv import (KVBlockManager, KVCacheFullError, ReferenceBlockManager, RoutingKey,
                    weights_digest)

BACKENDS = ["python"] + (["cpp"] if _ext.available() else [])
needs_cpp = pytest.mark.skipif(not _ext.available(), reason="compiled core not built")

DIGEST_A = bytes(range(16))
DIGEST_B = bytes(range(1, 17))
# Same expert under other weights, same weights under another version, another expert: a block
# computed under one of these must never be served for another.
KEYS = [RoutingKey(0, DIGEST_A), RoutingKey(0, DIGEST_B), RoutingKey(0, DIGEST_A, 1),
        RoutingKey(1, DIGEST_A)]
MIXED = -2
# Token streams that sequences share (a system prompt, a continued conversation), so that hits,
# duplicates and evictions of shared blocks happen often.
STREAMS = [[0, 1, 2, 0, 1, 1, 2, 2, 0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 2, 2, 1, 0, 1, 1, 0, 2, 2, 0],
           [2, 2, 1, 0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 1]]


def comparable(state: dict) -> dict:
    """A manager state without the hashes (the Python twin has none) and interned-key count."""
    out = dict(state)
    out["blocks"] = [b[:7] for b in state["blocks"]]
    out.pop("num_keys")
    return out


def assert_unchanged(m: KVBlockManager, before: dict) -> None:
    assert comparable(m.state()) == comparable(before)
    m.check_invariants()


class ManagerMachine(RuleBasedStateMachine):
    """Random append / match / fork / free (single and batched) on a small pool, so that
    exhaustion and eviction happen often, on the C++ manager and the Python twin at once.

    The test's own model is deliberately simple: for each live sequence, its tokens and the key
    of each of its blocks. Everything the managers report is checked against it; the managers'
    full states are checked against each other (same allocation and eviction decisions)."""

    seqs = Bundle("seqs")

    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(1, 12),
                hash_bits=st.sampled_from([64, 2]))
    def setup(self, block_size: int, num_blocks: int, hash_bits: int) -> None:
        self.bs = block_size
        self.managers = [KVBlockManager(num_blocks, block_size, backend=b, hash_bits=hash_bits)
                         for b in BACKENDS]
        self.model: dict[int, tuple[list[int], list[int]]] = {}  # seq → (tokens, block keys)
        self.counts = dict(lookups=0, tokens_queried=0, tokens_hit=0, tokens_appended=0)
        self.key_hits = [0] * len(KEYS)

    def fresh(self) -> int:
        """A new empty sequence (for rules that must return one to the bundle)."""
        seq = self.run_all(lambda m: m.new_sequence())
        self.model[seq] = ([], [])
        return seq

    def key_ids(self, keys: list[RoutingKey]) -> list[int]:
        return [KEYS.index(k) for k in keys]

    def run_all(self, fn):
        """fn(manager) on every backend; the same result or the same exception type on all,
        and a raising call changes nothing."""
        results, errors = [], []
        for m in self.managers:
            before = m.state()
            try:
                results.append(fn(m))
                errors.append(None)
            except (ValueError, IndexError, TypeError, KVCacheFullError) as e:
                errors.append(type(e))
                assert_unchanged(m, before)
                event(f"raised {type(e).__name__}")
        assert len(set(errors)) == 1, errors
        if errors[0] is not None:
            return None
        for r in results[1:]:
            assert repr(r) == repr(results[0])
        return results[0]

    def record_append(self, seq: int, tokens: list[int], block_keys: list[RoutingKey]) -> None:
        """Extend the model: block_keys[j] is the key of the j-th block these tokens touch."""
        toks, keys = self.model[seq]
        first = len(toks) // self.bs
        for t in tokens:
            j = len(toks) // self.bs - first
            k = self.key_ids([block_keys[j]])[0]
            if len(toks) % self.bs == 0:
                keys.append(k)
            elif keys[-1] != k:
                keys[-1] = MIXED
            toks.append(t)
        self.counts["tokens_appended"] += len(tokens)

    def record_match(self, seq: int, tokens: list[int], keys: list[RoutingKey], cached: int):
        assert cached % self.bs == 0 and 0 <= cached <= len(tokens)
        self.counts["lookups"] += 1
        self.counts["tokens_queried"] += len(tokens)
        self.counts["tokens_hit"] += cached
        event("prefix hit" if cached else "prefix miss")
        ids = self.key_ids(keys)
        for i in range(cached // self.bs):
            self.key_hits[ids[i]] += self.bs
        self.model[seq] = (list(tokens[:cached]), ids[:cached // self.bs])

    tokens_st = st.one_of(
        st.lists(st.integers(0, 2), max_size=9),
        st.tuples(st.sampled_from(STREAMS), st.integers(0, 12)).map(lambda t: t[0][:t[1]]))

    def draw_keys(self, data, n: int) -> list[RoutingKey]:
        """Mostly one key for everything (as chunk-sticky routing often is), else random."""
        if data.draw(st.booleans(), label="one key"):
            return [KEYS[0]] * n
        return data.draw(st.lists(st.sampled_from(KEYS), min_size=n, max_size=n))

    @rule(target=seqs, tokens=tokens_st, data=st.data())
    def prefill(self, tokens, data):
        """A new request: match its prompt, then (usually) append the uncached rest."""
        keys = self.draw_keys(data, -(-len(tokens) // self.bs))
        seq = self.fresh()
        cached = self.run_all(lambda m: m.match_prefix(seq, tokens, keys))
        self.record_match(seq, tokens, keys, cached)
        if cached < len(tokens) and data.draw(st.booleans(), label="compute the rest"):
            rest = keys[cached // self.bs:]
            if self.run_all(lambda m: m.append(seq, tokens[cached:], rest)) is not None:
                self.record_append(seq, tokens[cached:], rest)
        return seq

    @rule(target=seqs, stream=st.sampled_from(STREAMS), n=st.integers(1, 12))
    def concurrent_prefill(self, stream, n):
        """Two requests with the same prompt in one step: both match before either computes,
        so the second computes blocks equal to the first's (duplicates)."""
        tokens, keys = stream[:n], [KEYS[0]] * -(-n // self.bs)
        pair = [self.fresh(), self.fresh()]
        cached = []
        for seq in pair:
            cached.append(self.run_all(lambda m: m.match_prefix(seq, tokens, keys)))
            self.record_match(seq, tokens, keys, cached[-1])
        for seq, c in zip(pair, cached):
            rest = keys[c // self.bs:]
            if self.run_all(lambda m: m.append(seq, tokens[c:], rest)) is not None:
                self.record_append(seq, tokens[c:], rest)
        return pair[1]

    @rule(target=seqs, prompts=st.lists(tokens_st, max_size=3), data=st.data())
    def match_many(self, prompts, data):
        routing = [self.draw_keys(data, len(p) // self.bs) for p in prompts]
        out = self.run_all(lambda m: m.match_many(prompts, routing))
        for (seq, cached), p, r in zip(out, prompts, routing):
            self.record_match(seq, p, r, cached)
        return out[-1][0] if out else self.fresh()

    @rule(seq=seqs, tokens=st.lists(st.integers(0, 2), max_size=6), data=st.data())
    def append(self, seq, tokens, data):
        if seq not in self.model:
            return
        n0 = len(self.model[seq][0])
        # Usually continue a shared stream this sequence follows (forks and concurrent requests
        # then compute identical blocks), else append the random tokens.
        mine = [x for x in STREAMS if x[:n0] == self.model[seq][0] and len(x) > n0]
        if mine and data.draw(st.integers(0, 3), label="continue a stream") > 0:
            tokens = data.draw(st.sampled_from(mine))[n0:n0 + max(1, len(tokens))]
        touched = (n0 + len(tokens) - 1) // self.bs - n0 // self.bs + 1 if tokens else 0
        if data.draw(st.booleans(), label="per-block routing"):
            routing = block_keys = self.draw_keys(data, touched)
        else:
            routing = data.draw(st.sampled_from([KEYS[0], KEYS[0]] + KEYS[1:]))
            block_keys = [routing] * touched
        slots = self.run_all(lambda m: m.append(seq, tokens, routing))
        if slots is None:
            return
        table = self.managers[0].block_table(seq)
        assert [int(s) for s in slots] == [int(table[p // self.bs]) * self.bs + p % self.bs
                                           for p in range(n0, n0 + len(tokens))]
        self.record_append(seq, tokens, block_keys)

    @rule(items=st.lists(st.tuples(st.integers(0, 40), st.lists(st.integers(0, 2), max_size=3),
                                   st.sampled_from(KEYS)), max_size=3))
    def append_many(self, items):
        live = sorted(self.model)
        if not live:
            return
        items = [(live[i % len(live)], t, k) for i, t, k in items]
        out = self.run_all(lambda m: m.append_many([i[0] for i in items], [i[1] for i in items],
                                                   [i[2] for i in items]))
        if out is not None:
            for seq, tokens, key in items:
                self.record_append(seq, tokens, [key] * (len(tokens) + 1))

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq not in self.model:
            return self.fresh()
        f = self.run_all(lambda m: m.fork(seq))
        if f is None:
            return self.fresh()
        toks, keys = self.model[seq]
        self.model[f.child] = (list(toks), list(keys))
        parent_table = self.managers[0].block_table(seq)
        child_table = self.managers[0].block_table(f.child)
        full = len(toks) // self.bs
        assert list(child_table[:full]) == list(parent_table[:full])
        if len(toks) % self.bs:
            assert (f.copy_src, f.copy_dst) == (parent_table[-1], child_table[-1])
            assert f.copy_src != f.copy_dst
        else:
            assert f.copy_src is None and f.copy_dst is None
        return f.child

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq in self.model:
            self.run_all(lambda m: m.free(seq))
            del self.model[seq]

    @rule(pick=st.lists(st.integers(0, 40), max_size=3, unique=True))
    def free_many(self, pick):
        live = sorted(self.model)
        if not live:
            return
        chosen = sorted({live[i % len(live)] for i in pick})
        self.run_all(lambda m: m.free_many(chosen))
        for s in chosen:
            del self.model[s]

    @rule(seq=seqs, bad=st.sampled_from(["negative seq", "unknown seq", "negative token",
                                         "huge token", "float tokens", "bool tokens", "2-D",
                                         "wrong routing type", "routing length",
                                         "match non-empty", "duplicate free"]))
    def bad_input(self, seq, bad):
        key = KEYS[0]
        calls = {
            "negative seq": lambda m: m.append(-1, [1], key),
            "unknown seq": lambda m: m.append(10**6, [1], key),
            "negative token": lambda m: m.append(seq, [1, -3], key),
            "huge token": lambda m: m.append(seq, [2**31], key),
            "float tokens": lambda m: m.append(seq, np.array([1.0, 2.0]), key),
            "bool tokens": lambda m: m.append(seq, torch.tensor([True]), key),
            "2-D": lambda m: m.append(seq, np.zeros((2, 2), dtype=np.int64), key),
            "wrong routing type": lambda m: m.append(seq, [1], "expert-0"),
            "routing length": lambda m: m.append(seq, [1], [key, key, key]),
            "match non-empty": lambda m: (m.match_prefix(seq, [1] * self.bs, key)
                                          if m.num_tokens(seq) else m.free_many([seq, seq])),
            "duplicate free": lambda m: m.free_many([seq, seq]),
        }
        if seq not in self.model:
            return
        for m in self.managers:
            before = m.state()
            with pytest.raises((ValueError, IndexError, TypeError)):
                calls[bad](m)
            assert_unchanged(m, before)

    @invariant()
    def consistent(self):
        if not hasattr(self, "managers"):
            return
        states = [m.state() for m in self.managers]
        for m in self.managers:
            m.check_invariants()
        for s in states[1:]:
            assert comparable(s) == comparable(states[0])
        state = states[0]
        blocks = state["blocks"]
        # Manager key id → index in KEYS (the model's ids); MIXED stays MIXED.
        key_of = {i: KEYS.index(k) for i, k in enumerate(self.managers[0].routing_keys)}
        key_of[MIXED] = MIXED
        assert sorted(state["sequences"]) == sorted(self.model)
        owners: dict[int, int] = {}
        for seq, (toks, keys) in self.model.items():
            num_tokens, table, _ = state["sequences"][seq]
            assert num_tokens == len(toks)
            assert len(table) == -(-len(toks) // self.bs)
            for j, b in enumerate(table):
                ref, _, cached, key, _, filled, btoks = blocks[b][:7]
                # The tokens and routing behind every block are exactly the sequence's.
                assert list(btoks) == toks[j * self.bs:(j + 1) * self.bs]
                assert key_of[key] == keys[j]
                assert ref >= 1
                if filled < self.bs:  # a partial block belongs to exactly one sequence
                    assert b not in owners and not cached and ref == 1
                    owners[b] = seq
        referenced = {b for _, table, _ in state["sequences"].values() for b in table}
        assert not referenced & set(state["lru"]) and not referenced & set(state["free"])
        assert all(b[0] >= 0 for b in blocks)
        stats = state["stats"]
        n = len(blocks)
        assert stats["blocks_in_use"] + stats["blocks_evictable"] + stats["blocks_free"] == n
        assert len(referenced) <= stats["blocks_in_use"] <= n
        for name in ("evictions", "blocks_duplicate", "blocks_uncacheable"):
            if stats[name]:
                event(f"{name} > 0")
        for name, value in self.counts.items():
            assert stats[name] == value, name
        per_key = self.managers[0].stats().per_key
        for k, hits in zip(KEYS, self.key_hits):
            assert (per_key[k].tokens_hit if k in per_key else 0) == hits
        assert sum(ks.blocks_cached for ks in per_key.values()) == stats["blocks_cached"]


ManagerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_manager_state_machine = ManagerMachine.TestCase


# ---- focused behaviour --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_hits_are_keyed_by_routing_and_weights(backend):
    m = KVBlockManager(32, 4, backend=backend)
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 50_000, 13)
    a = m.new_sequence()
    m.append(a, prompt, KEYS[0])
    for key, want in [(KEYS[0], 12), (KEYS[1], 0), (KEYS[2], 0), (KEYS[3], 0)]:
        s = m.new_sequence()
        assert m.match_prefix(s, prompt, key) == want
    # Routing that changes at block boundaries is reused block by block.
    b = m.new_sequence()
    per_block = [KEYS[3], KEYS[1], KEYS[3], KEYS[0]]
    m.append(b, prompt + 1, per_block)
    s = m.new_sequence()
    assert m.match_prefix(s, prompt + 1, per_block[:3]) == 12
    s = m.new_sequence()
    assert m.match_prefix(s, prompt + 1, [KEYS[3], KEYS[1], KEYS[0]]) == 8
    st_ = m.stats()
    assert st_.per_key[KEYS[1]].tokens_hit == 8 and st_.per_key[KEYS[1]].blocks_committed == 1
    assert st_.hit_rate == st_.tokens_hit / st_.tokens_queried


@pytest.mark.parametrize("backend", BACKENDS)
def test_eviction_is_lru_tail_first_and_spares_referenced_blocks(backend):
    m = KVBlockManager(5, 2, backend=backend)
    a, b = m.new_sequence(), m.new_sequence()
    m.append(a, [1, 2, 3, 4, 5, 6], KEYS[0])   # blocks 0, 1, 2
    m.append(b, [7, 8], KEYS[0])               # block 3
    m.free(a)
    assert m.state()["lru"] == (2, 1, 0)
    c = m.new_sequence()
    m.append(c, [9, 9, 9, 9], KEYS[0])         # block 4, then evicts block 2 (a's tail)
    assert list(m.block_table(c)) == [4, 2]
    assert m.stats().evictions == 1
    d = m.new_sequence()
    assert m.match_prefix(d, [1, 2, 3, 4, 5, 6], KEYS[0]) == 4
    with pytest.raises(KVCacheFullError, match="KV cache full"):
        m.append(d, [0] * 6, KEYS[0])          # nothing free or evictable: all 5 blocks held
    m.check_invariants()


@needs_cpp
def test_collisions_never_return_wrong_blocks():
    # A 1-bit index hash makes nearly every lookup collide; the exact check must still hold.
    m = KVBlockManager(64, 2, backend="cpp", hash_bits=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 4, 8) for _ in range(40)]
    for p in prompts:
        s = m.new_sequence()
        m.append(s, p, KEYS[0])
        m.free(s)
    for p in prompts + [rng.integers(0, 4, 8) for _ in range(40)]:
        s = m.new_sequence()
        cached = m.match_prefix(s, p, KEYS[0])
        blocks = m.state()["blocks"]
        got = [t for b in m.block_table(s) for t in blocks[b][6]]
        assert got == list(p[:cached])
        m.free(s)
    m.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_misses_stay_reusable(backend):
    m = KVBlockManager(16, 2, backend=backend)
    a, b = m.new_sequence(), m.new_sequence()
    m.append(a, [1, 2, 3, 4], KEYS[0])
    m.append(b, [1, 2, 3, 4], KEYS[0])   # same prompt computed twice (no hit in between)
    m.append(b, [5, 6], KEYS[0])         # b's next block is cached after a's twin blocks
    assert m.stats().blocks_duplicate == 2
    m.free_many([a, b])
    c = m.new_sequence()
    assert m.match_prefix(c, [1, 2, 3, 4, 5, 6], KEYS[0]) == 6
    m.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_change_inside_a_block_is_never_shared(backend):
    m = KVBlockManager(8, 4, backend=backend)
    s = m.new_sequence()
    m.append(s, [1, 2], KEYS[0])
    m.append(s, [3, 4, 5, 6, 7, 8], KEYS[1])
    st_ = m.stats()
    assert st_.blocks_uncacheable == 2 and st_.blocks_committed == 0
    for keys in ([KEYS[0], KEYS[1]], [KEYS[1], KEYS[1]]):
        t = m.new_sequence()
        assert m.match_prefix(t, [1, 2, 3, 4, 5, 6, 7, 8], keys) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_reset_keeps_occupancy(backend):
    m = KVBlockManager(8, 2, backend=backend)
    s = m.new_sequence()
    m.append(s, [1, 2, 3], KEYS[0])
    t = m.new_sequence()
    m.match_prefix(t, [1, 2, 3], KEYS[0])
    m.reset_stats()
    st_ = m.stats()
    assert (st_.lookups, st_.tokens_hit, st_.tokens_appended, st_.blocks_committed) == (0,) * 4
    assert st_.blocks_in_use == 2 and st_.blocks_cached == 1 and st_.sequences == 2
    assert st_.per_key[KEYS[0]].blocks_cached == 1 and st_.per_key[KEYS[0]].tokens_hit == 0
    assert st_.hit_rate == 0.0


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_blocks, block_size, exc", [
    (0, 4, ValueError), (-1, 4, ValueError), (2**31, 4, ValueError), (4, 0, ValueError),
    (4, -2, ValueError), (4, 2**20 + 1, ValueError), (4.0, 4, TypeError), (4, True, TypeError),
    ("4", 4, TypeError)])
def test_bad_geometry(backend, num_blocks, block_size, exc):
    with pytest.raises(exc, match="num_blocks|block_size"):
        KVBlockManager(num_blocks, block_size, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_and_change_nothing(backend):
    m = KVBlockManager(6, 4, backend=backend)
    s = m.new_sequence()
    m.append(s, [1, 2, 3, 4, 5], KEYS[0])
    full = m.new_sequence()
    before = m.state()
    cases = [
        (IndexError, "seq", lambda: m.append(-1, [1], KEYS[0])),
        (IndexError, "seq", lambda: m.append(99, [1], KEYS[0])),
        (IndexError, "seq", lambda: m.free(99)),
        (IndexError, "seq", lambda: m.fork(-5)),
        (IndexError, "seq", lambda: m.num_tokens(7)),
        (IndexError, "seq", lambda: m.match_prefix(99, [1], KEYS[0])),
        (IndexError, "seqs", lambda: m.free_many([s, 99])),
        (IndexError, "seqs", lambda: m.append_many([s, 99], [[1], [2]], KEYS[:2])),
        (TypeError, "seq", lambda: m.append(1.0, [1], KEYS[0])),
        (TypeError, "seq", lambda: m.free(True)),
        (ValueError, "tokens", lambda: m.append(s, [3, -1], KEYS[0])),
        (ValueError, "tokens", lambda: m.append(s, [2**31], KEYS[0])),
        (ValueError, "tokens", lambda: m.append(s, np.array([2**63], dtype=np.uint64), KEYS[0])),
        (TypeError, "tokens.*float32", lambda: m.append(s, np.ones(3, np.float32), KEYS[0])),
        (TypeError, "tokens.*bool", lambda: m.append(s, np.ones(3, bool), KEYS[0])),
        (TypeError, "tokens.*float", lambda: m.append(s, torch.ones(3), KEYS[0])),
        (TypeError, "tokens", lambda: m.append(s, [1, 2.5], KEYS[0])),
        (TypeError, "tokens", lambda: m.append(s, [1, "a"], KEYS[0])),
        (TypeError, "tokens", lambda: m.append(s, "abc", KEYS[0])),
        (ValueError, "tokens.*shape", lambda: m.append(s, [[1, 2]], KEYS[0])),
        (TypeError, "routing", lambda: m.append(s, [1], 0)),
        (TypeError, "routing", lambda: m.append(s, [1], [0])),
        (ValueError, "routing", lambda: m.append(s, [1, 2, 3, 4], [KEYS[0]])),
        (ValueError, "routing", lambda: m.match_prefix(full, [1] * 9, [KEYS[0]])),
        (ValueError, "routing", lambda: m.match_prefix(full, [1] * 9, KEYS[:1] * 4)),
        (ValueError, "seq.*empty", lambda: m.match_prefix(s, [1, 2, 3, 4], KEYS[0])),
        (ValueError, "seqs.*twice", lambda: m.free_many([s, s])),
        (ValueError, "seqs, tokens, routing", lambda: m.append_many([s], [[1], [2]], KEYS[:2])),
        (KVCacheFullError, "append needs 5", lambda: m.append(full, list(range(20)), KEYS[0])),
        (KVCacheFullError, "append_many needs 5",
         lambda: m.append_many([full, s], [[1] * 9, [1] * 8], KEYS[:2])),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()
        assert_unchanged(m, before)
    # Fork needs one block for the partial block's copy; with none available it fails whole.
    m.append(full, list(range(16)), KEYS[0])
    assert m.num_available_blocks() == 0
    before = m.state()
    with pytest.raises(KVCacheFullError, match="fork needs 1"):
        m.fork(s)
    assert_unchanged(m, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_array_checks_name_argument_and_dtype(backend):
    impl = (ReferenceBlockManager(4, 2) if backend == "python"
            else _ext.C().KVBlockManager(4, 2))
    kid = impl.intern_key(0, DIGEST_A, 0)
    s = impl.create()
    with pytest.raises(TypeError, match="tokens: expected dtype int64, got int32"):
        impl.append(s, np.ones(2, np.int32), kid)
    with pytest.raises(TypeError, match="tokens: expected a 1-D numpy int64 array, got list"):
        impl.append(s, [1, 2], kid)
    with pytest.raises(ValueError, match="tokens: expected a contiguous array"):
        impl.append(s, np.arange(4, dtype=np.int64)[::2], kid)
    with pytest.raises(TypeError, match="key_ids: expected dtype int32, got int64"):
        impl.match_prefix(s, np.ones(2, np.int64), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="offsets: expected 2 entries"):
        impl.append_many(np.array([s]), np.ones(2, np.int64), np.array([0, 1, 2]),
                         np.array([kid], np.int32))
    with pytest.raises(ValueError, match="offsets: must be non-decreasing"):
        impl.append_many(np.array([s, s]), np.ones(2, np.int64), np.array([0, 3, 2]),
                         np.array([kid, kid], np.int32))
    with pytest.raises(ValueError, match="weights_digest: expected 16 bytes"):
        impl.intern_key(0, b"short", 0)
    with pytest.raises(ValueError, match="expert"):
        impl.intern_key(-2, DIGEST_A, 0)
    with pytest.raises(IndexError, match="key_id"):
        impl.append(s, np.ones(1, np.int64), 5)
    assert impl.num_tokens(s) == 0
    impl.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_routing_key_and_backend(backend):
    with pytest.raises(ValueError, match="expert"):
        RoutingKey(-2, DIGEST_A)
    with pytest.raises(TypeError, match="expert"):
        RoutingKey(True, DIGEST_A)
    with pytest.raises(TypeError, match="expert"):
        RoutingKey(1.5, DIGEST_A)
    with pytest.raises(ValueError, match="version"):
        RoutingKey(0, DIGEST_A, -1)
    with pytest.raises(ValueError, match="weights_digest: expected 16 bytes, got 15"):
        RoutingKey(0, DIGEST_A[:15])
    with pytest.raises(TypeError, match="weights_digest"):
        RoutingKey(0, "x" * 16)
    assert RoutingKey(np.int64(3), DIGEST_A).expert == 3
    with pytest.raises(ValueError, match="backend"):
        KVBlockManager(4, 2, backend="gpu")
    with pytest.raises(ValueError, match="hash_bits"):
        KVBlockManager(4, 2, backend=backend, hash_bits=0)


# ---- weights digest -----------------------------------------------------------------------------

def test_weights_digest_tracks_values_dtype_shape_and_names():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(7, 5, generator=g)
    base = weights_digest({"w": w})
    assert len(base) == 16 and weights_digest({"w": w.clone()}) == base
    changed = w.clone()
    changed[3, 2] += 1e-3
    assert weights_digest({"w": changed}) != base
    assert weights_digest({"w": w.double()}) != base
    assert weights_digest({"w": w.reshape(5, 7)}) != base
    assert weights_digest({"v": w}) != base
    assert weights_digest({"w": w.t().contiguous().t()}) == base  # layout does not matter
    assert weights_digest(w.to(torch.bfloat16)) != weights_digest(w.to(torch.float16))
    lin = torch.nn.Linear(5, 3)
    assert weights_digest(lin) == weights_digest(dict(lin.state_dict()))
    assert RoutingKey.for_weights(2, lin, 1) == RoutingKey(2, weights_digest(lin), 1)
    with pytest.raises(TypeError, match="weights"):
        weights_digest(3)
    with pytest.raises(TypeError, match="weights\\[.*\\]: expected a torch.Tensor"):
        weights_digest({"w": np.ones(3)})
    with pytest.raises(ValueError, match="nothing to digest"):
        weights_digest({})
    with pytest.raises(ValueError, match="meta"):
        weights_digest(torch.empty(3, device="meta"))


def test_weights_digest_is_stable_across_processes():
    code = ("import torch; from bem.kv import weights_digest; "
            "g = torch.Generator().manual_seed(5); "
            "print(weights_digest({'a': torch.randn(9, 4, generator=g), "
            "'b': torch.arange(6, dtype=torch.int32)}).hex())")
    g = torch.Generator().manual_seed(5)
    here = weights_digest({"a": torch.randn(9, 4, generator=g),
                           "b": torch.arange(6, dtype=torch.int32)}).hex()
    root = Path(__file__).resolve().parents[1] / "python"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == here


# ---- threads ------------------------------------------------------------------------------------

@needs_cpp
def test_threads_with_released_gil_keep_the_manager_consistent():
    m = KVBlockManager(4096, 16, backend="cpp")
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                s = m.new_sequence()
                m.append(s, rng.integers(0, 3, 5000), KEYS[seed % 2])  # large: GIL released
                m.match_prefix(m.new_sequence(), rng.integers(0, 3, 64), KEYS[0])
                m.free(s)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    m.check_invariants()
    assert m.stats().tokens_appended == 3 * 20 * 5000


@given(st.lists(st.integers(0, 2**31 - 1), max_size=40), st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_slots_address_the_block_table(tokens, block_size):
    for backend in BACKENDS:
        m = KVBlockManager(64, block_size, backend=backend)
        s = m.new_sequence()
        slots = m.append(s, tokens, KEYS[0])
        table = m.block_table(s)
        assert slots.dtype == np.int64 and len(slots) == len(tokens)
        assert [int(x) for x in slots] == [int(table[p // block_size]) * block_size
                                           + p % block_size for p in range(len(tokens))]


def test_auto_backend_falls_back_to_python_with_a_warning(monkeypatch, caplog):
    import bem.kv.manager as manager_module
    monkeypatch.setattr(manager_module._ext, "available", lambda: False)
    monkeypatch.setattr(manager_module, "_warned_fallback", False)
    with caplog.at_level("WARNING", logger="bem"):
        m = KVBlockManager(4, 2)
        KVBlockManager(4, 2)
    assert m.backend == "python" and isinstance(m._impl, ReferenceBlockManager)
    assert sum("pure-Python block manager" in r.message for r in caplog.records) == 1
