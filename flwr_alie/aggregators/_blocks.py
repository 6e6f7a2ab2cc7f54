"""Column blocks: what every aggregator reads ``x`` through, once a pass."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from flwr_alie._checks import refuse_bad_rows

# Bytes of one column block in the accumulation dtype: small enough to stay in the
# CPU's caches while several operations run on it; elsewhere it bounds temporaries.
_CPU_BLOCK_BYTES = 4 << 20
_DEVICE_BLOCK_BYTES = 256 << 20


def column_blocks(x: Tensor, acc: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, block)``: column blocks of `x`, in `acc` (converted in cache)."""
    n, d = x.shape
    budget = _CPU_BLOCK_BYTES if x.device.type == "cpu" else _DEVICE_BLOCK_BYTES
    width = max(1, min(d, budget // (n * acc.itemsize)))
    for start in range(0, d, width):
        block = x[:, start : start + width]
        yield start, block if block.dtype == acc else block.to(acc)


def row_sq_distances(x: Tensor, center: Tensor, acc: torch.dtype) -> Tensor:
    """``||x_i - center||^2`` for every row, exact differences (no Gram identity).

    ``ValueError`` naming the rows whose distance is not finite (NaN, inf, or an
    overflow): an aggregate of them would be too.
    """
    out = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    for start, block in column_blocks(x, acc):
        diff = block - center[start : start + block.shape[1]]
        out += diff.square_().sum(1)
    refuse_bad_rows(x, out)
    return out


def weighted_diff_sum(
    x: Tensor, center: Tensor, weights: Tensor, acc: torch.dtype
) -> Tensor:
    """``sum_i weights_i (x_i - center)``, from exact differences, block by block.

    On updates that are small against ``center`` (shifted data) this keeps the digits
    that ``weights @ x - sum(weights) * center`` would cancel away.
    """
    out = torch.empty(x.shape[1], dtype=acc, device=x.device)
    row = weights.to(acc).unsqueeze(0)
    for start, block in column_blocks(x, acc):
        w = block.shape[1]
        diff = block - center[start : start + w]
        torch.mm(row, diff, out=out[start : start + w].unsqueeze(0))
    return out
