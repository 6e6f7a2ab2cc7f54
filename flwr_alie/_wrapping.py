"""The Message-API strategy wrapper both the attack and the defences are built on.

Shaped like Flower's own wrappers (``DifferentialPrivacyServerSideFixedClipping``):
hold the inner strategy, remember the round's global model when
``configure_train`` sends it, forward everything else.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_alie.params import Layers, layers_from_record

__all__ = ["StrategyWrapper", "reply_weight"]


def reply_weight(message: Message, key: str) -> float:
    """Return a train reply's sample count: the number under `key` in its metrics.

    The last MetricRecord that holds a number under `key` counts; 0 if none does.
    """
    weight = 0.0
    for record in message.content.values():  # not .metric_records: it copies
        if isinstance(record, MetricRecord):
            value = record.get(key)
            if isinstance(value, int | float):
                weight = float(value)
    return weight


class StrategyWrapper(Strategy):
    """Hold `inner`, remember each round's global model, delegate the rest.

    Subclasses implement ``aggregate_train``; ``_remember`` is where the round's
    global model goes (kept here by default).
    """

    def __init__(self, inner: Strategy, *, name: str = "inner", hint: str = "") -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(
                f"Expected `{name}` to be a flwr.serverapp.strategy.Strategy, got "
                f"{type(inner).__name__}{hint}"
            )
        self.strategy = inner
        self._global: tuple[int, Layers] | None = None

    def _remember(self, server_round: int, global_layers: Layers) -> None:
        self._global = (server_round, global_layers)

    def _global_for(self, server_round: int) -> Layers | None:
        if self._global is None or self._global[0] != server_round:
            return None
        return self._global[1]

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model, then delegate."""
        self._remember(server_round, layers_from_record(arrays))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)
