"""A Little Is Enough (ALIE), the attack of Baruch, Baruch and Goldberg.

Moran Baruch, Gilad Baruch and Yoav Goldberg, "A Little Is Enough: Circumventing
Defenses For Distributed Learning", Advances in Neural Information Processing Systems
32 (NeurIPS 2019).

Colluding Byzantine workers all send the honest mean shifted by ``z`` standard
deviations in every coordinate: close enough to the honest vectors to pass Krum,
Bulyan, the median and the trimmed mean, far enough to steer training.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from flwr_alie._checks import (
    accumulation_dtype,
    as_matrix,
    check_count,
    check_out,
    describe_honest,
)
from flwr_alie.attacks.base import Attack, Direction
from flwr_alie.attacks.stats import moments

__all__ = ["ALIEAttack", "alie_vector", "check_z", "z_max"]


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
    ``generate`` is :func:`~flwr_alie.attacks.moments` (exact two-pass moments,
    one read of the input) followed by :func:`alie_vector`; callers that need the
    statistics too (telemetry) call those two directly. float16 and bfloat16 inputs
    are accumulated in float32 and the result is cast back; float64 stays float64.
    A NaN or an infinity in the honest vectors propagates into the affected
    coordinates of the result; it is not checked for, to keep the hot path one
    pass.
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
        factor = check_z(z)
        _check_direction(direction)
        result = check_out(out, f, info, honest_gradients)
        if f == 0:
            return result
        if factor is None:
            factor = z_max(info.h, f)
        acc = accumulation_dtype(info.dtype)
        if f >= 2 and result.dtype == acc and result.is_contiguous():
            # the output's own rows hold the moments: no fresh d-sized buffers
            mu, sigma = moments(x, out=(result[0], result[1]))
        else:
            mu, sigma = moments(x)
        alie_vector(mu, sigma, z=factor, direction=direction, out=result[0])
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


def check_z(z: object) -> float | None:
    """Validate an ALIE factor: return it as a float, or ``None`` for ``"max"``.

    The one check of `z` in flwr-alie: the core, the typed options and the command
    line all call it, so a bad value gets the same message everywhere.

    Raises
    ------
    TypeError
        If `z` is neither a real number (``bool`` excluded) nor ``"max"``.
    ValueError
        If `z` is negative or not finite.

    Examples
    --------
    >>> check_z(1), check_z("max")
    (1.0, None)
    """
    if isinstance(z, str):
        if z == "max":
            return None
        raise TypeError(f'Expected `z` to be a real number or "max", got {z!r}')
    if isinstance(z, bool) or not isinstance(z, numbers.Real):
        raise TypeError(
            f'Expected `z` to be a real number or "max", got {z!r} ({type(z).__name__})'
        )
    factor = float(z)
    if not math.isfinite(factor):
        raise ValueError(f"Expected a finite `z`, got {factor}")
    if factor < 0:
        raise ValueError(
            f"Expected `z` >= 0, got {factor}; choose the sign with `direction`"
        )
    return factor


def _check_direction(direction: object) -> None:
    if not isinstance(direction, Direction):
        raise TypeError(
            f"Expected `direction` to be a flwr_alie.Direction, got {direction!r}; "
            f"use e.g. Direction({str(direction)!r}) for a configured value"
        )


def alie_vector(
    mu: Tensor,
    sigma: Tensor,
    /,
    *,
    z: float,
    direction: Direction = Direction.NEGATIVE,
    out: Tensor | None = None,
) -> Tensor:
    """Return the ALIE vector ``mu + sign * z * sigma`` from precomputed moments.

    ``sign`` is ``-1`` for ``NEGATIVE``, ``+1`` for ``POSITIVE`` and ``-sign(mu)``
    for ``OPPOSITE_MEAN`` (see :class:`Direction`). Computed in the dtype of `mu`
    and `sigma` (as :func:`~flwr_alie.attacks.moments` returns them) and written
    into `out` (cast to its dtype) when given.

    Parameters
    ----------
    mu, sigma : Tensor
        Shape ``(d,)``, one dtype and device: the honest mean and population
        standard deviation.
    z : float
        The factor, ``>= 0`` and finite (checked by :func:`check_z`).
    direction : Direction
        Which way to shift the mean.
    out : Tensor, optional
        Shape ``(d,)``, on the device of `mu`; returned.

    Returns
    -------
    Tensor
        The ``(d,)`` crafted vector.

    Examples
    --------
    >>> import torch
    >>> alie_vector(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.5]), z=2.0)
    tensor([ 0., -2.])
    """
    factor = check_z(z)
    if factor is None:
        raise TypeError('`z="max"` needs h and f: resolve it with z_max(h, f) first')
    _check_direction(direction)
    if mu.shape != sigma.shape or mu.dim() != 1:
        raise ValueError(
            "Expected `mu` and `sigma` of one shape (d,), got "
            f"{tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    if out is not None and out.shape != mu.shape:
        raise ValueError(f"Expected `out` of shape {tuple(mu.shape)}, got {out.shape}")
    alpha = factor if direction is Direction.POSITIVE else -factor
    shift = sigma * mu.sign() if direction is Direction.OPPOSITE_MEAN else sigma
    if out is None:
        return torch.add(mu, shift, alpha=alpha)
    if out.dtype == mu.dtype:
        return torch.add(mu, shift, alpha=alpha, out=out)
    return out.copy_(torch.add(mu, shift, alpha=alpha))
