"""Generalised advantage estimation (Schulman et al. 2016) over a batch of trajectories concatenated
in time order, plus the argument checks bem.router's TRPO shares with it."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["gae"]


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
        last_value: float | torch.Tensor | None = None, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE(γ, λ).

    rewards: (N,) float; values: (N,) V(s_t); dones: (N,) bool (or 0/1), True on the last step of an
    episode, the next step starting a new one. last_value: V of the state after step N−1, used only
    when that step is not done; None counts as 0 (the batch is cut where the episode ended).
    With δ_t = r_t + γ·V_{t+1}·(1−done_t) − V_t:  A_t = δ_t + γλ·(1−done_t)·A_{t+1}.
    Returns (advantages, returns = advantages + values), both (N,) in rewards' dtype and device;
    the recursion runs in float64. λ=1 gives the discounted Monte-Carlo return − V, λ=0 the TD
    error.
    """
    rewards = float_tensor(rewards, "rewards")
    n = rewards.shape[0]
    values = float_tensor(values, "values", n=n, reference="rewards")
    done = bool_vector(dones, "dones", n=n)
    gamma = unit_float(gamma, "gamma")
    lam = unit_float(lam, "lam")
    if last_value is None:
        bootstrap = 0.0
    else:
        last = torch.as_tensor(last_value, dtype=torch.float64)
        if last.numel() != 1:
            raise ValueError(f"last_value: expected a scalar, got shape {tuple(last.shape)}")
        bootstrap = float(last)
        if not math.isfinite(bootstrap):
            raise ValueError(f"last_value: expected a finite number, got {bootstrap}")

    # Python floats are float64; N scalar steps of the reversed recursion are cheaper than N tensor
    # ops.
    r = rewards.detach().to("cpu", torch.float64).tolist()
    v = values.detach().to("cpu", torch.float64).tolist()
    d = done.to("cpu").tolist()
    advantages = [0.0] * n
    next_value, next_advantage = bootstrap, 0.0
    for t in range(n - 1, -1, -1):
        alive = 0.0 if d[t] else 1.0
        delta = r[t] + gamma * next_value * alive - v[t]
        next_advantage = delta + gamma * lam * alive * next_advantage
        advantages[t] = next_advantage
        next_value = v[t]
    adv = torch.tensor(advantages, dtype=torch.float64)
    ret = adv + torch.tensor(v, dtype=torch.float64)
    return (adv.to(rewards.device, rewards.dtype), ret.to(rewards.device, rewards.dtype))


def float_tensor(value: object, name: str, *, n: int | None = None,
                 reference: str = "") -> torch.Tensor:
    """``value`` as a non-empty (N,) floating tensor of finite numbers; with ``n``, N must be n."""
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(tensor.shape)}")
    if n is None and tensor.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one value, got an empty batch")
    if n is not None and tensor.shape[0] != n:
        raise ValueError(f"{name}: expected {n} values (the length of {reference}), "
                         f"got {tensor.shape[0]}")
    check_finite(tensor, name)
    return tensor


def bool_vector(value: object, name: str, *, n: int) -> torch.Tensor:
    """``value`` as an (n,) bool tensor: bool as is, numbers only when every one is 0 or 1."""
    tensor = torch.as_tensor(value)
    if tensor.ndim != 1 or tensor.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool:
        return tensor
    if tensor.is_complex() or not ((tensor == 0) | (tensor == 1)).all():
        raise ValueError(f"{name}: expected bools (or 0/1), got dtype {tensor.dtype} "
                         "with other values")
    return tensor != 0


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """ValueError naming the first non-finite element of ``tensor`` (by flat index)."""
    bad = ~torch.isfinite(tensor.detach()).reshape(-1)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected finite values, got {tensor.reshape(-1)[index].item()} "
                         f"at flat index {index}")


def unit_float(value: object, name: str) -> float:
    """``value`` as a float in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1], got {value}")
    return float(value)
