"""Server-side optimisation on top of any strategy's aggregate: momentum and a rate.

The regime of the ALIE paper (Baruch, Baruch and Goldberg, NeurIPS 2019; the
authors' code): every worker sends a gradient step, the server applies momentum 0.9
and learning rate 0.1 to whatever the aggregation rule returns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from flwr_alie._checks import check_real
from flwr_alie._wrapping import StrategyWrapper, describe
from flwr_alie.params import (
    layers_from_record,
    pack_aggregate,
    record_from_layers,
    unpack,
)

__all__ = ["ServerMomentum"]


class ServerMomentum(StrategyWrapper):
    r"""Apply a learning rate and momentum to the update `strategy` aggregates.

    With :math:`w_t` the round's global model and :math:`a_t` the inner strategy's
    aggregate, the update is :math:`u_t = a_t - w_t` (floating arrays), and

    .. math::

        m_t = \beta\, m_{t-1} + u_t, \qquad w_{t+1} = w_t + \eta\, m_t,
        \qquad m_0 = 0,

    with :math:`\eta` = `lr` and :math:`\beta` = `momentum` (PyTorch's SGD
    convention, no dampening). ``lr=1, momentum=0`` returns the inner aggregate.
    Non-floating arrays are the inner aggregate's. The momentum buffer is state
    kept across rounds (float32, on the CPU).

    Parameters
    ----------
    strategy : Strategy
        Any Message-API strategy: Flower's, a defence, a user's own. Wrap the
        result in :class:`flwr_alie.ALIEStrategy` to attack it.
    lr : float
        Server learning rate, ``> 0``.
    momentum : float
        ``>= 0`` (the paper: 0.9).

    Examples
    --------
    >>> from flwr.serverapp.strategy import FedAvg
    >>> ServerMomentum(FedAvg(), lr=0.1, momentum=0.9)
    ServerMomentum(FedAvg(...), lr=0.1, momentum=0.9)
    """

    def __init__(
        self, strategy: Strategy, *, lr: float = 1.0, momentum: float = 0.0
    ) -> None:
        super().__init__(strategy)
        self.lr = check_real(lr, "lr", positive=True)
        self.momentum = check_real(momentum, "momentum", positive=False)
        self._buffer: torch.Tensor | None = None

    def __repr__(self) -> str:
        """Name the wrapped strategy and the options."""
        inner = describe(self.strategy)
        return f"ServerMomentum({inner}, lr={self.lr}, momentum={self.momentum})"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with `strategy`, then step with momentum from the global model."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        global_layers = self.round_model.layers(server_round)
        if arrays is None or global_layers is None:
            return arrays, metrics
        update, spec = pack_aggregate(layers_from_record(arrays), global_layers)
        if self._buffer is None or self._buffer.shape != update.shape:
            self._buffer = torch.zeros_like(update)
        self._buffer.mul_(self.momentum).add_(update)
        stepped = unpack(self._buffer * self.lr, spec)
        merged = MetricRecord(dict(metrics or {}))
        merged["server.update-norm"] = float(torch.linalg.vector_norm(update))
        merged["server.step-norm"] = float(
            torch.linalg.vector_norm(self._buffer) * self.lr
        )
        return record_from_layers(stepped, base=arrays), merged
