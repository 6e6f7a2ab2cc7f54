"""The geometric median by smoothed Weiszfeld iterations.

As in RFA: Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated
Learning", IEEE TSP 2022.
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

__all__ = ["geometric_median"]


def geometric_median(
    x: Tensor,
    /,
    *,
    weights: Tensor | None = None,
    nu: float = 1e-6,
    iterations: int = 100,
    tol: float = 1e-6,
) -> Tensor:
    r"""Return the smoothed Weiszfeld estimate of the geometric median of the rows.

    With weights :math:`w_i` normalised to sum to 1 (default: all equal),

    .. math::

        z_0 = \sum_i w_i x_i, \qquad
        \beta_i = \frac{w_i}{\max(\nu, \lVert x_i - z_t \rVert_2)}, \qquad
        z_{t+1} = \frac{\sum_i \beta_i x_i}{\sum_i \beta_i},

    stopping after `iterations` updates, or as soon as
    :math:`\lVert z_{t+1} - z_t \rVert \le \mathrm{tol} \cdot \max(1, \lVert z_t
    \rVert)`; it returns :math:`z_{t+1}` in both cases (``tol=0`` runs exactly
    `iterations` updates).

    Parameters
    ----------
    x : Tensor
        ``(n, d)``, floating point, ``n >= 1``.
    weights : Tensor, optional
        ``(n,)`` on the device of `x`, any real dtype (sample counts are fine),
        finite, non-negative, not all zero.
    nu : float
        Smoothing, ``> 0``: distances below it count as `nu`.
    iterations : int
        Most updates, ``>= 1``.
    tol : float
        Relative tolerance, ``>= 0``.

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
    Each update reads `x` twice, block by block: the distances to :math:`z_t`, then
    :math:`z_t + \sum_i \beta_i (x_i - z_t) / \sum_i \beta_i` (the same
    :math:`z_{t+1}`, from exact differences, so that updates small against their
    mean keep their digits).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    >>> geometric_median(x)  # the unit pulls of the four points cancel there
    tensor([0.5000, 0.5000])
    """
    x = check_matrix(x)
    nu = check_real(nu, "nu", positive=True)
    iterations = check_count(iterations, "iterations", low=1)
    tol = check_real(tol, "tol", positive=False)
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    w = _weights(weights, n, x.device, acc)
    work = x if x.dtype == acc else x.to(acc)
    z = torch.mv(work.T, w) if d else torch.zeros(0, dtype=acc, device=x.device)
    for _ in range(iterations):
        distances = row_sq_distances(work, z, acc).sqrt_().clamp_(min=nu)
        beta = w / distances
        step = weighted_diff_sum(work, z, beta, acc) / beta.sum()
        z = z + step
        if tol > 0 and float(torch.linalg.vector_norm(step)) <= tol * max(
            1.0, float(torch.linalg.vector_norm(z - step))
        ):
            break
    return z.to(x.dtype)


def _weights(
    weights: Tensor | None, n: int, device: torch.device, acc: torch.dtype
) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=acc, device=device)
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)
        raise ValueError(f"Expected `weights` of shape ({n},), got {got}")
    if weights.device != device:
        raise ValueError(f"Expected `weights` on {device}, got {weights.device}")
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"Expected real `weights`, got dtype {weights.dtype}")
    w = weights.to(acc)
    if (
        not bool(torch.isfinite(w).all())
        or bool((w < 0).any())
        or not bool(w.sum() > 0)
    ):
        raise ValueError(
            "Expected finite, non-negative `weights`, not all zero, got "
            f"{weights.tolist() if n <= 10 else weights}"
        )
    return w / w.sum()
