"""Centered clipping, a robust aggregator with a memory of the last aggregate.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flwr_alie._checks import (
    accumulation_dtype,
    check_count,
    check_matrix,
    check_real,
)
from flwr_alie.aggregators._blocks import row_sq_distances, weighted_diff_sum

__all__ = ["centered_clipping"]


def centered_clipping(
    x: Tensor, /, *, center: Tensor, tau: float, iterations: int = 1
) -> Tensor:
    r"""Return the centered-clipping aggregate of the rows of `x`.

    .. math::

        v_0 = c, \qquad
        v_{l+1} = v_l + \frac{1}{n} \sum_{i=1}^{n} (x_i - v_l)
        \min\!\Big(1, \frac{\tau}{\lVert x_i - v_l \rVert_2}\Big),

    returning :math:`v_L` with :math:`L` = `iterations`. A row with
    :math:`\lVert x_i - v_l \rVert = 0` contributes 0.

    Parameters
    ----------
    x : Tensor
        ``(n, d)``, floating point, ``n >= 1``.
    center : Tensor
        ``(d,)``, the dtype and device of `x`: the starting point (in the paper the
        previous aggregate, with momentum).
    tau : float
        The clipping radius, ``> 0``.
    iterations : int
        ``L >= 1``.

    Returns
    -------
    Tensor
        ``(d,)``, in the dtype and on the device of `x`.

    Raises
    ------
    ValueError
        Naming the rows that hold NaN or inf, or values whose squared distances
        overflow the accumulation dtype: the aggregate would not be finite. The
        strategies of :mod:`flwr_alie.defenses` set such rows aside first.

    Notes
    -----
    Each iteration reads `x` twice, block by block: once for the distances to
    :math:`v_l`, once for :math:`\sum_i s_i (x_i - v_l)` with :math:`s_i` the
    clipping factors; both from exact differences taken in cache, so no ``(n, d)``
    temporary is made and updates small against :math:`v_l` keep their digits.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]])
    >>> centered_clipping(x, center=torch.zeros(2), tau=1.0)
    tensor([0.6667, 0.3333])
    """
    x = check_matrix(x)
    tau = check_real(tau, "tau", positive=True)
    iterations = check_count(iterations, "iterations", low=1)
    n, d = x.shape
    if not isinstance(center, Tensor) or center.shape != (d,):
        got = tuple(center.shape) if isinstance(center, Tensor) else type(center)
        raise ValueError(f"Expected `center` of shape ({d},), got {got}")
    if center.dtype != x.dtype or center.device != x.device:
        raise ValueError(
            f"Expected `center` of dtype {x.dtype} on {x.device}, got "
            f"{center.dtype} on {center.device}"
        )
    acc = accumulation_dtype(x.dtype)
    v = center.to(acc, copy=True)
    work = x if x.dtype == acc else x.to(acc)
    for _ in range(iterations):
        norms = row_sq_distances(work, v, acc).sqrt_()
        scale = torch.where(norms > 0, (tau / norms).clamp_(max=1.0), 1.0)
        v = v + weighted_diff_sum(work, v, scale, acc) / n
    return v.to(x.dtype)
