"""Argument checks shared by bem.online: the errors name the argument, what was expected and what
was given."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def nonneg_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def positive_float(value: Any, name: str) -> float:
    v = nonneg_float(value, name)
    if v == 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def same_layout(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                name: str, reference_name: str = "the adapter parameters") -> None:
    """ValueError unless `tensors` has exactly the names and shapes of `reference`."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{name}: expected a mapping name → tensor, got {type(tensors).__name__}")
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        raise ValueError(f"{name}: names do not match {reference_name}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for k, ref in reference.items():
        t = tensors[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}[{k!r}]: expected shape {tuple(ref.shape)} (as "
                             f"{reference_name}), got {tuple(t.shape)}")
