"""The built-in transformer: config validation and JSON round trip, Llama-style names, causality,
padding, positions, bad inputs."""
import pytest
import torch

from bem.model import BemForCausalLM, TransformerConfig

CFG = TransformerConfig(vocab_size=29, d_model=20, n_layers=3, n_heads=5, d_ff=33)


def test_config_round_trip_and_validation():
    assert TransformerConfig.from_dict(CFG.to_dict()) == CFG
    for kw, match in [({"d_model": 0}, "d_model"), ({"n_heads": 3}, "n_heads"),
                      ({"positions": "alibi"}, "positions"), ({"mlp": "moe"}, "mlp"),
                      ({"norm_eps": 0.0}, "norm_eps"), ({"tie_embeddings": 1}, "tie_embeddings"),
                      ({"d_model": 15, "n_heads": 5}, "even head width"),
                      ({"vocab_size": True}, "vocab_size")]:
        with pytest.raises(ValueError, match=match):
            TransformerConfig(**{**CFG.to_dict(), **kw})
    with pytest.raises(ValueError, match="unknown"):
        TransformerConfig.from_dict({"bogus": 1})
    with pytest.raises(TypeError, match="dict"):
        TransformerConfig.from_dict([1])


def test_llama_module_names():
    names = {n for n, _ in BemForCausalLM(CFG).named_modules()}
    for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                 "post_attention_layernorm"):
        assert f"model.layers.2.{leaf}" in names
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= names


@pytest.mark.parametrize("positions,mlp", [("rotary", "gated"), ("learned", "plain")])
def test_causal_and_padding(positions, mlp):
    torch.manual_seed(0)
    m = BemForCausalLM(TransformerConfig(**{**CFG.to_dict(), "positions": positions, "mlp": mlp}))
    m = m.double()
    ids = torch.randint(0, 29, (2, 17), generator=torch.Generator().manual_seed(1))
    out = m(ids)
    assert out.shape == (2, 17, 29) and out.dtype == torch.float64
    other = ids.clone()
    other[:, 9:] = (other[:, 9:] + 1) % 29
    torch.testing.assert_close(m(other)[:, :9], out[:, :9], rtol=0, atol=0)
    assert not torch.allclose(m(other)[:, 9:], out[:, 9:])
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[1, 11:] = False                       # right padding changes nothing before it
    torch.testing.assert_close(m(ids, valid=valid)[1, :11], out[1, :11], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(ids[1:, :11])[0], out[1, :11], rtol=1e-12, atol=1e-12)


def test_tied_embeddings_and_bad_inputs():
    m = BemForCausalLM(TransformerConfig(**{**CFG.to_dict(), "tie_embeddings": True,
                                            "max_positions": 8}))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match="input_ids"):
        m(torch.full((1, 3), 29))
    with pytest.raises(ValueError, match="max_positions"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="TransformerConfig"):
        BemForCausalLM({"d_model": 4})
