"""The safety controller: finds a model's LoRA-style adapters and, after every optimizer step,
projects their factors off the safety basis and into the spectral budget; reports orthogonality
and projections; checks outputs with the violation detector and gates updates on them."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from bem.safety.basis import SafetyBasis
from bem.safety.gate import ViolationGate, violation_gate
from bem.safety.spectral import SpectralMonitor
from bem.safety.violations import OutputReport, Request, ViolationDetector

__all__ = ["SafetyController", "adapted_layers"]

log = logging.getLogger(__name__)


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that carry LoRA factors: parameters lora_A (E, r, d_in) and
    lora_B (E, d_out, r) and a ``scale`` (bem.modules.LoRA, DynamicRankLoRA), by module name."""
    out = {}
    for name, m in model.named_modules():
        A, B = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter) and A.dim() == 3 and \
                B.dim() == 3 and hasattr(m, "scale"):
            out[name] = m
    return out


class SafetyController:
    """Keeps a model's adapters safe while it trains, and gates what it produces.

    Args:
        model: an nn.Module with LoRA-style adapters (see :func:`adapted_layers`).
        basis: optional SafetyBasis, or a list of them on different sides (an input basis and
            an output basis: A ← A(I − U_in U_inᵀ) and B ← (I − U_out U_outᵀ)B act on different
            factors, so both hold exactly); each of its layers must be an adapted layer whose
            width on the basis' side matches U. Adapted layers without a basis are not projected
            off.
        monitor: optional SpectralMonitor applied to every adapted layer (all experts).
        detector: optional ViolationDetector for :meth:`check`.

    The factors are projected once at construction (the Kaiming-initialised A has components
    along U) and then by :meth:`step`, which a training loop calls after each optimizer step —
    or :meth:`attach_to` registers it as the optimizer's step post-hook. Projecting the
    parameters after the step (rather than the gradients before it) keeps the constraint exact
    for any optimizer: Adam's elementwise scaling would carry a projected gradient back out of
    the subspace.

    >>> import torch
    >>> from torch import nn
    >>> from bem.modules import LoRA
    >>> from bem.safety import SafetyBasis, SpectralMonitor
    >>> net = nn.Sequential(LoRA(nn.Linear(16, 8), rank=4))
    >>> U = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))[0]
    >>> ctl = SafetyController(net, basis=SafetyBasis({"0": U}), monitor=SpectralMonitor(0.5))
    >>> opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    >>> handle = ctl.attach_to(opt)
    >>> for _ in range(5):
    ...     opt.zero_grad(); net(torch.randn(32, 16)).square().mean().backward(); opt.step()
    >>> ctl.report()["max_orthogonality"] <= 1e-5
    True
    """

    def __init__(self, model: nn.Module, *,
                 basis: SafetyBasis | Sequence[SafetyBasis] | None = None,
                 monitor: SpectralMonitor | None = None,
                 detector: ViolationDetector | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected nn.Module, got {type(model).__name__}")
        bases = self._bases_of(basis)
        for name, value, cls in (("monitor", monitor, SpectralMonitor),
                                 ("detector", detector, ViolationDetector)):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name}: expected {cls.__name__} or None, got "
                                f"{type(value).__name__}")
        if basis is None and monitor is None and detector is None:
            raise ValueError("basis, monitor, detector: expected at least one of them")
        self.layers = adapted_layers(model)
        if not self.layers and (basis is not None or monitor is not None):
            raise ValueError(f"model: no LoRA adapters (lora_A, lora_B, scale) found in "
                             f"{type(model).__name__}")
        for b in bases:
            self._check_basis(b)
        self.basis, self.monitor, self.detector = basis, monitor, detector
        self.bases = bases
        self.steps = 0
        self._project_basis()

    @staticmethod
    def _bases_of(basis) -> list[SafetyBasis]:
        if basis is None:
            return []
        if isinstance(basis, SafetyBasis):
            return [basis]
        if isinstance(basis, (str, bytes)) or not isinstance(basis, Sequence) or not basis:
            raise TypeError(f"basis: expected SafetyBasis, a non-empty list of them or None, "
                            f"got {type(basis).__name__}")
        for i, b in enumerate(basis):
            if not isinstance(b, SafetyBasis):
                raise TypeError(f"basis[{i}]: expected SafetyBasis, got {type(b).__name__}")
        sides = [b.side for b in basis]
        if len(set(sides)) != len(sides):
            raise ValueError(f"basis: at most one basis per side, got sides {sides} (merge the "
                             f"directions of one side into one basis)")
        return list(basis)

    def _check_basis(self, basis: SafetyBasis) -> None:
        missing = [n for n in basis.layers if n not in self.layers]
        if missing:
            raise ValueError(f"basis: layers {missing} are not adapted layers of the model "
                             f"(adapted: {sorted(self.layers)})")
        for name in basis.layers:
            m = self.layers[name]
            d = m.lora_A.shape[-1] if basis.side == "input" else m.lora_B.shape[-2]
            if basis[name].shape[0] != d:
                raise ValueError(f"basis: layer {name!r} has U of shape "
                                 f"{tuple(basis[name].shape)}, expected ({d}, s) for side "
                                 f"{basis.side!r}")

    def _project_basis(self) -> None:
        for b in self.bases:
            for name in b.layers:
                m = self.layers[name]
                b.project_(name, m.lora_A, m.lora_B)

    def step(self) -> None:
        """After an optimizer step: project every layer's factors off its safety basis, then scale
        them into the spectral budget (a scaling keeps the first projection exact)."""
        with torch.no_grad():
            self._project_basis()
            if self.monitor is not None:
                for name, m in self.layers.items():
                    self.monitor.monitor_and_project(m.lora_A, m.lora_B, m.scale, name,
                                                     inplace=True)
        self.steps += 1

    def attach_to(self, optimizer: torch.optim.Optimizer):
        """Runs :meth:`step` after every ``optimizer.step()``; returns the hook's handle
        (``handle.remove()`` detaches it)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def orthogonality(self) -> dict[str, float]:
        """Per basis layer, the largest ‖ΔW U‖_F/‖ΔW‖_F (input side; ‖Uᵀ ΔW‖_F/‖ΔW‖_F output
        side) over its experts; keyed by layer name, or "side:layer" with several bases."""
        out = {}
        for b in self.bases:
            for name in b.layers:
                key = name if len(self.bases) == 1 else f"{b.side}:{name}"
                out[key] = float(b.orthogonality(name, self.layers[name].lora_A,
                                                 self.layers[name].lora_B).max())
        return out

    def report(self) -> dict:
        """steps, per-layer and max orthogonality, and the monitor's projection statistics."""
        ortho = self.orthogonality()
        out = {"steps": self.steps, "orthogonality": ortho,
               "max_orthogonality": max(ortho.values(), default=0.0)}
        if self.monitor is not None:
            out["spectral"] = self.monitor.get_projection_stats()
        log.debug("safety report after %d steps: max orthogonality %.3g", self.steps,
                  out["max_orthogonality"])
        return out

    def snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of every adapted layer's (lora_A, lora_B), for :meth:`restore`."""
        return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                for n, m in self.layers.items()}

    def restore(self, snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Puts the factors of a :meth:`snapshot` back (an update the gate refused)."""
        if not isinstance(snapshot, dict) or set(snapshot) != set(self.layers):
            raise ValueError(f"snapshot: expected factors for the layers {sorted(self.layers)}")
        with torch.no_grad():
            for n, (A, B) in snapshot.items():
                self.layers[n].lora_A.copy_(A)
                self.layers[n].lora_B.copy_(B)

    def check(self, pairs: Iterable[tuple[Request, str]]) -> list[OutputReport]:
        """The detector's report on each (request, output) pair (tallied in its rates)."""
        if self.detector is None:
            raise ValueError("detector: this controller has none; pass detector= to check outputs")
        return self.detector.check_many(pairs)

    def gate(self, baseline: Sequence[OutputReport], candidate: Sequence[OutputReport], *,
             alpha: float = 0.05, other_p_values: Sequence[float] = ()) -> ViolationGate:
        """:func:`bem.safety.gate.violation_gate`; a refusal is logged with its reasons."""
        decision = violation_gate(baseline, candidate, alpha=alpha,
                                  other_p_values=other_p_values)
        if not decision.accepted:
            log.warning("safety gate refused the candidate: %s", "; ".join(decision.reasons))
        return decision
