"""Which backend each op actually ran: the compiled kernels for float32/bfloat16/float16 (forward
on the inference fast path and the checked path, and backward), the pure-torch reference only for
float64 — so a build that silently lost its kernels cannot pass the op tests on the reference."""
from __future__ import annotations

import collections
import os

import pytest
import torch

from bem import _ext, reference
from bem.ops import film, kron_delta, lora_delta
from helpers import available_devices

pytestmark = pytest.mark.skipif(
    not _ext.available() and os.environ.get("BEM_ALLOW_NO_EXT") == "1",
    reason="BEM_ALLOW_NO_EXT=1 and bem._C is missing (test_compiled_core reports it)")

KERNELS = ("lora_forward", "lora_forward_cpu", "lora_backward", "kron_forward", "kron_backward",
           "film_forward", "film_backward")
REFERENCES = ("lora_delta", "lora_delta_backward", "kron_delta", "kron_delta_backward", "film",
              "film_backward")


@pytest.fixture
def ran(monkeypatch):
    """Counter of calls: "kernel:<name>" for bem._C's entry points, "reference:<name>" for
    bem.reference's functions."""
    calls: collections.Counter = collections.Counter()

    def spy(owner, name, prefix):
        fn = getattr(owner, name)

        def wrapped(*args, **kwargs):
            calls[f"{prefix}:{name}"] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapped)

    for name in KERNELS:
        spy(_ext.C(), name, "kernel")
    for name in REFERENCES:
        spy(reference, name, "reference")
    return calls


def _expect_kernel(device: str) -> bool:
    return device == "cpu" or _ext.cuda_built()


def _lora_inputs(device, dtype, gen):
    x = torch.randn(70, 19, generator=gen)
    A = torch.randn(3, 5, 19, generator=gen) * 0.2
    B = torch.randn(3, 23, 5, generator=gen)
    ei = torch.tensor([0] * 30 + [2] * 20 + [-1] * 20)
    return [t.to(device, dtype if t.is_floating_point() else t.dtype) for t in (x, A, B, ei)]


def _assert_ran(ran, device, dtype, kernels, references):
    if dtype == torch.float64 or not _expect_kernel(device):
        assert sum(ran[f"reference:{r}"] for r in references) > 0, dict(ran)
        assert not any(ran[f"kernel:{k}"] for k in kernels), dict(ran)
    else:
        assert sum(ran[f"kernel:{k}"] for k in kernels) > 0, dict(ran)
        assert not any(ran[f"reference:{r}"] for r in references), dict(ran)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_lora_delta_backend(ran, device, dtype):
    x, A, B, ei = _lora_inputs(device, dtype, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora_delta(x, A, B, scale=0.5, expert_index=ei)                       # fast path on CPU
        out = torch.zeros(70, 40, device=device, dtype=dtype)[:, :23]          # row-strided out
        lora_delta(x, A, B, scale=0.5, expert_index=ei, out=out)             # checked path
    _assert_ran(ran, device, dtype, ("lora_forward", "lora_forward_cpu"), ("lora_delta",))
    ran.clear()
    A.requires_grad_(True)
    lora_delta(x, A, B, scale=0.5, expert_index=ei).square().sum().backward()
    _assert_ran(ran, device, dtype, ("lora_forward",), ("lora_delta",))
    _assert_ran(ran, device, dtype, ("lora_backward",), ("lora_delta_backward",))


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kron_delta_backend(ran, device, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 12, generator=gen).to(device, dtype)
    A = torch.randn(5, 3, generator=gen).to(device, dtype)
    B = torch.randn(7, 4, generator=gen).to(device, dtype)
    with torch.no_grad():
        kron_delta(x, A, B)
        kron_delta(x.T.contiguous().T, A, B, scale=2.0)                       # strided x
    _assert_ran(ran, device, dtype, ("kron_forward",), ("kron_delta",))
    ran.clear()
    B.requires_grad_(True)
    kron_delta(x, A, B).sum().backward()
    _assert_ran(ran, device, dtype, ("kron_backward",), ("kron_delta_backward",))


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_film_backend(ran, device, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 11, generator=gen).to(device, dtype)
    gamma = (torch.rand(2, 1, 11, generator=gen) + 0.5).to(device, dtype)
    beta = torch.randn(11, generator=gen).to(device, dtype)
    with torch.no_grad():
        film(x, gamma, beta)
    _assert_ran(ran, device, dtype, ("film_forward",), ("film",))
    ran.clear()
    gamma.requires_grad_(True)
    film(x, gamma, beta).sum().backward()
    _assert_ran(ran, device, dtype, ("film_forward",), ("film",))
    _assert_ran(ran, device, dtype, ("film_backward",), ("film_backward",))
