"""PEFT LoRA adapters (made and saved by peft itself, ranks 4/8/2, rslora on one) loaded as the
experts of bem's multi-expert LoRA (bem.hf.peft_experts): each expert reproduces its PEFT model,
a batch routed row by row reproduces PEFT's mixed-batch adapter_names forward, cached generation
with chunk routing equals recomputation, export_peft returns each adapter as it was; refusals."""
import json
from pathlib import Path

import pytest
import torch

from bem.hf.peft_experts import load_peft_experts, read_peft_lora
from bem.modules import use_control
from bem.peft_export import PEFT_CONFIG, PEFT_WEIGHTS, export_peft
from bem.serialization import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-10, atol=1e-10)      # float64: the same math, other summation orders
V = 50
ADAPTERS = [(4, 8, False), (8, 16, False), (2, 3, True)]         # (r, lora_alpha, use_rslora)


def _base(kind="llama"):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=200)).double().eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=200, pad_token_id=0)
    ).double().eval()


def _make(path, r, alpha, rslora, seed, kind="llama", targets=("q_proj", "v_proj"), **extra):
    pm = peft.get_peft_model(_base(kind), peft.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets), lora_dropout=0.0,
        **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    pm.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return [_make(root / f"a{i}", r, a, rs, seed=10 + i) for i, (r, a, rs) in enumerate(ADAPTERS)]


IDS = torch.randint(1, V, (3, 80), generator=torch.Generator().manual_seed(1))


def _routed(m, ids, experts):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    ctrl = m.bem_controller.control(ids, pos, m.get_input_embeddings().weight, experts=experts)
    with torch.no_grad(), use_control(ctrl):
        return m(input_ids=ids, use_cache=False).logits


def test_each_expert_and_mixed_batch_match_peft(adapters):
    m = load_peft_experts(_base(), adapters)
    assert m.bem_config.num_experts == 3 and m.bem_controller.num_experts == 3
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("bem_controller.") for n in trainable)
    refs = []
    for e, path in enumerate(adapters):
        ref = peft.PeftModel.from_pretrained(_base(), path).eval()
        with torch.no_grad():
            refs.append(ref(input_ids=IDS, use_cache=False).logits)
        torch.testing.assert_close(_routed(m, IDS, e), refs[-1], **TOL)
    # PEFT's mixed batch: row i uses adapter i (adapter_names) == bem routing row i to expert i.
    mixed = peft.PeftModel.from_pretrained(_base(), adapters[0], adapter_name="a0").eval()
    for i in (1, 2):
        mixed.load_adapter(adapters[i], adapter_name=f"a{i}")
    with torch.no_grad():
        want = mixed(input_ids=IDS, use_cache=False, adapter_names=["a0", "a1", "a2"]).logits
    got = _routed(m, IDS, torch.arange(3)[:, None].expand(3, 2))
    torch.testing.assert_close(got, want, **TOL)
    for i in range(3):
        torch.testing.assert_close(got[i], refs[i][i], **TOL)


def test_chunk_routed_cached_generation(adapters):
    m = load_peft_experts(_base(), adapters)
    with torch.no_grad():
        m.bem_controller.router.weight.normal_(0, 30.0, generator=torch.Generator().manual_seed(2))
    ids = IDS[:2, :60]
    a = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True,
                   pad_token_id=0)
    b = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False,
                   pad_token_id=0)
    assert torch.equal(a, b)


def test_export_round_trip_returns_each_adapter(adapters, tmp_path):
    m = load_peft_experts(_base(), adapters)
    for e, path in enumerate(adapters):
        out = tmp_path / f"e{e}"
        export_peft(m, out, expert=e)
        got, _ = load_file(out / PEFT_WEIGHTS)
        want, _ = load_file(f"{path}/{PEFT_WEIGHTS}", require_digests=False)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            if e == 0 or k.endswith("lora_A.weight"):        # expert 0's scale: nothing folded
                assert torch.equal(got[k], want[k]), k
            else:                                            # folded ratio: ≤ 1 ulp
                torch.testing.assert_close(got[k], want[k], rtol=4e-16, atol=0)
        cfg, orig = (json.loads((Path(d) / PEFT_CONFIG).read_text()) for d in (out, path))
        for key in ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                    "alpha_pattern", "fan_in_fan_out"):
            assert cfg[key] == orig[key], key
        reloaded = peft.PeftModel.from_pretrained(_base(), str(out)).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=IDS, use_cache=False).logits,
                                       _routed(m, IDS, e), **TOL)


def test_gpt2_conv1d_adapters(tmp_path):
    paths = [_make(tmp_path / f"g{i}", r, 2 * r, False, 20 + i, kind="gpt2",
                   targets=("c_attn",), fan_in_fan_out=True) for i, r in enumerate((2, 4))]
    m = load_peft_experts(_base("gpt2"), paths)
    for e, path in enumerate(paths):
        ref = peft.PeftModel.from_pretrained(_base("gpt2"), path).eval()
        with torch.no_grad():
            want = ref(input_ids=IDS, use_cache=False).logits
        torch.testing.assert_close(_routed(m, IDS, e), want, **TOL)


def test_refusals(adapters, tmp_path):
    other_targets = _make(tmp_path / "o", 4, 8, False, 30, targets=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match="targets differ.*missing.*v_proj.*extra.*k_proj"):
        load_peft_experts(_base(), [adapters[0], other_targets])
    torch.manual_seed(0)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V)).double()
    with pytest.raises(ValueError, match="do not fit the base layer"):
        load_peft_experts(wide, adapters)
    assert not hasattr(wide, "bem_config")
    dora = _make(tmp_path / "d", 4, 8, False, 31, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_experts(_base(), [adapters[0], dora])
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft_experts(_base(), [str(tmp_path)])
    with pytest.raises(ValueError, match="not a directory"):
        load_peft_experts(_base(), [str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="directories"):
        load_peft_experts(_base(), adapters[0])
    with pytest.raises(ValueError, match="directories"):
        load_peft_experts(_base(), [])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / PEFT_CONFIG).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type"):
        read_peft_lora(bad)
    (bad / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        read_peft_lora(bad)
    gpt = _base("gpt2")
    with pytest.raises(ValueError, match="not a module"):
        load_peft_experts(gpt, adapters)
    m = load_peft_experts(_base(), adapters)
    with pytest.raises(ValueError, match="already attached"):
        load_peft_experts(m, adapters)


def test_detach_forgets_the_sources(adapters, tmp_path):
    from bem.attach import detach

    m = load_peft_experts(_base(), adapters)
    detach(m)
    assert not hasattr(m, "bem_peft_experts")
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS, use_cache=False).logits,
                                   _base()(input_ids=IDS, use_cache=False).logits, rtol=0, atol=0)
