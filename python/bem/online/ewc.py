"""Elastic weight consolidation over adapter parameters: the diagonal Fisher estimated from
per-sample gradients (not from the square of a batch-mean gradient), and the quadratic penalty
½·λ·Σ F̃ (θ − θ*)² in "separate" (one term per consolidation) or "online" (F̃ ← γ·F̃ + F_new)
mode."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bem.online._checks import nonneg_float, same_layout

MODES = ("separate", "online")


def per_sample_fisher(params: Mapping[str, torch.Tensor],
                      nll: Callable[[Any], torch.Tensor], samples: Sequence[Any]
                      ) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher F_j = (1/N) Σ_i (∂ℓ_i/∂θ_j)² of `params` (name → tensor with
    requires_grad), with ℓ_i = nll(samples[i]) the negative log-likelihood of sample i's observed
    answer (a scalar tensor). One backward pass per sample: squaring each sample's gradient before
    averaging is what makes this a Fisher estimate; squaring the gradient of the batch mean (what
    Avalanche's EWC does) gives (1/N²)(Σ_i g_i)², which shrinks with N and cancels opposing
    samples. Returns name → float32 tensor of the parameter's shape (float64 parameters give
    float64). A parameter that ℓ_i does not depend on gets zeros."""
    if not samples:
        raise ValueError("samples: expected at least one sample to estimate the Fisher from")
    names = list(params)
    tensors = [params[n] for n in names]
    if not tensors or not all(t.requires_grad for t in tensors):
        raise ValueError("params: expected a non-empty mapping of tensors that require grad")
    acc = [torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
           for t in tensors]
    for i, sample in enumerate(samples):
        loss = nll(sample)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"nll: expected a scalar tensor for samples[{i}], got "
                             f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
        if not torch.isfinite(loss).all():
            raise ValueError(f"nll: non-finite loss {loss.item()} for samples[{i}]")
        grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.detach().to(a.dtype).square())
    return {n: a / len(samples) for n, a in zip(names, acc)}


class EWC:
    """The EWC penalty ½·λ·Σ_k Σ_j F_kj (θ_j − θ*_kj)² over consolidated (Fisher, anchor) pairs.

    mode "separate": each :meth:`consolidate` adds a pair (Kirkpatrick et al. 2017, one per task);
    "online": one pair, F̃ ← γ·F̃ + F_new and θ* ← the current parameters (Schwarz et al. 2018).
    The ½ follows GMvandeVen/continual-learning; Avalanche's EWCPlugin omits it (its λ is half of
    bem's for the same penalty). lam: λ ≥ 0. gamma: the online decay in [0, 1].
    """

    def __init__(self, lam: float, mode: str = "online", gamma: float = 1.0):
        self.lam = nonneg_float(lam, "lam")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.gamma = nonneg_float(gamma, "gamma")
        if self.gamma > 1:
            raise ValueError(f"gamma: expected a decay in [0, 1], got {gamma!r}")
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def consolidate(self, params: Mapping[str, torch.Tensor],
                    fisher: Mapping[str, torch.Tensor]) -> None:
        """Remember the current `params` (name → tensor) with their importance `fisher` (same
        names and shapes, finite, ≥ 0); ValueError naming the argument otherwise, with nothing
        changed."""
        if self.terms:
            same_layout(params, self.terms[0][1], "params", "the consolidated parameters")
        same_layout(fisher, params, "fisher", "params")
        for k, f in fisher.items():
            if not torch.isfinite(f).all() or bool((f < 0).any()):
                raise ValueError(f"fisher[{k!r}]: expected finite values >= 0")
        anchor = {k: p.detach().clone() for k, p in params.items()}
        new = {k: f.detach().to(params[k].dtype).clone() for k, f in fisher.items()}
        if self.mode == "online" and self.terms:
            old = self.terms[0][0]
            new = {k: self.gamma * old[k] + new[k] for k in new}
            self.terms = [(new, anchor)]
        else:
            self.terms.append((new, anchor))

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """½·λ·Σ F̃ (θ − θ*)², a differentiable scalar (0 before any consolidation)."""
        if not self.terms or self.lam == 0:
            ref = next(iter(params.values()))
            return ref.new_zeros(())
        same_layout(params, self.terms[0][1], "params", "the consolidated parameters")
        total = None
        for fisher, anchor in self.terms:
            for k, p in params.items():
                term = (fisher[k] * (p - anchor[k]).square()).sum()
                total = term if total is None else total + term
        return 0.5 * self.lam * total

    def state_tensors(self, prefix: str = "ewc.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{i}.{part}.{k}": t for i, (fisher, anchor) in enumerate(self.terms)
                for part, d in (("fisher", fisher), ("anchor", anchor)) for k, t in d.items()}

    def state_json(self) -> dict[str, Any]:
        return {"lam": self.lam, "mode": self.mode, "gamma": self.gamma,
                "n_terms": len(self.terms)}

    def load_state(self, doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   params: Mapping[str, torch.Tensor], prefix: str = "ewc.") -> None:
        """Restore what state_tensors/state_json wrote, checked against `params`' layout."""
        if not isinstance(doc, Mapping) or doc.get("mode") != self.mode:
            raise ValueError(f"state: ewc: saved in mode {doc.get('mode')!r}, this EWC is "
                             f"{self.mode!r}")
        n = doc.get("n_terms")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"state: ewc: n_terms: expected an int >= 0, got {n!r}")
        terms = []
        for i in range(n):
            pair = []
            for part in ("fisher", "anchor"):
                head = f"{prefix}{i}.{part}."
                d = {k[len(head):]: t for k, t in tensors.items() if k.startswith(head)}
                same_layout(d, params, f"state: {head}*", "the adapter parameters")
                pair.append({k: t.clone() for k, t in d.items()})
            terms.append((pair[0], pair[1]))
        self.lam, self.gamma, self.terms = float(doc["lam"]), float(doc["gamma"]), terms
        if not math.isfinite(self.lam):
            raise ValueError("state: ewc: lam is not finite")
