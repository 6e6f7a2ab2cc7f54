"""Argument checks of the torch core (attacks and aggregators): every message once.

Torch only: nothing here imports Flower or NumPy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HonestInfo",
    "accumulation_dtype",
    "as_matrix",
    "check_count",
    "check_matrix",
    "check_out",
    "check_real",
    "describe_honest",
    "refuse_bad_rows",
]


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


def refuse_bad_rows(x: Tensor, per_row: Tensor) -> None:
    """Raise ``ValueError`` naming the rows of `x` if `per_row` is not all finite.

    `per_row` is what an aggregator computed anyway (squared norms, distances, or
    its result's): when a row of `x` holds NaN or inf, or values so large that
    their squares overflow the accumulation dtype (beyond ``sqrt(max) / 2``), it
    is not finite. Nothing more is read unless so.
    """
    if bool(torch.isfinite(per_row).all()):
        return
    acc = accumulation_dtype(x.dtype)
    largest = x.abs().to(acc).amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    finite = torch.isfinite(largest).tolist()
    limit = math.sqrt(torch.finfo(acc).max) / 2
    broken = [i for i, ok in enumerate(finite) if not ok]
    large = [i for i, v in enumerate(largest.tolist()) if finite[i] and v > limit]
    parts = []
    if broken:
        parts.append(f"rows {broken} hold NaN or inf")
    if large:
        top = float(largest[large].max())
        parts.append(
            f"rows {large} hold values up to {top:.3g}: their squares overflow"
        )
    raise ValueError(
        f"Expected finite rows of `x` whose squared norms fit in {acc}; "
        f"{'; '.join(parts) or 'their sums overflow'}; set such rows aside (the "
        "strategies of flwr_alie.defenses do)"
    )


def check_count(
    value: object, name: str, *, low: int = 0, high: int | None = None
) -> int:
    """Return `value` as an int in ``[low, high]``; `name` is its argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a non-negative integer" if low == 0 else f"an integer >= {low}"
        raise TypeError(
            f"Expected `{name}` to be {kind}, got {value!r} ({type(value).__name__})"
        )
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


HonestGradients = Tensor | Sequence[Tensor]


class HonestInfo(NamedTuple):
    """What the checks learned of the honest gradients without copying them."""

    h: int
    d: int
    dtype: torch.dtype
    device: torch.device


def describe_honest(honest_gradients: HonestGradients) -> HonestInfo:
    """Check `honest_gradients` and return its shape, dtype and device.

    Accepts one ``(h, d)`` tensor or a sequence of ``h`` tensors of shape ``(d,)``.
    """
    if isinstance(honest_gradients, Tensor):
        if honest_gradients.dim() != 2:
            raise ValueError(
                "Expected `honest_gradients` to be a 2-D tensor of shape (h, d) or a "
                f"sequence of 1-D tensors, got a tensor of shape "
                f"{tuple(honest_gradients.shape)}"
            )
        h, d = honest_gradients.shape
        dtype, device = honest_gradients.dtype, honest_gradients.device
    elif isinstance(honest_gradients, Sequence) and not isinstance(
        honest_gradients, str | bytes
    ):
        h = len(honest_gradients)
        if h == 0:
            raise ValueError(
                "Expected at least one honest gradient in `honest_gradients`, got an "
                "empty sequence"
            )
        first = honest_gradients[0]
        for i, g in enumerate(honest_gradients):
            if not isinstance(g, Tensor):
                raise TypeError(
                    f"Expected `honest_gradients[{i}]` to be a torch.Tensor, got "
                    f"{type(g).__name__}"
                )
            if g.dim() != 1:
                raise ValueError(
                    f"Expected `honest_gradients[{i}]` to be a 1-D tensor of shape "
                    f"(d,), got shape {tuple(g.shape)}"
                )
            if g.shape != first.shape:
                raise ValueError(
                    "Expected all `honest_gradients` to have one shape, got "
                    f"{tuple(first.shape)} at index 0 and {tuple(g.shape)} at index {i}"
                )
            if g.device != first.device:
                raise ValueError(
                    "Expected all `honest_gradients` on one device, got "
                    f"{first.device} at index 0 and {g.device} at index {i}"
                )
            if g.dtype != first.dtype:
                raise ValueError(
                    "Expected all `honest_gradients` to have one dtype, got "
                    f"{first.dtype} at index 0 and {g.dtype} at index {i}"
                )
        d = first.shape[0]
        dtype, device = first.dtype, first.device
    else:
        raise TypeError(
            "Expected `honest_gradients` to be a torch.Tensor of shape (h, d) or a "
            f"sequence of 1-D tensors, got {type(honest_gradients).__name__}"
        )
    if not dtype.is_floating_point:
        raise TypeError(
            f"Expected floating-point `honest_gradients`, got dtype {dtype}; convert "
            "integer updates with `.to(torch.float32)` first"
        )
    if h == 0:
        raise ValueError(
            "Expected at least one honest gradient in `honest_gradients`, got shape "
            f"(0, {d})"
        )
    return HonestInfo(h, d, dtype, device)


def as_matrix(honest_gradients: HonestGradients) -> tuple[Tensor, HonestInfo]:
    """Check `honest_gradients` and return it as one ``(h, d)`` tensor.

    An ``(h, d)`` tensor is returned as it is (not copied); a sequence is stacked once.
    """
    info = describe_honest(honest_gradients)
    if isinstance(honest_gradients, Tensor):
        return honest_gradients, info
    return torch.stack(list(honest_gradients)), info


def check_out(out: object, f: int, info: HonestInfo, inputs: HonestGradients) -> Tensor:
    """Return `out`, checked to hold the ``(f, d)`` result, or a new tensor."""
    if out is None:
        return torch.empty((f, info.d), dtype=info.dtype, device=info.device)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Expected `out` to be a torch.Tensor, got {type(out).__name__}"
        )
    if tuple(out.shape) != (f, info.d):
        raise ValueError(
            f"Expected `out` of shape (f, d) = {(f, info.d)}, got {tuple(out.shape)}"
        )
    if out.dtype != info.dtype:
        raise ValueError(
            f"Expected `out` of dtype {info.dtype} (that of `honest_gradients`), got "
            f"{out.dtype}"
        )
    if out.device != info.device:
        raise ValueError(
            f"Expected `out` on device {info.device} (that of `honest_gradients`), "
            f"got {out.device}"
        )
    sources = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if out.numel() > 0 and any(_shares_storage(out, g) for g in sources):
        raise ValueError(
            "Expected `out` not to share memory with `honest_gradients`: the input "
            "is never modified"
        )
    return out


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return bool(
        b.numel() > 0
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )
