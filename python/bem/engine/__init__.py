"""bem.engine — continuous-batching generation over bem's built-in model and the routing-keyed
paged KV cache (bem.kv): requests join and finish at any step, every decoding row runs in one
forward with its own per-chunk routing, long prompts are prefilled in pieces, and the per-chunk
controls are computed once per chunk. See docs/engine.md."""
from bem.engine.engine import Engine, RequestOutput, SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
