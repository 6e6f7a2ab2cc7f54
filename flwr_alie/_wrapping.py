"""The Message-API strategy wrapper that the attack, the defences and momentum share.

Shaped like Flower's own wrappers (``DifferentialPrivacyServerSideFixedClipping``):
take a ``strategy``, keep it as ``.strategy``, remember the round's global model
when ``configure_train`` sends it (:class:`RoundModel`), forward everything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_alie.params import Layers, layers_from_record

__all__ = ["RoundModel", "StrategyWrapper", "describe"]


def describe(strategy: object) -> str:
    """Name a strategy in a ``__repr__``: its own repr, or ``ClassName(...)``."""
    if type(strategy).__repr__ is not object.__repr__:
        return repr(strategy)
    return f"{type(strategy).__name__}(...)"


class RoundModel:
    """The global model of the round in progress, as ``configure_train`` sent it.

    The one holder of it for every wrapper and defence: :meth:`see` keeps the
    record, :meth:`layers` reads it (views of its bytes, once a round; the record
    is read lazily, so a wrapper that never needs it reads nothing).
    """

    def __init__(self) -> None:
        self._round: int | None = None
        self._record: ArrayRecord | None = None
        self._layers: Layers | None = None

    def see(self, server_round: int, arrays: ArrayRecord) -> None:
        """Keep the round's global arrays."""
        self._round, self._record, self._layers = server_round, arrays, None

    def layers(self, server_round: int) -> Layers | None:
        """Return the global model of `server_round`, or ``None`` if not seen."""
        if self._round != server_round or self._record is None:
            return None
        if self._layers is None:
            self._layers = layers_from_record(self._record)
        return self._layers


class StrategyWrapper(Strategy):
    """Hold `strategy`, remember each round's global model, delegate the rest.

    Subclasses implement ``aggregate_train`` and may extend :meth:`summary` with
    :meth:`_log_settings`.
    """

    def __init__(self, strategy: Strategy, *, hint: str = "") -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                "Expected `strategy` to be a flwr.serverapp.strategy.Strategy, got "
                f"{type(strategy).__name__}{hint}"
            )
        self.strategy = strategy
        self.round_model = RoundModel()

    @property
    def weight_key(self) -> str:
        """The MetricRecord key the wrapped strategy weighs replies by."""
        return str(getattr(self.strategy, "weighted_by_key", "num-examples"))

    def _log_settings(self) -> None:
        """Log this wrapper's own settings (Flower's summary style)."""
        log(INFO, "\t├──> %r", self)

    def summary(self) -> None:
        """Log this wrapper's settings, then the wrapped strategy's summary."""
        self._log_settings()
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model, then delegate."""
        self.round_model.see(server_round, arrays)
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
