"""Bucketing, a pre-aggregation against Byzantine clients.

Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flwr_alie.aggregators._checks import accumulation_dtype, check_count, check_matrix

__all__ = ["bucketing"]


def bucketing(
    x: Tensor, /, *, s: int, generator: torch.Generator | None = None
) -> Tensor:
    """Return the means of random buckets of `s` rows, in bucket order.

    ``perm = torch.randperm(n, generator=generator, device="cpu")``; bucket ``k``
    holds rows ``perm[k*s : (k+1)*s]`` (the last one may be smaller).

    Parameters
    ----------
    x : Tensor
        ``(n, d)``, floating point, ``n >= 1``.
    s : int
        Bucket size, ``>= 1``: ``s = 1`` returns ``x[perm]``, ``s >= n`` one row,
        the mean.
    generator : torch.Generator, optional
        A CPU generator; ``None`` uses torch's global generator.

    Returns
    -------
    Tensor
        ``(ceil(n / s), d)``, in the dtype and on the device of `x`: each row of
        `x` is added once into its bucket (one read of `x`), then divided.

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(8.0).reshape(4, 2)
    >>> bucketing(x, s=4)
    tensor([[3., 4.]])
    """
    x = check_matrix(x)
    s = check_count(s, "s", low=1)
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        raise TypeError(
            f"Expected `generator` to be a CPU torch.Generator, got {generator!r}"
        )
    n = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    perm = torch.randperm(n, generator=generator, device="cpu")
    buckets = math.ceil(n / s)
    # row perm[j] goes to bucket j // s: each row is added once into its bucket
    of_row = torch.empty(n, dtype=torch.long)
    of_row[perm] = torch.arange(n) // s
    sizes = torch.bincount(of_row, minlength=buckets).to(acc)
    work = x if x.dtype == acc else x.to(acc)
    out = torch.zeros((buckets, x.shape[1]), dtype=acc, device=x.device)
    out.index_add_(0, of_row.to(x.device), work)
    out /= sizes.to(x.device).unsqueeze(1)
    return out.to(x.dtype)
