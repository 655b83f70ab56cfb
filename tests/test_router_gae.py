"""bem.router.gae against a float64 double-loop reference, its λ=1 (Monte-Carlo) and λ=0 (TD error)
limits, dtype handling and argument errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bem.router.gae import gae


def _reference(rewards, values, dones, last_value, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k} summed explicitly up to the episode's end, in float64."""
    r, v, d = (np.asarray(x, dtype=np.float64) for x in (rewards, values, dones))
    n = len(r)
    next_v = np.append(v[1:], 0.0 if last_value is None else last_value)
    delta = r + gamma * next_v * (1 - d) - v
    adv = np.zeros(n)
    for t in range(n):
        for k in range(t, n):
            adv[t] += (gamma * lam) ** (k - t) * delta[k]
            if d[k]:
                break
    return adv, adv + v


def _batch(n=40, seed=0, last_done=False):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    values = torch.randn(n, generator=g, dtype=torch.float64)
    dones = torch.rand(n, generator=g) < 0.15
    dones[-1] = last_done
    return rewards, values, dones


@pytest.mark.parametrize("last_done", [False, True])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.0, 0.7)])
def test_matches_reference(gamma, lam, last_done):
    rewards, values, dones = _batch(seed=3, last_done=last_done)
    assert 2 <= int(dones.sum()) < len(dones) - 1  # several episodes, one cut at the end
    adv, ret = gae(rewards, values, dones, 0.7, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _reference(rewards, values, dones, 0.0 if last_done else 0.7, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("last_value", [None, -1.3])
def test_lambda_one_is_monte_carlo_return_minus_value(last_value):
    gamma = 0.95
    rewards, values, dones = _batch(seed=5)
    adv, ret = gae(rewards, values, dones, last_value, gamma=gamma, lam=1.0)
    tail = 0.0 if last_value is None else last_value
    monte_carlo = np.zeros(len(rewards))
    for t in range(len(rewards)):
        discount = 1.0
        for k in range(t, len(rewards)):
            monte_carlo[t] += discount * float(rewards[k])
            discount *= gamma
            if dones[k]:
                break
        else:
            monte_carlo[t] += discount * tail
    np.testing.assert_allclose(ret.numpy(), monte_carlo, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(adv.numpy(), monte_carlo - values.numpy(), rtol=1e-12, atol=1e-12)


def test_lambda_zero_is_td_error():
    gamma = 0.9
    rewards, values, dones = _batch(seed=7)
    adv, _ = gae(rewards, values, dones, torch.tensor(2.5), gamma=gamma, lam=0.0)
    next_values = torch.cat([values[1:], torch.tensor([2.5], dtype=torch.float64)])
    td = rewards + gamma * next_values * (~dones) - values
    np.testing.assert_allclose(adv.numpy(), td.numpy(), rtol=1e-12, atol=1e-12)


def test_float32_in_float32_out_with_float64_accuracy():
    rewards, values, dones = _batch(n=500, seed=11)
    adv, ret = gae(rewards.float(), values.float(), dones.int(), 0.3, gamma=0.999, lam=0.99)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == (500,)
    ref_adv, _ = _reference(rewards.float().double(), values.float().double(), dones, 0.3, 0.999,
                            0.99)
    # Rounding once at the end: within one float32 ulp of the float64 result.
    np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=2 ** -23, atol=1e-6)


def test_single_step():
    adv, ret = gae(torch.tensor([1.0]), torch.tensor([0.25]), torch.tensor([False]), 2.0,
                   gamma=0.5, lam=0.9)
    assert math.isclose(float(adv[0]), 1.0 + 0.5 * 2.0 - 0.25)
    assert math.isclose(float(ret[0]), 2.0)


_R, _V, _D = torch.zeros(4), torch.zeros(4), torch.tensor([False, True, False, True])


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(rewards=torch.tensor([0.0, math.nan, 0.0, 0.0])), ValueError, "rewards"),
    (dict(rewards=torch.zeros(4, 1)), ValueError, "rewards"),
    (dict(rewards=torch.zeros(0), values=torch.zeros(0), dones=torch.zeros(0, dtype=torch.bool)),
     ValueError, "rewards"),
    (dict(rewards=torch.zeros(4, dtype=torch.long)), TypeError, "rewards"),
    (dict(values=torch.zeros(3)), ValueError, "values"),
    (dict(values=torch.tensor([0.0, 0.0, math.inf, 0.0])), ValueError, "values"),
    (dict(dones=torch.tensor([0, 2, 0, 1])), ValueError, "dones"),
    (dict(dones=torch.zeros(5, dtype=torch.bool)), ValueError, "dones"),
    (dict(last_value=math.nan), ValueError, "last_value"),
    (dict(last_value=torch.zeros(2)), ValueError, "last_value"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(gamma=math.nan), ValueError, "gamma"),
    (dict(lam=-0.1), ValueError, "lam"),
    (dict(lam="0.5"), TypeError, "lam"),
])
def test_bad_arguments_name_the_argument(kwargs, error, name):
    args = dict(rewards=_R, values=_V, dones=_D, last_value=None, gamma=0.9, lam=0.9) | kwargs
    with pytest.raises(error, match=f"^{name}: "):
        gae(args.pop("rewards"), args.pop("values"), args.pop("dones"), args.pop("last_value"),
            **args)
