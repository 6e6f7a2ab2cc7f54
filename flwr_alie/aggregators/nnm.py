"""Nearest-neighbour mixing, a pre-aggregation against Byzantine clients.

Allouah, Farhadkhani, Guerraoui, Gupta, Pinot and Stephan, "Fixing by Mixing: A
Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flwr_alie._checks import (
    accumulation_dtype,
    check_count,
    check_matrix,
    refuse_bad_rows,
)
from flwr_alie.aggregators._blocks import column_blocks

__all__ = ["nearest_neighbor_mixing", "pairwise_sq_distances"]


def pairwise_sq_distances(x: Tensor, /) -> Tensor:
    r"""Return the ``(n, n)`` squared Euclidean distances between the rows of `x`.

    Computed block by block over columns: each block is centred on its column mean
    (distances do not change), its Gram matrix taken in the accumulation dtype and
    summed across blocks in float64, then
    :math:`D_{ij} = G_{ii} + G_{jj} - 2 G_{ij}`. Centring is what keeps this exact
    to float rounding on updates that are small against their mean
    (``1 + 1e-3 * randn``), where the same identity on the raw rows in float32
    (Flower's Krum) loses every digit. Memory: ``O(n^2)`` beyond one block.

    Returns
    -------
    Tensor
        ``(n, n)`` float64 on the device of `x`, symmetric, zero diagonal,
        non-negative.

    Raises
    ------
    ValueError
        Naming the rows that hold NaN or inf, or values whose squares overflow the
        accumulation dtype.
    """
    x = check_matrix(x)
    n = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    gram = torch.zeros((n, n), dtype=torch.float64, device=x.device)
    mean = torch.full((1, n), 1.0 / n, dtype=acc, device=x.device)
    for _, block in column_blocks(x, acc):
        centred = block - torch.mm(mean, block)
        gram += torch.mm(centred, centred.T).to(torch.float64)
    diag = gram.diagonal()
    refuse_bad_rows(x, diag)  # a NaN, inf or overflowing row: no distance is right
    distances = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * gram).clamp_(min=0)
    distances.fill_diagonal_(0)
    return distances


def nearest_neighbor_mixing(x: Tensor, /, *, f: int) -> Tensor:
    r"""Replace every row by the mean of its ``n - f`` nearest rows (itself included).

    Row ``i`` of the result is the mean of the first ``n - f`` rows of the ranking
    of all ``n`` rows ``j`` by :math:`(\lVert x_j - x_i \rVert_2, j)`: ties go to
    the lower index, and ``x_i`` itself (distance 0) is among them.

    Parameters
    ----------
    x : Tensor
        ``(n, d)``, floating point, ``n >= 1``.
    f : int
        The number of Byzantine rows to resist, ``0 <= f < n``; ``f = 0`` gives the
        mean of all rows in every row.

    Returns
    -------
    Tensor
        ``(n, d)``, in the dtype and on the device of `x`.

    Notes
    -----
    The distances come from :func:`pairwise_sq_distances` (one read of `x`,
    ``n^2 / 2`` multiply-adds per coordinate: compute-bound for large ``n``); the
    means from one GEMM with the ``(n, n)`` selection matrix (a second read).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0], [1.0], [10.0]])
    >>> nearest_neighbor_mixing(x, f=1)
    tensor([[0.5000],
            [0.5000],
            [5.5000]])
    """
    x = check_matrix(x)
    n = x.shape[0]
    f = check_count(f, "f", low=0, high=n - 1)
    acc = accumulation_dtype(x.dtype)
    distances = pairwise_sq_distances(x)
    keep = n - f
    # rank by (distance, index): a stable sort on distance keeps index order on ties
    order = torch.sort(distances, dim=1, stable=True).indices[:, :keep]
    select = torch.zeros((n, n), dtype=acc, device=x.device)
    select.scatter_(1, order, 1.0 / keep)
    work = x if x.dtype == acc else x.to(acc)
    return torch.mm(select, work).to(x.dtype)
