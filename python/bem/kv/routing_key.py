"""Routing keys: what one KV block was computed with — expert id, a digest of that expert's
weights, and an adapter/config version. Equal keys are the only licence to reuse K/V."""
from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

DIGEST_BYTES = 16
_PERSON = b"bem.kv.weights"  # blake2b personalisation: digests of other bem uses never collide


def _tensor_bytes(name: str, tensor: torch.Tensor) -> memoryview:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"weights[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"weights[{name!r}]: expected a dense (strided) tensor, got "
                        f"{tensor.layout}")
    if tensor.device.type == "meta":
        raise ValueError(f"weights[{name!r}]: a meta tensor has no data to digest")
    flat = tensor.detach().resolve_conj().resolve_neg().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).cpu().numpy())


def weights_digest(weights: torch.nn.Module | Mapping[str, torch.Tensor] | torch.Tensor
                   | Iterable[torch.Tensor]) -> bytes:
    """16-byte blake2b digest of weights, stable across processes and runs.

    ``weights``: an ``nn.Module`` (its ``state_dict()``, by sorted name), a mapping name → tensor
    (by sorted name), a tensor, or an iterable of tensors (in order). Each tensor contributes its
    name (for mappings), dtype, shape and raw bytes (CPU or CUDA; copied to the CPU to hash), so
    reloading different weights under the same name gives a different digest. Cost: one pass over
    the bytes (about 1 GB/s); compute it once per weight load, not per request.
    """
    if isinstance(weights, torch.nn.Module):
        items = sorted(weights.state_dict().items())
    elif isinstance(weights, Mapping):
        items = sorted(weights.items())
        for name, _ in items:
            if not isinstance(name, str):
                raise TypeError(f"weights: mapping keys must be str, got {type(name).__name__}")
    elif isinstance(weights, torch.Tensor):
        items = [("", weights)]
    elif isinstance(weights, Iterable) and not isinstance(weights, (str, bytes)):
        items = [(str(i), t) for i, t in enumerate(weights)]
    else:
        raise TypeError("weights: expected an nn.Module, a mapping of tensors, a tensor or an "
                        f"iterable of tensors, got {type(weights).__name__}")
    if not items:
        raise ValueError("weights: nothing to digest (no tensors)")
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_PERSON)
    for name, tensor in items:
        data = _tensor_bytes(name, tensor)
        for field in (name.encode(), str(tensor.dtype).encode(),
                      struct.pack(f"<{tensor.dim()}q", *tensor.shape)):
            h.update(struct.pack("<q", len(field)))
            h.update(field)
        h.update(struct.pack("<q", data.nbytes))
        h.update(data)
    return h.digest()


@dataclass(frozen=True)
class RoutingKey:
    """What a block's K/V was computed with.

    ``expert``: int ≥ −1 (−1: the base model without adapter). ``weights_digest``: 16 bytes,
    usually :func:`weights_digest` of that expert's weights (for −1, of the base model's).
    ``version``: int ≥ 0, bumped when anything else that changes K/V changes (adapter config,
    scaling, router config). Blocks are reused only between equal keys.
    """

    expert: int
    weights_digest: bytes
    version: int = 0
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __hash__(self) -> int:  # computed once: keys are looked up on every manager call
        return self._hash

    def __post_init__(self) -> None:
        for name, lo in (("expert", -1), ("version", 0)):
            value = getattr(self, name)
            if isinstance(value, bool):
                raise TypeError(f"{name}: expected int, got bool")
            try:
                value = operator.index(value)  # numpy integers become int
            except TypeError:
                raise TypeError(f"{name}: expected int, got {type(value).__name__}") from None
            if not lo <= value < 2**63:
                raise ValueError(f"{name}: expected an int in [{lo}, 2**63), got {value}")
            object.__setattr__(self, name, value)
        if not isinstance(self.weights_digest, bytes):
            raise TypeError("weights_digest: expected bytes, got "
                            f"{type(self.weights_digest).__name__}")
        if len(self.weights_digest) != DIGEST_BYTES:
            raise ValueError(f"weights_digest: expected {DIGEST_BYTES} bytes, got "
                             f"{len(self.weights_digest)}")
        object.__setattr__(self, "_hash", hash((self.expert, self.weights_digest, self.version)))

    @classmethod
    def for_weights(cls, expert: int, weights, version: int = 0) -> RoutingKey:
        """Key of ``expert`` computed with ``weights`` (anything :func:`weights_digest` takes)."""
        return cls(expert, weights_digest(weights), version)
