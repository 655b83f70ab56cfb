"""Budget accounting: exact trainable-parameter and per-token FLOP counts of bem adapters and of
whole models (torch.utils.flop_counter's convention: 2 FLOPs per multiply-add of matmuls), and a
helper that sizes the static-LoRA baseline to match a variant within a tolerance."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bem.attach import ROLES, AdapterSpec, BemConfig, attach, bem_modules, family
from bem.model.transformer import BemForCausalLM
from bem.modules.base import linear_shape, reference_kernels
from bem.modules.control import CHUNK_SIZE
from bem.serialization import adapter_state_dict


@dataclass(frozen=True)
class Budget:
    """Counts for one forward of `seq_len` tokens (one sequence).

    adapter_params / model_params: parameters bem added / all parameters (shared tensors once).
    trainable_params: parameters with requires_grad. adapter_flops / model_flops: matmul FLOPs of
    bem's modules / of the whole forward; ``*_per_token`` divide by seq_len.
    """

    seq_len: int
    adapter_params: int
    model_params: int
    trainable_params: int
    adapter_flops: int
    model_flops: int

    @property
    def adapter_flops_per_token(self) -> float:
        return self.adapter_flops / self.seq_len

    @property
    def model_flops_per_token(self) -> float:
        return self.model_flops / self.seq_len


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def adapter_flops(model: nn.Module, seq_len: int) -> int:
    """Matmul FLOPs bem's modules and controller add to a forward of seq_len tokens (one row)."""
    chunks = -(-seq_len // CHUNK_SIZE)
    total = sum(m.adapter_flops(seq_len, chunks) for m in bem_modules(model).values())
    ctl = getattr(model, "bem_controller", None)
    if ctl is not None and ctl.router is not None:
        total += 2 * chunks * ctl.router.in_features * ctl.router.out_features
    return total


def base_flops(model: BemForCausalLM, seq_len: int) -> int:
    """Matmul FLOPs of the built-in transformer itself for seq_len tokens: projections, the full
    T×T score and value products of the attention (as computed), MLP and LM head."""
    c = model.config
    T, d = seq_len, c.d_model
    per_layer = 4 * 2 * T * d * d + 2 * 2 * T * T * d + (3 if c.mlp == "gated" else 2) * 2 * T * d * c.d_ff
    return c.n_layers * per_layer + 2 * T * d * c.vocab_size


def measure_flops(model: nn.Module, seq_len: int) -> int:
    """FLOPs of one forward of seq_len tokens counted by torch.utils.flop_counter, with bem's
    modules on their pure-torch reference path (custom ops are invisible to the counter)."""
    ids = torch.zeros(1, seq_len, dtype=torch.int64, device=next(model.parameters()).device)
    # Not under no_grad: FlopCounterMode's module tracker fails on views of parameters made there.
    with reference_kernels(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    return counter.get_total_flops()


def count(model: nn.Module, seq_len: int = 256) -> Budget:
    """Exact counts for `model` (with or without bem attached) and a seq_len-token forward.
    Whole-model FLOPs are analytic for bem's built-in model and measured with flop_counter (on the
    reference path) for other models."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    ad = adapter_flops(model, seq_len)
    if isinstance(model, BemForCausalLM):
        total_flops = base_flops(model, seq_len) + ad
    else:
        total_flops = measure_flops(model, seq_len)
    adapter = adapter_state_dict(model)
    return Budget(seq_len, sum(t.numel() for t in adapter.values()),
                  _unique_numel(model.parameters()),
                  _unique_numel(p for p in model.parameters() if p.requires_grad), ad, total_flops)


def _lora_candidates(model: nn.Module) -> list[tuple[str, int]]:
    """(pattern, d_in + d_out) of the linear layers a baseline LoRA may use, widest first."""
    fam = family(model)
    names = {n: m for n, m in model.named_modules()}
    out = []
    for role in ("attn_in", "attn_out", "mlp_down"):
        for pattern in ROLES[fam][role]:
            spec = AdapterSpec("lora", [pattern])
            hits = [n for n in names if spec.matches(n)]
            for n in hits:
                d_in, d_out, _ = linear_shape(names[n], n)
                out.append((f"re:{n.replace('.', '[.]')}", d_in + d_out))
    return sorted(out, key=lambda t: -t[1])


def _rank_units(target: int, widths: list[int]) -> list[int]:
    """Non-negative counts n_w (total LoRA ranks on layers of width w = d_in + d_out) with
    Σ n_w·w closest to target; searches a few counts below the greedy one for every width but
    the narrowest, which takes the rounded remainder."""
    best: tuple[int, list[int]] = (target + 1, [0] * len(widths))

    def search(i: int, left: int, chosen: list[int]) -> None:
        nonlocal best
        w = widths[i]
        if i == len(widths) - 1:
            n = max(0, round(left / w))
            err = abs(left - n * w)
            if err < best[0]:
                best = (err, chosen + [n])
            return
        top = max(0, left // w)
        for n in range(top, max(-1, top - 9), -1):
            search(i + 1, left - n * w, chosen + [n])

    search(0, target, [])
    return best[1]


def size_baseline(model: nn.Module, variant: BemConfig, *, seq_len: int = 256,
                  tolerance: float = 0.05) -> tuple[BemConfig, Budget, Budget]:
    """A static-LoRA config whose adapter parameters (= trainable parameters with a frozen base)
    and whole-model FLOPs per token are both within ±tolerance of `variant`'s on `model`.

    LoRA goes on the attention input, output and MLP down projections; the total rank per layer
    width (d_in + d_out) is chosen to bring the parameter count closest to the variant's, then
    spread evenly over the layers of that width. Returns (baseline config, variant
    budget, baseline budget). `model` is not modified (copies are measured). Raises ValueError
    when no rank assignment meets the tolerance."""
    if not isinstance(variant, BemConfig):
        raise TypeError(f"variant: expected BemConfig, got {type(variant).__name__}")
    if not (isinstance(tolerance, float) and 0 < tolerance < 1):
        raise ValueError(f"tolerance: expected a float in (0, 1), got {tolerance!r}")
    if bem_modules(model):
        raise ValueError("model: expected a model without bem modules (the shared base)")
    target = count(attach(copy.deepcopy(model), variant), seq_len)
    cands = _lora_candidates(model)
    if not cands:
        raise ValueError("model: no linear layers for a LoRA baseline")
    widths = sorted({u for _, u in cands}, reverse=True)
    counts = _rank_units(target.adapter_params, widths)
    ranks: dict[str, int] = {}
    for width, total in zip(widths, counts):   # spread a width's ranks evenly over its layers
        group = [p for p, u in cands if u == width]
        for i, pattern in enumerate(group):
            r = total // len(group) + (1 if i < total % len(group) else 0)
            if r:
                ranks[pattern] = r
    if not ranks:
        raise ValueError(f"size_baseline: the variant has {target.adapter_params} adapter "
                         f"parameters, fewer than one LoRA rank ({widths[-1]})")
    baseline = BemConfig([AdapterSpec("lora", [p], {"rank": r, "alpha": float(2 * r)})
                          for p, r in ranks.items()])
    got = count(attach(copy.deepcopy(model), baseline), seq_len)
    for what, a, b in (("adapter parameters", got.adapter_params, target.adapter_params),
                       ("model FLOPs per token", got.model_flops, target.model_flops)):
        if abs(a - b) > tolerance * b:
            raise ValueError(f"size_baseline: cannot match the variant's {what} within "
                             f"±{tolerance:.0%}: baseline {a}, variant {b}")
    return baseline, target, got

