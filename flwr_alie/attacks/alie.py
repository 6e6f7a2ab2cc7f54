"""A Little Is Enough (ALIE), the attack of Baruch, Baruch and Goldberg.

Moran Baruch, Gilad Baruch and Yoav Goldberg, "A Little Is Enough: Circumventing
Defenses For Distributed Learning", Advances in Neural Information Processing Systems
32 (NeurIPS 2019).

Colluding Byzantine workers all send the honest mean shifted by ``z`` standard
deviations in every coordinate: close enough to the honest vectors to pass Krum,
Bulyan, the median and the trimmed mean, far enough to steer training.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from flwr_alie.attacks._checks import as_matrix, check_count, check_out, describe_honest
from flwr_alie.attacks.base import Attack, Direction

__all__ = ["ALIEAttack", "z_max"]

# Bytes of one column block of the statistics, in the accumulation dtype. On the CPU
# a block stays in the L2 cache while both moments are taken from it; elsewhere a
# block only bounds the temporary memory.
_CPU_BLOCK_BYTES = 2 << 20
_DEVICE_BLOCK_BYTES = 256 << 20


def z_max(h: int, f: int) -> float:
    """Return the largest ALIE factor for ``h`` honest and ``f`` Byzantine workers.

    With ``n = h + f`` workers, the attackers need ``s = floor(n / 2) + 1 - f`` honest
    workers on their side for a majority; the factor is the largest ``z`` with
    ``Phi(z) < (h - s) / h``, that is ``z_max = Phi^{-1}((h - s) / h)``, where ``Phi``
    is the standard normal CDF.

    Parameters
    ----------
    h : int
        Number of honest workers, at least 1.
    f : int
        Number of Byzantine workers, at least 0.

    Returns
    -------
    float
        ``z_max``, computed in float64.

    Raises
    ------
    TypeError
        If `h` or `f` is not an integer.
    ValueError
        If ``h < 1``, ``f < 0``, or ``(h - s) / h < 1/2``: too few attackers for a
        non-negative factor to win a majority; or ``s <= 0``: the attackers hold a
        majority on their own, ``Phi^{-1}`` is unbounded there and a fixed ``z`` must
        be chosen instead.

    Notes
    -----
    The paper defines ``z_max`` only for a Byzantine minority; the bound ``s <= 0``
    (``f > n / 2``) is an error here rather than an infinite factor, which would turn
    every crafted coordinate into an infinity.

    Examples
    --------
    >>> round(z_max(7, 3), 4)
    0.18
    >>> z_max(8, 2)
    0.0
    """
    h = check_count(h, "h")
    f = check_count(f, "f")
    if h < 1:
        raise ValueError(f"Expected at least one honest worker (`h` >= 1), got {h}")
    n = h + f
    s = n // 2 + 1 - f
    if 2 * (h - s) < h:
        raise ValueError(
            f"No non-negative ALIE factor for n = {n} workers with f = {f} Byzantine: "
            f"(h - s) / h = ({h} - {s}) / {h} = {(h - s) / h:.4f} < 1/2, so the "
            "attackers cannot win a majority; use more Byzantine workers or a fixed `z`"
        )
    if s <= 0:
        raise ValueError(
            f"z_max is unbounded for n = {n} workers with f = {f} Byzantine: the "
            f"attackers hold a majority on their own (s = {s} <= 0); pass a fixed `z`"
        )
    p = torch.tensor((h - s) / h, dtype=torch.float64)
    return float(torch.special.ndtri(p))


class ALIEAttack(Attack):
    r"""A Little Is Enough (Baruch, Baruch and Goldberg, NeurIPS 2019).

    Given honest vectors :math:`g_1, \dots, g_h \in \mathbb{R}^d`, every one of the
    ``f`` Byzantine vectors is

    .. math::

        b = \mu + s \, z \, \sigma \quad \text{(coordinate-wise)},\qquad
        \mu = \frac{1}{h} \sum_{i=1}^{h} g_i,\qquad
        \sigma = \sqrt{\frac{1}{h} \sum_{i=1}^{h} (g_i - \mu)^2},

    with :math:`\sigma` the *population* standard deviation (divisor ``h``, as in the
    code of the paper's authors) and the sign :math:`s` set by the :class:`Direction`
    (``-1`` for ``NEGATIVE``, ``+1`` for ``POSITIVE``, ``-sign(mu)`` for
    ``OPPOSITE_MEAN``).

    This is the statistics oracle: the attacker knows the honest vectors passed in.
    The paper's own threat model, where the statistics come from the Byzantine
    workers' own honestly computed gradients, is reached by passing those gradients.

    Notes
    -----
    The statistics are exact two-pass moments computed block by block over columns,
    so each block is read once from memory; float16 and bfloat16 inputs are
    accumulated in float32 and the result is cast back; float64 stays float64. A NaN
    or an infinity in the honest vectors propagates into the affected coordinates of
    the result; it is not checked for, to keep the hot path one pass.
    """

    @classmethod
    def generate(
        cls,
        honest_gradients: Tensor | Sequence[Tensor],
        /,
        out: Tensor | None = None,
        *,
        f: int,
        z: float | Literal["max"] = "max",
        direction: Direction = Direction.NEGATIVE,
        **specialized: Any,
    ) -> Tensor:
        """Return ``f`` copies of the ALIE vector ``mu + sign * z * sigma``.

        Parameters
        ----------
        honest_gradients : Tensor or Sequence[Tensor]
            One ``(h, d)`` tensor (used as it is), or a sequence of ``h`` tensors of
            shape ``(d,)`` (stacked once). Floating point; never modified.
        out : Tensor, optional
            A tensor of shape ``(f, d)``, dtype and device of `honest_gradients`, to
            write the result into; it is returned (the same object).
        f : int
            Number of Byzantine vectors, ``>= 0``.
        z : float or "max"
            The factor, in standard deviations, ``>= 0`` and finite; ``"max"`` uses
            :meth:`max_z` for ``h`` honest and ``f`` Byzantine workers.
        direction : Direction
            Which way to shift the mean; see :class:`Direction`.
        **specialized
            None are defined for ALIE; any keyword here raises ``TypeError``.

        Returns
        -------
        Tensor
            Shape ``(f, d)``, on the device and in the dtype of `honest_gradients`;
            all rows are equal. With ``f == 0``, an empty ``(0, d)`` tensor (also when
            ``z="max"``).

        Raises
        ------
        TypeError
            If `z` is neither a real number nor ``"max"``, `direction` is not a
            :class:`Direction`, `f` is not an integer, the honest gradients are not
            floating point, or an unknown keyword is passed.
        ValueError
            If `z` is negative or not finite, ``f < 0``, there are no honest
            gradients, they differ in shape, dtype or device, `out` has the wrong
            shape, dtype or device, or ``z="max"`` and the configuration admits no
            non-negative factor.

        Examples
        --------
        >>> import torch
        >>> honest = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
        >>> ALIEAttack.generate(honest, f=2, z=1.0)
        tensor([[1.5505, 2.5505, 3.5505],
                [1.5505, 2.5505, 3.5505]])
        """
        if specialized:
            raise TypeError(
                f"ALIEAttack.generate() got unexpected keyword argument(s) "
                f"{sorted(specialized)}; ALIE takes `f`, `z`, `direction` and `out`"
            )
        x, info = as_matrix(honest_gradients)
        f = check_count(f, "f")
        factor = _check_z(z)
        if not isinstance(direction, Direction):
            raise TypeError(
                f"Expected `direction` to be a flwr_alie.Direction, got {direction!r}; "
                f"use e.g. Direction({str(direction)!r}) for a configured value"
            )
        result = check_out(out, f, info, honest_gradients)
        if f == 0:
            return result
        if factor is None:
            factor = z_max(info.h, f)
        _alie_row(x, factor, direction, result[0])
        if f > 1:
            result[1:].copy_(result[0].expand(f - 1, info.d))
        return result

    @classmethod
    def max_z(cls, honest_gradients: Tensor | Sequence[Tensor], /, f: int) -> Tensor:
        """Return ``z_max`` for these honest workers and ``f`` Byzantine ones.

        ``h`` is the number of honest gradients; see :func:`z_max` for the formula.

        Parameters
        ----------
        honest_gradients : Tensor or Sequence[Tensor]
            One ``(h, d)`` tensor or a sequence of ``h`` tensors of shape ``(d,)``.
        f : int
            Number of Byzantine workers.

        Returns
        -------
        Tensor
            A 0-D tensor on the device and in the dtype of `honest_gradients`.

        Raises
        ------
        ValueError
            If there are no honest gradients, or the configuration admits no
            non-negative factor (``(h - s) / h < 1/2``).

        Examples
        --------
        >>> import torch
        >>> ALIEAttack.max_z(torch.zeros(7, 4, dtype=torch.float64), f=3)
        tensor(0.1800, dtype=torch.float64)
        """
        info = describe_honest(honest_gradients)
        return torch.tensor(z_max(info.h, f), dtype=info.dtype, device=info.device)


def _check_z(z: object) -> float | None:
    """Return `z` as a float, or ``None`` for ``"max"``."""
    if isinstance(z, str):
        if z == "max":
            return None
        raise TypeError(f'Expected `z` to be a real number or "max", got {z!r}')
    if isinstance(z, bool) or not isinstance(z, numbers.Real):
        raise TypeError(
            f'Expected `z` to be a real number or "max", got {z!r} ({type(z).__name__})'
        )
    factor = float(z)
    if factor != factor or factor in (float("inf"), float("-inf")):
        raise ValueError(f"Expected a finite `z`, got {factor}")
    if factor < 0:
        raise ValueError(
            f"Expected `z` >= 0, got {factor}; choose the sign with `direction`"
        )
    return factor


def _alie_row(x: Tensor, z: float, direction: Direction, row: Tensor) -> None:
    """Write ``mu + sign * z * sigma`` of the ``(h, d)`` tensor `x` into `row`.

    Column blocks are small enough to stay in cache, so both moments come from one
    read of `x`; reductions run in at least float32.
    """
    h, d = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    on_cpu = x.device.type == "cpu"
    budget = _CPU_BLOCK_BYTES if on_cpu else _DEVICE_BLOCK_BYTES
    width = max(1, min(d, budget // (h * acc.itemsize)))
    buffer = torch.empty((h, width), dtype=acc, device=x.device)
    # On the CPU a GEMV sums columns several times faster than `sum(0)`.
    ones = torch.ones((1, h), dtype=acc, device=x.device) if on_cpu else None
    alpha = z if direction is Direction.POSITIVE else -z
    for start in range(0, d, width):
        block = x[:, start : start + width]
        w = block.shape[1]
        scratch = buffer[:, :w]
        if block.dtype != acc:
            block = scratch.copy_(block)
        mu = _column_sum(block, ones).div_(h)
        sigma = _column_sum(torch.sub(block, mu, out=scratch).square_(), ones)
        sigma.div_(h).sqrt_()
        if direction is Direction.OPPOSITE_MEAN:
            sigma.mul_(mu.sign())
        target = row[start : start + w]
        if target.dtype == acc:
            torch.add(mu, sigma, alpha=alpha, out=target)
        else:
            target.copy_(mu.add_(sigma, alpha=alpha))


def _column_sum(block: Tensor, ones: Tensor | None) -> Tensor:
    if ones is None:
        return block.sum(0)
    return torch.mm(ones, block)[0]
