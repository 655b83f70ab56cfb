"""bem's safetensors reader/writer (round trips, interop with the safetensors library when
installed, refusal of truncated/tampered/malformed files, atomic writes) and save/load of
adapters and of the built-in model."""
import json
import os
import struct

import pytest
import torch

from bem import serialization as S
from bem.attach import BemConfig, attach, bem_modules
from bem.model import BemForCausalLM, TransformerConfig

CFG = TransformerConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=2, d_ff=24)


def _tensors(gen):
    return {"a.f64": torch.randn(3, 5, generator=gen, dtype=torch.float64),
            "b.f32": torch.randn(7, generator=gen),
            "c.bf16": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
            "d.f16": torch.randn(4, generator=gen).half(),
            "e.i64": torch.randint(-9, 9, (2, 2), generator=gen),
            "f.bool": torch.rand(5, generator=gen) > 0.5,
            "g.empty": torch.zeros(0, 3),
            "h.scalar": torch.tensor(2.5)}


def test_round_trip_all_dtypes(tmp_path):
    t = _tensors(torch.Generator().manual_seed(0))
    S.save_file(t, tmp_path / "x.safetensors", {"note": "hi"})
    back, meta = S.load_file(tmp_path / "x.safetensors")
    assert meta == {"note": "hi"} and set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    assert os.listdir(tmp_path) == ["x.safetensors"]           # no temporary left behind


def test_interop_with_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    t = _tensors(torch.Generator().manual_seed(1))
    S.save_file(t, tmp_path / "bem.safetensors")
    theirs = st.load_file(str(tmp_path / "bem.safetensors"))
    assert all(torch.equal(theirs[k], t[k]) for k in t)
    st.save_file({k: v for k, v in t.items()}, str(tmp_path / "st.safetensors"), {"m": "1"})
    with pytest.raises(ValueError, match="require_digests"):
        S.load_file(tmp_path / "st.safetensors")
    ours, meta = S.load_file(tmp_path / "st.safetensors", require_digests=False)
    assert meta == {"m": "1"} and all(torch.equal(ours[k], t[k]) for k in t)


def _write_raw(path, header, body):
    hj = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hj)) + hj + body)


def test_refuses_bad_files(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    p = tmp_path / "w.safetensors"
    S.save_file(t, p)
    good = p.read_bytes()
    bad = tmp_path / "bad.safetensors"
    cases = {
        "truncated": good[:-3],
        "no header length": good[:5],
        "trailing bytes": good + b"\0",
        "header length": struct.pack("<Q", len(good)) + good[8:],
    }
    for what, data in cases.items():
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="truncated|corrupt|trailing"):
            S.load_file(bad)
    tampered = bytearray(good)
    tampered[-1] ^= 0x01
    bad.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="SHA-256"):
        S.load_file(bad)
    body = b"\0" * 24
    for header, match in [
        ({"w": {"dtype": "F99", "shape": [2, 3], "data_offsets": [0, 24]}}, "corrupt header entry"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 24]}}, "do not hold"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
          "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "holes"),
        ({"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, "__metadata__": {"a": 1}},
         "__metadata__"),
        ([1, 2], "not a JSON object"),
    ]:
        _write_raw(bad, header, body)
        with pytest.raises(ValueError, match=match):
            S.load_file(bad)
    bad.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="corrupt header"):
        S.load_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        S.load_file(tmp_path / "missing.safetensors")


def test_save_file_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="tensors"):
        S.save_file({"a": [1]}, tmp_path / "a")
    with pytest.raises(TypeError, match="metadata"):
        S.save_file({"a": torch.zeros(1)}, tmp_path / "a", {"k": 1})
    with pytest.raises(ValueError, match="reserved"):
        S.save_file({"a": torch.zeros(1)}, tmp_path / "a", {S.DIGEST_KEY: "x"})
    with pytest.raises(TypeError, match="dtype"):
        S.save_file({"a": torch.zeros(1, dtype=torch.complex64)}, tmp_path / "a")
    assert not list(tmp_path.iterdir())


def _model(seed=0, **cfg):
    torch.manual_seed(seed)
    return BemForCausalLM(TransformerConfig(**{**CFG.to_dict(), **cfg})).double()


def _randomise_adapter(m, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


@pytest.mark.parametrize("preset", ["lora", "V1", "V2", "V3", "V4"])
def test_adapter_round_trip(tmp_path, preset):
    m = attach(_model(), BemConfig.preset(preset, num_experts=2 if preset == "V1" else 1))
    _randomise_adapter(m, 3)
    ids = torch.randint(0, 37, (2, 70), generator=torch.Generator().manual_seed(4))
    want = m(ids)
    S.save_pretrained(m, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([S.ADAPTER_CONFIG, S.ADAPTER_WEIGHTS])
    fresh = S.from_pretrained(_model(), tmp_path)
    torch.testing.assert_close(fresh(ids), want, rtol=0, atol=0)
    assert set(S.adapter_state_dict(fresh)) == set(S.adapter_state_dict(m))


def test_adapter_refusals_leave_model_unchanged(tmp_path):
    m = attach(_model(), BemConfig.preset("lora"))
    S.save_pretrained(m, tmp_path)
    other = _model(d_model=24, d_ff=30)                      # mismatched shapes
    with pytest.raises(ValueError, match="shape"):
        S.from_pretrained(other, tmp_path)
    assert not bem_modules(other) and getattr(other, "bem_config", None) is None
    with pytest.raises(ValueError, match="BemForCausalLM"):
        S.from_pretrained(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path)
    doc = json.loads((tmp_path / S.ADAPTER_CONFIG).read_text())
    doc["tensors"]["extra"] = [1]
    (tmp_path / S.ADAPTER_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="listed"):
        S.from_pretrained(_model(), tmp_path)
    doc["format_version"] = 99
    (tmp_path / S.ADAPTER_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="format version"):
        S.from_pretrained(_model(), tmp_path)
    (tmp_path / S.ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        S.from_pretrained(_model(), tmp_path)
    with pytest.raises(ValueError, match="no bem adapter"):
        S.save_pretrained(_model(), tmp_path / "x")


def test_model_round_trip_and_refusals(tmp_path):
    m = _model(tie_embeddings=True, positions="learned")
    ids = torch.randint(0, 37, (1, 9), generator=torch.Generator().manual_seed(5))
    S.save_model(m, tmp_path)
    back = S.load_model(tmp_path)
    torch.testing.assert_close(back(ids), m(ids), rtol=0, atol=0)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with pytest.raises(ValueError, match="adapter attached"):
        S.save_model(attach(_model(), BemConfig.preset("lora")), tmp_path / "y")
    doc = json.loads((tmp_path / S.MODEL_CONFIG).read_text())
    doc["config"]["d_model"] = 32
    (tmp_path / S.MODEL_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="shape"):
        S.load_model(tmp_path)
    doc["config"]["bogus"] = 1
    (tmp_path / S.MODEL_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown fields"):
        S.load_model(tmp_path)


def test_adapter_round_trip_on_hugging_face_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=100, bos_token_id=0,
            eos_token_id=0)).double().eval()

    m = attach(gpt2(), BemConfig.preset("V1", "gpt2", num_experts=2))
    _randomise_adapter(m, 6)
    ids = torch.randint(0, 50, (1, 70), generator=torch.Generator().manual_seed(7))
    want = m(input_ids=ids, use_cache=False).logits
    S.save_pretrained(m, tmp_path)
    back = S.from_pretrained(gpt2(), tmp_path)
    torch.testing.assert_close(back(input_ids=ids, use_cache=False).logits, want, rtol=0, atol=0)
