"""AR1's macro-policy: the per-chunk action space (expert × rank budget × bias scale), the
factorised categorical policy with its critics, and the planner that turns chunk features into a
cache-safe plan with hysteresis and a bounded number of distinct actions per sequence."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution
from torch.distributions.kl import register_kl

__all__ = ["ActionSpace", "FactorisedCategorical", "MacroPolicy", "PlanStats", "QHead",
           "ValueNetwork", "action_histogram", "plan", "worth_flip"]

QFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ActionSpace:
    """What the router chooses per chunk: an expert (−1 = no adapter, 0..E−1), a rank budget k
    (the routed LoRA experts keep their k most important rank components) and a bias scale (the
    routed experts' delta is multiplied by it).

    An action is encoded as a (..., 3) int64 tensor of indices [expert + 1, rank-budget index,
    bias-scale index], so "no adapter" is expert index 0 and every factor starts at 0.

    Args:
        num_experts: E ≥ 1. rank_budgets: distinct positive ints. bias_scales: distinct finite
            numbers ≥ 0. (Lists are accepted and stored as tuples.)
    """

    num_experts: int
    rank_budgets: tuple[int, ...]
    bias_scales: tuple[float, ...]

    def __post_init__(self) -> None:
        E = self.num_experts
        if isinstance(E, bool) or not isinstance(E, numbers.Integral) or E < 1:
            raise ValueError(f"ActionSpace: num_experts: expected a positive int, got {E!r}")
        ranks = _choices("rank_budgets", self.rank_budgets,
                         lambda v: not isinstance(v, bool) and isinstance(v, numbers.Integral)
                         and v >= 1, "positive ints")
        scales = _choices("bias_scales", self.bias_scales,
                          lambda v: not isinstance(v, bool) and isinstance(v, numbers.Real)
                          and math.isfinite(v) and v >= 0, "finite numbers >= 0")
        object.__setattr__(self, "num_experts", int(E))
        object.__setattr__(self, "rank_budgets", tuple(int(k) for k in ranks))
        object.__setattr__(self, "bias_scales", tuple(float(s) for s in scales))

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Choices per factor: (E + 1, |rank_budgets|, |bias_scales|)."""
        return self.num_experts + 1, len(self.rank_budgets), len(self.bias_scales)

    @property
    def num_actions(self) -> int:
        return math.prod(self.sizes)

    def validate(self, actions: torch.Tensor, name: str = "actions", *,
                 allow_none: bool = False) -> torch.Tensor:
        """Check ``actions`` is a (..., 3) int64 tensor of in-range indices and return it. With
        ``allow_none`` a row may also be [−1, −1, −1] ("no previous action")."""
        if not isinstance(actions, torch.Tensor) or actions.dtype != torch.int64:
            raise TypeError(f"{name}: expected an int64 tensor, got "
                            f"{getattr(actions, 'dtype', type(actions).__name__)}")
        if actions.dim() < 1 or actions.shape[-1] != 3:
            raise ValueError(f"{name}: expected shape (..., 3), got {tuple(actions.shape)}")
        sizes = torch.tensor(self.sizes, device=actions.device)
        bad = (actions < 0) | (actions >= sizes)
        if allow_none:
            bad &= ~(actions == -1).all(-1, keepdim=True)
        if bool(bad.any()):
            row = actions[bad.any(-1)][0].tolist()
            raise ValueError(f"{name}: index out of range: {row} (expected [expert+1, rank, scale] "
                             f"indices below {list(self.sizes)}"
                             + (", or [-1, -1, -1]" if allow_none else "") + ")")
        return actions

    def encode(self, experts: torch.Tensor, rank_index: torch.Tensor,
               scale_index: torch.Tensor) -> torch.Tensor:
        """Expert ids (−1..E−1), rank-budget and bias-scale indices (int64 tensors, broadcast
        together) → (..., 3) int64 actions."""
        parts = []
        for name, t, lo, hi in (("experts", experts, -1, self.num_experts),
                                ("rank_index", rank_index, 0, len(self.rank_budgets)),
                                ("scale_index", scale_index, 0, len(self.bias_scales))):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"{name}: expected an int64 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
                raise ValueError(f"{name}: expected values in [{lo}, {hi}), got "
                                 f"[{int(t.min())}, {int(t.max())}]")
            parts.append(t)
        e, k, s = torch.broadcast_tensors(*parts)
        return torch.stack([e + 1, k, s], dim=-1)

    def decode(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., 3) actions → (expert ids (−1 = no adapter), rank-budget indices, bias-scale
        indices), each (...) int64."""
        self.validate(actions)
        return actions[..., 0] - 1, actions[..., 1], actions[..., 2]

    def canonical(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions with the rank and scale indices of "no adapter" set to 0: without an adapter they
        change nothing, so every such triple is the same action (for switching and plan length)."""
        none = actions[..., :1] == 0
        return torch.where(none, torch.zeros_like(actions), actions)

    def flat(self, actions: torch.Tensor) -> torch.Tensor:
        """(..., 3) actions → (...) int64 index in [0, num_actions) (row-major over the factors)."""
        _, K, S = self.sizes
        return (actions[..., 0] * K + actions[..., 1]) * S + actions[..., 2]

    def label(self, actions: torch.Tensor) -> str:
        """Readable name of one (3,) action: "none" or "e{expert}/k{budget}/s{scale}"."""
        e, k, s = self.validate(actions).reshape(-1, 3)[0].tolist()
        if e == 0:
            return "none"
        return f"e{e - 1}/k{self.rank_budgets[k]}/s{self.bias_scales[s]:g}"

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "rank_budgets": list(self.rank_budgets),
                "bias_scales": list(self.bias_scales)}

    @classmethod
    def from_dict(cls, data: Mapping) -> ActionSpace:
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a mapping, got {type(data).__name__}")
        keys = {"num_experts", "rank_budgets", "bias_scales"}
        if set(data) != keys:
            raise ValueError(f"data: expected the keys {sorted(keys)}, got {sorted(data)}")
        return cls(data["num_experts"], tuple(data["rank_budgets"]), tuple(data["bias_scales"]))


def _choices(name: str, values, ok: Callable[[object], bool], what: str) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"ActionSpace: {name}: expected a non-empty tuple of {what}, got "
                         f"{values!r}")
    if not all(ok(v) for v in values) or len(set(values)) != len(values):
        raise ValueError(f"ActionSpace: {name}: expected distinct {what}, got {values!r}")
    return tuple(values)


class FactorisedCategorical(Distribution):
    """Independent categoricals over an action's three factors (expert, rank budget, bias scale).

    Args: expert_logits (..., E+1), rank_logits (..., K), scale_logits (..., S) — float logits
    with the same batch shape (...) (usually (N,)); −inf masks a choice, but every row needs a
    finite one. Actions are (..., 3) int64 indices (see :class:`ActionSpace`).

    ``log_prob`` and ``kl`` sum over the factors; ``mode`` is a property, as in torch.distributions.
    """

    arg_constraints: dict = {}  # the logits are checked in __init__ instead

    def __init__(self, expert_logits: torch.Tensor, rank_logits: torch.Tensor,
                 scale_logits: torch.Tensor):
        named = (("expert_logits", expert_logits), ("rank_logits", rank_logits),
                 ("scale_logits", scale_logits))
        normalised = []
        for name, t in named:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() < 1 or t.shape[-1] < 1 or t.shape[:-1] != expert_logits.shape[:-1]:
                raise ValueError(f"{name}: expected shape (..., n) with n >= 1 and batch shape "
                                 f"{tuple(expert_logits.shape[:-1])}, got {tuple(t.shape)}")
            lp = t - t.logsumexp(-1, keepdim=True)
            if bool(lp.isnan().any()):  # NaN, +inf, or a row of −inf
                raise ValueError(f"{name}: expected finite logits (−inf only where another "
                                 "choice of the row is finite)")
            normalised.append(lp)
        self._log_probs = tuple(normalised)
        super().__init__(expert_logits.shape[:-1], torch.Size([3]), validate_args=False)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return tuple(lp.shape[-1] for lp in self._log_probs)

    @property
    def factor_log_probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised log-probabilities per factor: (..., E+1), (..., K), (..., S)."""
        return self._log_probs

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (*sample, *batch, 3) int64 → (*sample, *batch) summed log-probability."""
        if not isinstance(actions, torch.Tensor) or actions.dtype != torch.int64:
            raise TypeError(f"actions: expected an int64 tensor, got "
                            f"{getattr(actions, 'dtype', type(actions).__name__)}")
        nb = len(self.batch_shape)
        if (actions.dim() < nb + 1 or actions.shape[-1] != 3
                or actions.shape[actions.dim() - 1 - nb:-1] != self.batch_shape):
            want = ", ".join(map(str, (*self.batch_shape, 3)))
            raise ValueError(f"actions: expected shape (..., {want}), got {tuple(actions.shape)}")
        out = 0
        for f, lp in enumerate(self._log_probs):
            idx = actions[..., f]
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= lp.shape[-1]):
                raise ValueError(f"actions: factor {f} index out of range [0, {lp.shape[-1]})")
            lp = lp.expand(*idx.shape, lp.shape[-1])
            out = out + lp.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        return out

    def entropy(self) -> torch.Tensor:
        """(*batch) sum of the factors' entropies."""
        return sum(-_plogq(lp, lp) for lp in self._log_probs)

    def kl(self, other: FactorisedCategorical) -> torch.Tensor:
        """(*batch) KL(self ‖ other), the sum of the per-factor KLs (differentiable in both)."""
        if not isinstance(other, FactorisedCategorical):
            raise TypeError(f"other: expected FactorisedCategorical, got {type(other).__name__}")
        if other.sizes != self.sizes or other.batch_shape != self.batch_shape:
            raise ValueError(f"other: expected sizes {self.sizes} and batch shape "
                             f"{tuple(self.batch_shape)}, got {other.sizes} and "
                             f"{tuple(other.batch_shape)}")
        return sum(_plogq(p, p) - _plogq(p, q)
                   for p, q in zip(self._log_probs, other._log_probs))

    def sample(self, sample_shape: torch.Size | tuple = torch.Size(), *,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(*sample_shape, *batch, 3) int64 actions, by Gumbel-max: deterministic given a seeded
        ``generator`` (on the logits' device)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            picks = []
            for lp in self._log_probs:
                u = torch.rand(shape + lp.shape[-1:], generator=generator, dtype=lp.dtype,
                               device=lp.device)
                picks.append((lp - torch.log(-torch.log(u))).argmax(-1))
        return torch.stack(picks, dim=-1)

    @property
    def mode(self) -> torch.Tensor:
        """(*batch, 3) int64: the most likely index of each factor (the first on ties)."""
        return torch.stack([lp.argmax(-1) for lp in self._log_probs], dim=-1)


def _plogq(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p·log q over the last dim, with 0·log q = 0 (masked choices of p contribute nothing)."""
    p = log_p.exp()
    return torch.where(p > 0, p * log_q, 0.0).sum(-1)


@register_kl(FactorisedCategorical, FactorisedCategorical)
def _kl_factorised(p: FactorisedCategorical, q: FactorisedCategorical) -> torch.Tensor:
    return p.kl(q)


def _net(d_in: int, d_out: int, hidden: int) -> nn.Module:
    """A linear map, or with hidden > 0 a one-hidden-layer tanh MLP; the last layer starts at 0."""
    last = nn.Linear(hidden or d_in, d_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return last if not hidden else nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), last)


def _check_width(owner: str, name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{owner}: {name}: expected an int >= {minimum}, got {v!r}")
    return int(v)


def _check_states(states: torch.Tensor, state_dim: int) -> None:
    if not isinstance(states, torch.Tensor) or not states.is_floating_point():
        raise TypeError(f"states: expected a floating tensor, got "
                        f"{getattr(states, 'dtype', type(states).__name__)}")
    if states.dim() < 1 or states.shape[-1] != state_dim:
        raise ValueError(f"states: expected shape (..., {state_dim}), got {tuple(states.shape)}")
    if not bool(states.isfinite().all()):
        raise ValueError("states: expected finite values")


class MacroPolicy(nn.Module):
    """π(action | state) for one chunk.

    state = [chunk feature (d_ctrl), one-hot of the previous chunk's action per factor
    (E+1 + K + S; all zero for the first chunk), is_first_chunk] → one linear map (or a tanh MLP
    with ``hidden`` units) to the logits of the three factors → :class:`FactorisedCategorical`.
    The output layer starts at zero: the initial policy is uniform, and its mode is action
    [0, 0, 0] (no adapter). Parameters: (state_dim + 1)·(E+1+K+S) with hidden = 0.

    Args:
        action_space: the choices. d_ctrl: width of the chunk features. hidden: 0 or the MLP width.
    """

    def __init__(self, action_space: ActionSpace, d_ctrl: int, hidden: int = 0):
        super().__init__()
        if not isinstance(action_space, ActionSpace):
            raise TypeError(f"MacroPolicy: action_space: expected ActionSpace, got "
                            f"{type(action_space).__name__}")
        self.action_space = action_space
        self.d_ctrl = _check_width("MacroPolicy", "d_ctrl", d_ctrl, 1)
        self.hidden = _check_width("MacroPolicy", "hidden", hidden, 0)
        self.net = _net(self.state_dim, sum(action_space.sizes), self.hidden)

    @property
    def state_dim(self) -> int:
        return self.d_ctrl + sum(self.action_space.sizes) + 1

    def states(self, features: torch.Tensor, prev_actions: torch.Tensor, *,
               first_chunk: int = 0) -> torch.Tensor:
        """Policy states of a run of chunks.

        features: (B, C, d_ctrl) float, finite — chunk c's feature (from tokens of chunks < c).
        prev_actions: (B, C, 3) int64 — the action executed at the chunk before each one, or
            [−1, −1, −1] for none (the first chunk).
        first_chunk: the chunk index of column 0 (for is_first_chunk).
        Returns (B, C, state_dim) in features' dtype.
        """
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"features: expected a floating tensor, got "
                            f"{getattr(features, 'dtype', type(features).__name__)}")
        if features.dim() != 3 or features.shape[-1] != self.d_ctrl:
            raise ValueError(f"features: expected shape (B, C, {self.d_ctrl}), got "
                             f"{tuple(features.shape)}")
        if not bool(features.isfinite().all()):
            raise ValueError("features: expected finite values (got NaN or inf)")
        self.action_space.validate(prev_actions, "prev_actions", allow_none=True)
        if prev_actions.shape[:-1] != features.shape[:-1]:
            raise ValueError(f"prev_actions: expected shape {tuple(features.shape[:2]) + (3,)}, "
                             f"got {tuple(prev_actions.shape)}")
        if isinstance(first_chunk, bool) or not isinstance(first_chunk, numbers.Integral) \
                or first_chunk < 0:
            raise ValueError(f"first_chunk: expected an int >= 0, got {first_chunk!r}")
        B, C, _ = features.shape
        prev = prev_actions.to(features.device)
        hot = [F.one_hot(prev[..., f].clamp(min=0), n).to(features.dtype)
               * (prev[..., f:f + 1] >= 0) for f, n in enumerate(self.action_space.sizes)]
        first = (torch.arange(first_chunk, first_chunk + C, device=features.device) == 0)
        first = first.to(features.dtype).expand(B, C).unsqueeze(-1)
        return torch.cat([features, *hot, first], dim=-1)

    def forward(self, states: torch.Tensor) -> FactorisedCategorical:
        """states (..., state_dim) float (cast to the parameters' dtype) → distribution with
        batch shape (...)."""
        _check_states(states, self.state_dim)
        logits = self.net(states.to(self.net_dtype))
        return FactorisedCategorical(*logits.split(list(self.action_space.sizes), dim=-1))

    @property
    def net_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class ValueNetwork(nn.Module):
    """V(state): (..., state_dim) float → (...) value; linear, or a tanh MLP with ``hidden`` units
    (output layer at zero)."""

    def __init__(self, state_dim: int, hidden: int = 0):
        super().__init__()
        self.state_dim = _check_width("ValueNetwork", "state_dim", state_dim, 1)
        self.hidden = _check_width("ValueNetwork", "hidden", hidden, 0)
        self.net = _net(self.state_dim, 1, self.hidden)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        _check_states(states, self.state_dim)
        return self.net(states.to(next(self.parameters()).dtype)).squeeze(-1)


class QHead(nn.Module):
    """Action-value estimate Q(state, executed action) for the planner's hysteresis, additive
    over the factors: Q(s, a) = q_e(s)[e] + [e ≠ none]·(q_k(s)[k] + q_s(s)[s]), so "no adapter"
    does not depend on its (irrelevant) rank and scale indices, and the head has as many outputs
    as the policy's (E+1+K+S) rather than one per combination. Trained by regression on the
    returns that followed the executed actions (:meth:`loss`).

    Why not the policy's own log-probabilities: log π(a|s) measures preference, not value. Only
    at the optimum of entropy-regularised RL with temperature α does α·(log π(a|s) − log π(b|s))
    equal Q(s,a) − Q(s,b); for a TRPO policy in training the scale is unknown, so comparing it to
    a switch cost in return units would be meaningless. Q is in the returns' units.
    """

    def __init__(self, action_space: ActionSpace, state_dim: int, hidden: int = 0):
        super().__init__()
        if not isinstance(action_space, ActionSpace):
            raise TypeError(f"QHead: action_space: expected ActionSpace, got "
                            f"{type(action_space).__name__}")
        self.action_space = action_space
        self.state_dim = _check_width("QHead", "state_dim", state_dim, 1)
        self.hidden = _check_width("QHead", "hidden", hidden, 0)
        self.net = _net(self.state_dim, sum(action_space.sizes), self.hidden)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """states (..., state_dim) float, actions (..., 3) int64 → (...) Q values."""
        _check_states(states, self.state_dim)
        self.action_space.validate(actions)
        if actions.shape[:-1] != states.shape[:-1]:
            raise ValueError(f"actions: expected shape {tuple(states.shape[:-1]) + (3,)}, got "
                             f"{tuple(actions.shape)}")
        out = self.net(states.to(next(self.parameters()).dtype))
        q_e, q_k, q_s = out.split(list(self.action_space.sizes), dim=-1)
        actions = actions.to(out.device)
        pick = lambda q, f: q.gather(-1, actions[..., f:f + 1]).squeeze(-1)  # noqa: E731
        adapter = (actions[..., 0] > 0).to(out.dtype)
        return pick(q_e, 0) + adapter * (pick(q_k, 1) + pick(q_s, 2))

    def loss(self, states: torch.Tensor, actions: torch.Tensor,
             returns: torch.Tensor) -> torch.Tensor:
        """Mean squared error between Q(states, actions) and ``returns`` (same batch shape)."""
        q = self(states, actions)
        if not isinstance(returns, torch.Tensor) or returns.shape != q.shape:
            raise ValueError(f"returns: expected a tensor of shape {tuple(q.shape)}, got "
                             f"{tuple(getattr(returns, 'shape', ()))}")
        return F.mse_loss(q, returns.to(q))


def worth_flip(q_prev: torch.Tensor, q_new: torch.Tensor, *, switch_cost: float,
               tau: float) -> torch.Tensor:
    """Hysteresis test: True where Q(new) − Q(prev) > switch_cost + τ (strict).

    q_prev, q_new: float tensors of one shape — values of keeping the previous action and of
    switching, in the same state. With switch_cost, τ ≥ 0 an unchanged action (equal values) is
    never a flip. Returns a bool tensor of that shape.
    """
    switch_cost = _non_negative("switch_cost", switch_cost)
    tau = _non_negative("tau", tau)
    for name, q in (("q_prev", q_prev), ("q_new", q_new)):
        if not isinstance(q, torch.Tensor) or not q.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got "
                            f"{getattr(q, 'dtype', type(q).__name__)}")
        if not bool(q.isfinite().all()):
            raise ValueError(f"{name}: expected finite values")
    if q_prev.shape != q_new.shape:
        raise ValueError(f"q_new: expected shape {tuple(q_prev.shape)} (q_prev's), got "
                         f"{tuple(q_new.shape)}")
    return (q_new - q_prev) > switch_cost + tau


def _non_negative(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class PlanStats:
    """What :func:`plan` saw and did (all detached; B rows, C chunks).

    proposed: (B, C, 3) int64 — the policy's own actions (samples, or modes when greedy): the
        actions that ``log_probs`` score, i.e. what a policy-gradient step must use.
    states: (B, C, state_dim) — each chunk's policy state (built from the previous EXECUTED action).
    overridden: (B, C) bool — chunks whose executed action is not the (canonical) proposal.
    switches: (B,) int64 — chunks c ≥ 1 whose executed action differs from chunk c−1's.
    switch_rate: (B,) float — switches / (C − 1) (0 when C = 1).
    plan_length: (B,) int64 — distinct executed actions per row (≤ max_plan_length).
    """

    proposed: torch.Tensor
    states: torch.Tensor
    overridden: torch.Tensor
    switches: torch.Tensor
    switch_rate: torch.Tensor
    plan_length: torch.Tensor

    def plan_length_histogram(self) -> dict[int, int]:
        """{plan length: rows with that many distinct actions}, sorted by length."""
        return _histogram(self.plan_length)

    def to_dict(self) -> dict:
        """JSON-ready summary over the rows."""
        rows = int(self.switches.numel())
        return {"rows": rows, "switches": int(self.switches.sum()),
                "switch_rate": float(self.switch_rate.mean()) if rows else 0.0,
                "override_rate": float(self.overridden.float().mean()) if rows else 0.0,
                "plan_length": {str(k): v for k, v in self.plan_length_histogram().items()}}


def _histogram(values: torch.Tensor) -> dict[int, int]:
    keys, counts = torch.unique(values.detach().cpu(), return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist()))


def action_histogram(action_space: ActionSpace, actions: torch.Tensor) -> dict[str, int]:
    """{action label (see ActionSpace.label): count} over (..., 3) actions (canonicalised), by
    label."""
    flat_actions = action_space.canonical(action_space.validate(actions)).reshape(-1, 3).cpu()
    keys, counts = torch.unique(flat_actions, dim=0, return_counts=True)
    return {action_space.label(k): int(n) for k, n in zip(keys, counts)}


@torch.no_grad()
def plan(policy: MacroPolicy, features: torch.Tensor, *, switch_cost: float, tau: float,
         greedy: bool = True, generator: torch.Generator | None = None,
         max_plan_length: int = 3,
         q_fn: QFunction | None = None) -> tuple[torch.Tensor, torch.Tensor, PlanStats]:
    """Choose every chunk's action, one chunk after the other.

    Chunk c's state is (features[:, c], the action EXECUTED at chunk c−1), so chunk c's action
    depends on chunks ≤ c's features only (the cache rule). The policy proposes an action (its
    mode when ``greedy``, else a sample drawn with ``generator``); a deterministic post-processing
    step then decides the executed action:

    1. canonicalise (no adapter ⇒ rank and scale indices 0);
    2. hysteresis (c ≥ 1, with ``q_fn``): a changed action is executed only where
       :func:`worth_flip` (q_fn(s, prev), q_fn(s, new), switch_cost, tau), else the previous
       action is kept;
    3. plan length: once a row has executed ``max_plan_length`` distinct actions, a proposal
       outside them is replaced by the previous action (itself one of them).

    The returned log-probabilities are log π(proposed | state): the post-processing belongs to the
    environment, not the policy, so TRPO's ratio π_new(proposed|s)/π_old(proposed|s) over
    (stats.states, stats.proposed) is exactly the ratio of the behaviour policy that produced the
    data. Scoring the executed action instead would be wrong (an override is not a draw of π).

    Greedy planning is deterministic, and row b's actions depend only on row b's features (up to
    floating-point batch effects), so recomputing a plan over the chunks generated so far gives
    the same actions as the plan built during generation; a plan over a prefix of the chunks is the
    prefix of the plan. Sampling draws from ``generator`` in chunk order (not row-independent).

    Args:
        policy: the MacroPolicy. features: (B, C, d_ctrl) float, finite (C ≥ 1).
        switch_cost, tau: hysteresis margin (≥ 0); both must be 0 without ``q_fn``.
        greedy: take the mode (inference) rather than a sample (data collection).
        generator: torch.Generator for the samples (ignored when greedy).
        max_plan_length: at most this many distinct executed actions per row (≥ 1).
        q_fn: q_fn(states (B, state_dim), actions (B, 3) int64) → (B,) values, e.g. a
            :class:`QHead`; None: no hysteresis.

    Returns: executed actions (B, C, 3) int64, log_probs (B, C) (of the proposals, in the policy's
    dtype), and :class:`PlanStats`. Runs under torch.no_grad: a policy-gradient step recomputes
    the log-probs from (stats.states, stats.proposed).
    """
    if not isinstance(policy, MacroPolicy):
        raise TypeError(f"policy: expected MacroPolicy, got {type(policy).__name__}")
    switch_cost = _non_negative("switch_cost", switch_cost)
    tau = _non_negative("tau", tau)
    max_plan_length = _check_width("plan", "max_plan_length", max_plan_length, 1)
    if q_fn is None and (switch_cost > 0 or tau > 0):
        raise ValueError("q_fn: needed for hysteresis (switch_cost or tau > 0)")
    if q_fn is not None and not callable(q_fn):
        raise TypeError(f"q_fn: expected a callable, got {type(q_fn).__name__}")
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[1] < 1:
        raise ValueError(f"features: expected a (B, C, d_ctrl) tensor with C >= 1, got "
                         f"{tuple(getattr(features, 'shape', ()))}")
    space = policy.action_space
    B, C, _ = features.shape
    dev = features.device
    executed = torch.empty(B, C, 3, dtype=torch.int64, device=dev)
    proposed = torch.empty_like(executed)
    log_probs = torch.empty(B, C, dtype=policy.net_dtype, device=dev)
    states = torch.empty(B, C, policy.state_dim, dtype=features.dtype, device=dev)
    used = torch.zeros(B, space.num_actions, dtype=torch.bool, device=dev)
    n_used = torch.zeros(B, dtype=torch.int64, device=dev)
    prev = torch.full((B, 3), -1, dtype=torch.int64, device=dev)
    for c in range(C):
        s = policy.states(features[:, c:c + 1], prev[:, None], first_chunk=c)[:, 0]
        dist = policy(s)
        a = dist.mode if greedy else dist.sample(generator=generator)
        log_probs[:, c] = dist.log_prob(a)
        candidate = space.canonical(a)
        if c == 0:
            act = candidate
        else:
            go = (candidate != prev).any(-1)
            if q_fn is not None:
                go &= worth_flip(_q(q_fn, s, prev, B), _q(q_fn, s, candidate, B),
                                 switch_cost=switch_cost, tau=tau)
            is_new = ~used.gather(1, space.flat(candidate)[:, None])[:, 0]
            go &= ~is_new | (n_used < max_plan_length)
            act = torch.where(go[:, None], candidate, prev)
        flat = space.flat(act)[:, None]
        n_used += ~used.gather(1, flat)[:, 0]
        used.scatter_(1, flat, True)
        executed[:, c], proposed[:, c], states[:, c] = act, a, s
        prev = act
    changed = (executed[:, 1:] != executed[:, :-1]).any(-1)
    switches = changed.sum(1)
    stats = PlanStats(proposed=proposed, states=states,
                      overridden=(executed != space.canonical(proposed)).any(-1),
                      switches=switches, switch_rate=switches.to(torch.float32) / max(C - 1, 1),
                      plan_length=n_used)
    return executed, log_probs, stats


def _q(q_fn: QFunction, states: torch.Tensor, actions: torch.Tensor, B: int) -> torch.Tensor:
    q = q_fn(states, actions)
    if not isinstance(q, torch.Tensor) or q.shape != (B,):
        raise ValueError(f"q_fn: expected it to return a ({B},) tensor, got "
                         f"{tuple(getattr(q, 'shape', ())) or type(q).__name__}")
    return q
