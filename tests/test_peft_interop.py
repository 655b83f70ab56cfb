"""PEFT interop: bem's plain LoRA experts exported in PEFT's adapter format load with
peft.PeftModel.from_pretrained and reproduce bem's outputs (Llama Linear and GPT-2 Conv1D);
refusals."""
import copy
import json

import pytest
import torch

from bem.attach import AdapterSpec, BemConfig, attach
from bem.model import BemForCausalLM, TransformerConfig
from bem.modules import use_control
from bem.peft_export import PEFT_CONFIG, export_peft
from bem.serialization import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _hf(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64, bos_token_id=0,
            eos_token_id=0)).double().eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0)).double().eval()


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj", "down_proj"]),
                                          ("gpt2", ["c_attn", "attn.c_proj"])])
def test_peft_loads_export_and_matches(tmp_path, kind, targets):
    base = _hf(kind)
    pristine = copy.deepcopy(base)
    specs = [AdapterSpec("lora", targets[:1], {"rank": 4, "alpha": 8.0}),
             AdapterSpec("lora", targets[1:], {"rank": 3, "alpha": 5.0})]
    m = attach(base, BemConfig(specs, num_experts=2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    ids = torch.randint(0, 50, (2, 20), generator=gen)
    names = export_peft(m, tmp_path, expert=1)
    assert names and json.loads((tmp_path / PEFT_CONFIG).read_text())["fan_in_fan_out"] == (kind == "gpt2")
    # Route every chunk to the exported expert, as PEFT has only that one.
    ctl = m.bem_controller
    pos = torch.arange(20).expand(2, 20)
    ctrl = ctl.control(ids, pos, m.get_input_embeddings().weight, experts=1)
    with torch.no_grad(), use_control(ctrl):
        want = m(input_ids=ids, use_cache=False).logits
    loaded = peft.PeftModel.from_pretrained(pristine, str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    tensors, _ = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(names)


def test_refusals(tmp_path):
    torch.manual_seed(0)
    m = BemForCausalLM(TransformerConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=20))
    with pytest.raises(ValueError, match="no bem LoRA"):
        export_peft(m, tmp_path)
    attach(m, BemConfig([AdapterSpec("lora", ["q_proj"]), AdapterSpec("kronecker", ["down_proj"])]))
    with pytest.raises(ValueError, match="only plain LoRA"):
        export_peft(m, tmp_path)
    m2 = BemForCausalLM(TransformerConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=20))
    attach(m2, BemConfig.preset("lora"))
    with pytest.raises(ValueError, match="expert"):
        export_peft(m2, tmp_path, expert=1)
    assert not list(tmp_path.iterdir())
