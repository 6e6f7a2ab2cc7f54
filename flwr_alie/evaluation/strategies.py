"""The strategies under evaluation: one row each, built from ``n`` and ``f``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from flwr_alie.defenses import NNM, Bucketing, CenteredClipping, GeometricMedian

__all__ = [
    "DEFAULT_STRATEGIES",
    "DEFENCES",
    "FLOWER_STRATEGIES",
    "STRATEGIES",
    "DefenceOptions",
    "StrategySpec",
    "make_strategy",
]


@dataclasses.dataclass(frozen=True)
class DefenceOptions:
    """The parameters of flwr-alie's defences, as a cell sets them.

    Attributes
    ----------
    cc_tau, cc_iterations : float, int
        Centered clipping's radius and iterations (:class:`CenteredClipping`).
    geomed_iterations : int
        The smoothed Weiszfeld iterations of the geometric median (RFA's ``T``).
    """

    cc_tau: float = 1.0
    cc_iterations: int = 1
    geomed_iterations: int = 100


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """How the evaluation builds one strategy.

    Attributes
    ----------
    factory : Callable[[int, int, dict, DefenceOptions], Strategy]
        ``(n, f, common, options) -> strategy``, with ``f`` the number of Byzantine
        nodes the strategy is configured for, ``common`` Flower's sampling options
        and ``options`` the defences' parameters.
    defence : bool
        One of flwr-alie's own defences (:mod:`flwr_alie.defenses`) rather than a
        strategy of Flower's.
    uses_f : bool
        Whether the configuration depends on ``f`` (FedAvg's and the median's do
        not): a strategy that does not gets one clean reference for all fractions.
    """

    factory: Callable[[int, int, dict[str, Any], DefenceOptions], Strategy]
    uses_f: bool
    defence: bool = False


def _trimmed(n: int, f: int, common: dict[str, Any], _: DefenceOptions) -> Strategy:
    # Flower trims int(beta * n) from each end: beta = (f + 1/2) / n trims exactly f
    return FedTrimmedAvg(**common, beta=min((f + 0.5) / n, 0.49))


def _cc(common: dict[str, Any], o: DefenceOptions) -> Strategy:
    return CenteredClipping(tau=o.cc_tau, iterations=o.cc_iterations, **common)


def _geomed(common: dict[str, Any], o: DefenceOptions) -> Strategy:
    return GeometricMedian(nu=1e-6, iterations=o.geomed_iterations, tol=1e-6, **common)


_TABLE: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(lambda n, f, c, o: FedAvg(**c), uses_f=False),
    "fedmedian": StrategySpec(lambda n, f, c, o: FedMedian(**c), uses_f=False),
    "fedtrimmedavg": StrategySpec(_trimmed, uses_f=True),
    "krum": StrategySpec(lambda n, f, c, o: Krum(**c, num_malicious_nodes=f), True),
    "multikrum": StrategySpec(
        lambda n, f, c, o: MultiKrum(
            **c, num_malicious_nodes=f, num_nodes_to_select=n - f
        ),
        uses_f=True,
    ),
    "bulyan": StrategySpec(lambda n, f, c, o: Bulyan(**c, num_malicious_nodes=f), True),
    # flwr-alie's defences, with the parameters of DefenceOptions (tau = 1 by
    # default: an honest update's median distance from the honest mean in rounds
    # 10-15 of digits with local epochs, 1.1 IID, 1.3 Dirichlet; the papers'
    # values belong to their own update scales). L = 1 iteration and bucket size
    # s = 2 as in the papers.
    "cc": StrategySpec(lambda n, f, c, o: _cc(c, o), False, True),
    "geomed": StrategySpec(lambda n, f, c, o: _geomed(c, o), False, True),
    "nnm-krum": StrategySpec(
        lambda n, f, c, o: NNM(Krum(**c, num_malicious_nodes=f), f=f), True, True
    ),
    "nnm-median": StrategySpec(lambda n, f, c, o: NNM(FedMedian(**c), f=f), True, True),
    "bucketing-median": StrategySpec(
        lambda n, f, c, o: Bucketing(FedMedian(**c), s=2), False, True
    ),
    "bucketing-krum": StrategySpec(
        lambda n, f, c, o: Bucketing(Krum(**c, num_malicious_nodes=f), s=2),
        True,
        True,
    ),
    "bucketing-geomed": StrategySpec(
        lambda n, f, c, o: Bucketing(_geomed(c, o), s=2), False, True
    ),
    "bucketing-cc": StrategySpec(
        lambda n, f, c, o: Bucketing(_cc(c, o), s=2), False, True
    ),
}

STRATEGIES: tuple[str, ...] = tuple(_TABLE)
"""The names ``--strategies`` accepts, in the order tables list them."""

FLOWER_STRATEGIES: tuple[str, ...] = tuple(
    k for k, v in _TABLE.items() if not v.defence
)
"""Flower's own strategies: the default of ``--strategies``."""

DEFENCES: tuple[str, ...] = tuple(k for k, v in _TABLE.items() if v.defence)
"""flwr-alie's defences."""

DEFAULT_STRATEGIES: tuple[str, ...] = (
    "fedavg",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "geomed",
)
"""The main job's: FedAvg, Flower's robust median, trimmed mean and Krum, and the
geometric median of flwr-alie's defences."""


def spec(name: str) -> StrategySpec:
    """Return the row of `name`; ``ValueError`` names the choices."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(
            f"Expected a strategy among {', '.join(STRATEGIES)}, got {name!r}"
        ) from None


def make_strategy(
    name: str,
    *,
    num_nodes: int,
    num_byzantine: int,
    options: DefenceOptions | None = None,
) -> Strategy:
    """Build a Message-API strategy that trains on all nodes each round.

    ``num_malicious_nodes`` (Krum, MultiKrum, Bulyan) is set to `num_byzantine`;
    FedTrimmedAvg gets ``beta = (f + 1/2) / n``, so that it trims exactly ``f``
    updates from each end; MultiKrum keeps ``n - f`` updates; flwr-alie's defences
    take `options` (the defaults of :class:`DefenceOptions` when ``None``).
    Federated evaluation is off: the evaluation measures the global model on a
    central test set.

    Examples
    --------
    >>> make_strategy("krum", num_nodes=10, num_byzantine=2).num_malicious_nodes
    2
    >>> make_strategy("fedtrimmedavg", num_nodes=10, num_byzantine=2).beta
    0.25
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": num_nodes,
        "min_available_nodes": num_nodes,
    }
    return spec(name).factory(
        num_nodes, num_byzantine, common, options or DefenceOptions()
    )
