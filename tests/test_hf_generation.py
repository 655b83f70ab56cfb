"""Cached Hugging Face generation with bem's per-chunk controls (bem.hf.generation): every preset
on random-init tiny Llama and GPT-2 gives the same tokens (greedy, sampling, beam search,
left-padded batches) and the same logits (float64, atol 1e-9) with use_cache=True as with
use_cache=False; legacy tuples, crop and AR1 routing; refusals of caches bem cannot serve."""
import pytest
import torch

from bem.attach import BemConfig, attach
from bem.hf.generation import STATE_ATTR, CacheStateError, get_history

transformers = pytest.importorskip("transformers")

ATOL = 1e-9          # float64 logits: cached vs recomputed (only summation order differs)
V = 50


def _hf(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=200,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
        m = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                       max_position_embeddings=200, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=0)
        m = transformers.LlamaForCausalLM(cfg)
    m.generation_config.pad_token_id = 0
    return m.double().eval()


def _randomise(m, seed=1, scale=0.4):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _attached(kind, preset, experts=1, seed=0):
    m = attach(_hf(kind, seed), BemConfig.preset(preset, kind, rank=4, num_experts=experts))
    _randomise(m)
    # Make the routing vary between chunks.
    if getattr(getattr(m, "bem_controller", None), "router", None) is not None:
        with torch.no_grad():
            m.bem_controller.router.weight.mul_(40)
    return m


def _batch(lengths, seed=3):
    """Left-padded prompts (pad id 0) of the given lengths: (ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, V, (n,), generator=gen)
        mask[i, T - n:] = 1
    return ids, mask


def _gen(m, ids, mask, cache, **kw):
    kw.setdefault("do_sample", False)
    return m.generate(ids, attention_mask=mask, max_new_tokens=kw.pop("new", 12),
                      use_cache=cache, return_dict_in_generate=True, output_logits=True,
                      min_new_tokens=kw.pop("min_new", 12), **kw)


PRESETS = [("lora", 3), ("PT1", 1), ("V1", 2), ("V2", 1), ("V3", 1), ("V4", 1)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("preset,experts", PRESETS)
def test_greedy_cached_equals_recomputed(kind, preset, experts):
    m = _attached(kind, preset, experts)
    # Row 0 crosses chunk boundary 64 during decoding, row 1 (left-padded) inside its prompt...
    ids, mask = _batch([58, 70, 5])
    a = _gen(m, ids, mask, True)
    b = _gen(m, ids, mask, False)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)
    # ...and bem changes the model (the comparison is not vacuous).
    with torch.no_grad():
        full = torch.cat([ids, a.sequences[:, ids.shape[1]:]], 1)
        amask = torch.cat([mask, torch.ones_like(a.sequences[:, ids.shape[1]:])], 1)
        with_bem = m(input_ids=full, attention_mask=amask, use_cache=False).logits
    from bem.attach import detach
    detach(m)
    with torch.no_grad():
        base = m(input_ids=full, attention_mask=amask, use_cache=False).logits
    assert (with_bem[0, 64:] - base[0, 64:]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampling_and_beam_search(kind):
    m = _attached(kind, "V1", 2)
    ids, mask = _batch([60, 66])
    torch.manual_seed(7)
    a = _gen(m, ids, mask, True, do_sample=True, top_k=10)
    torch.manual_seed(7)
    b = _gen(m, ids, mask, False, do_sample=True, top_k=10)
    assert torch.equal(a.sequences, b.sequences)
    beams = dict(num_beams=3, num_return_sequences=2, output_logits=False, new=8, min_new=8)
    a = m.generate(ids, attention_mask=mask, use_cache=True, max_new_tokens=8, min_new_tokens=8,
                   num_beams=3, num_return_sequences=2)
    b = m.generate(ids, attention_mask=mask, use_cache=False, max_new_tokens=8, min_new_tokens=8,
                   num_beams=3, num_return_sequences=2)
    assert beams and torch.equal(a, b)


def test_left_padded_row_equals_row_alone():
    m = _attached("llama", "lora", 3)
    ids, mask = _batch([70, 57])
    batch = m.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                       do_sample=False, use_cache=True)
    alone = m.generate(ids[1:, 13:], max_new_tokens=10, min_new_tokens=10, do_sample=False,
                       use_cache=True)
    assert torch.equal(batch[1, 13:], alone[0])


def _manual_loop(m, ids, steps, past, key="cache"):
    """Greedy decode by hand with `past` (a Cache, or () for the legacy tuple format) passed as
    keyword `key`; returns the cached logits of every step, the final sequence and output."""
    logits = []
    out = m(input_ids=ids, use_cache=True, **{key: past})
    seq = ids
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        logits.append(out.logits[:, -1])
        seq = torch.cat([seq, nxt], 1)
        out = m(input_ids=nxt, use_cache=True, **{key: out.cache})
    return logits, seq, out


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("legacy", [True, False])
def test_manual_decode_loop_legacy_tuple_and_dynamic_cache(legacy):
    m = _attached("llama", "V4")
    ids, _ = _batch([62, 62])
    with torch.no_grad():
        logits, seq, out = _manual_loop(m, ids, 6, () if legacy else None,
                                        "past_key_values" if legacy else "cache")
        assert isinstance(out.cache, tuple) == legacy
        for i, lg in enumerate(logits):
            ref = m(input_ids=seq[:, : 62 + i], use_cache=False).logits[:, -1]
            torch.testing.assert_close(lg, ref, rtol=0, atol=ATOL)
        if legacy:      # branching twice from one tuple is served (each branch has its history)
            past = out.cache
            x = m(input_ids=seq[:, -1:], cache=past, use_cache=True).logits
            y = m(input_ids=seq[:, -1:], cache=past, use_cache=True).logits
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_crop_then_continue():
    m = _attached("gpt2", "lora", 3)
    ids, _ = _batch([60])
    with torch.no_grad():
        _, seq, out = _manual_loop(m, ids, 10, None)     # 70 tokens: chunk 1 started
        cache = out.cache
        cache.crop(-8)                                    # back to 62 (chunk 0 only)
        assert get_history(cache).seen == 62 == cache.get_seq_length()
        nxt = torch.tensor([[5, 6, 7, 8]])
        got = m(input_ids=nxt, cache=cache, use_cache=True).logits
        ref = m(input_ids=torch.cat([seq[:, :62], nxt], 1), use_cache=False).logits[:, -4:]
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_ar1_router_cached_equals_recomputed():
    from bem.router.ar1 import AR1Router
    from bem.router.policy import ActionSpace

    m = _attached("llama", "lora", 3)
    torch.manual_seed(5)
    m.bem_controller.set_macro_router(AR1Router(ActionSpace(3, (2, 4), (0.5, 1.0)), 32,
                                                switch_cost=0.0, tau=0.0).double())
    ids, mask = _batch([60, 70])
    a = _gen(m, ids, mask, True, new=16, min_new=16)
    b = _gen(m, ids, mask, False, new=16, min_new=16)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)


def test_refusals():
    base = _hf("llama")
    ids, _ = _batch([10, 10])
    with torch.no_grad():
        foreign = base(input_ids=ids, use_cache=True).cache     # before bem
    m = attach(base, BemConfig.preset("V4", "llama"))
    nxt = torch.tensor([[3], [4]])
    with pytest.raises(CacheStateError, match="did not see"):
        m(input_ids=nxt, cache=foreign, use_cache=True)
    assert m._bem_control_tokens == []
    with torch.no_grad():
        cache = m(input_ids=ids, use_cache=True).cache
        with pytest.raises(CacheStateError, match="input_ids: the cache holds 2 rows"):
            m(input_ids=torch.tensor([[3]]), cache=cache, use_cache=True)
    with torch.no_grad():
        cache = m(input_ids=ids, use_cache=True).cache
        with pytest.raises(CacheStateError, match="attention_mask"):
            m(input_ids=nxt, cache=cache, attention_mask=torch.ones(2, 1, 1, 11),
              use_cache=True)
    with torch.no_grad():
        cache = m(input_ids=ids, use_cache=True).cache
        with pytest.raises(CacheStateError, match="attention_mask: expected 11 columns"):
            m(input_ids=nxt, cache=cache, attention_mask=torch.ones(2, 5),
              use_cache=True)
    with torch.no_grad():
        cache = m(input_ids=ids, use_cache=True).cache
        cache.layers[0].keys = cache.layers[0].keys[..., :-1, :]        # changed behind bem's back
        with pytest.raises(CacheStateError, match="holds 9 tokens but bem saw 10"):
            m(input_ids=nxt, cache=cache, use_cache=True)
        other = attach(_hf("llama", 1), BemConfig.preset("V4", "llama"))
        cache = m(input_ids=ids, use_cache=True).cache
        with pytest.raises(CacheStateError, match="another bem-attached model"):
            other(input_ids=nxt, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="whole sequence"):   # a continuation without cache
            m(input_ids=nxt, position_ids=torch.tensor([[10], [10]]), use_cache=False)
    assert m._bem_control_tokens == [] and other._bem_control_tokens == []
    assert not hasattr(m, STATE_ATTR)              # nothing global: the history is on the cache


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("legacy", [True, False])
def test_tuple_outputs(legacy):
    """return_dict=False: the cache is an element of the output tuple (legacy tuples too)."""
    m = _attached("gpt2", "V1", 2)
    ids, _ = _batch([66])
    with torch.no_grad():
        logits, past = m(input_ids=ids, use_cache=True, return_dict=False,
                         **({"past_key_values": ()} if legacy else {}))[:2]
        assert isinstance(past, tuple) == legacy
        nxt = logits[:, -1:].argmax(-1)
        got = m(input_ids=nxt, cache=past, use_cache=True, return_dict=False)[0]
        ref = m(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_interleaved_generations_keep_their_own_history():
    """Two caches decoded step by step in turn with one model: each row history lives on its
    own cache, so each equals its recomputation."""
    m = _attached("llama", "lora", 3)
    a_ids, _ = _batch([62, 62], seed=11)
    b_ids, _ = _batch([66], seed=12)
    with torch.no_grad():
        outs = [m(input_ids=x, use_cache=True) for x in (a_ids, b_ids)]
        seqs = [a_ids, b_ids]
        for _ in range(5):
            for i in (0, 1):
                nxt = outs[i].logits[:, -1:].argmax(-1)
                seqs[i] = torch.cat([seqs[i], nxt], 1)
                outs[i] = m(input_ids=nxt, cache=outs[i].cache, use_cache=True)
        for i in (0, 1):
            ref = m(input_ids=seqs[i], use_cache=False).logits[:, -1]
            torch.testing.assert_close(outs[i].logits[:, -1], ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_qwen2_and_mistral_sliding_window(arch):
    """Other Llama-named families; Mistral with a 32-token sliding window (its cache layers keep
    only the window, while bem's history keeps every token)."""
    torch.manual_seed(0)
    extra = {"sliding_window": 32} if arch == "Mistral" else {}
    cfg = getattr(transformers, f"{arch}Config")(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=256, pad_token_id=0, **extra)
    m = getattr(transformers, f"{arch}ForCausalLM")(cfg).double().eval()
    attach(m, BemConfig.preset("V1", "llama", rank=4, num_experts=2))
    _randomise(m)
    with torch.no_grad():
        m.bem_controller.router.weight.mul_(40)
    ids, mask = _batch([58, 70])
    a = _gen(m, ids, mask, True, pad_token_id=0)
    b = _gen(m, ids, mask, False, pad_token_id=0)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)
