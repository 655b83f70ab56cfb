"""Safetensors files written and read by bem itself (strictly validated, SHA-256 of every tensor
in the metadata, atomic writes), and save/load of bem adapters and of bem's built-in model.

Format: an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape",
"data_offsets": [begin, end]}, optional "__metadata__": {str: str}}), then the tensors' raw
little-endian bytes, back to back in offset order.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bem

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
DIGEST_KEY = "bem.sha256"
ADAPTER_CONFIG = "bem_config.json"
ADAPTER_WEIGHTS = "bem_adapter.safetensors"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if sys.byteorder != "little":  # pragma: no cover - bem targets little-endian machines
        raise RuntimeError("bem.serialization: big-endian hosts are not supported")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync and os.replace: a
    reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file (atomically), adding the SHA-256 of each tensor's bytes
    under metadata key "bem.sha256" (a JSON object name → hex digest)."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and k for k in tensors):
        raise TypeError("tensors: expected a dict of non-empty str → torch.Tensor")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata: expected a dict of str → str")
    if DIGEST_KEY in meta or "__metadata__" in tensors:
        raise ValueError(f"metadata/tensors: the names {DIGEST_KEY!r} and '__metadata__' are "
                         "reserved")
    header: dict[str, Any] = {}
    blobs, digests, offset = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _CODES:
            raise TypeError(f"tensors[{name!r}]: dtype {t.dtype} has no safetensors code")
        raw = _raw(t)
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        digests[name] = hashlib.sha256(raw).hexdigest()
        blobs.append(raw)
        offset += len(raw)
    meta[DIGEST_KEY] = json.dumps(digests, sort_keys=True)
    header["__metadata__"] = meta
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)  # data starts 8-byte aligned, as the safetensors library writes
    atomic_write(path, struct.pack("<Q", len(hj)) + hj + b"".join(blobs))


def load_file(path: str | os.PathLike, *, require_digests: bool = True
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; returns (tensors, metadata without "bem.sha256").

    Refuses (ValueError naming the file and the problem) a truncated or over-long file, a
    malformed header, unknown dtypes, offsets that overlap, leave holes or disagree with the
    shape, and — when the file carries bem's digests — any tensor whose bytes no longer match.
    ``require_digests``: also refuse files without bem's digests (files from other writers).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) < 8:
        raise ValueError(f"{path}: truncated (only {len(data)} bytes; no header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ValueError(f"{path}: truncated or corrupt (header length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise ValueError(f"{path}: corrupt header (__metadata__ must map str to str)")
    body = memoryview(data)[8 + n:]
    spans = []
    for name, info in header.items():
        if (not isinstance(info, dict) or info.get("dtype") not in DTYPES or
                not isinstance(info.get("shape"), list) or
                not all(isinstance(s, int) and s >= 0 for s in info["shape"]) or
                not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2 or
                not all(isinstance(o, int) for o in info["data_offsets"])):
            raise ValueError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}")
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        numel = 1
        for s in info["shape"]:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ValueError(f"{path}: tensor {name!r}: offsets {info['data_offsets']} do not "
                             f"hold shape {info['shape']} of {info['dtype']}")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise ValueError(f"{path}: tensor {name!r} starts at {begin}, expected {pos} (holes or "
                             "overlaps in the data)")
        pos = end
    if pos != len(body):
        raise ValueError(f"{path}: {'truncated' if pos > len(body) else 'trailing bytes'}: the "
                         f"header describes {pos} data bytes, the file has {len(body)}")
    digests = None
    if DIGEST_KEY in meta:
        try:
            digests = json.loads(meta.pop(DIGEST_KEY))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: corrupt {DIGEST_KEY} metadata") from None
        if not isinstance(digests, dict) or set(digests) != set(header):
            raise ValueError(f"{path}: {DIGEST_KEY} metadata does not list exactly the file's "
                             "tensors")
    elif require_digests:
        raise ValueError(f"{path}: no {DIGEST_KEY} metadata (not written by bem); pass "
                         "require_digests=False to accept it unverified")
    out = {}
    for begin, end, name in spans:
        raw = body[begin:end]
        if digests is not None and hashlib.sha256(raw).hexdigest() != digests[name]:
            raise ValueError(f"{path}: tensor {name!r} fails its SHA-256 check (file tampered "
                             "with or corrupted)")
        info = header[name]
        t = torch.frombuffer(bytearray(raw), dtype=DTYPES[info["dtype"]]) if end > begin else \
            torch.empty(0, dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out, meta


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors bem added to `model` (module parameters, controller, gate shaper), by their
    names in ``model.state_dict()``; the wrapped base layers are left out."""
    from bem.attach import bem_modules

    prefixes = sorted((n + "." for n in bem_modules(model)), key=len, reverse=True)
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith(("bem_controller.", "bem_gate_shaper.")):
            out[key] = t
            continue
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is not None and not key[len(owner):].startswith("base_layer."):
            out[key] = t
    return out


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save the bem adapter of `model`: bem_config.json (config, model class, tensor shapes) and
    bem_adapter.safetensors (with SHA-256 digests), each written atomically."""
    config = getattr(model, "bem_config", None)
    if config is None:
        raise ValueError("model: no bem adapter attached (bem.attach first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    save_file(tensors, directory / ADAPTER_WEIGHTS, {"format": "bem-adapter"})
    doc = {"format": "bem-adapter", "format_version": FORMAT_VERSION, "bem_version": bem.__version__,
           "model_class": type(model).__name__, "config": json.loads(config.to_json()),
           "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}}
    atomic_write(directory / ADAPTER_CONFIG, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def from_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    freeze_base: bool = True) -> nn.Module:
    """Attach the adapter saved in `directory` to `model` and load its weights. Refuses (and
    leaves the model unchanged) a missing, truncated or tampered file, a config of another format
    or model class, and tensors whose names or shapes do not match what the config builds."""
    from bem.attach import BemConfig, attach, detach

    directory = Path(directory)
    doc = _json_file(directory / ADAPTER_CONFIG)
    if doc.get("format") != "bem-adapter" or doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: not a bem adapter config of format "
                         f"version {FORMAT_VERSION}")
    if doc.get("model_class") != type(model).__name__:
        raise ValueError(f"{directory}: adapter saved for a {doc.get('model_class')}, got a "
                         f"{type(model).__name__}")
    config = BemConfig.from_json(json.dumps(doc.get("config")))
    tensors, _ = load_file(directory / ADAPTER_WEIGHTS)
    listed = doc.get("tensors")
    if not isinstance(listed, dict) or {k: list(v.shape) for k, v in tensors.items()} != listed:
        raise ValueError(f"{directory}: {ADAPTER_WEIGHTS} does not hold the tensors listed in "
                         f"{ADAPTER_CONFIG}")
    attach(model, config, freeze_base=freeze_base)
    try:
        expected = adapter_state_dict(model)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"{directory}: adapter does not fit this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for k, t in expected.items():
            if tuple(t.shape) != tuple(tensors[k].shape):
                raise ValueError(f"{directory}: tensor {k!r}: shape {tuple(tensors[k].shape)} in "
                                 f"the file, {tuple(t.shape)} in the model")
        with torch.no_grad():
            for k, t in expected.items():
                t.copy_(tensors[k])
    except BaseException:
        detach(model)
        raise
    return model


def save_model(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save bem's built-in model (no adapter attached): config.json + model.safetensors."""
    from bem.attach import bem_modules
    from bem.model import BemForCausalLM

    if not isinstance(model, BemForCausalLM):
        raise TypeError(f"model: expected BemForCausalLM, got {type(model).__name__}")
    if bem_modules(model) or getattr(model, "bem_config", None) is not None:
        raise ValueError("model: has a bem adapter attached; save it with save_pretrained and "
                         "save the base model detached or merged")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # tied weights: own copies
    save_file(state, directory / MODEL_WEIGHTS, {"format": "bem-model"})
    doc = {"format": "bem-model", "format_version": FORMAT_VERSION, "bem_version": bem.__version__,
           "config": model.config.to_dict()}
    atomic_write(directory / MODEL_CONFIG, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def load_model(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model` (strict: every tensor present, shapes equal)."""
    from bem.model import BemForCausalLM, TransformerConfig

    directory = Path(directory)
    doc = _json_file(directory / MODEL_CONFIG)
    if doc.get("format") != "bem-model" or doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / MODEL_CONFIG}: not a bem model config of format version "
                         f"{FORMAT_VERSION}")
    try:
        cfg = TransformerConfig.from_dict(doc.get("config"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{directory / MODEL_CONFIG}: {exc}") from None
    tensors, _ = load_file(directory / MODEL_WEIGHTS)
    model = BemForCausalLM(cfg)
    state = model.state_dict()
    if set(state) != set(tensors):
        raise ValueError(f"{directory}: weights do not match the config: missing "
                         f"{sorted(set(state) - set(tensors))[:5]}, unexpected "
                         f"{sorted(set(tensors) - set(state))[:5]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(tensors[k].shape):
            raise ValueError(f"{directory}: tensor {k!r}: shape {tuple(tensors[k].shape)} in the "
                             f"file, {tuple(t.shape)} from the config")
    model = model.to(dtype or tensors["lm_head.weight"].dtype)
    model.load_state_dict(tensors)
    return model
