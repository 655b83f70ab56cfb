"""Argument checks shared by bem.stats: messages name the argument, what was expected and what came."""
from __future__ import annotations

import numbers
from collections.abc import Collection

import numpy as np


def float_vector(value: object, name: str, *, min_size: int = 2) -> np.ndarray:
    """``value`` as a contiguous (n,) float64 array of finite numbers with n >= ``min_size``.

    Accepts anything numpy converts to a real (or boolean) 1-D array: lists, numpy arrays, CPU
    torch tensors. TypeError for non-numeric input; ValueError for a wrong shape, too few values,
    NaN or infinity (the first offending index is named).
    """
    try:
        array = np.asarray(value)
    except Exception as exc:  # numpy raises assorted types for ragged or exotic input
        raise TypeError(f"{name}: expected a 1-D array of real numbers, got {type(value).__name__} "
                        f"({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers, got an array of dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {array.shape}")
    if array.size < min_size:
        raise ValueError(f"{name}: expected at least {min_size} values, got {array.size}")
    array = np.ascontiguousarray(array, dtype=np.float64)
    check_finite(array, name)
    return array


def check_length(array: np.ndarray, name: str, n: int, reference: str) -> None:
    """ValueError unless ``array`` has the ``n`` values of the argument named ``reference``."""
    if array.size != n:
        raise ValueError(f"{name}: expected {n} values (the length of {reference}), got {array.size}")


def check_finite(array: np.ndarray, name: str) -> None:
    """ValueError naming the first non-finite element of ``array``."""
    bad = ~np.isfinite(array)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: expected finite values, got {array[index]} at index {index}")


def integer(value: object, name: str, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused: True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def open_unit_float(value: object, name: str) -> float:
    """``value`` as a float strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float in (0, 1), got {type(value).__name__}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}: expected a float in (0, 1), got {value}")
    return float(value)


def choice(value: object, name: str, options: Collection[str]) -> str:
    """``value`` if it is one of ``options``."""
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name}: expected one of {listed}, got {value!r}")
    return value


def seed_value(value: object, name: str = "seed") -> int | None:
    """``value`` if it is None or an int >= 0: what numpy's SeedSequence takes."""
    if value is None:
        return None
    return integer(value, name, minimum=0)


def seed_to_uint64(seed: int | None) -> int:
    """A 64-bit seed for the C++ core from ``seed`` (OS entropy when None), via SeedSequence so
    that any non-negative int, however large, maps to a well-mixed word."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
