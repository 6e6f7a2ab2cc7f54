"""Bucketing, a pre-aggregation against Byzantine clients.

Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flwr_alie._checks import (
    accumulation_dtype,
    check_count,
    check_matrix,
    refuse_bad_rows,
)

__all__ = ["bucket_permutation", "bucketing"]


def bucket_permutation(n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Return the random order in which :func:`bucketing` fills its buckets.

    ``torch.randperm(n, generator=generator, device="cpu")``: row ``perm[j]``
    goes to bucket ``j // s``. A caller that needs to know which rows share a
    bucket draws it here and passes it to :func:`bucketing`.
    """
    n = check_count(n, "n", low=1)
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        raise TypeError(
            f"Expected `generator` to be a CPU torch.Generator, got {generator!r}"
        )
    return torch.randperm(n, generator=generator, device="cpu")


def bucketing(
    x: Tensor,
    /,
    *,
    s: int,
    generator: torch.Generator | None = None,
    permutation: Tensor | None = None,
) -> Tensor:
    """Return the means of random buckets of `s` rows, in bucket order.

    Bucket ``k`` holds rows ``perm[k*s : (k+1)*s]`` (the last one may be
    smaller), with ``perm`` = `permutation`, or
    :func:`bucket_permutation` drawn from `generator`.

    Parameters
    ----------
    x : Tensor
        ``(n, d)``, floating point, ``n >= 1``.
    s : int
        Bucket size, ``>= 1``: ``s = 1`` returns ``x[perm]``, ``s >= n`` one row,
        the mean.
    generator : torch.Generator, optional
        A CPU generator; ``None`` uses torch's global generator.
    permutation : Tensor, optional
        The order to fill the buckets in, a permutation of ``range(n)`` (then
        `generator` is not used).

    Returns
    -------
    Tensor
        ``(ceil(n / s), d)``, in the dtype and on the device of `x`: each row of
        `x` is added once into its bucket (one read of `x`), then divided.

    Raises
    ------
    ValueError
        If `permutation` is not one of ``range(n)``; or naming the rows that hold
        NaN or inf, or values whose squares overflow (the means would not be
        finite, or their distances, which the strategy after bucketing takes).

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(8.0).reshape(4, 2)
    >>> bucketing(x, s=4)
    tensor([[3., 4.]])
    """
    x = check_matrix(x)
    s = check_count(s, "s", low=1)
    n = x.shape[0]
    if permutation is None:
        perm = bucket_permutation(n, generator=generator)
    else:
        perm = permutation.to("cpu")
        if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
            raise ValueError(
                f"Expected `permutation` to be a permutation of range({n}), got "
                f"{permutation.tolist()}"
            )
    acc = accumulation_dtype(x.dtype)
    buckets = math.ceil(n / s)
    # row perm[j] goes to bucket j // s: each row is added once into its bucket
    of_row = torch.empty(n, dtype=torch.long)
    of_row[perm] = torch.arange(n) // s
    sizes = torch.bincount(of_row, minlength=buckets).to(acc)
    work = x if x.dtype == acc else x.to(acc)
    out = torch.zeros((buckets, x.shape[1]), dtype=acc, device=x.device)
    out.index_add_(0, of_row.to(x.device), work)
    out /= sizes.to(x.device).unsqueeze(1)
    # one (k, d) read of the means, no (k, d) temporary; inf when a square overflows
    refuse_bad_rows(x, torch.linalg.vector_norm(out, dim=1))
    return out.to(x.dtype)
