"""bem's safetensors files (written and read through the safetensors library, with bem's SHA-256
digests and layout in the metadata): round trips, interop, files of bem's earlier writer, a corpus of
malformed files that must each be refused, random corruption, atomic writes, and save/load of
adapters and of the built-in model."""
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings, strategies as st_

from bem import serialization as S
from bem.attach import BemConfig, attach, bem_modules
from bem.model import BemForCausalLM, TransformerConfig

CFG = TransformerConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=2, d_ff=24)
LEGACY = Path(__file__).parent / "data" / "serialization_v1"


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
    t["i.view"] = t["a.f64"].T                                  # a strided view of another tensor
    S.save_file(t, tmp_path / "x.safetensors", {"note": "hi"})
    back, meta = S.load_file(tmp_path / "x.safetensors")
    assert meta == {"note": "hi"} and set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    assert os.listdir(tmp_path) == ["x.safetensors"]           # no temporary left behind
    back["b.f32"][0] = 1.0                                      # own, writable memory


def test_interop_with_safetensors_library(tmp_path):
    t = _tensors(torch.Generator().manual_seed(1))
    S.save_file(t, tmp_path / "bem.safetensors")
    theirs = st.load_file(str(tmp_path / "bem.safetensors"))
    assert all(torch.equal(theirs[k], t[k]) for k in t)
    st.save_file(dict(t), str(tmp_path / "st.safetensors"), {"m": "1"})
    with pytest.raises(ValueError, match="require_digests"):
        S.load_file(tmp_path / "st.safetensors")
    ours, meta = S.load_file(tmp_path / "st.safetensors", require_digests=False)
    assert meta == {"m": "1"} and all(torch.equal(ours[k], t[k]) for k in t)


def _legacy_tensors():
    """What tests/data/serialization_v1/tensors.safetensors holds (written by bem 0.1.0's own
    hand-written writer, before bem used the safetensors library)."""
    return {"a.f64": torch.arange(15, dtype=torch.float64).reshape(3, 5) / 7,
            "b.f32": torch.arange(7, dtype=torch.float32) - 3.5,
            "c.bf16": (torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3).to(torch.bfloat16),
            "d.f16": (torch.arange(4, dtype=torch.float32) / 8).half(),
            "e.i64": torch.arange(-2, 2).reshape(2, 2),
            "f.bool": torch.tensor([True, False, True, True, False]),
            "g.empty": torch.zeros(0, 3),
            "h.scalar": torch.tensor(2.5)}


def test_files_of_the_earlier_writer_stay_loadable(tmp_path):
    back, meta = S.load_file(LEGACY / "tensors.safetensors")
    want = _legacy_tensors()
    assert meta == {"note": "written by bem 0.1.0's own writer"} and set(back) == set(want)
    for k in want:
        assert back[k].dtype == want[k].dtype and torch.equal(back[k], want[k]), k
    # Their digests are still checked (they have no bem.layout).
    data = bytearray((LEGACY / "tensors.safetensors").read_bytes())
    data[-20] ^= 0x40
    (tmp_path / "t.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        S.load_file(tmp_path / "t.safetensors")
    model = S.load_model(LEGACY / "model")
    ids = torch.arange(10).reshape(1, 10) % 37
    logits = model(ids)
    assert logits.shape == (1, 10, 37) and bool(torch.isfinite(logits).all())
    S.save_model(model, tmp_path / "again")                     # and re-save with the library
    again = S.load_model(tmp_path / "again")
    torch.testing.assert_close(again(ids), logits, rtol=0, atol=0)
    fresh = S.load_model(LEGACY / "model")
    adapted = S.from_pretrained(fresh, LEGACY / "adapter")
    assert bem_modules(adapted)
    torch.testing.assert_close(adapted(ids), logits, rtol=0, atol=0)   # LoRA B starts at zero


# ---- the corpus of malformed files ----------------------------------------------------------------

def _frame(header_json: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json + body


def _file(header, body=b"\0" * 24) -> bytes:
    return _frame(json.dumps(header).encode(), body)


def _good() -> bytes:
    """A bem file: w (2, 3) float32 and v (3,) bfloat16, with bem's metadata."""
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "v": torch.ones(3).bfloat16()}
    digests = {k: S._sha256(v) for k, v in t.items()}
    layout = {"w": ["F32", [2, 3]], "v": ["BF16", [3]]}
    return st.save(t, {S.DIGEST_KEY: json.dumps(digests), S.LAYOUT_KEY: json.dumps(layout)})


def _edit_header(edit) -> bytes:
    """The good file with its header JSON passed through `edit` (data bytes unchanged)."""
    good = _good()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    edit(header)
    return _frame(json.dumps(header).encode(), good[8 + n:])


def _set(path, value):
    def edit(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _meta_edit(key, fn):
    def edit(h):
        h["__metadata__"][key] = fn(h["__metadata__"][key])
    return edit


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


F32_24 = {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}
MALFORMED = [
    ("empty file", lambda: b"", "header too small"),
    ("no header length", lambda: b"12345", "header too small"),
    ("header length past the end", lambda: struct.pack("<Q", 1000) + b"{}", "not a valid"),
    ("oversized header", lambda: struct.pack("<Q", 200 * 2**20) + b"{}", "header too large"),
    ("header length 2**63", lambda: struct.pack("<Q", 2**63) + b"{}", "header too large"),
    ("zero-length header", lambda: struct.pack("<Q", 0), "invalid JSON"),
    ("header not JSON", lambda: _frame(b"{{{{", b""), "invalid JSON"),
    ("header a JSON list", lambda: _file([1, 2]), "invalid JSON"),
    ("header not UTF-8", lambda: _frame(b'{"\xff\xfe":1}', b""), "UTF-8"),
    ("truncated data", lambda: _good()[:-3], "not fully covered"),
    ("trailing bytes", lambda: _good() + b"\0", "not fully covered"),
    ("offsets past the data", lambda: _file({"w": {**F32_24, "shape": [8], "data_offsets": [0, 32]}}),
     "not fully covered"),
    ("hole between tensors", lambda: _file({"w": {**F32_24, "shape": [1], "data_offsets": [4, 8]},
                                            "v": {**F32_24, "shape": [4], "data_offsets": [8, 24]}}),
     "invalid offset"),
    ("overlapping offsets", lambda: _file({"w": {**F32_24, "shape": [4], "data_offsets": [0, 16]},
                                           "v": {**F32_24, "shape": [4], "data_offsets": [8, 24]}}),
     "invalid offset"),
    ("duplicate tensor name", lambda: _frame(
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8), "invalid offset"),
    ("three data offsets", lambda: _file({"w": {**F32_24, "data_offsets": [0, 12, 24]}}),
     "invalid length 3"),
    ("shape disagrees with offsets", lambda: _file({"w": {**F32_24, "shape": [2, 2]}}),
     "invalid shape, data type, or offset"),
    ("negative dimension", lambda: _file({"w": {**F32_24, "shape": [-6]}}), "invalid value"),
    ("shape overflows", lambda: _file({"w": {**F32_24, "shape": [2**62, 2**62]}}), "overflow"),
    ("shape not a list", lambda: _file({"w": {**F32_24, "shape": "6"}}), "invalid type"),
    ("missing dtype", lambda: _file({"w": {"shape": [6], "data_offsets": [0, 24]}}),
     "missing field `dtype`"),
    ("unknown dtype", lambda: _file({"w": {**F32_24, "dtype": "F99"}}), "unknown variant `F99`"),
    ("dtype bem does not store", lambda: _file({"w": {**F32_24, "dtype": "U32"}}),
     "does not store"),
    ("non-string metadata value", lambda: _file({"w": F32_24, "__metadata__": {"a": 1}}),
     "expected a string"),
    ("dtype reinterpreted, digests intact", lambda: _edit_header(_set(["w", "dtype"], "I32")),
     "header edited"),
    ("shape reinterpreted, digests intact", lambda: _edit_header(_set(["w", "shape"], [3, 2])),
     "header edited"),
    ("tampered data byte", lambda: _flip_last_byte(_good()), "SHA-256"),
    ("digest metadata not JSON", lambda: _edit_header(_meta_edit(S.DIGEST_KEY, lambda v: v[:-1])),
     "corrupt bem.sha256"),
    ("digest metadata lists other tensors", lambda: _edit_header(_meta_edit(
        S.DIGEST_KEY, lambda v: json.dumps({"w": json.loads(v)["w"]}))), "exactly the file's"),
    ("layout metadata lists other tensors", lambda: _edit_header(_meta_edit(
        S.LAYOUT_KEY, lambda v: json.dumps({**json.loads(v), "x": ["F32", [1]]}))),
     "exactly the file's"),
    ("digest swapped between tensors", lambda: _edit_header(_meta_edit(S.DIGEST_KEY, lambda v: (
        lambda d: json.dumps({"w": d["v"], "v": d["w"]}))(json.loads(v)))), "SHA-256"),
    ("no digests (not written by bem)", lambda: st.save({"w": torch.zeros(6)}), "require_digests"),
]


def test_malformed_corpus_is_large_enough():
    assert len(MALFORMED) >= 20 and len({name for name, _, _ in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("name,make,match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_refuses_malformed_file(tmp_path, name, make, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make())
    with pytest.raises(ValueError, match=match) as info:
        S.load_file(path)
    assert str(path) in str(info.value)                         # the message names the file


def test_good_corpus_file_loads_and_unreadable_paths_are_refused(tmp_path):
    (tmp_path / "good.safetensors").write_bytes(_good())
    t, meta = S.load_file(tmp_path / "good.safetensors")
    assert meta == {} and torch.equal(t["w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="no such file"):
        S.load_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        S.load_file(tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st_.data())
def test_random_corruption_is_refused_or_harmless(tmp_path, data):
    """Any truncation, any single flipped bit and any overwritten byte either raises ValueError or
    loads exactly the original tensors (a flip in metadata text or header padding may pass)."""
    good = _good()
    want = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "v": torch.ones(3).bfloat16()}
    kind = data.draw(st_.sampled_from(["truncate", "flip", "byte"]))
    if kind == "truncate":
        bad = good[:data.draw(st_.integers(0, len(good) - 1))]
    else:
        i = data.draw(st_.integers(0, len(good) - 1))
        b = (good[i] ^ (1 << data.draw(st_.integers(0, 7))) if kind == "flip"
             else data.draw(st_.integers(0, 255).filter(lambda v: v != good[i])))
        bad = good[:i] + bytes([b]) + good[i + 1:]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bad)
    try:
        back, _ = S.load_file(path)
    except ValueError:
        return
    assert set(back) == set(want)
    for k in want:
        assert back[k].dtype == want[k].dtype and torch.equal(back[k], want[k]), k


def test_atomic_write_permissions_and_no_leftovers(tmp_path):
    old = os.umask(0o022)
    try:
        S.atomic_write(tmp_path / "a.json", b"{}")
        S.save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for name in ("a.json", "w.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    with pytest.raises(TypeError):
        S.atomic_write(tmp_path / "b.json", "not bytes")       # a failed write leaves nothing
    assert sorted(os.listdir(tmp_path)) == ["a.json", "w.safetensors"]


def test_save_file_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="tensors"):
        S.save_file({"a": [1]}, tmp_path / "a")
    with pytest.raises(TypeError, match="metadata"):
        S.save_file({"a": torch.zeros(1)}, tmp_path / "a", {"k": 1})
    for key in (S.DIGEST_KEY, S.LAYOUT_KEY):
        with pytest.raises(ValueError, match="reserved"):
            S.save_file({"a": torch.zeros(1)}, tmp_path / "a", {key: "x"})
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


def test_files_are_byte_identical_across_processes(tmp_path):
    """The same tensors and metadata give the same bytes in every process (the library's metadata
    map has a per-process random order; bem writes the header with sorted keys)."""
    import subprocess
    import sys
    code = ("import sys, torch; from bem import serialization as S; "
            "S.save_file({'b': torch.arange(5.0), 'a': torch.ones(2, dtype=torch.int64)}, "
            "sys.argv[1], {'format': 'x', 'note': 'y', 'z': 'w'})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(S.__file__).parent.parent),
                                                        *sys.path])}
    for i in range(4):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True,
                       env=env)
    blobs = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}
    assert len(blobs) == 1
    (blob,) = blobs
    assert st.load(blob)["b"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and list(json.loads(blob[8:8 + n])["__metadata__"]) == sorted(
        ["format", "note", "z", S.DIGEST_KEY, S.LAYOUT_KEY])
