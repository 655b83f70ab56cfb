"""Budget accounting: analytic FLOP counts equal torch.utils.flop_counter on the reference path
(built-in model for every variant, adapter deltas on HF GPT-2), exact parameter counts, and the
baseline sizing helper within ±5% on adapter parameters and whole-model FLOPs."""
import pytest
import torch

from bem import budget
from bem.attach import AdapterSpec, BemConfig, attach
from bem.model import BemForCausalLM, TransformerConfig

SMALL = TransformerConfig(vocab_size=53, d_model=24, n_layers=2, n_heads=4, d_ff=44)
BASE = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=172)
VARIANTS = {"lora": BemConfig.preset("lora", rank=4, num_experts=3), "PT1": BemConfig.preset("PT1"),
            "V1": BemConfig.preset("V1", num_experts=2), "V2": BemConfig.preset("V2"),
            "V3": BemConfig.preset("V3"), "V4": BemConfig.preset("V4"),
            "V1-token": BemConfig([AdapterSpec("dynamic_rank", ["q_proj"], {"mode": "token"})]),
            "plain-mlp": None}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("seq_len", [1, 131])
def test_analytic_flops_equal_flop_counter(name, seq_len):
    torch.manual_seed(0)
    m = BemForCausalLM(SMALL if name != "plain-mlp" else
                       TransformerConfig(**{**SMALL.to_dict(), "mlp": "plain"}))
    if VARIANTS[name] is not None:
        attach(m, VARIANTS[name])
    b = budget.count(m, seq_len)
    assert b.model_flops == budget.measure_flops(m, seq_len)
    assert b.model_params == sum(p.numel() for p in m.parameters())
    assert b.trainable_params == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert b.adapter_params == (b.trainable_params if VARIANTS[name] is not None else 0)
    assert b.model_flops_per_token == b.model_flops / seq_len


def test_lora_counts_by_hand():
    torch.manual_seed(0)
    m = attach(BemForCausalLM(SMALL), BemConfig.preset("lora", rank=4))
    b = budget.count(m, 64)
    d, L = SMALL.d_model, SMALL.n_layers
    assert b.adapter_params == L * 2 * 4 * (d + d)                      # q and v, A and B
    assert b.adapter_flops == 64 * L * 2 * 2 * 4 * (d + d)


def test_adapter_flops_on_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=200, bos_token_id=0,
        eos_token_id=0)).eval()
    before = budget.count(m, 70)
    attach(m, BemConfig.preset("V3", "gpt2"))
    after = budget.count(m, 70)
    assert after.model_flops - before.model_flops == after.adapter_flops > 0
    assert after.model_params - before.model_params == after.adapter_params


@pytest.mark.parametrize("name", ["lora", "PT1", "V1", "V3", "V4"])
def test_size_baseline_within_tolerance(name):
    torch.manual_seed(0)
    model = BemForCausalLM(BASE)
    baseline, var, got = budget.size_baseline(model, VARIANTS[name], seq_len=256)
    assert all(a.kind == "lora" for a in baseline.adapters)
    assert abs(got.adapter_params - var.adapter_params) <= 0.05 * var.adapter_params
    assert abs(got.model_flops_per_token - var.model_flops_per_token) <= \
        0.05 * var.model_flops_per_token
    assert got.trainable_params == got.adapter_params
    assert not any(p.requires_grad is False for p in model.parameters())   # model untouched


def test_size_baseline_refusals():
    torch.manual_seed(0)
    small = BemForCausalLM(SMALL)
    with pytest.raises(ValueError, match="FLOPs"):        # cross-encoder params, no per-token work
        budget.size_baseline(small, VARIANTS["V2"], seq_len=64)
    with pytest.raises(ValueError, match="tolerance"):
        budget.size_baseline(small, VARIANTS["V3"], tolerance=5)
    with pytest.raises(TypeError, match="variant"):
        budget.size_baseline(small, "V3")
    with pytest.raises(ValueError, match="without bem"):
        budget.size_baseline(attach(BemForCausalLM(SMALL), VARIANTS["V3"]), VARIANTS["V3"])
    with pytest.raises(ValueError, match="seq_len"):
        budget.count(small, 0)
