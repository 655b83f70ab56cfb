"""bem's built-in small causal transformer (pre-norm, RoPE or learned positions, multi-head
attention, gated or plain MLP) with Llama-style module names, whose attention reads and writes K/V
through a paged cache (bem.model.cache) when generating."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bem.model.config import TransformerConfig
from bem.modules.control import ChunkControl, optional_control, use_control


@dataclass
class AttentionBatch:
    """Where the tokens of one forward sit, and (when generating) where their K/V go.

    positions: (B, T) int64 absolute positions of the input tokens.
    valid: (B, T) bool, False for padding.
    kv: None (attend within the input only) or a paged K/V step (bem.engine) with
        ``write(layer, k, v)`` storing the valid tokens' k, v (B, T, H, D) and
        ``read(layer) -> (keys, values (B, H, L, D), key_positions (B, L) int64, key_valid (B, L))``
        returning each row's whole context, the new tokens included.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    kv: object | None = None
    _rope: dict = field(default_factory=dict, repr=False, compare=False)

    def rope(self, theta: float, head_dim: int, dtype: torch.dtype):
        """(cos, sin) (B, T, 1, D) of the RoPE angles at `positions`, computed in float64 once
        per forward and shared by every layer."""
        key = (theta, head_dim, dtype)
        if key not in self._rope:
            D = head_dim
            inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64,
                                                device=self.positions.device) / D))
            ang = self.positions.to(torch.float64)[..., None] * inv               # (B, T, D/2)
            ang = torch.cat([ang, ang], -1)
            self._rope[key] = (ang.cos().to(dtype)[:, :, None, :],
                               ang.sin().to(dtype)[:, :, None, :])
        return self._rope[key]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention, as Llama): x (B, T, H, D), cos/sin (B, T, 1, D)."""
    D = x.shape[-1]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """Multi-head causal self-attention; x (B, T, d) → (B, T, d)."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        if self.cfg.positions == "rotary":
            cos, sin = batch.rope(self.cfg.rope_theta, D, q.dtype)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if batch.kv is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)              # (B, H, L, D) views
            kpos, kvalid = batch.positions, batch.valid
        else:
            batch.kv.write(self.layer, k, v)
            keys, values, kpos, kvalid = batch.kv.read(self.layer)           # (B, H, L, D)
        allowed = kvalid[:, None, :] & (kpos[:, None, :] <= batch.positions[:, :, None])  # (B,T,L)
        allowed = allowed | ~allowed.any(-1, keepdim=True)   # padding rows: anything, ignored
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(-1, -2)) / math.sqrt(D)
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        out = torch.matmul(probs, values)                                    # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """Gated (SiLU, Llama) or plain (GELU) MLP; x (B, T, d) → (B, T, d)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gated = cfg.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.gated else F.gelu(self.up_proj(x))
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.embed_positions = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class BemForCausalLM(nn.Module):
    """The built-in causal LM. Module names follow Hugging Face Llama (``model.layers.N.self_attn.
    q_proj`` …, ``mlp.down_proj``, ``lm_head``), so bem.attach patterns are shared with HF Llama.

    ``forward(input_ids (B, T) int64) → logits (B, T, vocab)`` in the parameters' dtype.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"BemForCausalLM: cfg: expected TransformerConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, control: ChunkControl | None = None,
                batch: AttentionBatch | None = None) -> torch.Tensor:
        """input_ids: (B, T) int64. Without `batch`, the rows are whole sequences from position 0
        (right-padded where `valid` (B, T) bool is False). `control` overrides the per-chunk
        controls an attached bem controller would compute from input_ids; `batch` carries the
        positions and the paged K/V of a generation step. Returns (B, T, vocab) logits."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
                input_ids.dtype != torch.int64:
            raise ValueError(f"BemForCausalLM: input_ids: expected a (B, T) int64 tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        B, T = input_ids.shape
        if batch is None:
            pos = (torch.arange(T, device=input_ids.device).expand(B, T) if positions is None
                   else positions)
            ok = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if valid is None else valid
            batch = AttentionBatch(pos, ok)
        if int(batch.positions.max()) >= self.config.max_positions:
            raise ValueError(f"BemForCausalLM: positions up to {int(batch.positions.max())} exceed "
                             f"max_positions={self.config.max_positions}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise IndexError(f"BemForCausalLM: input_ids: expected ids in [0, "
                             f"{self.config.vocab_size}), got [{int(input_ids.min())}, "
                             f"{int(input_ids.max())}]")
        with use_control(control if control is not None else optional_control()):
            h = self.model.embed_tokens(input_ids)
            if self.config.positions == "learned":
                h = h + self.model.embed_positions(batch.positions)
            for layer in self.model.layers:
                h = layer(h, batch)
            return self.lm_head(self.model.norm(h))
