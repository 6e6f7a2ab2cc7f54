"""Argument checks of the aggregators: one place for every message they raise."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "check_count", "check_matrix", "check_real"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are computed in float32; float32 and float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


def check_matrix(x: object) -> Tensor:
    """Return `x`, checked to be a floating ``(n, d)`` tensor with ``n >= 1``."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        kind = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"Expected `x` to be a floating-point torch.Tensor, got {kind}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(
            f"Expected `x` of shape (n, d) with n >= 1, got {tuple(x.shape)}"
        )
    return x


def check_count(value: object, name: str, *, low: int, high: int | None = None) -> int:
    """Return `value` as an int in ``[low, high]``; `name` is its argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected `{name}` to be an int, got {value!r}")
    count = int(value)
    if count < low or (high is not None and count > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Expected `{name}` {bound}, got {count}")
    return count


def check_real(value: object, name: str, *, positive: bool) -> float:
    """Return `value` as a finite float, ``> 0`` (or ``>= 0``); `name` its argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{name}` to be a real number, got {value!r}")
    number = float(value)
    ok = math.isfinite(number) and (number > 0 if positive else number >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"Expected a finite `{name}` {bound}, got {number}")
    return number
