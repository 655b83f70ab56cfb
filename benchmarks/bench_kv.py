"""Benchmarks of bem.kv: (1) operations per second of the C++ block manager against its
pure-Python twin (same logic, same run) for match / append / free with many sequences, per call
and batched; (2) prefix-cache hit rate on a generated multi-turn chat workload under chunk-sticky
versus per-token routing.

    PYTHONPATH=python python benchmarks/bench_kv.py            # both parts, 100k sequences
    PYTHONPATH=python python benchmarks/bench_kv.py --quick    # small smoke run
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from bem import _ext
from bem.kv import KVBlockManager, ReferenceBlockManager, RoutingKey

BLOCK = 64


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}")


# ---- part 1: operations per second --------------------------------------------------------------

def make_prompts(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n prompts: a shared 128-token system prompt + 1..191 own tokens, and one routing key id
    (0) per full block."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 50_000, 2 * BLOCK)
    prompts, keys = [], []
    for i in range(n):
        own = rng.integers(0, 50_000, int(rng.integers(1, 3 * BLOCK)))
        p = np.concatenate([system, own])
        prompts.append(p)
        keys.append(np.zeros(len(p) // BLOCK, dtype=np.int32))
    return prompts, keys


def prepare(impl, system: np.ndarray) -> None:
    """Intern the keys and cache the system prompt (one earlier request computed it)."""
    for e in range(4):
        impl.intern_key(e, hashlib.blake2b(bytes([e]), digest_size=16).digest(), 0)
    s = impl.create()
    impl.append(s, system, 0)
    impl.free(s)


def run_per_call(impl, prompts, keys) -> dict[str, float]:
    """Seconds for each phase over all sequences, one call per operation."""
    n = len(prompts)
    times = {}
    t0 = time.perf_counter()
    seqs = []
    for i in range(n):
        s = impl.create()
        impl.match_prefix(s, prompts[i], keys[i])
        seqs.append(s)
    times["match"] = time.perf_counter() - t0
    suffix = [prompts[i][impl.num_tokens(s):] for i, s in enumerate(seqs)]
    one = [p[:1] for p in prompts]
    t0 = time.perf_counter()
    for i in range(n):
        impl.append(seqs[i], suffix[i], 0)
    times["append (prompt suffix)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        impl.append(seqs[i], one[i], 0)
    times["append (1 token)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in seqs:
        impl.free(s)
    times["free"] = time.perf_counter() - t0
    return times


def run_batched(impl, prompts, keys, batch: int) -> dict[str, float]:
    """Seconds for each phase over all sequences, `batch` sequences per call."""
    n = len(prompts)
    times = {"match": 0.0, "append (prompt suffix)": 0.0, "append (1 token)": 0.0, "free": 0.0}
    all_seqs = []
    for lo in range(0, n, batch):
        ps, ks = prompts[lo:lo + batch], keys[lo:lo + batch]
        flat = np.concatenate(ps)
        offsets = np.zeros(len(ps) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in ps], out=offsets[1:])
        flat_keys = np.concatenate(ks)
        t0 = time.perf_counter()
        seqs, cached = impl.match_many(flat, offsets, flat_keys)
        times["match"] += time.perf_counter() - t0
        suffix = [p[c:] for p, c in zip(ps, cached.tolist())]
        sflat = np.concatenate(suffix)
        soff = np.zeros(len(ps) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in suffix], out=soff[1:])
        kid = np.zeros(len(ps), dtype=np.int32)
        one = np.array([p[0] for p in ps], dtype=np.int64)
        one_off = np.arange(len(ps) + 1, dtype=np.int64)
        t0 = time.perf_counter()
        impl.append_many(seqs, sflat, soff, kid)
        times["append (prompt suffix)"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        impl.append_many(seqs, one, one_off, kid)
        times["append (1 token)"] += time.perf_counter() - t0
        all_seqs.append(seqs)
    for seqs in all_seqs:
        t0 = time.perf_counter()
        impl.free_many(seqs)
        times["free"] += time.perf_counter() - t0
    return times


def run_public(m: KVBlockManager, prompts, routing) -> dict[str, float]:
    """The public bem.kv.KVBlockManager API (argument conversion and checks included)."""
    n = len(prompts)
    times = {}
    t0 = time.perf_counter()
    seqs, cached = [], []
    for i in range(n):
        s = m.new_sequence()
        cached.append(m.match_prefix(s, prompts[i], routing[i]))
        seqs.append(s)
    times["match"] = time.perf_counter() - t0
    suffix = [prompts[i][c:] for i, c in enumerate(cached)]
    one = [p[:1] for p in prompts]
    key = routing[0]
    t0 = time.perf_counter()
    for i in range(n):
        m.append(seqs[i], suffix[i], key)
    times["append (prompt suffix)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        m.append(seqs[i], one[i], key)
    times["append (1 token)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in seqs:
        m.free(s)
    times["free"] = time.perf_counter() - t0
    return times


def ops_benchmark(n: int, repeats: int, batch: int) -> None:
    prompts, keys = make_prompts(n, seed=0)
    keyset = [RoutingKey(e, hashlib.blake2b(bytes([e]), digest_size=16).digest()) for e in range(4)]
    routing = [keyset[0]] * n
    num_blocks = 4 * n + 16
    tokens = sum(len(p) for p in prompts)
    impls = {"C++": lambda: _ext.C().KVBlockManager(num_blocks, BLOCK),
             "Python": lambda: ReferenceBlockManager(num_blocks, BLOCK)}
    modes = {
        "per call": lambda impl: run_per_call(impl, prompts, keys),
        f"batched ({batch}/call)": lambda impl: run_batched(impl, prompts, keys, batch),
    }
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    warm_p, warm_k = make_prompts(2000, seed=1)
    for name, make in impls.items():  # warm-up: allocator, code paths
        impl = make()
        prepare(impl, warm_p[0][:2 * BLOCK])
        run_per_call(impl, warm_p, warm_k)
        run_batched(impl, warm_p, warm_k, batch)
    for r in range(repeats):
        for mode, fn in modes.items():
            for name, make in impls.items():
                impl = make()
                prepare(impl, prompts[0][:2 * BLOCK])
                gc.collect()
                results.setdefault((mode, name), []).append(fn(impl))
                del impl
        for name, backend in (("C++", "cpp"), ("Python", "python")):
            m = KVBlockManager(num_blocks, BLOCK, backend=backend)
            m.append(m.new_sequence(), prompts[0][:2 * BLOCK], routing[0])
            gc.collect()
            results.setdefault(("public API, per call", name), []).append(
                run_public(m, prompts, routing))
            del m
    print(f"\n### Block manager operations per second ({n:,} sequences, block {BLOCK}, "
          f"{tokens:,} prompt tokens, median of {repeats})\n")
    print("| mode | operation | C++ ops/s | Python ops/s | C++ / Python |")
    print("|---|---|---:|---:|---:|")
    for mode in list(modes) + ["public API, per call"]:
        for op in results[(mode, "C++")][0]:
            t_c = statistics.median(x[op] for x in results[(mode, "C++")])
            t_p = statistics.median(x[op] for x in results[(mode, "Python")])
            print(f"| {mode} | {op} | {n / t_c:,.0f} | {n / t_p:,.0f} | {t_p / t_c:.1f}× |")


# ---- part 2: hit rate on a multi-turn workload --------------------------------------------------

EXPERTS = 4
EXPERT_KEYS = [RoutingKey(e, hashlib.blake2b(b"expert%d" % e, digest_size=16).digest())
               for e in range(EXPERTS)]


def mixture_key(experts: list[int]) -> RoutingKey:
    """Key of a chunk whose tokens used different experts: exact in the per-token choices
    (expert −1 here stands for "several experts")."""
    if len(set(experts)) == 1:
        return EXPERT_KEYS[experts[0]]
    h = hashlib.blake2b(bytes(experts), digest_size=16)
    for e in sorted(set(experts)):
        h.update(EXPERT_KEYS[e].weights_digest)
    return RoutingKey(-1, h.digest())


def _h(*xs: int) -> int:
    return int.from_bytes(hashlib.blake2b(np.asarray(xs, np.int64).tobytes(),
                                          digest_size=8).digest(), "little")


class Router:
    """How a request's tokens are routed.

    chunk:  chunk-sticky, prefix-causal (bem): block b's expert from block b−1's tokens.
    token-causal:  per token, from the token and its predecessor (prefix-causal).
    token-request: per token, from the token and the request (as a router that reads the whole
                   request does, X-LoRA-like: old tokens are re-routed every turn)."""

    def __init__(self, mode: str):
        self.mode = mode

    def token_experts(self, tokens: list[int], request: int) -> list[int]:
        if self.mode == "token-causal":
            return [_h(tokens[i - 1] if i else -1, tokens[i]) % EXPERTS for i in range(len(tokens))]
        return [_h(t, request) % EXPERTS for t in tokens]

    def chunk_expert(self, tokens: list[int], b: int) -> int:
        return 0 if b == 0 else _h(*tokens[(b - 1) * BLOCK:b * BLOCK]) % EXPERTS


def conversations(users: int, turns: int, seed: int):
    """Requests in arrival order: (user, turn, prompt, response). Turn t's prompt is the shared
    system prompt, the conversation so far and the new user message."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 32_000, 400).tolist()
    history = {u: list(system) for u in range(users)}
    requests = []
    for t in range(turns):
        for u in rng.permutation(users).tolist():
            user_msg = rng.integers(0, 32_000, int(rng.integers(20, 200))).tolist()
            response = rng.integers(0, 32_000, int(rng.integers(30, 400))).tolist()
            prompt = history[u] + user_msg
            requests.append((u, t, prompt, response))
            history[u] = prompt + response
    return requests


def simulate(requests, mode: str, num_blocks: int, concurrency: int) -> dict[str, float]:
    """Serve the requests `concurrency` at a time: match every prompt of the wave, compute the
    uncached rest, decode the responses token by token (interleaved), free. Also counts the
    ideal hits: the leading full blocks of each prompt that some earlier sequence had filled
    with the same tokens under the same keys."""
    m = KVBlockManager(num_blocks, BLOCK)
    router = Router({"chunk-sticky": "chunk", "per-token (causal)": "token-causal",
                     "per-token (request-dependent)": "token-request",
                     "no reuse": "chunk"}[mode])
    seen: set[bytes] = set()
    ideal = queried = 0

    def block_ids(tokens: list[int], keys: list[RoutingKey]) -> list[bytes]:
        out, h = [], hashlib.blake2b(digest_size=16)
        for b in range(len(tokens) // BLOCK):
            h.update(np.asarray(tokens[b * BLOCK:(b + 1) * BLOCK], np.int64).tobytes())
            h.update(repr(keys[b]).encode())
            out.append(h.copy().digest())
        return out

    def keys_for(tokens: list[int], request: int) -> list[RoutingKey]:
        n = -(-len(tokens) // BLOCK)
        if router.mode == "chunk":
            return [EXPERT_KEYS[router.chunk_expert(tokens, b)] for b in range(n)]
        e = router.token_experts(tokens, request)
        return [mixture_key(e[b * BLOCK:(b + 1) * BLOCK]) for b in range(n)]

    for lo in range(0, len(requests), concurrency):
        wave = [(lo + i, r) for i, r in enumerate(requests[lo:lo + concurrency])]
        live = []
        for rid, (_, _, prompt, response) in wave:
            keys = keys_for(prompt, rid)
            seq = m.new_sequence()
            queried += len(prompt)
            cached = m.match_prefix(seq, prompt, keys) if mode != "no reuse" else 0
            if router.mode == "chunk":
                ids = block_ids(prompt, keys)
                ideal += BLOCK * next((i for i, x in enumerate(ids) if x not in seen), len(ids))
            live.append([rid, seq, prompt, response, keys, cached])
        for rid, seq, prompt, _, keys, cached in live:
            m.append(seq, prompt[cached:], keys[cached // BLOCK:])
            if router.mode == "chunk":
                seen.update(block_ids(prompt, keys))
        for step in range(max(len(x[3]) for x in live)):
            for rid, seq, prompt, response, _, _ in live:
                if step >= len(response):
                    continue
                tokens = prompt + response[:step + 1]
                if router.mode == "chunk":
                    key = EXPERT_KEYS[router.chunk_expert(tokens, (len(tokens) - 1) // BLOCK)]
                else:
                    key = EXPERT_KEYS[router.token_experts(tokens[-2:], rid)[-1]]
                m.append(seq, response[step:step + 1], key)
                if len(tokens) % BLOCK == 0 and router.mode == "chunk":
                    seen.update(block_ids(tokens, keys_for(tokens, rid))[-1:])
        m.free_many([x[1] for x in live])
    st = m.stats()
    return {"queried": queried, "hit": st.tokens_hit, "ideal": ideal,
            "evictions": st.evictions, "uncacheable": st.blocks_uncacheable,
            "duplicate": st.blocks_duplicate}


def hit_benchmark(users: int, turns: int, concurrency: int) -> None:
    requests = conversations(users, turns, seed=7)
    total = sum(len(p) + len(r) for _, _, p, r in requests)
    working = sum(-(-(len(p) + len(r)) // BLOCK) for _, t, p, r in requests if t == turns - 1)
    pools = {"unbounded": 4 * total // BLOCK + 64, "tight (≈ last turn's working set / 2)":
             max(working // 2, concurrency * 40)}
    print(f"\n### Prefix-cache hit rate, multi-turn chat ({users} users × {turns} turns, "
          f"400-token shared system prompt, user 20–199 / response 30–399 tokens, {EXPERTS} "
          f"experts, {concurrency} requests in flight, block {BLOCK})\n")
    print("| pool (blocks) | routing | tokens hit / queried | hit rate | ideal (all full chunks "
          "seen before) | evictions | uncacheable blocks | duplicate blocks |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for pool_name, nb in pools.items():
        for mode in ("no reuse", "chunk-sticky", "per-token (causal)",
                     "per-token (request-dependent)"):
            r = simulate(requests, mode, nb, concurrency)
            ideal = f"{r['ideal'] / r['queried']:.3f}" if mode == "chunk-sticky" else "—"
            print(f"| {pool_name}: {nb:,} | {mode} | {r['hit']:,} / {r['queried']:,} | "
                  f"{r['hit'] / r['queried']:.3f} | {ideal} | {r['evictions']:,} | "
                  f"{r['uncacheable']:,} | {r['duplicate']:,} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="sequences per batched call")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--part", choices=("ops", "hits", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.sequences, args.repeats, args.users, args.turns = 3000, 1, 20, 3
    if not _ext.available():
        print(f"bem's compiled core is not available: {_ext.load_error()}", file=sys.stderr)
        return 1
    print(f"Machine: {machine()}")
    print(f"Command: PYTHONPATH=python python benchmarks/bench_kv.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    if args.part in ("ops", "all"):
        ops_benchmark(args.sequences, args.repeats, args.batch)
    if args.part in ("hits", "all"):
        hit_benchmark(args.users, args.turns, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
