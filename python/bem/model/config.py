"""Configuration of bem's built-in causal transformer (JSON round trip, validated)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

POSITIONS = ("rotary", "learned")
MLPS = ("gated", "plain")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`bem.model.BemForCausalLM`.

    positions: "rotary" (RoPE on q, k) or "learned" (absolute embeddings up to max_positions).
    mlp: "gated" (Llama: down(silu(gate(x)) · up(x))) or "plain" (down(gelu(up(x)))).
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 172
    max_positions: int = 4096
    positions: str = "rotary"
    mlp: str = "gated"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TransformerConfig: {name}: expected a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig: n_heads: expected a divisor of d_model="
                             f"{self.d_model}, got {self.n_heads}")
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"TransformerConfig: rotary positions need an even head width, got "
                             f"{self.d_model // self.n_heads}")
        if self.positions not in POSITIONS:
            raise ValueError(f"TransformerConfig: positions: expected one of {POSITIONS}, got "
                             f"{self.positions!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"TransformerConfig: mlp: expected one of {MLPS}, got {self.mlp!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TransformerConfig: {name}: expected a finite number > 0, got {v!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"TransformerConfig: tie_embeddings: expected a bool, got "
                             f"{self.tie_embeddings!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        if not isinstance(data, dict):
            raise TypeError(f"TransformerConfig: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TransformerConfig: unknown fields {unknown}")
        return cls(**data)
