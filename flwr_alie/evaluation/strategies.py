"""The robust strategies under evaluation, configured from the Byzantine count."""

from __future__ import annotations

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

__all__ = ["STRATEGIES", "make_strategy"]

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def make_strategy(name: str, *, num_nodes: int, num_byzantine: int) -> Strategy:
    """Build a Message-API strategy that trains on all nodes each round.

    ``num_malicious_nodes`` (Krum, MultiKrum, Bulyan) is set to `num_byzantine`;
    FedTrimmedAvg gets ``beta = (f + 1/2) / n``, so that it trims exactly ``f``
    updates from each end;
    MultiKrum keeps ``n - f`` updates. Federated evaluation is off: the evaluation
    measures the global model on a central test set.

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
    f = num_byzantine
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=min((f + 0.5) / num_nodes, 0.49))
    if name == "krum":
        return Krum(**common, num_malicious_nodes=f)
    if name == "multikrum":
        return MultiKrum(
            **common, num_malicious_nodes=f, num_nodes_to_select=num_nodes - f
        )
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=f)
    raise ValueError(f"Expected `name` in {STRATEGIES}, got {name!r}")
