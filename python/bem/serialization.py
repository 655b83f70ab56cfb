"""Safetensors files read and written through the `safetensors` package, with bem's guarantees on
top (SHA-256 of every tensor and each tensor's dtype and shape in the metadata, verified on load;
atomic writes), and save/load of bem adapters and of bem's built-in model.

The format is the safetensors library's own (files bem wrote with its earlier hand-written writer
are byte-compatible and stay loadable). bem adds two metadata keys: "bem.sha256", a JSON object
tensor name → hex SHA-256 of its raw little-endian bytes, and "bem.layout", name → [dtype code,
shape], so that a header edited to reinterpret the same bytes (F32 read as I32) is refused too.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

import bem

# The dtypes bem writes and reads, by safetensors code; files holding others are refused.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in DTYPES.items()}
DIGEST_KEY = "bem.sha256"
LAYOUT_KEY = "bem.layout"
ADAPTER_CONFIG = "bem_config.json"
ADAPTER_WEIGHTS = "bem_adapter.safetensors"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def _sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a contiguous CPU tensor's raw bytes (what the file holds, little-endian)."""
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, os.replace and an
    fsync of the folder: a reader — or the process after a crash or kill -9 — sees the old file or
    the new one, never a partial one. The file gets the permissions a plain open() would give it
    (mkstemp's are owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # makes the rename itself durable


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that renames and new entries in it survive a crash (a no-op where the
    folder cannot be opened or fsynced, as on some network file systems)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - file systems that do not fsync folders
        pass
    finally:
        os.close(dir_fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file (atomically) with the safetensors library, adding the
    SHA-256 of each tensor's bytes ("bem.sha256") and its dtype and shape ("bem.layout") to the
    metadata. tensors: name → tensor of a dtype in DTYPES, any device and strides."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and k for k in tensors):
        raise TypeError("tensors: expected a dict of non-empty str → torch.Tensor")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata: expected a dict of str → str")
    if DIGEST_KEY in meta or LAYOUT_KEY in meta or "__metadata__" in tensors:
        raise ValueError(f"metadata/tensors: the names {DIGEST_KEY!r}, {LAYOUT_KEY!r} and "
                         "'__metadata__' are reserved")
    plain: dict[str, torch.Tensor] = {}
    digests, layout = {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _CODES:
            raise TypeError(f"tensors[{name!r}]: dtype {t.dtype} is not one bem stores "
                            f"({', '.join(map(str, DTYPES.values()))})")
        # Own contiguous CPU copies: the library refuses views and tensors that share memory.
        t = t.detach().to("cpu", copy=True).contiguous()
        plain[name] = t
        digests[name] = _sha256(t)
        layout[name] = [_CODES[t.dtype], list(t.shape)]
    meta[DIGEST_KEY] = json.dumps(digests, sort_keys=True)
    meta[LAYOUT_KEY] = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    atomic_write(path, _canonical_header(safetensors.torch.save(plain, metadata=meta)))


def _canonical_header(blob: bytes) -> bytes:
    """The library's file with its header JSON re-serialised with sorted keys: the library keeps
    metadata in a hash map, so its key order (and the file's bytes and SHA-256) would change from
    process to process. Offsets count from the end of the header, so the data is unchanged."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(header)) + header + blob[8 + n:]


def _json_metadata(path: Path, meta: dict[str, str], key: str, names: set[str]) -> dict | None:
    if key not in meta:
        return None
    try:
        value = json.loads(meta.pop(key))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: corrupt {key} metadata (not JSON)") from None
    if not isinstance(value, dict) or set(value) != names:
        raise ValueError(f"{path}: {key} metadata does not list exactly the file's tensors")
    return value


def load_file(path: str | os.PathLike, *, require_digests: bool = True
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file with the safetensors library; returns (tensors, metadata without
    bem's keys). Tensors: name → CPU tensor (own memory, not a map of the file).

    The library refuses truncated or over-long files, malformed or oversized (> 100 MB) headers
    and offsets that overlap, leave holes or disagree with the shape; bem then refuses dtypes it
    does not store and — when the file carries bem's metadata — any tensor whose bytes, dtype or
    shape no longer match it. Every refusal is a ValueError naming the file and the problem.
    ``require_digests``: also refuse files without bem's digests (files from other writers).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: cannot read (no such file)" if not path.exists() else
                         f"{path}: cannot read (not a regular file)")
    try:
        # backend="pread": the tensors are copies, not views of a mapping that a later truncation
        # of the file would turn into SIGBUS.
        with safetensors.safe_open(path, framework="pt", backend="pread") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for name, t in tensors.items():
        if t.dtype not in _CODES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which bem does not "
                             "store")
    names = set(tensors)
    digests = _json_metadata(path, meta, DIGEST_KEY, names)
    layout = _json_metadata(path, meta, LAYOUT_KEY, names)
    if digests is None and require_digests:
        raise ValueError(f"{path}: no {DIGEST_KEY} metadata (not written by bem); pass "
                         "require_digests=False to accept it unverified")
    for name, t in tensors.items():
        if layout is not None and layout[name] != [_CODES[t.dtype], list(t.shape)]:
            raise ValueError(f"{path}: tensor {name!r} is {_CODES[t.dtype]} {list(t.shape)} in "
                             f"the header but {layout[name]} in {LAYOUT_KEY} (header edited)")
        if digests is not None and _sha256(t) != digests[name]:
            raise ValueError(f"{path}: tensor {name!r} fails its SHA-256 check (file tampered "
                             "with or corrupted)")
    return tensors, meta


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
        copy_adapter_tensors(model, tensors, directory)
    except BaseException:
        detach(model)
        raise
    return model


def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                         directory: str | os.PathLike) -> None:
    """Copy a saved adapter's tensors into the attached bem parameters of `model`; ValueError
    (naming `directory`) when names or shapes do not match, before anything is copied."""
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
