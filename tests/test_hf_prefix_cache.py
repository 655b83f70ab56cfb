"""Prefix reuse across generate calls (bem.hf.prefix_cache.PrefixStore, backed by bem.kv): a
repeated system prompt's full blocks are reused, outputs equal plain generate (tokens; float64
logits within 1e-9), a changed adapter never reuses stale K/V (routing keys carry the weights'
digest), padded batches run without reuse; refusals."""
import pytest
import torch

from bem.hf.prefix_cache import PrefixStore

transformers = pytest.importorskip("transformers")
from test_hf_generation import ATOL, _attached, _randomise  # noqa: E402

SYSTEM = torch.randint(3, 50, (150,), generator=torch.Generator().manual_seed(9))


def _prompt(suffix_seed, n=20, rows=1):
    gen = torch.Generator().manual_seed(suffix_seed)
    return torch.stack([torch.cat([SYSTEM, torch.randint(3, 50, (n,), generator=gen)])
                        for _ in range(rows)])


def _same(m, store, ids, mask=None):
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    got = store.generate(ids, attention_mask=mask, **kw)
    want = m.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for x, y in zip(got.logits, want.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind,preset,experts", [("llama", "V1", 2), ("gpt2", "lora", 3)])
def test_reuse_across_calls_equals_plain_generate(kind, preset, experts):
    m = _attached(kind, preset, experts)
    store = PrefixStore(m, num_blocks=32)
    a = _prompt(1)
    assert store.cache_for(a).reused_tokens == 0
    _same(m, store, a)                                   # stores blocks 0 and 1 (128 tokens)
    b = _prompt(2, rows=2)
    cache = store.cache_for(b)
    assert cache.reused_tokens == 128
    store.release(cache)
    before = store.stats().tokens_hit
    _same(m, store, b)
    assert store.stats().tokens_hit - before == 2 * 128 and store.stats().hit_rate > 0


def test_changed_adapter_never_reuses_stale_kv():
    m = _attached("llama", "lora", 3)
    store = PrefixStore(m, num_blocks=32)
    _same(m, store, _prompt(1))
    _randomise(m, seed=5)                                # retrained adapter: new digest
    cache = store.cache_for(_prompt(2))
    assert cache.reused_tokens == 0
    store.release(cache)
    _same(m, store, _prompt(2))
    cache = store.cache_for(_prompt(3))
    assert cache.reused_tokens == 128                    # reuse under the new weights
    store.release(cache)


def test_padded_batch_runs_without_reuse():
    m = _attached("llama", "V4")
    store = PrefixStore(m, num_blocks=32)
    _same(m, store, _prompt(1))
    ids = _prompt(2, rows=2)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    assert store.cache_for(ids, mask).reused_tokens == 0
    _same(m, store, ids, mask)


def test_refusals():
    m = _attached("llama", "V4")
    store = PrefixStore(m, num_blocks=8)
    ids = _prompt(1)
    for kw, match in [({"num_beams": 2}, "num_beams"), ({"num_return_sequences": 2},
                                                        "num_return_sequences"),
                      ({"cache": None}, "cache"), ({"use_cache": False}, "use_cache")]:
        with pytest.raises(ValueError, match=match):
            store.generate(ids, max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="input_ids"):
        store.cache_for(ids.float())
    with pytest.raises(ValueError, match="num_blocks"):
        PrefixStore(m, num_blocks=0)
    with pytest.raises(TypeError, match="model"):
        PrefixStore(torch.nn.Linear(2, 2))
    assert store.stats().sequences == 0
