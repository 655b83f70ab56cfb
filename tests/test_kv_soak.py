"""KV soak: long random streams of operations (prefill-match, append, batched append and match,
fork, free, bad calls) on the C++ block manager and its pure-Python twin side by side. Every call
must return the same thing (or raise the same exception type) on both; every 1,000 operations
their full states must agree and both pass check_invariants.

CI runs 20,000 operations; the slow test runs 10⁶ (result recorded in docs/reliability.md)."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from bem import _ext
from bem.kv import KVBlockManager, KVCacheFullError, RoutingKey

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the C++ manager (bem._C)")

KEYS = [RoutingKey(0, bytes(16)), RoutingKey(0, bytes(range(16))), RoutingKey(1, bytes(16), 3)]
# Shared token streams (system prompts, continued conversations) so that hits, duplicates,
# forks of shared blocks and evictions happen all the time.
STREAMS = [[(7 * i + s) % 5 for i in range(300)] for s in range(4)]


def _comparable(state: dict) -> dict:
    out = dict(state)
    out["blocks"] = [b[:7] for b in state["blocks"]]   # the Python twin keeps no hashes
    out.pop("num_keys")
    return out


def soak(n_ops: int, seed: int, num_blocks: int = 48, block_size: int = 4) -> dict:
    rng = random.Random(seed)
    managers = [KVBlockManager(num_blocks, block_size, backend=b) for b in ("cpp", "python")]
    counts = {"ops": 0, "raised": 0, "full": 0, "hits": 0}

    def both(fn):
        """fn(manager) on both backends (fn must not draw from rng: both calls must be equal)."""
        out, errs = [], []
        for m in managers:
            try:
                out.append(fn(m))
                errs.append(None)
            except (ValueError, IndexError, TypeError, KVCacheFullError) as e:
                out.append(None)
                errs.append(type(e))
        assert errs[0] == errs[1], (counts["ops"], errs)
        if errs[0] is not None:
            counts["raised"] += 1
            counts["full"] += errs[0] is KVCacheFullError
            return None
        assert repr(out[0]) == repr(out[1]), (counts["ops"], out)
        return out[0]

    live: list[int] = []
    for i in range(n_ops):
        counts["ops"] = i
        # Finish requests when many are live, as a server does (and so that the live set, and the
        # cost of each check, stays bounded over 10⁶ operations).
        op = rng.uniform(0.80, 0.97) if len(live) > 40 else rng.random()
        if op < 0.25 or not live:                               # a new request
            s = both(lambda m: m.new_sequence())
            stream = rng.choice(STREAMS)
            n = rng.randrange(0, 40)
            prompt = stream[:n] if rng.random() < 0.8 else [rng.randrange(5) for _ in range(n)]
            key = KEYS[0] if rng.random() < 0.7 else rng.choice(KEYS)
            cached = both(lambda m: m.match_prefix(s, prompt, key))
            counts["hits"] += bool(cached)
            live.append(s)
            if cached is not None and cached < len(prompt):
                both(lambda m: m.append(s, prompt[cached:], key))
        elif op < 0.55:                                         # decode steps
            s = rng.choice(live)
            toks = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
            key = rng.choice(KEYS) if rng.random() < 0.1 else KEYS[0]
            both(lambda m: m.append(s, toks, key))
        elif op < 0.65:                                         # a batched decode step
            batch = rng.sample(live, min(len(live), rng.randrange(1, 4)))
            toks = [[rng.randrange(5)] for _ in batch]
            both(lambda m: m.append_many(batch, toks, [KEYS[0]] * len(batch)))
        elif op < 0.72:                                         # batched prefix lookups
            prompts = [rng.choice(STREAMS)[:rng.randrange(0, 30)] for _ in range(rng.randrange(1, 3))]
            out = both(lambda m: m.match_many(prompts, [KEYS[0]] * len(prompts)))
            if out is not None:
                live.extend(seq for seq, _ in out)
        elif op < 0.80:                                         # fork (beam search, n > 1)
            parent = rng.choice(live)
            f = both(lambda m: m.fork(parent))
            if f is not None:
                live.append(f.child)
        elif op < 0.97:                                         # finish requests
            if rng.random() < 0.7:
                s = live.pop(rng.randrange(len(live)))
                both(lambda m: m.free(s))
            else:
                batch = rng.sample(live, min(len(live), rng.randrange(1, 4)))
                both(lambda m: m.free_many(batch))
                live = [s for s in live if s not in batch]
        else:                                                   # bad calls change nothing
            bad = rng.choice([
                lambda m: m.append(10**9, [1], KEYS[0]),
                lambda m: m.append(live[0], [-1], KEYS[0]),
                lambda m: m.append(live[0], np.array([1.5]), KEYS[0]),
                lambda m: m.free_many([live[0], live[0]]),
                lambda m: m.fork(-1),
            ])
            before = [_comparable(m.state()) for m in managers]
            assert both(bad) is None
            assert [_comparable(m.state()) for m in managers] == before
        if i % 1000 == 999:
            states = [m.state() for m in managers]
            assert _comparable(states[0]) == _comparable(states[1]), i
            for m in managers:
                m.check_invariants()
            assert sorted(live) == sorted(states[0]["sequences"])
    for m in managers:
        m.check_invariants()
    counts["ops"] = n_ops
    counts["stats"] = managers[0].stats()
    return counts


def test_kv_soak_20k_operations():
    counts = soak(20_000, seed=1)
    stats = counts["stats"]
    # The stream must have exercised what it is meant to: hits, evictions, a full pool.
    assert counts["hits"] > 100 and stats.evictions > 100 and counts["full"] > 0, counts


@pytest.mark.slow
def test_kv_soak_one_million_operations():
    t = time.perf_counter()
    counts = soak(1_000_000, seed=2)
    stats = counts["stats"]
    print(f"\nKV soak: {counts['ops']:,} operations in {time.perf_counter() - t:.0f} s; "
          f"{counts['raised']:,} raised ({counts['full']:,} KV cache full), "
          f"{counts['hits']:,} prefix hits, {stats.evictions:,} evictions, "
          f"{stats.blocks_duplicate:,} duplicate blocks, hit rate {stats.hit_rate:.3f}")
    assert counts["hits"] > 1000 and stats.evictions > 1000
