"""Tests of bem.kv.KVStorage and KVCache: scatter / gather / copy-on-write on every available
device, and cached generation of a small routed causal transformer equal to full recomputation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bem import _ext
from bem.kv import KVBlockManager, KVCache, KVCacheFullError, KVStorage, RoutingKey

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["python"] + (["cpp"] if _ext.available() else [])
KEY = RoutingKey(0, bytes(16))


def random_kv(g: torch.Generator, heads: int, n: int, head_dim: int, dtype, device):
    k = torch.randn(heads, n, head_dim, generator=g, dtype=torch.float64).to(device, dtype)
    v = torch.randn(heads, n, head_dim, generator=g, dtype=torch.float64).to(device, dtype)
    return k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_gather_round_trip(device, dtype):
    g = torch.Generator().manual_seed(1)
    layers, heads, head_dim, bs = 3, 3, 5, 4
    m = KVBlockManager(13, bs)
    store = KVStorage(layers, 13, heads, head_dim, bs, dtype=dtype, device=device)
    seqs = [m.new_sequence() for _ in range(2)]
    want = {s: [[] for _ in range(layers)] for s in seqs}
    # Interleaved chunks of odd sizes (prefill, then one-token decode steps).
    for step, n in enumerate([7, 1, 1, 5, 1, 3]):
        s = seqs[step % 2]
        slots = m.append(s, list(range(n)), KEY)
        for layer in range(layers):
            k, v = random_kv(g, heads, n, head_dim, dtype, device)
            store.write(layer, slots, k, v)
            want[s][layer].append((k, v))
    for s in seqs:
        for layer in range(layers):
            k, v = store.read(layer, m.block_table(s), m.num_tokens(s))
            assert k.shape == v.shape == (heads, m.num_tokens(s), head_dim)
            assert k.dtype == dtype and k.device.type == device
            assert torch.equal(k, torch.cat([kv[0] for kv in want[s][layer]], dim=1))
            assert torch.equal(v, torch.cat([kv[1] for kv in want[s][layer]], dim=1))


@pytest.mark.parametrize("device", DEVICES)
def test_copy_on_write_fork(device):
    g = torch.Generator().manual_seed(2)
    heads, head_dim, bs = 2, 7, 4
    m = KVBlockManager(8, bs)
    store = KVStorage(2, 8, heads, head_dim, bs, device=device)
    parent = m.new_sequence()
    slots = m.append(parent, list(range(6)), KEY)  # one full block, one partial
    for layer in range(2):
        store.write(layer, slots, *random_kv(g, heads, 6, head_dim, torch.float32, device))
    before = [store.read(layer, m.block_table(parent), 6) for layer in range(2)]
    f = m.fork(parent)
    assert f.copy_src is not None
    store.copy_blocks(f.copy_src, f.copy_dst)
    for layer in range(2):
        k, v = store.read(layer, m.block_table(f.child), 6)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])
    # Divergent continuations write into their own partial blocks.
    new = {}
    for s in (parent, f.child):
        slots = m.append(s, [9], KEY)
        new[s] = random_kv(g, heads, 1, head_dim, torch.float32, device)
        store.write(0, slots, *new[s])
    for s in (parent, f.child):
        k, v = store.read(0, m.block_table(s), 7)
        assert torch.equal(k[:, :6], before[0][0]) and torch.equal(k[:, 6:], new[s][0])
        assert torch.equal(v[:, 6:], new[s][1])


def test_storage_bad_input():
    store = KVStorage(2, 4, 3, 5, 4)
    k = torch.randn(3, 2, 5)
    before = store.data.clone()
    cases = [
        (IndexError, "layer", lambda: store.write(2, [0, 1], k, k)),
        (IndexError, "layer", lambda: store.write(-1, [0, 1], k, k)),
        (TypeError, "layer", lambda: store.write(0.0, [0, 1], k, k)),
        (IndexError, "slots", lambda: store.write(0, [0, 16], k, k)),
        (IndexError, "slots", lambda: store.write(0, np.array([-1, 0]), k, k)),
        (IndexError, "slots", lambda: store.write(0, torch.tensor([0, 99]), k, k)),
        (TypeError, "slots", lambda: store.write(0, np.array([0.0, 1.0]), k, k)),
        (TypeError, "slots", lambda: store.write(0, torch.tensor([0.0, 1.0]), k, k)),
        (ValueError, "slots", lambda: store.write(0, [[0, 1]], k, k)),
        (ValueError, "k: expected shape", lambda: store.write(0, [0, 1, 2], k, k)),
        (ValueError, "v: expected shape", lambda: store.write(0, [0, 1], k, k[:2])),
        (TypeError, "k: expected torch.float32", lambda: store.write(0, [0, 1], k.double(), k)),
        (TypeError, "v: expected a torch.Tensor", lambda: store.write(0, [0, 1], k, None)),
        (ValueError, "num_tokens", lambda: store.read(0, [0, 1], 3)),
        (ValueError, "num_tokens", lambda: store.read(0, [0], 5)),
        (IndexError, "block_table", lambda: store.read(0, [4], 1)),
        (IndexError, "dst", lambda: store.copy_blocks(0, 4)),
        (ValueError, "src, dst", lambda: store.copy_blocks([0, 1], [2])),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()
        assert torch.equal(store.data, before)
    for kwargs, exc in [(dict(layers=0), ValueError), (dict(heads=-1), ValueError),
                        (dict(block_size=0), ValueError), (dict(head_dim=2.0), TypeError),
                        (dict(dtype=torch.int64), TypeError)]:
        args = dict(layers=1, num_blocks=2, heads=1, head_dim=1, block_size=1) | kwargs
        with pytest.raises(exc):
            KVStorage(**args)


# ---- a small routed causal transformer on the cache ---------------------------------------------

class TinyRoutedLM(nn.Module):
    """Pre-LN causal transformer whose K/V projections depend on a per-token expert:
    k/v = W_{k,v}(h + h · delta[expert]). Positions are learned embeddings."""

    def __init__(self, vocab=37, d=18, heads=3, layers=2, experts=3, max_pos=96, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.head_dim = heads, d // heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_pos, d)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                 for _ in range(layers))
        self.delta = nn.Parameter(0.3 * torch.randn(layers, experts, d, d))
        self.head = nn.Linear(d, vocab)
        self.double()

    def split(self, x):  # (n, d) → (heads, n, head_dim)
        return x.view(x.shape[0], self.heads, self.head_dim).transpose(0, 1)

    def layer_kv(self, layer, h, experts):
        q, _, _ = self.qkv[layer](h).chunk(3, dim=-1)
        routed = h + torch.einsum("nd,nde->ne", h, self.delta[layer][experts])
        _, k, v = self.qkv[layer](routed).chunk(3, dim=-1)
        return self.split(q), self.split(k), self.split(v)

    def forward(self, tokens, experts, start=0, cache=None, seq=None, slots=None):
        """Logits (n, vocab) of tokens at positions [start, start + n). Without a cache, start
        must be 0 and attention covers these tokens; with one, their K/V are written to
        ``slots`` and attention reads all of ``seq``'s K/V from the cache."""
        n = len(tokens)
        pos = torch.arange(start, start + n)
        x = self.emb(tokens) + self.pos(pos)
        for layer in range(len(self.qkv)):
            q, k, v = self.layer_kv(layer, self.ln1[layer](x), experts)
            if cache is not None:
                cache.write(layer, slots, k, v)
                k, v = cache.read(layer, seq)
            mask = pos[:, None] >= torch.arange(k.shape[1])[None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.out[layer](o.transpose(0, 1).reshape(n, -1))
            x = x + self.mlp[layer](self.ln2[layer](x))
        return self.head(x)


def chunk_experts(tokens: torch.Tensor, bs: int, experts: int) -> list[int]:
    """Chunk-sticky, prefix-causal routing: a block's expert from its first token."""
    return [int(tokens[b * bs]) % experts for b in range(-(-len(tokens) // bs))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_matches_full_recompute(backend):
    bs, experts = 4, 3
    model = TinyRoutedLM(experts=experts)
    cache = KVCache.allocate(layers=2, heads=3, head_dim=6, num_blocks=40, block_size=bs,
                             dtype=torch.float64, backend=backend)

    def keys_for(tokens):
        return [RoutingKey.for_weights(e, model.delta[:, e]) for e in
                chunk_experts(tokens, bs, experts)]

    def per_token(tokens):
        return torch.tensor(chunk_experts(tokens, bs, experts)).repeat_interleave(bs)[:len(tokens)]

    def full_logits(tokens):
        return model(tokens, per_token(tokens))

    def run_prefill(tokens):
        p = cache.prefill(tokens, keys_for(tokens))
        new = tokens[p.cached_tokens:]
        logits = model(new, per_token(tokens)[p.cached_tokens:], start=p.cached_tokens,
                       cache=cache, seq=p.seq, slots=p.slots)
        torch.testing.assert_close(logits, full_logits(tokens)[p.cached_tokens:], rtol=0,
                                   atol=1e-10)
        return p, logits[-1]

    def decode(seq, tokens, last_logits, steps):
        for _ in range(steps):
            nxt = last_logits.argmax().view(1)
            tokens = torch.cat([tokens, nxt])
            key = keys_for(tokens)[-1]
            slots = cache.extend(seq, nxt, key)
            last_logits = model(nxt, per_token(tokens)[-1:], start=len(tokens) - 1, cache=cache,
                                seq=seq, slots=slots)[-1]
            torch.testing.assert_close(last_logits, full_logits(tokens)[-1], rtol=0, atol=1e-10)
        return tokens, last_logits

    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 37, (11,), generator=g)
    user_a = torch.randint(0, 37, (6,), generator=g)
    user_b = torch.randint(0, 37, (5,), generator=g)
    a_tokens = torch.cat([system, user_a])
    a, a_last = run_prefill(a_tokens)
    assert a.cached_tokens == 0
    a_tokens, a_last = decode(a.seq, a_tokens, a_last, 7)
    # A second user with the same system prompt reuses its full blocks (8 of 11 tokens).
    b, _ = run_prefill(torch.cat([system, user_b]))
    assert b.cached_tokens == 8
    # The first conversation continues in a new request: everything but the last partial block.
    a2, _ = run_prefill(torch.cat([a_tokens, user_b]))
    assert a2.cached_tokens == len(a_tokens) // bs * bs
    # Fork: two continuations of one sequence, each equal to its own full recomputation.
    child = cache.fork(a.seq)
    decode(child, a_tokens, a_last, 3)
    decode(a.seq, a_tokens, a_last + torch.linspace(0, 5, 37, dtype=torch.float64), 3)
    # Reloading other weights for the experts changes the keys: nothing is reused, and the
    # results follow the new weights (stale K/V would not match the recomputation).
    with torch.no_grad():
        model.delta.mul_(1.5)
    c, _ = run_prefill(torch.cat([system, user_a]))
    assert c.cached_tokens == 0
    stats = cache.manager.stats()
    assert stats.tokens_hit == 8 + a2.cached_tokens and stats.lookups == 4
    for s in (a.seq, b.seq, a2.seq, child, c.seq):
        cache.free(s)
    assert cache.manager.stats().blocks_in_use == 0
    cache.manager.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_bad_input_and_exhaustion(device):
    cache = KVCache.allocate(layers=1, heads=1, head_dim=2, num_blocks=3, block_size=2,
                             device=device)
    with pytest.raises(ValueError, match="tokens: expected at least 1 token"):
        cache.prefill([], KEY)
    with pytest.raises(ValueError, match="routing: expected one key per block"):
        cache.prefill([1, 2, 3], [KEY])
    with pytest.raises(IndexError, match="seq"):
        cache.read(0, 5)
    p = cache.prefill([1, 2, 3], KEY)
    before = cache.manager.state()
    with pytest.raises(KVCacheFullError):
        cache.prefill([4, 5, 6, 7, 8], KEY)
    after = cache.manager.state()
    # The failed prefill's sequence was freed again; only the lookup was counted.
    assert after["sequences"] == before["sequences"] and after["blocks"] == before["blocks"]
    assert after["stats"]["lookups"] == before["stats"]["lookups"] + 1
    with pytest.raises(KVCacheFullError):
        cache.extend(p.seq, [1, 2, 3, 4], KEY)
    k, v = cache.read(0, p.seq)
    assert k.shape == (1, 3, 2)
    with pytest.raises(ValueError, match="storage"):
        KVCache(KVBlockManager(4, 2), KVStorage(1, 3, 1, 2, 2))
    with pytest.raises(TypeError, match="manager"):
        KVCache(object(), KVStorage(1, 3, 1, 2, 2))
