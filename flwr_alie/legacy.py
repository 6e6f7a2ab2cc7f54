"""The legacy Flower API: :class:`ALIEClient` and :class:`ALIELegacyStrategy`.

Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019. For apps built on
``NumPyClient`` / ``Client`` and the ``flwr.server.strategy`` API with
``aggregate_fit(server_round, results, failures)``. Everything legacy lives in this
one module: the rest of flwr-alie does not import it (save the package's lazy
re-export), so it can be dropped by deleting this file. The round itself is
:class:`flwr_alie.engine.RoundEngine`'s, shared with the Message-API wrapper.
"""

from __future__ import annotations

import math
import time
from logging import WARNING
from typing import Any

from flwr.client import Client, NumPyClient
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Scalar,
    Status,
    log,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from flwr_alie.config import (
    LEGACY_TAG_PREFIX,
    SKIPPED_WEIGHT,
    TAG_BYZANTINE,
    TAG_PARTITION_ID,
    TAG_SKIPPED_TRAINING,
    ALIEConfig,
)
from flwr_alie.engine import KEY_BELOW_LIMIT, KEY_SECONDS, RoundEngine
from flwr_alie.limits import replies_problems
from flwr_alie.params import (
    Layers,
    layers_from_parameters,
    parameters_from_layers,
    tensors_from_layers,
)
from flwr_alie.replies import Reply, reply_order

__all__ = ["ALIEClient", "ALIELegacyStrategy"]


class ALIEClient(Client):
    """A legacy Flower client acting as a Byzantine ALIE node.

    ``client_fn`` returns ``ALIEClient(MyClient(...)).to_client()`` for the nodes
    chosen to be Byzantine (e.g. with :meth:`ALIEConfig.byzantine_partitions`). Its
    fit results carry ``alie.*`` tags in ``FitRes.metrics``, which
    :class:`ALIELegacyStrategy` reads and strips;
    ``get_parameters``, ``get_properties`` and ``evaluate`` are delegated unchanged.

    Parameters
    ----------
    client : Client or NumPyClient
        The honest client; reachable as ``.client``.
    partition_id : int, optional
        The node's partition id, which orders the replies of a round on the server.
    skip_training : bool
        Skip local training and send the global model back (its update is replaced
        on the server anyway in oracle mode). Must be False in byzantine-only mode.
    """

    def __init__(
        self,
        client: Client | NumPyClient,
        *,
        partition_id: int | None = None,
        skip_training: bool = False,
    ) -> None:
        if not isinstance(client, Client | NumPyClient):
            raise TypeError(
                "Expected `client` to be a flwr Client or NumPyClient, got "
                f"{type(client).__name__}"
            )
        if partition_id is not None and (
            isinstance(partition_id, bool)
            or not isinstance(partition_id, int)
            or partition_id < 0
        ):
            raise ValueError(
                "Expected `partition_id` to be a non-negative int, got "
                f"{partition_id!r}"
            )
        self.client = client
        self.partition_id = partition_id
        self.skip_training = bool(skip_training)
        self._delegate = client.to_client()

    def _tags(self) -> dict[str, Scalar]:
        tags: dict[str, Scalar] = {
            LEGACY_TAG_PREFIX + TAG_BYZANTINE: True,
            LEGACY_TAG_PREFIX + TAG_SKIPPED_TRAINING: self.skip_training,
        }
        if self.partition_id is not None:
            tags[LEGACY_TAG_PREFIX + TAG_PARTITION_ID] = self.partition_id
        return tags

    def fit(self, ins: FitIns) -> FitRes:
        """Train (unless skipping) and tag the result as Byzantine."""
        if self.skip_training:
            return FitRes(
                Status(Code.OK, "Byzantine node: local training skipped"),
                ins.parameters,
                SKIPPED_WEIGHT,
                self._tags(),
            )
        res = self._delegate.fit(ins)
        return FitRes(
            res.status,
            res.parameters,
            res.num_examples,
            {**res.metrics, **self._tags()},
        )

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Delegate."""
        return self._delegate.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        """Delegate."""
        return self._delegate.get_parameters(ins)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Delegate."""
        return self._delegate.evaluate(ins)

    def to_client(self) -> Client:
        """Return this client."""
        return self


class ALIELegacyStrategy(Strategy):
    """:class:`flwr_alie.ALIEStrategy` for legacy strategies (``flwr.server.strategy``).

    Wraps a strategy of the ``aggregate_fit(server_round, results, failures)`` API
    (FedAvg, FedMedian, FedTrimmedAvg, Krum, Bulyan, ...). The Byzantine clients are
    those wrapped in :class:`ALIEClient`, whose ``FitRes.metrics`` carry ``alie.*``
    tags. Parameters, the round, the replies set aside and the telemetry as in
    :class:`flwr_alie.ALIEStrategy`.
    """

    def __init__(
        self,
        strategy: Strategy,
        config: ALIEConfig | None = None,
        *,
        num_nodes: int | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                "Expected `strategy` to be a flwr.server.strategy.Strategy, got "
                f"{type(strategy).__name__}; wrap Message-API strategies in "
                "ALIEStrategy"
            )
        self.strategy = strategy
        self.engine = RoundEngine(config or ALIEConfig(), num_nodes=num_nodes)
        self._global: tuple[int, Layers] | None = None

    @property
    def config(self) -> ALIEConfig:
        """The attack options."""
        return self.engine.config

    def __repr__(self) -> str:
        """Name the wrapped strategy and the options."""
        return f"ALIELegacyStrategy({self.strategy!r}, {self.engine!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Remember the round's global model, then delegate."""
        self._global = (server_round, layers_from_parameters(parameters))
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Replace the Byzantine updates by the ALIE update, then delegate."""
        started = time.perf_counter()
        ordered = sorted(results, key=_order)
        views = [_view(proxy, res) for proxy, res in ordered]
        global_layers = None
        if self._global is not None and self._global[0] == server_round:
            global_layers = self._global[1]
        result = self.engine.attack(server_round, views, global_layers)
        failed = {**result.rejected}
        failed.update(dict.fromkeys(result.dropped, "Byzantine client without a "
                                    "crafted update"))  # fmt: skip
        failures = [*failures, *(ValueError(why) for why in failed.values())]
        crafted = (
            None  # serialized once, shared by every reply
            if result.crafted is None
            else tensors_from_layers(result.crafted)
        )
        template = None if result.template is None else ordered[result.template][1]
        forwarded = [
            (proxy, _rebuild(res, v, crafted, template))
            for i, ((proxy, res), v) in enumerate(zip(ordered, views, strict=True))
            if i not in failed
        ]
        below = replies_problems(self.strategy, len(forwarded))
        if below:
            log(WARNING, "ALIE round %d: %d results reach %s: %s", server_round,
                len(forwarded), type(self.strategy).__name__,
                "; ".join(below))  # fmt: skip
        seconds = time.perf_counter() - started
        parameters, metrics = self.strategy.aggregate_fit(
            server_round, forwarded, failures
        )
        aggregate = None if parameters is None else layers_from_parameters(parameters)
        return parameters, {
            **metrics,
            **result.metrics,
            **self.engine.aggregate_metrics(result, aggregate),
            KEY_BELOW_LIMIT: int(bool(below)),
            KEY_SECONDS: seconds,
        }

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Delegate."""
        return self.strategy.configure_evaluate(
            server_round, parameters, client_manager
        )

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate."""
        return self.strategy.evaluate(server_round, parameters)


def _tags(res: FitRes) -> dict[str, Scalar]:
    return {
        k[len(LEGACY_TAG_PREFIX) :]: v
        for k, v in res.metrics.items()
        if k.startswith(LEGACY_TAG_PREFIX)
    }


def _cid(proxy: ClientProxy) -> int:
    try:
        return int(proxy.cid)
    except ValueError:
        return 0


def _order(item: tuple[ClientProxy, FitRes]) -> tuple[int, int]:
    proxy, res = item
    return reply_order(_tags(res).get(TAG_PARTITION_ID), _cid(proxy))


def _view(proxy: ClientProxy, res: FitRes) -> Reply:
    """Read a fit result into a :class:`Reply`, its ``alie.*`` tags strictly."""
    tags = _tags(res)
    problems = []
    byzantine = tags.get(TAG_BYZANTINE, False)
    skipped = tags.get(TAG_SKIPPED_TRAINING, False)
    partition = tags.get(TAG_PARTITION_ID)
    for key, value in ((TAG_BYZANTINE, byzantine), (TAG_SKIPPED_TRAINING, skipped)):
        if not isinstance(value, bool):
            problems.append(f"its tag {LEGACY_TAG_PREFIX + key!r} is {value!r}, "
                            "not a bool")  # fmt: skip
    if partition is not None and (
        isinstance(partition, bool) or not isinstance(partition, int) or partition < 0
    ):
        problems.append(f"its tag {LEGACY_TAG_PREFIX + TAG_PARTITION_ID!r} is "
                        f"{partition!r}, not an int >= 0")  # fmt: skip
        partition = None
    examples = res.num_examples
    weight = (
        float(examples)
        if isinstance(examples, int | float) and not isinstance(examples, bool)
        else math.nan
    )
    name = (
        f"client {proxy.cid}"
        if partition is None
        else f"partition {partition} (client {proxy.cid})"
    )
    return Reply(
        partition=partition if isinstance(partition, int) else None,
        name=name,
        byzantine=byzantine is True,
        skipped=skipped is True,
        weight=weight,
        read_layers=lambda: layers_from_parameters(res.parameters),
        metric_keys=frozenset(
            k for k in res.metrics if not k.startswith(LEGACY_TAG_PREFIX)
        ),
        problem="; ".join(problems) or None,
    )


def _rebuild(
    res: FitRes,
    view: Reply,
    crafted: dict[str, bytes] | None,
    template: FitRes | None,
) -> FitRes:
    """Return `res` without tags; a Byzantine one with the crafted parameters.

    `crafted` maps each floating tensor's position (``"0"``, ``"1"``, ...) to its
    serialized crafted value; the reply's other tensors stay as the node sent them.
    """
    metrics = {
        k: v for k, v in res.metrics.items() if not k.startswith(LEGACY_TAG_PREFIX)
    }
    if len(metrics) == len(res.metrics) and not view.byzantine:
        return res
    parameters, num_examples = res.parameters, res.num_examples
    if view.byzantine and crafted is not None:
        parameters = parameters_from_layers(crafted, base=res.parameters)
    if view.byzantine and view.skipped and template is not None:
        num_examples = template.num_examples
        metrics = {
            k: v
            for k, v in template.metrics.items()
            if not k.startswith(LEGACY_TAG_PREFIX)
        }
    return FitRes(res.status, parameters, num_examples, metrics)
