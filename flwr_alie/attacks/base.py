"""The base class every attack implements, and the direction of the ALIE shift."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["Attack", "Direction"]


class Direction(enum.Enum):
    """Which way the crafted vector leaves the honest mean, coordinate by coordinate.

    With ``mu`` and ``sigma`` the coordinate-wise mean and standard deviation of the
    honest vectors and ``z >= 0`` the attack factor:

    - ``NEGATIVE``: ``mu - z * sigma`` (the code of the paper's authors; the default).
    - ``POSITIVE``: ``mu + z * sigma`` (the convention of several libraries).
    - ``OPPOSITE_MEAN``: ``mu - z * sigma * sign(mu)``, each coordinate pushed toward
      zero, against the sign of the mean (a coordinate whose mean is 0 stays at 0).

    The value is the spelling used in configuration files, e.g.
    ``Direction("opposite-mean") is Direction.OPPOSITE_MEAN``.
    """

    NEGATIVE = "negative"
    POSITIVE = "positive"
    OPPOSITE_MEAN = "opposite-mean"


class Attack(ABC):
    """An attack that crafts Byzantine vectors from the honest ones of a round.

    Every attack is used through one classmethod with one calling convention, so that
    a caller can drive several attacks alike::

        Byz = SomeAttack.generate(honest_gradients, out=None, f=f, **specialized)

    Subclasses add keyword-only options of their own, and must raise ``TypeError``
    for any keyword they do not know, so that a typo does not pass silently.
    """

    @classmethod
    @abstractmethod
    def generate(
        cls,
        honest_gradients: Tensor | Sequence[Tensor],
        /,
        out: Tensor | None = None,
        *,
        f: int,
        **specialized: Any,
    ) -> Tensor:
        """Return ``f`` Byzantine vectors as an ``(f, d)`` tensor.

        Parameters
        ----------
        honest_gradients : Tensor or Sequence[Tensor]
            One ``(h, d)`` tensor, or a sequence of ``h`` tensors of shape ``(d,)``.
        out : Tensor, optional
            A tensor of shape ``(f, d)`` to write the result into; it is returned.
        f : int
            How many Byzantine vectors to produce.
        **specialized
            Options of the attack.

        Returns
        -------
        Tensor
            The ``(f, d)`` Byzantine vectors, on the device and in the dtype of
            `honest_gradients`.
        """
