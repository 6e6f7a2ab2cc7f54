"""Which configurations a robust strategy can serve: a table, checked before a run.

Flower's robust strategies default to ``num_malicious_nodes = 0`` and, when ``n`` is
too small for the declared ``f``, skip aggregation with a warning in the middle of a
run. :func:`check_setup` reports such configurations before anything starts, from
one table (:data:`LIMITS`) of the least number of nodes each strategy needs, and
:func:`replies_problems` tells a round when too few replies reached a strategy. A
wrapper (:class:`Wraps`: Flower's own DP wrappers, flwr-alie's) is looked through; a
strategy of a user's own can add its checks (:class:`HasSetupProblems`), and a
wrapper that hands its inner strategy fewer replies than it received (bucketing)
says how many (:class:`ShrinksReplies`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, runtime_checkable

from flwr.server import strategy as legacy
from flwr.serverapp import strategy as message_api

from flwr_alie.attacks import z_max

__all__ = [
    "LIMITS",
    "HasSetupProblems",
    "Limit",
    "ShrinksReplies",
    "Wraps",
    "check_setup",
    "replies_problems",
]


@runtime_checkable
class Wraps(Protocol):
    """A strategy that wraps another as ``.strategy`` (Flower's convention)."""

    strategy: Any


@runtime_checkable
class HasSetupProblems(Protocol):
    """A strategy that knows which node counts it cannot serve."""

    def setup_problems(self, num_nodes: int) -> list[str]:
        """Return why `num_nodes` replies cannot be served (empty if they can)."""


@runtime_checkable
class ShrinksReplies(Protocol):
    """A wrapper whose inner strategy receives fewer replies than it does."""

    def inner_num_nodes(self, num_nodes: int) -> int:
        """Return how many replies the inner strategy receives of `num_nodes`."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """The least number of nodes a strategy class needs for its declared ``f``.

    Attributes
    ----------
    kind : type
        The strategy class (subclasses match too).
    min_nodes : Callable[[int], int]
        ``f -> n_min``, with ``f`` the strategy's declared ``num_malicious_nodes``
        (``num_malicious_clients`` in the legacy API).
    formula : str
        ``n_min`` as a formula in ``f``, for the message.
    """

    kind: type
    min_nodes: Callable[[int], int]
    formula: str


LIMITS: tuple[Limit, ...] = (
    Limit(message_api.Bulyan, lambda f: 4 * f + 3, "4 * num_malicious_nodes + 3"),
    Limit(message_api.Krum, lambda f: 2 * f + 3, "2 * num_malicious_nodes + 3"),
    Limit(message_api.MultiKrum, lambda f: 2 * f + 3, "2 * num_malicious_nodes + 3"),
    Limit(legacy.Bulyan, lambda f: 4 * f + 3, "4 * num_malicious_clients + 3"),
    Limit(legacy.Krum, lambda f: 2 * f + 3, "2 * num_malicious_clients + 3"),
)
"""One row per strategy class with a limit on ``n``; a new strategy is one row."""


def _declared_f(strategy: object) -> int:
    return int(
        getattr(
            strategy,
            "num_malicious_nodes",
            getattr(strategy, "num_malicious_clients", 0),
        )
    )


def _layers(strategy: object, num_nodes: int) -> Iterator[tuple[Any, int]]:
    """Yield the strategy, then each strategy it wraps, with the replies each sees."""
    seen: set[int] = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        yield strategy, num_nodes
        if isinstance(strategy, ShrinksReplies):
            num_nodes = int(strategy.inner_num_nodes(num_nodes))
        strategy = strategy.strategy if isinstance(strategy, Wraps) else None


def replies_problems(strategy: object, num_nodes: int) -> list[str]:
    """Return why `num_nodes` replies are too few for `strategy` (empty if not).

    The strategy and every one it wraps, each with the replies it receives: the
    rows of :data:`LIMITS` for its declared ``f``, and its own
    ``setup_problems``.
    """
    problems: list[str] = []
    for layer, n in _layers(strategy, num_nodes):
        if isinstance(layer, HasSetupProblems):
            problems.extend(layer.setup_problems(n))
        limit = next((row for row in LIMITS if isinstance(layer, row.kind)), None)
        if limit is not None and n < limit.min_nodes(_declared_f(layer)):
            problems.append(
                f"{type(layer).__name__} needs n >= {limit.formula} = "
                f"{limit.min_nodes(_declared_f(layer))} nodes, got n = {n}"
            )
    return problems


def check_setup(
    strategy: object,
    *,
    num_nodes: int,
    num_byzantine: int,
    z: float | Literal["max"] = "max",
) -> list[str]:
    """Return the reasons a configuration cannot be evaluated (empty if it can).

    Checks, for ``n = num_nodes`` replies with ``f = num_byzantine`` Byzantine, the
    strategy and every strategy it wraps (:class:`Wraps`): the rows of
    :data:`LIMITS` (Bulyan needs ``n >= 4 f' + 3``, Krum and MultiKrum
    ``n >= 2 f' + 3``, with ``f'`` the strategy's declared ``num_malicious_nodes``),
    each one's own ``setup_problems(n)`` (:class:`HasSetupProblems`), and that
    ``z="max"`` has a non-negative ``z_max`` for ``h = n - f`` and ``f``.

    Examples
    --------
    >>> from flwr.serverapp.strategy import Bulyan
    >>> check_setup(Bulyan(num_malicious_nodes=2), num_nodes=10, num_byzantine=2)
    ['Bulyan needs n >= 4 * num_malicious_nodes + 3 = 11 nodes, got n = 10']
    """
    problems = replies_problems(strategy, num_nodes)
    if z == "max" and num_byzantine > 0:
        try:
            z_max(num_nodes - num_byzantine, num_byzantine)
        except ValueError as err:
            problems.append(str(err))
    return problems
