"""Argument checks shared by the attacks: one place for every message they raise."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["HonestInfo", "as_matrix", "check_count", "check_out", "describe_honest"]

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


def check_count(value: object, name: str) -> int:
    """Return `value` as a non-negative ``int``; `name` is the argument it came from."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"Expected `{name}` to be a non-negative integer, got {value!r} "
            f"({type(value).__name__})"
        )
    count = int(value)
    if count < 0:
        raise ValueError(f"Expected `{name}` >= 0, got {count}")
    return count


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
