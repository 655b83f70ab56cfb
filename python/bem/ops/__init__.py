"""bem's kernels as PyTorch ops: masked multi-expert LoRA, Kronecker and FiLM deltas.

Each op is a ``torch.library`` custom op (``torch.ops.bem.*``) with a fake implementation and
registered autograd, so it runs under ``torch.compile`` and passes ``torch.library.opcheck``;
``bem.reference`` holds the pure-torch twin of each, used as the test oracle and as the fallback
where no compiled kernel exists.
"""
from bem.ops._common import device_checks
from bem.ops._film import film
from bem.ops._kron import kron_delta, kron_spectral_norm, kron_weight
from bem.ops._lora import lora_delta

__all__ = ["device_checks", "film", "kron_delta", "kron_spectral_norm", "kron_weight", "lora_delta"]
