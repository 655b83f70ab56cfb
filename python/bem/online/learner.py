"""OnlineLearner: updates a model's adapter parameters (those that require grad) from a stream of
feedback in small batches, with the EWC penalty, a proximal term to the last promoted adapter,
optional replay, and limits per update (steps, gradient norm, size of the parameter change). An
update that fails — bad input, a non-finite loss or result — leaves the adapter and the optimizer
exactly as they were."""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bem.online._checks import nonneg_float, positive_float, positive_int, same_layout
from bem.online.ewc import EWC, per_sample_fisher
from bem.online.proximal import ProximalAnchor
from bem.online.replay import ReplayBuffer

log = logging.getLogger("bem")

# loss_fn(model, items) -> (len(items),) per-item negative log-likelihood of the item's answer.
LossFn = Callable[[nn.Module, Sequence[Any]], torch.Tensor]
STATE_FORMAT = "bem.online-learner"
STATE_VERSION = 1


@dataclass(frozen=True)
class UpdateResult:
    """One update: the weighted data loss of its first step (before the change), the EWC and
    proximal penalties of its last step, steps taken, ‖Δθ‖ of the whole update (after the limit)
    and whether max_update_norm scaled the change down."""

    loss: float
    ewc_penalty: float
    prox_penalty: float
    steps: int
    update_norm: float
    limited: bool


class OnlineLearner:
    """Online adapter updates.

    model: an nn.Module whose trainable parameters (requires_grad) are the adapter (e.g. after
    bem.attach, which freezes the base). loss_fn(model, items) → (B,) per-item NLL (a sum over the
    item's answer tokens). lr, betas: Adam's (weight decay 0). steps_per_update: optimiser steps on
    each batch. max_grad_norm: clip of the total gradient norm per step (None: no clip).
    max_update_norm: the whole update's ‖Δθ‖₂ is scaled down to this (None: no limit).
    ewc: an :class:`EWC` (None: no EWC). prox_mu: μ of ½·μ·‖θ − θ_promoted‖² (0: off).
    replay: a :class:`ReplayBuffer`; each step adds `replay_batch` stored items (weight 1 each) to
    the batch, and the batch is added to the buffer after a successful update.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), steps_per_update: int = 1,
                 max_grad_norm: float | None = 1.0, max_update_norm: float | None = None,
                 ewc: EWC | None = None, prox_mu: float = 0.0,
                 replay: ReplayBuffer | None = None, replay_batch: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable (model, items) -> (B,) losses")
        self.model, self.loss_fn = model, loss_fn
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("model: no trainable parameters (attach an adapter first)")
        self.lr = positive_float(lr, "lr")
        self.steps_per_update = positive_int(steps_per_update, "steps_per_update")
        self.max_grad_norm = None if max_grad_norm is None else positive_float(max_grad_norm,
                                                                                "max_grad_norm")
        self.max_update_norm = None if max_update_norm is None else positive_float(
            max_update_norm, "max_update_norm")
        if ewc is not None and not isinstance(ewc, EWC):
            raise TypeError(f"ewc: expected an EWC or None, got {type(ewc).__name__}")
        self.ewc = ewc
        self.prox = ProximalAnchor(nonneg_float(prox_mu, "prox_mu"))
        if replay is not None and not isinstance(replay, ReplayBuffer):
            raise TypeError(f"replay: expected a ReplayBuffer or None, got {type(replay).__name__}")
        self.replay = replay
        self.replay_batch = positive_int(replay_batch, "replay_batch", minimum=0)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=self.lr, betas=betas)
        self.n_updates = 0
        self.items_seen = 0

    # ---- updates -------------------------------------------------------------------------
    def _weights(self, batch: Sequence[Any], weights: Any) -> torch.Tensor:
        device = next(iter(self.params.values())).device
        if weights is None:
            return torch.ones(len(batch), device=device)
        w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if w.numel() != len(batch):
            raise ValueError(f"weights: expected {len(batch)} feedback weights (one per item), "
                             f"got {w.numel()}")
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).nonzero()[0])
            raise ValueError(f"weights: feedback weight {w[bad].item()} at index {bad} is not "
                             "finite")
        if bool((w < 0).any()) or float(w.sum()) == 0:
            raise ValueError("weights: expected feedback weights >= 0 with a positive sum")
        return w.to(device)

    def _losses(self, items: Sequence[Any]) -> torch.Tensor:
        losses = self.loss_fn(self.model, items)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (len(items),):
            raise ValueError(f"loss_fn: expected a ({len(items)},) tensor of per-item losses, got "
                             f"{type(losses).__name__} {tuple(getattr(losses, 'shape', ()))}")
        if not torch.isfinite(losses).all():
            raise ValueError("loss_fn: non-finite per-item loss (bad feedback in the batch?); the "
                             "update was not applied")
        return losses

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Copies of the adapter parameters and the optimiser state (what a failed update puts
        back)."""
        return ({k: p.detach().clone() for k, p in self.params.items()},
                copy.deepcopy(self.optimizer.state_dict()))

    def _restore(self, snap: tuple[dict[str, torch.Tensor], dict]) -> None:
        params, opt = snap
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(params[k])
        self.optimizer.load_state_dict(opt)

    def update(self, batch: Sequence[Any], weights: Any = None) -> UpdateResult:
        """Learn from one batch of feedback items (weights: optional (B,) finite weights ≥ 0, e.g.
        ratings; None = 1 each). ValueError, with the adapter and optimiser unchanged, for an empty
        batch, bad weights, non-finite losses or a non-finite result."""
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
            raise TypeError(f"batch: expected a sequence of items, got {type(batch).__name__}")
        if len(batch) == 0:
            raise ValueError("batch: expected at least one feedback item, got an empty batch")
        w = self._weights(batch, weights)
        snap = self.snapshot()
        start = snap[0]
        was_training = self.model.training
        self.model.train()
        try:
            first_loss = math.nan
            ewc_pen = prox_pen = torch.zeros(())
            for step in range(self.steps_per_update):
                replayed = self.replay.sample(self.replay_batch) if self.replay else []
                items = list(batch) + replayed
                weights_all = torch.cat([w, w.new_ones(len(replayed))])
                losses = self._losses(items)
                data = (weights_all * losses).sum() / weights_all.sum()
                if step == 0:
                    first_loss = float(data.detach())
                ewc_pen = self.ewc.penalty(self.params) if self.ewc else data.new_zeros(())
                prox_pen = self.prox.penalty(self.params)
                total = data + ewc_pen + prox_pen
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                grads = [p.grad for p in self.params.values() if p.grad is not None]
                if not all(torch.isfinite(g).all() for g in grads):
                    raise ValueError("loss_fn: non-finite gradient; the update was not applied")
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm)
                self.optimizer.step()
            limited, norm = self._limit_update(start)
            if not all(torch.isfinite(p).all() for p in self.params.values()):
                raise ValueError("update: the adapter became non-finite; the update was not "
                                 "applied")
        except BaseException:
            self._restore(snap)
            raise
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        if self.replay is not None:
            self.replay.add(batch)
        self.n_updates += 1
        self.items_seen += len(batch)
        return UpdateResult(first_loss, float(ewc_pen.detach()), float(prox_pen.detach()),
                            self.steps_per_update,
                            norm, limited)

    @torch.no_grad()
    def _limit_update(self, start: Mapping[str, torch.Tensor]) -> tuple[bool, float]:
        sq = sum(float((p - start[k]).double().square().sum()) for k, p in self.params.items())
        norm = math.sqrt(sq)
        if self.max_update_norm is None or norm <= self.max_update_norm:
            return False, norm
        scale = self.max_update_norm / norm
        for k, p in self.params.items():
            p.copy_(start[k] + (p - start[k]) * scale)
        return True, self.max_update_norm

    # ---- promotion -----------------------------------------------------------------------
    def fisher(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Per-sample diagonal Fisher of the adapter on `samples` (bem.online.ewc)."""
        was = self.model.training
        self.model.eval()
        try:
            return per_sample_fisher(self.params, lambda s: self._losses([s])[0], samples)
        finally:
            self.model.train(was)

    def consolidate(self, samples: Sequence[Any]) -> None:
        """EWC consolidation (no-op without EWC): remember the current adapter with its
        per-sample Fisher on `samples` — call it when a task (a domain, a regime between two drift
        alarms) is finished. Consolidating after every small update instead anchors the penalty to
        the task that is still being learned: with λ large enough to protect anything the adapter
        stops learning (measured in docs/online.md)."""
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
            raise TypeError(f"samples: expected a sequence of items, got {type(samples).__name__}")
        if not samples:
            raise ValueError("samples: expected at least one item to estimate the Fisher from")
        if self.ewc is not None:
            self.ewc.consolidate(self.params, self.fisher(samples))

    def promote(self, samples: Sequence[Any] = ()) -> None:
        """The current adapter was promoted (shipped): it becomes the proximal anchor, and, with
        `samples`, is also consolidated (:meth:`consolidate`) — pass samples only where a task
        ends."""
        if samples:
            self.consolidate(samples)
        self.prox.set_anchor(self.params)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self, encode_item: Callable[[Any], Any] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, doc): copies of every tensor (adapter, Adam moments and step counts, EWC,
        proximal anchor) for a safetensors file and everything else as JSON — a snapshot that
        later updates do not change. The replay buffer needs
        `encode_item` (item → JSON values)."""
        tensors = {f"param.{k}": p.detach().clone() for k, p in self.params.items()}
        names = list(self.params)
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in opt["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{names[idx]}.{key}"] = v.detach().clone()
                else:
                    scalars.setdefault(names[idx], {})[key] = v
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                   if k != "params"} for g in opt["param_groups"]]
        if self.ewc is not None:
            tensors.update(self.ewc.state_tensors())
        if self.prox.anchor is not None:
            tensors.update({f"prox.{k}": t for k, t in self.prox.anchor.items()})
        doc: dict[str, Any] = {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "params": names,
            "optimizer": {"param_groups": groups, "scalars": scalars,
                          "with_state": [names[i] for i in sorted(opt["state"])]},
            "ewc": self.ewc.state_json() if self.ewc is not None else None,
            "prox": {"mu": self.prox.mu, "anchored": self.prox.anchor is not None},
            "n_updates": self.n_updates, "items_seen": self.items_seen, "replay": None}
        if self.replay is not None:
            if encode_item is None:
                raise ValueError("encode_item: needed to save the replay buffer's items")
            doc["replay"] = self.replay.state_dict(encode_item)
        return tensors, doc

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any],
                        decode_item: Callable[[Any], Any] | None = None) -> None:
        """Restore a state written by :meth:`state_dict` — bit for bit (adapter and optimiser).
        Everything is checked before anything is changed: ValueError naming the mismatch (other
        adapter names or shapes, another format) leaves the learner as it was."""
        if not isinstance(doc, Mapping) or doc.get("format") != STATE_FORMAT or \
                doc.get("format_version") != STATE_VERSION:
            raise ValueError(f"state: not a {STATE_FORMAT} document of version {STATE_VERSION}")
        params = {k[len("param."):]: t for k, t in tensors.items() if k.startswith("param.")}
        same_layout(params, self.params, "state: param.*")
        if list(doc.get("params", [])) != list(self.params):
            raise ValueError("state: params: saved for an adapter with other parameter names")
        for k, t in params.items():
            if t.dtype != self.params[k].dtype:
                raise ValueError(f"state: param.{k}: dtype {t.dtype}, the adapter has "
                                 f"{self.params[k].dtype}")
            if not torch.isfinite(t).all():
                raise ValueError(f"state: param.{k}: non-finite values")
        names = list(self.params)
        opt_doc = doc["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for name in opt_doc["with_state"]:
            entry = {key[len(f"optim.{name}."):]: t for key, t in tensors.items()
                     if key.startswith(f"optim.{name}.")}
            entry.update(opt_doc["scalars"].get(name, {}))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry and tuple(entry[key].shape) != tuple(self.params[name].shape):
                    raise ValueError(f"state: optim.{name}.{key}: shape {tuple(entry[key].shape)}, "
                                     f"the adapter has {tuple(self.params[name].shape)}")
            state[names.index(name)] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                        for k, v in entry.items()}
        groups = [dict(g, params=list(range(len(names))) if i == 0 else []) for i, g in
                  enumerate(opt_doc["param_groups"])]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        ewc = None
        if doc.get("ewc") is not None:
            if self.ewc is None:
                raise ValueError("state: saved with EWC; this learner has none")
            ewc = EWC(self.ewc.lam, self.ewc.mode, self.ewc.gamma)
            ewc.load_state(doc["ewc"], tensors, self.params)
        anchor = None
        if doc["prox"]["anchored"]:
            anchor = {k[len("prox."):]: t.clone() for k, t in tensors.items()
                      if k.startswith("prox.")}
            same_layout(anchor, self.params, "state: prox.*")
        replay = None
        if doc.get("replay") is not None:
            if self.replay is None or decode_item is None:
                raise ValueError("state: saved with a replay buffer; pass decode_item and give the "
                                 "learner a ReplayBuffer of the same capacity")
            replay = ReplayBuffer(self.replay.capacity)
            replay.load_state_dict(doc["replay"], decode_item)
        probe = torch.optim.Adam(list(self.params.values()), lr=self.lr)
        probe.load_state_dict({"state": state, "param_groups": groups})   # validates the layout
        # Everything checked: apply.
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(params[k])
        self.optimizer = probe
        if ewc is not None:
            self.ewc = ewc
        self.prox.anchor = anchor
        if replay is not None:
            self.replay = replay
        self.n_updates, self.items_seen = int(doc["n_updates"]), int(doc["items_seen"])
