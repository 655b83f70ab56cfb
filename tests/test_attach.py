"""bem.attach on the built-in transformer and on randomly initialised Hugging Face GPT-2 (Conv1D),
Llama and BERT models: pattern matching, identity at init, gradients only to bem's parameters,
detach and merge round trips, refusals."""
import pytest
import torch

from bem.attach import (AdapterSpec, BemConfig, attach, bem_modules, detach, family, merge)
from bem.model import BemForCausalLM, TransformerConfig
from bem.modules import DynamicRankLoRA, HeadGating, KroneckerAdapter, LoRA, ResidualFiLM

CFG = TransformerConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=4, d_ff=36)
IDS = torch.randint(0, 41, (2, 80), generator=torch.Generator().manual_seed(0))


def _model(seed=0):
    torch.manual_seed(seed)
    return BemForCausalLM(CFG).double()


def _randomise(m, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


KINDS = {"lora": LoRA, "PT1": HeadGating, "V1": DynamicRankLoRA, "V2": HeadGating,
         "V3": KroneckerAdapter, "V4": ResidualFiLM}


@pytest.mark.parametrize("preset", list(KINDS))
def test_builtin_identity_grads_detach(preset):
    m = _model()
    base_out = m(IDS)
    originals = {n: mod for n, mod in m.named_modules()}
    attach(m, BemConfig.preset(preset))
    found = bem_modules(m)
    assert len(found) >= CFG.n_layers and any(isinstance(x, KINDS[preset]) for x in found.values())
    torch.testing.assert_close(m(IDS), base_out, rtol=0, atol=0)       # identity at init
    _randomise(m)
    out = m(IDS)
    assert not torch.allclose(out, base_out)
    out.square().mean().backward()
    for n, p in m.named_parameters():
        bem_param = p.requires_grad
        assert bem_param == (n.startswith("bem_") or any(
            n.startswith(k + ".") and not n[len(k) + 1:].startswith("base_layer.") for k in found)), n
        if bem_param and not n.startswith(("bem_gate_shaper", "bem_controller.router")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    detach(m)
    assert not bem_modules(m) and not hasattr(m, "bem_controller")
    for n, mod in m.named_modules():
        assert originals[n] is mod
    torch.testing.assert_close(m(IDS), base_out, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["lora", "V3"])
def test_merge_equals_attached(preset):
    m = attach(_model(), BemConfig.preset(preset, budget=0.4) if preset == "V3"
               else BemConfig.preset(preset))
    _randomise(m)
    want = m(IDS)
    merge(m)
    assert not bem_modules(m) and getattr(m, "bem_config", None) is None
    torch.testing.assert_close(m(IDS), want, rtol=1e-10, atol=1e-10)


def test_merge_refuses_unmergeable_and_changes_nothing():
    m = attach(_model(), BemConfig([AdapterSpec("lora", ["q_proj"]),
                                    AdapterSpec("dynamic_rank", ["v_proj"], {"rank": 4, "active": 2})]))
    _randomise(m)
    before = m(IDS)
    with pytest.raises(ValueError, match="v_proj"):
        merge(m)
    torch.testing.assert_close(m(IDS), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no bem modules"):
        merge(_model())
    routed = attach(_model(), BemConfig.preset("lora", num_experts=2))
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(routed)


def test_nested_film_over_kronecker_and_regex_targets():
    m = _model()
    ref = m(IDS)
    cfg = BemConfig([AdapterSpec("kronecker", [r"re:model\.layers\.1\.mlp\.down_proj"]),
                     AdapterSpec("film", ["mlp"])])
    attach(m, cfg)
    assert isinstance(m.model.layers[1].mlp, ResidualFiLM)
    assert isinstance(m.model.layers[1].mlp.base_layer.down_proj, KroneckerAdapter)
    assert not isinstance(m.model.layers[0].mlp.base_layer.down_proj, KroneckerAdapter)
    detach(m)
    torch.testing.assert_close(m(IDS), ref, rtol=0, atol=0)


def test_refusals():
    m = attach(_model(), BemConfig.preset("lora"))
    with pytest.raises(ValueError, match="already attached"):
        attach(m, BemConfig.preset("lora"))
    with pytest.raises(ValueError, match="match no module"):
        attach(_model(), BemConfig([AdapterSpec("lora", ["nope"])]))
    with pytest.raises(ValueError, match="matched by both"):
        attach(_model(), BemConfig([AdapterSpec("lora", ["q_proj"]),
                                    AdapterSpec("kronecker", ["self_attn.q_proj"])]))
    fresh = _model()
    with pytest.raises(ValueError, match="options"):
        attach(fresh, BemConfig([AdapterSpec("lora", ["q_proj"], {"rnak": 2})]))
    assert not bem_modules(fresh) and all(p.requires_grad for p in fresh.parameters())
    with pytest.raises(TypeError, match="BemConfig"):
        attach(_model(), {"adapters": []})
    with pytest.raises(ValueError, match="naming family"):
        family(torch.nn.Linear(2, 2))


def test_config_validation_and_json():
    cfg = BemConfig.preset("V1", rank=6, num_experts=3)
    assert BemConfig.from_json(cfg.to_json()) == cfg
    for bad, match in [("[]", "JSON object"), ("{x", "JSON"), ('{"adapters": [], "zz": 1}', "unknown"),
                       ('{"adapters": []}', "adapters")]:
        with pytest.raises(ValueError, match=match):
            BemConfig.from_json(bad)
    with pytest.raises(ValueError, match="kind"):
        AdapterSpec("lorax", ["q"])
    with pytest.raises(ValueError, match="targets"):
        AdapterSpec("lora", [])
    with pytest.raises(ValueError, match="gate_shaping"):
        BemConfig([AdapterSpec("lora", ["q"])], gate_shaping=True)
    with pytest.raises(ValueError, match="version"):
        BemConfig([AdapterSpec("lora", ["q"])], version=-1)
    with pytest.raises(ValueError, match="name"):
        BemConfig.preset("V9")
    with pytest.raises(ValueError, match="family"):
        BemConfig.preset("lora", family="t5")


# ---- Hugging Face models (randomly initialised, no downloads) -------------------------------

def _hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=160,
                                      bos_token_id=0, eos_token_id=0)
        m = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                       max_position_embeddings=160, bos_token_id=0, eos_token_id=0)
        m = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, vocab_size=50, max_position_embeddings=160)
        m = transformers.BertModel(cfg)
    return m.double().eval()


def _hf_out(m, ids):
    out = m(input_ids=ids, use_cache=False) if not hasattr(m, "pooler") else m(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("preset", ["lora", "V1", "V3", "V4"])
def test_hugging_face_models(kind, preset):
    m = _hf(kind)
    assert family(m) == kind
    ids = torch.randint(0, 50, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = _hf_out(m, ids)
    attach(m, BemConfig.preset(preset, kind, num_experts=2 if preset == "V1" else 1))
    torch.testing.assert_close(_hf_out(m, ids), ref, rtol=0, atol=0)
    _randomise(m, scale=0.2)
    out = _hf_out(m, ids)
    assert not torch.allclose(out, ref)
    out.square().mean().backward()
    trained = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is not None
               and p.grad.abs().sum() > 0]
    assert trained and all(n.startswith("bem_") or "base_layer" not in n for n in trained)
    if preset in ("lora", "V3"):
        merge(m)
        torch.testing.assert_close(_hf_out(m, ids), out.detach(), rtol=1e-10, atol=1e-10)
    else:
        detach(m)
        torch.testing.assert_close(_hf_out(m, ids), ref, rtol=0, atol=0)


def test_hugging_face_cached_generation_with_chunk_controls():
    """Per-chunk modules under HF's KV cache (docs/hf.md; tests/test_hf_generation.py covers every
    preset, padding, sampling and beam search): 70 prompt tokens, so generation crosses into
    chunk 1, whose controls come from chunk 0's tokens."""
    m = _hf("llama")
    attach(m, BemConfig.preset("V4", "llama"))
    _randomise(m, scale=0.5)
    ids = torch.randint(0, 50, (1, 70), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True),
                       m.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False))


def test_hugging_face_cached_generation_with_static_modules():
    m = _hf("llama")
    attach(m, BemConfig.preset("V3", "llama"))
    _randomise(m, scale=0.5)
    ids = torch.randint(0, 50, (1, 70), generator=torch.Generator().manual_seed(3))
    a = m.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    b = m.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset,E", [("lora", 3), ("V1", 1), ("V1", 2), ("PT1", 1), ("V4", 1)])
def test_expert_minus_one_is_the_base_model(preset, E):
    from bem.modules import use_control

    m = _model()
    base_out = m(IDS)
    attach(m, BemConfig.preset(preset, num_experts=E))
    _randomise(m)
    pos = torch.arange(IDS.shape[1]).expand_as(IDS)
    emb = m.get_input_embeddings().weight
    experts = torch.tensor([[-1, 0], [0, -1]])[:, :2]             # chunk 0 / chunk 1 off
    with use_control(m.bem_controller.control(IDS, pos, emb, experts=experts)):
        out = m(IDS)
    torch.testing.assert_close(out[0, :64], base_out[0, :64], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[0, 64:], base_out[0, 64:])
    assert not torch.allclose(out[1, :64], base_out[1, :64])
