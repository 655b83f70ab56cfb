"""bem's adapter modules on :mod:`bem.ops`: PT1 head gating, V1 dynamic-rank LoRA, V2 gate
shaping, V3 Kronecker, V4 residual FiLM and the static LoRA baseline, plus the per-chunk controls
they read (see docs/modules.md for the cache-safety rule)."""
from bem.modules.base import LinearAdapter, reference_kernels
from bem.modules.control import (CHUNK_SIZE, ChunkControl, ChunkController, current_control,
                                 use_control)
from bem.modules.dynamic_rank import DynamicRankLoRA
from bem.modules.gate_shaping import (GateShaping, GateShapingOutput, TinyCrossEncoder,
                                      evidence_inputs)
from bem.modules.head_gating import HeadGating
from bem.modules.kronecker import KroneckerAdapter
from bem.modules.lora import LoRA
from bem.modules.residual_film import ResidualFiLM

__all__ = ["CHUNK_SIZE", "ChunkControl", "ChunkController", "DynamicRankLoRA", "GateShaping",
           "GateShapingOutput", "HeadGating", "KroneckerAdapter", "LinearAdapter", "LoRA",
           "ResidualFiLM", "TinyCrossEncoder", "current_control", "evidence_inputs",
           "reference_kernels", "use_control"]
