"""Cached generation through bem.kv equals recomputation without a cache, token for token, for
every bem module (prefix hits from earlier requests included); routing keys that change with
weights and request controls; sampling; the cache-safety rule; bad arguments."""
import pytest
import torch

from bem.attach import AdapterSpec, BemConfig, attach
from bem.model import BemForCausalLM, TransformerConfig, generate, new_kv_cache
from bem.modules import ChunkController

V = 61
CFG = TransformerConfig(vocab_size=V, d_model=24, n_layers=2, n_heads=4, d_ff=40)

CONFIGS = {
    "base": None,
    "lora": BemConfig.preset("lora", rank=4),
    "lora-experts": BemConfig.preset("lora", rank=3, num_experts=3),
    "PT1": BemConfig.preset("PT1"),
    "V1-chunk": BemConfig.preset("V1", rank=6, num_experts=2),
    "V1-token": BemConfig([AdapterSpec("dynamic_rank", ["q_proj", "v_proj"],
                                       {"rank": 6, "active": 2, "mode": "token"})]),
    "V2": BemConfig.preset("V2"),
    "V3": BemConfig.preset("V3", budget=0.5),
    "V4": BemConfig.preset("V4"),
}


def _model(name, seed=0, dtype=torch.float64, **cfg):
    torch.manual_seed(seed)
    m = BemForCausalLM(TransformerConfig(**{**CFG.to_dict(), **cfg})).to(dtype)
    if CONFIGS[name] is not None:
        attach(m, CONFIGS[name])
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():   # move every adapter away from its identity init
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return m


def _prompts(seed, lengths):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_equals_uncached_with_prefix_hits(name):
    m = _model(name)
    temp = None
    if name == "V2":
        temp = torch.tensor([[0.5, 1.0, 2.0, 0.3], [1.5, 0.2, 0.9, 3.0]], dtype=torch.float64)
    first = _prompts(1, [60, 130])            # row 0 decodes across the chunk boundary at 64
    cache = new_kv_cache(m, 16)
    out1 = generate(m, first, 8, cache=cache, head_temperature=temp)
    assert out1 == generate(m, first, 8, head_temperature=temp)
    assert cache.manager.stats().tokens_hit == 0
    # A later request sharing full chunks with the first — one of them filled during decode —
    # hits them, and still gives the same tokens as recomputation.
    second = [first[1][:129] + [3, 4], first[0] + out1[0][:5]]
    temp2 = temp[[1, 0]] if temp is not None else None
    out = generate(m, second, 8, cache=cache, head_temperature=temp2)
    assert cache.manager.stats().tokens_hit == 128 + 64
    assert out == generate(m, second, 8, head_temperature=temp2)


@pytest.mark.parametrize("name", ["lora-experts", "V1-chunk", "V3", "V4"])
def test_cached_equals_uncached_float32_kernels(name):
    """float32 runs bem's compiled kernels; cached and recomputed K/V differ only by rounding."""
    m = _model(name, dtype=torch.float32)
    p = _prompts(9, [60, 100])
    cache = new_kv_cache(m, 8)
    assert generate(m, p, 8, cache=cache) == generate(m, p, 8)
    assert generate(m, [p[1][:70]], 4, cache=cache) == generate(m, [p[1][:70]], 4)
    assert cache.manager.stats().tokens_hit == 64


def test_bfloat16_generation_runs():
    m = _model("V1-chunk", dtype=torch.bfloat16)
    out = generate(m, _prompts(10, [70, 3]), 4, cache=new_kv_cache(m, 8))
    assert [len(r) for r in out] == [4, 4] and all(0 <= t < V for r in out for t in r)


def test_routing_key_changes_with_weights_and_request_controls():
    m = _model("V2")
    p = _prompts(2, [70])
    t1 = torch.full((1, 4), 0.7, dtype=torch.float64)
    cache = new_kv_cache(m, 8)
    generate(m, p, 3, cache=cache, head_temperature=t1)
    generate(m, p, 3, cache=cache, head_temperature=t1 * 2)        # other request controls
    assert cache.manager.stats().tokens_hit == 0
    generate(m, p, 3, cache=cache, head_temperature=t1)
    assert cache.manager.stats().tokens_hit == 64
    with torch.no_grad():                                            # reload other weights
        m.model.layers[0].self_attn.o_proj.gate_proj.bias.add_(0.5)
    out = generate(m, p, 3, cache=cache, head_temperature=t1)
    assert cache.manager.stats().tokens_hit == 64                    # no stale K/V
    assert out == generate(m, p, 3, head_temperature=t1)


def _shaper_temperatures(m, queries, passages):
    """V2 temperatures of the model's gate shaper for each query over its passages."""
    from bem.modules import evidence_inputs

    emb = m.get_input_embeddings().weight
    return m.bem_gate_shaper(*evidence_inputs(emb, queries, passages)).temperature


def test_v2_questions_over_the_same_passages_share_the_passage_blocks():
    """With temperature_from at the query, the full chunks before it are keyed without the
    query-dependent temperatures, so another question over the same passages reuses them; with
    temperature_from=None (temperatures on every chunk) nothing is shared."""
    m = _model("V2")
    passages = _prompts(12, [50, 60])                      # 110 tokens: chunk 0 is passages only
    queries = _prompts(13, [12, 15])
    prompts = [passages[0] + passages[1] + q for q in queries]
    temps = [_shaper_temperatures(m, [q], [passages]) for q in queries]
    assert not torch.equal(temps[0], temps[1])
    start = len(passages[0]) + len(passages[1])            # the query's first token (chunk 1)
    for temperature_from, hit in ((None, 0), ([start], 64)):
        cache = new_kv_cache(m, 8)
        for p, t in zip(prompts, temps):
            out = generate(m, [p], 3, cache=cache, head_temperature=t,
                           temperature_from=temperature_from)
            assert out == generate(m, [p], 3, head_temperature=t,
                                   temperature_from=temperature_from)
        assert cache.manager.stats().tokens_hit == hit
        assert (cache.manager.stats().hit_rate > 0) == (hit > 0)


def test_v2_blocks_from_the_query_chunk_on_need_equal_temperatures():
    m = _model("V2")
    p = _prompts(14, [200])                                 # 3 full blocks before the last token
    t1 = torch.full((1, 4), 0.7, dtype=torch.float64)
    t2 = torch.tensor([[0.4, 1.3, 2.0, 0.9]], dtype=torch.float64)
    cache = new_kv_cache(m, 16)
    hits = []
    for t, start in ((t1, [70]), (t2, [70]), (t1, [130]), (None, None), (t1, [70])):
        out = generate(m, p, 3, cache=cache, head_temperature=t, temperature_from=start)
        assert out == generate(m, p, 3, head_temperature=t, temperature_from=start)
        hits.append(cache.manager.stats().tokens_hit - sum(hits))
    # t2 reuses only chunk 0 (before the query's chunk 1), never a block from chunk 1 on; a query
    # in chunk 2 reuses chunk 0 only (t1 shaped chunk 1 before); a request without temperatures
    # shares the unshaped chunks 0 and 1; the same temperatures and query chunk reuse every block.
    assert hits == [0, 64, 64, 128, 192]


def test_v2_temperature_from_chunk_in_the_forward():
    """Through the controller: logits of the chunks before temperature_from_chunk equal those
    without temperatures and change from it on; temperature_from_chunk 0 shapes every chunk."""
    m = _model("V2")
    ids = torch.tensor(_prompts(15, [150]))
    pos = torch.arange(150).expand(1, 150)
    emb = m.get_input_embeddings().weight
    t = torch.tensor([[0.3, 2.0, 0.5, 1.7]], dtype=torch.float64)

    def logits(**kw):
        return m(ids, control=m.bem_controller.control(ids, pos, emb, **kw))

    plain, shaped = logits(), logits(head_temperature=t)
    late = logits(head_temperature=t, temperature_from_chunk=torch.tensor([1]))
    torch.testing.assert_close(late[:, :64], plain[:, :64], rtol=0, atol=0)
    assert not torch.allclose(late[:, 64:], plain[:, 64:])
    torch.testing.assert_close(logits(head_temperature=t, temperature_from_chunk=torch.tensor([0])),
                               shaped, rtol=0, atol=0)


@pytest.mark.parametrize("temperature_from", [[0, 0, 0], [30, 70, 130], [60, 126, 190]])
def test_v2_temperature_from_cached_equals_uncached(temperature_from):
    m = _model("V2")
    temp = torch.tensor([[0.5, 1.0, 2.0, 0.3], [1.5, 0.2, 0.9, 3.0], [0.4, 2.5, 0.7, 1.2]],
                        dtype=torch.float64)
    first = _prompts(11, [60, 126, 190])      # decoding crosses the chunk boundaries 64, 128, 192
    cache = new_kv_cache(m, 24)
    out1 = generate(m, first, 8, cache=cache, head_temperature=temp,
                    temperature_from=torch.tensor(temperature_from))
    assert out1 == generate(m, first, 8, head_temperature=temp, temperature_from=temperature_from)
    # Row 0: row 2's tokens under other temperatures reuse its unshaped chunks only. Row 1: row 1
    # continued (same temperatures) reuses its two full blocks, one of them filled during decode.
    second = [first[2][:140] + [5, 6], first[1] + out1[1][:4]]
    temp2, from2 = temp[[0, 1]], [min(temperature_from[2], 142), temperature_from[1]]
    out = generate(m, second, 8, cache=cache, head_temperature=temp2, temperature_from=from2)
    assert out == generate(m, second, 8, head_temperature=temp2, temperature_from=from2)
    assert cache.manager.stats().tokens_hit == 64 * min(from2[0] // 64, 2) + 128


def test_expert_override_and_learned_positions_plain_mlp():
    m = _model("lora-experts", positions="learned", mlp="plain")
    p = _prompts(3, [66, 9])
    cache = new_kv_cache(m, 16)
    for experts in (None, 2, -1):
        assert generate(m, p, 4, cache=cache, experts=experts) == generate(m, p, 4, experts=experts)
    keys = {k.expert for k in cache.manager.routing_keys}
    assert {-1, 2} <= keys


def test_sampling_reproducible_and_equal_with_cache():
    m = _model("V1-chunk")
    p = _prompts(4, [62, 20])
    kw = dict(do_sample=True, temperature=0.8, top_k=7)
    a = generate(m, p, 6, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(m, p, 6, cache=new_kv_cache(m, 8), generator=torch.Generator().manual_seed(5), **kw)
    assert a == b and all(len(r) == 6 for r in a)


def test_same_prefix_twice_in_one_batch_and_cache_exhaustion():
    m = _model("V4")
    p = _prompts(8, [100])[0]
    cache = new_kv_cache(m, 8)
    batch = [p, p[:90] + [1, 2]]
    assert generate(m, batch, 5, cache=cache) == generate(m, batch, 5)
    assert cache.manager.stats().tokens_hit == 64          # row 1 reuses row 0's first block
    small = new_kv_cache(m, 3)
    with pytest.raises(ValueError, match="needs 4 KV blocks"):  # 195 tokens > 3 blocks: refused
        generate(m, [(p * 2)[:190]], 5, cache=small)
    assert small.manager.stats().sequences == 0 and cache.manager.stats().sequences == 0


def test_eos_stops_a_row():
    m = _model("lora")
    p = _prompts(6, [10, 12])
    ref = generate(m, p, 6)
    eos = ref[0][2]
    out = generate(m, p, 6, eos_token_id=eos, cache=new_kv_cache(m, 4))
    assert out[0] == ref[0][: ref[0].index(eos) + 1]
    assert out[1] == (ref[1][: ref[1].index(eos) + 1] if eos in ref[1] else ref[1])


@pytest.mark.parametrize("name", ["V1-chunk", "V4", "lora-experts"])
def test_controls_depend_only_on_earlier_chunks(name):
    """The cache-safety rule: changing tokens from position p on changes no logit before p, and
    no control (feature, expert) of a chunk that starts before p."""
    m = _model(name)
    ids = torch.tensor(_prompts(7, [200]))
    logits = m(ids)
    ctl: ChunkController = m.bem_controller
    emb = m.get_input_embeddings().weight
    f = ctl.features(ids, emb, 4)
    for p in (64, 100, 150):
        other = ids.clone()
        other[0, p:] = (other[0, p:] + 1) % V
        torch.testing.assert_close(m(other)[:, :p], logits[:, :p], rtol=0, atol=0)
        g = ctl.features(other, emb, 4)
        first_changed = p // 64 + 1          # chunk c reads chunk c−1's tokens
        torch.testing.assert_close(g[:, :first_changed], f[:, :first_changed], rtol=0, atol=0)
        assert not torch.equal(g[:, first_changed:], f[:, first_changed:])


def test_bad_arguments():
    m = _model("lora")
    with pytest.raises(ValueError, match="prompts"):
        generate(m, [], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        generate(m, [[V]], 3)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(m, [[1], []], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [[1]], 0)
    with pytest.raises(ValueError, match="max_positions"):
        generate(m, [[1]], CFG.max_positions)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [[1]], 2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        generate(m, [[1]], 2, top_k=0)
    with pytest.raises(ValueError, match="experts"):
        generate(m, [[1]], 2, experts=-2)
    with pytest.raises(ValueError, match="no chunk-routed"):
        generate(m, [[1]], 2, experts=0)
    with pytest.raises(TypeError, match="cache"):
        generate(m, [[1]], 2, cache=object())
    for bad in (torch.ones(2, 4), torch.zeros(1, 4), [[1.0]]):
        with pytest.raises(ValueError, match="head_temperature"):
            generate(m, [[1]], 2, head_temperature=bad)
    t = torch.ones(1, 4)
    with pytest.raises(ValueError, match="without head_temperature"):
        generate(m, [[1]], 2, temperature_from=[0])
    for bad in ([0, 0], torch.zeros(1, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match="temperature_from"):
            generate(m, [[1]], 2, head_temperature=t, temperature_from=bad)
    for bad in ([-1], [2], torch.tensor([2])):
        with pytest.raises(ValueError, match=r"temperature_from\[0\]: .*\[0, 1\]"):
            generate(m, [[1]], 2, head_temperature=t, temperature_from=bad)
    for bad in ([0.0], [True], torch.tensor([0.0]), "0", 0):
        with pytest.raises(TypeError, match="temperature_from"):
            generate(m, [[1]], 2, head_temperature=t, temperature_from=bad)
    with pytest.raises(TypeError, match="BemForCausalLM"):
        new_kv_cache(torch.nn.Linear(2, 2), 4)


def _record_logits(monkeypatch):
    """Capture the logits each generated token was chosen from: {(prompt, step): (V,) float64}
    for the cached path (the engine's sampler) and the uncached reference (generation's)."""
    import bem.model.generation as generation
    from bem.engine import Engine

    cached, uncached = {}, {}
    sample, next_tokens = Engine._sample, generation._next_tokens

    def engine_sample(self, rows, logits):
        for r, row in zip(rows, logits):
            cached[(tuple(r.prompt), len(r.generated))] = row.detach().double().clone()
        return sample(self, rows, logits)

    def reference_next(logits, *args):
        step = sum(1 for k in uncached if k[0] == 0)
        for b, row in enumerate(logits):
            uncached[(b, step)] = row.detach().double().clone()
        return next_tokens(logits, *args)

    monkeypatch.setattr(Engine, "_sample", engine_sample)
    monkeypatch.setattr(generation, "_next_tokens", reference_next)
    return cached, uncached


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_uncached_across_chunk_boundaries(name, monkeypatch):
    """Not only the greedy tokens: the logits behind every generated token, cached (prefill, then
    decode through the paged cache, blocks reused from an earlier request) against recomputation
    without a cache, with decoding crossing the chunk boundaries at 64, 128 and 192."""
    m = _model(name)
    cache = new_kv_cache(m, 24)
    prompts = _prompts(12, [60, 126, 190])
    for request in ("first", "second"):
        cached, uncached = _record_logits(monkeypatch)
        out = generate(m, prompts, 8, cache=cache)
        assert out == generate(m, prompts, 8)
        assert len(cached) == len(uncached) == 8 * len(prompts)
        for b, p in enumerate(prompts):
            for step in range(8):
                want = uncached[(b, step)]
                torch.testing.assert_close(cached[(tuple(p), step)], want, rtol=1e-9,
                                           atol=1e-9 * float(want.abs().max()),
                                           msg=lambda s: f"{name}, row {b}, step {step}: {s}")
        monkeypatch.undo()
        if request == "first":
            # Continue two of the finished sequences: their full blocks (192 and 64 tokens, the
            # last of each filled during decode) are served from the cache.
            prompts = [prompts[2] + out[2][:2] + [5], prompts[0] + out[0][:4] + [7]]
    assert cache.manager.stats().tokens_hit == 192 + 64
