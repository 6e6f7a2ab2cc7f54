"""Server-side wrappers that run ALIE on each round, then delegate to any strategy.

The attack of Baruch, Baruch and Goldberg ("A Little Is Enough", NeurIPS 2019) needs
the statistics of a round's honest updates, which only the server sees in a
simulation. :class:`ALIEStrategy` (Message API, ``flwr.serverapp.strategy``) and
:class:`ALIELegacyStrategy` (``flwr.server.strategy``) hold a real strategy, and in
each round:

1. sort the train replies by the partition id the client side tagged them with
   (node id for untagged replies), so that a round is processed in one order;
2. set error replies aside and split the others into honest and Byzantine;
3. pack the honest updates as differences from the round's global model into one
   ``(h, d)`` tensor (floating arrays only) and run :class:`ALIEAttack`;
4. replace the arrays of every Byzantine reply by the crafted update (same keys,
   shapes and dtypes; non-floating arrays stay as the node sent them), strip the
   tags, and hand all replies, error replies included, to the wrapped strategy's
   own aggregation;
5. add the round's telemetry (``alie.*``) to the aggregated train metrics.

A round the attack cannot serve (no honest reply, no valid ``z_max``, arrays that
do not match the global model) is logged at WARNING with the numbers, and its
Byzantine replies go to the wrapped strategy as they were sent.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import FitRes, Parameters, Scalar, log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from flwr_alie.attacks import ALIEAttack, Direction, z_max
from flwr_alie.config import (
    LEGACY_TAG_PREFIX,
    TAG_BYZANTINE,
    TAG_PARTITION_ID,
    TAG_RECORD_KEY,
    TAG_SKIPPED_TRAINING,
    ALIEConfig,
    Knowledge,
    resolve_device,
)
from flwr_alie.params import (
    Layers,
    PackSpec,
    layers_from_parameters,
    layers_from_record,
    pack,
    parameters_from_layers,
    unpack,
)

__all__ = ["ALIELegacyStrategy", "ALIEStrategy", "check_setup"]

_UNTAGGED = 1 << 62  # untagged replies sort after tagged ones


@dataclasses.dataclass
class _Reply:
    """What the round needs to know of one reply, whichever API it came in."""

    name: str
    byzantine: bool
    skipped: bool
    weight: float
    read_layers: Callable[[], Layers]


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """The crafted floating layers (``None``: left as sent) and the telemetry."""

    crafted: dict[str, NDArray[np.generic]] | None
    metrics: dict[str, float | int]
    template: int | None  # index among honest replies whose metrics a skipper copies
    packed: torch.Tensor | None = None  # the honest deltas, reusable next round
    row: torch.Tensor | None = None  # the crafted delta
    mu: torch.Tensor | None = None  # the honest mean delta
    spread: float = 0.0  # the honest spread

    def aggregate_metrics(
        self, aggregate: Layers | None, global_layers: Layers | None
    ) -> dict[str, float]:
        """Return where the wrapped strategy's aggregate landed, in honest spreads.

        ``alie.aggregate-to-crafted`` is 0 when the strategy selected the crafted
        update (Krum); ``alie.aggregate-to-mean`` is the aggregate's distance from
        the honest mean.
        """
        if self.row is None or self.mu is None or not self.spread:
            return {}
        if aggregate is None or global_layers is None:
            return {}
        # compare the floating arrays only: strategies average integer buffers too
        floating = set(PackSpec.of(global_layers).packed_keys)
        try:
            layers = {
                k: aggregate[k] if k in floating else v
                for k, v in global_layers.items()
            }
            x, _ = pack([layers], global_layers, device=self.row.device)
        except (KeyError, ValueError):
            return {}
        a = x[0].double()
        return {
            "alie.aggregate-to-crafted": float(
                torch.linalg.vector_norm(a - self.row.double()) / self.spread
            ),
            "alie.aggregate-to-mean": float(
                torch.linalg.vector_norm(a - self.mu.double()) / self.spread
            ),
        }


def _attack_round(
    config: ALIEConfig,
    device: torch.device,
    server_round: int,
    global_layers: Layers | None,
    replies: Sequence[_Reply],
    buffer: torch.Tensor | None = None,
) -> _Outcome:
    """Craft the round's Byzantine update from sorted, error-free replies."""
    honest = [r for r in replies if not r.byzantine]
    byzantine = [r for r in replies if r.byzantine]
    h, f = len(honest), len(byzantine)
    metrics: dict[str, float | int] = {
        "alie.attacked": 0,
        "alie.num-honest": h,
        "alie.num-byzantine": f,
    }
    template = _median_weight_index(honest)

    def skip(reason: str, *args: object) -> _Outcome:
        log(
            WARNING,
            "ALIE round %d: " + reason + "; the %d Byzantine replies go on as sent",
            server_round,
            *args,
            f,
        )
        return _Outcome(None, metrics, template)

    if f == 0:
        return _Outcome(None, metrics, template)
    if global_layers is None:
        return skip("the global model of this round was not seen in configure_train")
    if h == 0:
        return skip("no honest reply among the %d replies", len(replies))
    if config.knowledge == "byzantine-only" and any(r.skipped for r in byzantine):
        return skip(
            "knowledge='byzantine-only' needs the Byzantine nodes' trained updates, "
            "but some skipped training (set alie.skip-training to false)"
        )
    if config.z == "max":
        try:
            z = z_max(h, f)
        except ValueError as err:
            return skip("z='max' is undefined for h = %d honest, f = %d: %s", h, f, err)
    else:
        z = float(config.z)
    try:
        honest_x, spec = pack(
            [r.read_layers for r in honest],
            global_layers,
            device=device,
            names=[r.name for r in honest],
            out=buffer,
        )
        if config.knowledge == "byzantine-only":
            stats_x, _ = pack(
                [r.read_layers for r in byzantine],
                global_layers,
                device=device,
                names=[r.name for r in byzantine],
            )
        else:
            stats_x = honest_x
    except ValueError as err:
        return skip("%s", err)
    row = ALIEAttack.generate(stats_x, f=1, z=z, direction=config.direction)[0]
    distances, mu, spread = _distances(honest_x, row)
    metrics.update(distances)
    metrics.update({"alie.attacked": 1, "alie.z": z})
    crafted = unpack(row, spec, global_layers)
    return _Outcome(crafted, metrics, template, honest_x, row, mu, spread)


def _median_weight_index(honest: Sequence[_Reply]) -> int | None:
    """Index of the honest reply with the median weight (ties: the earlier)."""
    if not honest:
        return None
    order = sorted(range(len(honest)), key=lambda i: (honest[i].weight, i))
    return order[(len(order) - 1) // 2]


def _distances(
    honest_x: torch.Tensor, row: torch.Tensor
) -> tuple[dict[str, float], torch.Tensor, float]:
    """How far the crafted update is from the honest mean, absolutely and in spreads.

    The spread is ``sqrt(mean_i |g_i - mu|^2)``, the root-mean-square distance of an
    honest update from the honest mean; ``alie.distance-sigma`` is the crafted
    update's distance in that unit (``z`` itself in oracle mode). Returns the
    metrics, the honest mean and the spread.
    """
    h = honest_x.shape[0]
    # float32 reductions (a GEMV for the column sums, row norms), float64 scalars:
    # no float64 copy of the (h, d) tensor
    ones = torch.full((1, h), 1.0 / h, dtype=honest_x.dtype, device=honest_x.device)
    mu = torch.mm(ones, honest_x)[0]
    mean_sq = torch.linalg.vector_norm(honest_x, dim=1).double().square().mean()
    mu_sq = torch.linalg.vector_norm(mu).double().square()
    spread = float((mean_sq - mu_sq).clamp(min=0).sqrt())
    distance = float(torch.linalg.vector_norm(row.double() - mu.double()))
    metrics = {"alie.distance": distance, "alie.honest-spread": spread}
    if spread > 0:
        metrics["alie.distance-sigma"] = distance / spread
    return metrics, mu, spread


class _Attacker:
    """What both wrappers keep across rounds: options, global model, packed buffer."""

    def __init__(
        self,
        z: float | Literal["max"],
        direction: Direction,
        knowledge: Knowledge,
        device: str,
    ) -> None:
        self.config = ALIEConfig(
            z=z, direction=direction, knowledge=knowledge, device=device
        )
        self.device = resolve_device(device)
        self._global: tuple[int, Layers] | None = None
        self._buffer: torch.Tensor | None = None

    def remember(self, server_round: int, global_layers: Layers) -> None:
        """Keep the global model the round's updates are differences from."""
        self._global = (server_round, global_layers)

    def global_for(self, server_round: int) -> Layers | None:
        """Return the global model of `server_round`, if it was seen."""
        if self._global is None or self._global[0] != server_round:
            return None
        return self._global[1]

    def attack(self, server_round: int, replies: Sequence[_Reply]) -> _Outcome:
        """Craft the round's update, reusing last round's packed tensor."""
        outcome = _attack_round(
            self.config,
            self.device,
            server_round,
            self.global_for(server_round),
            replies,
            self._buffer,
        )
        if outcome.packed is not None:
            self._buffer = outcome.packed
        return outcome

    @property
    def held_bytes(self) -> int:
        """Bytes of the packed honest updates held between rounds."""
        if self._buffer is None:
            return 0
        return self._buffer.numel() * self._buffer.element_size()

    def log_settings(self) -> None:
        """Log the attack settings, Flower's summary style."""
        log(INFO, "\t├──> ALIE attack (Baruch, Baruch and Goldberg, NeurIPS 2019):")
        log(INFO, "\t│\t├── z: %s", self.config.z)
        log(INFO, "\t│\t├── direction: %s", self.config.direction.value)
        log(INFO, "\t│\t├── knowledge: %s", self.config.knowledge)
        log(INFO, "\t│\t└── device: %s", self.device)


class ALIEStrategy(Strategy):
    """Run ALIE on each training round, then aggregate with the wrapped strategy.

    For Message-API strategies (``flwr.serverapp.strategy``: FedAvg, FedMedian,
    FedTrimmedAvg, Krum, MultiKrum, Bulyan, ...). The Byzantine nodes are those
    whose train reply carries the tag of :func:`flwr_alie.client.alie_mod`.

    Parameters
    ----------
    strategy : Strategy
        The strategy whose aggregation is evaluated; it is not copied.
    z : float or "max"
        Attack factor in honest standard deviations, or ``"max"`` for ``z_max`` of
        each round's ``h`` honest and ``f`` Byzantine replies.
    direction : Direction
        Which way the crafted update leaves the honest mean.
    knowledge : {"oracle", "byzantine-only"}
        Statistics of all honest updates of the round (``"oracle"``), or of the
        Byzantine nodes' own trained updates (``"byzantine-only"``, the paper's
        threat model).
    device : str
        Where the attack runs: ``"auto"`` (CUDA when present) or a torch device.

    Notes
    -----
    A Byzantine node that skipped training (oracle mode) sends the global model
    back; its metrics are replaced by those of the honest reply with the median
    weight, so that it claims a typical number of examples. The train metrics of a
    round gain ``alie.attacked`` (1 or 0), ``alie.z``, ``alie.num-honest``,
    ``alie.num-byzantine``, ``alie.distance`` (L2 distance of the crafted update
    from the honest mean), ``alie.honest-spread`` (root-mean-square distance of an
    honest update from the honest mean), ``alie.distance-sigma`` (the distance in
    units of the honest spread), ``alie.aggregate-to-crafted`` and
    ``alie.aggregate-to-mean`` (where the wrapped strategy's aggregate landed, in
    honest spreads: 0 to the crafted update when Krum selected it) and
    ``alie.seconds`` (the wrapper's own time in the round).

    The honest deltas are packed into one ``(h, d)`` float32 tensor on `device`,
    kept from round to round so that it is allocated once: the wrapper holds one
    copy of the honest updates, no more.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        z: float | Literal["max"] = "max",
        direction: Direction = Direction.NEGATIVE,
        knowledge: Knowledge = "oracle",
        device: str = "auto",
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                "Expected `strategy` to be a flwr.serverapp.strategy.Strategy, got "
                f"{type(strategy).__name__}; wrap legacy strategies in "
                "ALIELegacyStrategy"
            )
        self.strategy = strategy
        self._attacker = _Attacker(z, direction, knowledge, device)
        self.config = self._attacker.config
        self.device = self._attacker.device

    @classmethod
    def from_config(cls, strategy: Strategy, config: ALIEConfig) -> ALIEStrategy:
        """Wrap `strategy` with the server-side options of `config`."""
        return cls(
            strategy,
            z=config.z,
            direction=config.direction,
            knowledge=config.knowledge,
            device=config.device,
        )

    def summary(self) -> None:
        """Log the attack settings, then the wrapped strategy's summary."""
        self._attacker.log_settings()
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model, then delegate."""
        self._attacker.remember(server_round, layers_from_record(arrays))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replace the Byzantine updates by the ALIE update, then delegate."""
        started = time.perf_counter()
        replies = list(replies)
        valid = sorted((m for m in replies if not m.has_error()), key=_message_key)
        errors = [m for m in replies if m.has_error()]
        weight_key = str(getattr(self.strategy, "weighted_by_key", "num-examples"))
        views = [_message_view(m, weight_key) for m in valid]
        outcome = self._attacker.attack(server_round, views)
        honest = [m for m, v in zip(valid, views, strict=True) if not v.byzantine]
        template = None if outcome.template is None else honest[outcome.template]
        crafted = (
            None
            if outcome.crafted is None
            else {k: Array(np.asarray(v)) for k, v in outcome.crafted.items()}
        )
        forwarded = [
            _rebuild_message(m, v, crafted, template, weight_key)
            for m, v in zip(valid, views, strict=True)
        ]
        seconds = time.perf_counter() - started
        arrays, metrics = self.strategy.aggregate_train(
            server_round, forwarded + errors
        )
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        aggregate = None if arrays is None else layers_from_record(arrays)
        telemetry = {
            **outcome.metrics,
            **outcome.aggregate_metrics(
                aggregate, self._attacker.global_for(server_round)
            ),
            "alie.seconds": seconds,
        }
        for key, value in telemetry.items():
            merged[key] = value
        return arrays, merged

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


def _message_tag(message: Message) -> ConfigRecord | None:
    tag = message.content.get(TAG_RECORD_KEY)
    return tag if isinstance(tag, ConfigRecord) else None


def _message_key(message: Message) -> tuple[int, int]:
    tag = _message_tag(message)
    partition = None if tag is None else tag.get(TAG_PARTITION_ID)
    if isinstance(partition, int):
        return (partition, 0)
    return (_UNTAGGED, message.metadata.src_node_id)


def _message_view(message: Message, weight_key: str) -> _Reply:
    tag = _message_tag(message)
    content = message.content
    weight = 0.0
    for record in content.metric_records.values():
        value = record.get(weight_key)
        if isinstance(value, int | float):
            weight = float(value)

    def read_layers() -> Layers:
        records = list(content.array_records.values())
        if len(records) != 1:
            raise ValueError(
                f"node {message.metadata.src_node_id}: expected one ArrayRecord in "
                f"the train reply, got {len(records)}"
            )
        return layers_from_record(records[0])

    return _Reply(
        name=f"node {message.metadata.src_node_id}",
        byzantine=bool(tag is not None and tag.get(TAG_BYZANTINE, False)),
        skipped=bool(tag is not None and tag.get(TAG_SKIPPED_TRAINING, False)),
        weight=weight,
        read_layers=read_layers,
    )


def _rebuild_message(
    message: Message,
    view: _Reply,
    crafted: dict[str, Array] | None,
    template: Message | None,
    weight_key: str,
) -> Message:
    """Return `message` without the tag; a Byzantine one with the crafted arrays."""
    content = message.content
    if TAG_RECORD_KEY not in content and not view.byzantine:
        return message
    records: dict[str, Any] = {}
    for key, record in content.items():
        if key == TAG_RECORD_KEY:
            continue
        if view.byzantine and crafted is not None and isinstance(record, ArrayRecord):
            record = ArrayRecord({k: crafted.get(k, a) for k, a in record.items()})
        elif view.byzantine and view.skipped and isinstance(record, MetricRecord):
            record = (
                MetricRecord(dict(next(iter(template.content.metric_records.values()))))
                if template is not None
                else MetricRecord({weight_key: 1})
            )
        records[key] = record
    rebuilt = copy.copy(message)  # same metadata; the original keeps its content
    rebuilt.content = RecordDict(records)
    return rebuilt


class ALIELegacyStrategy(LegacyStrategy):
    """:class:`ALIEStrategy` for legacy strategies (``flwr.server.strategy``).

    Wraps a strategy of the ``aggregate_fit(server_round, results, failures)`` API
    (FedAvg, FedMedian, FedTrimmedAvg, Krum, Bulyan, ...). The Byzantine clients are
    those wrapped in :class:`flwr_alie.client.ALIEClient`, whose ``FitRes.metrics``
    carry ``alie.*`` tags. Parameters and telemetry as in :class:`ALIEStrategy`.
    """

    def __init__(
        self,
        strategy: LegacyStrategy,
        *,
        z: float | Literal["max"] = "max",
        direction: Direction = Direction.NEGATIVE,
        knowledge: Knowledge = "oracle",
        device: str = "auto",
    ) -> None:
        if not isinstance(strategy, LegacyStrategy):
            raise TypeError(
                "Expected `strategy` to be a flwr.server.strategy.Strategy, got "
                f"{type(strategy).__name__}; wrap Message-API strategies in "
                "ALIEStrategy"
            )
        self.strategy = strategy
        self._attacker = _Attacker(z, direction, knowledge, device)
        self.config = self._attacker.config
        self.device = self._attacker.device

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Remember the round's global model, then delegate."""
        self._attacker.remember(server_round, layers_from_parameters(parameters))
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Replace the Byzantine updates by the ALIE update, then delegate."""
        started = time.perf_counter()
        ordered = sorted(results, key=_legacy_key)
        views = [_legacy_view(proxy, res) for proxy, res in ordered]
        global_layers = self._attacker.global_for(server_round)
        outcome = self._attacker.attack(server_round, views)
        honest = [
            res for (_, res), v in zip(ordered, views, strict=True) if not v.byzantine
        ]
        template = None if outcome.template is None else honest[outcome.template]
        crafted = None
        if outcome.crafted is not None:  # serialized once, shared by every reply
            tensors = parameters_from_layers(outcome.crafted).tensors
            # legacy layers are named by their position (params.layers_from_parameters)
            crafted = dict(zip(map(int, outcome.crafted), tensors, strict=True))
        forwarded = [
            (proxy, _rebuild_fitres(res, v, crafted, template))
            for (proxy, res), v in zip(ordered, views, strict=True)
        ]
        seconds = time.perf_counter() - started
        parameters, metrics = self.strategy.aggregate_fit(
            server_round, forwarded, failures
        )
        aggregate = None if parameters is None else layers_from_parameters(parameters)
        return parameters, {
            **metrics,
            **outcome.metrics,
            **outcome.aggregate_metrics(aggregate, global_layers),
            "alie.seconds": seconds,
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


def _legacy_tags(res: FitRes) -> dict[str, Scalar]:
    return {
        k[len(LEGACY_TAG_PREFIX) :]: v
        for k, v in res.metrics.items()
        if k.startswith(LEGACY_TAG_PREFIX)
    }


def _legacy_key(item: tuple[ClientProxy, FitRes]) -> tuple[int, int]:
    proxy, res = item
    partition = _legacy_tags(res).get(TAG_PARTITION_ID)
    if isinstance(partition, int):
        return (partition, 0)
    try:
        return (_UNTAGGED, int(proxy.cid))
    except ValueError:
        return (_UNTAGGED, 0)


def _legacy_view(proxy: ClientProxy, res: FitRes) -> _Reply:
    tags = _legacy_tags(res)
    return _Reply(
        name=f"client {proxy.cid}",
        byzantine=bool(tags.get(TAG_BYZANTINE, False)),
        skipped=bool(tags.get(TAG_SKIPPED_TRAINING, False)),
        weight=float(res.num_examples),
        read_layers=lambda: layers_from_parameters(res.parameters),
    )


def _rebuild_fitres(
    res: FitRes,
    view: _Reply,
    crafted: dict[int, bytes] | None,
    template: FitRes | None,
) -> FitRes:
    """Return `res` without tags; a Byzantine one with the crafted parameters.

    `crafted` maps the position of each floating tensor to its serialized crafted
    value; the reply's other tensors stay the bytes the node sent.
    """
    metrics = {
        k: v for k, v in res.metrics.items() if not k.startswith(LEGACY_TAG_PREFIX)
    }
    if len(metrics) == len(res.metrics) and not view.byzantine:
        return res
    parameters, num_examples = res.parameters, res.num_examples
    if view.byzantine and crafted is not None:
        parameters = Parameters(
            tensors=[crafted.get(i, t) for i, t in enumerate(res.parameters.tensors)],
            tensor_type=res.parameters.tensor_type,
        )
    if view.byzantine and view.skipped and template is not None:
        num_examples = template.num_examples
        metrics = {
            k: v
            for k, v in template.metrics.items()
            if not k.startswith(LEGACY_TAG_PREFIX)
        }
    return FitRes(res.status, parameters, num_examples, metrics)


# ----------------------------------------------------------------- setup checks


def check_setup(
    strategy: Strategy | LegacyStrategy,
    *,
    num_nodes: int,
    num_byzantine: int,
    z: float | Literal["max"] = "max",
) -> list[str]:
    """Return the reasons a configuration cannot be evaluated (empty if it can).

    Checks, for ``n = num_nodes`` replies with ``f = num_byzantine`` Byzantine:
    Bulyan needs ``n >= 4 f' + 3`` and Krum/MultiKrum ``n > 2 f' + 2``, with ``f'``
    the strategy's ``num_malicious_nodes`` (``num_malicious_clients``); and
    ``z="max"`` needs a non-negative ``z_max`` for ``h = n - f`` and ``f``.

    Examples
    --------
    >>> from flwr.serverapp.strategy import Bulyan
    >>> check_setup(Bulyan(num_malicious_nodes=2), num_nodes=10, num_byzantine=2)
    ['Bulyan needs n >= 4 * num_malicious_nodes + 3 = 11 nodes, got n = 10']
    """
    inner = (
        strategy.strategy
        if isinstance(strategy, ALIEStrategy | ALIELegacyStrategy)
        else strategy
    )
    problems = []
    name = type(inner).__name__
    declared = int(
        getattr(
            inner, "num_malicious_nodes", getattr(inner, "num_malicious_clients", 0)
        )
    )
    if name == "Bulyan" and num_nodes < 4 * declared + 3:
        problems.append(
            f"Bulyan needs n >= 4 * num_malicious_nodes + 3 = {4 * declared + 3} "
            f"nodes, got n = {num_nodes}"
        )
    if name in ("Krum", "MultiKrum") and num_nodes <= 2 * declared + 2:
        problems.append(
            f"{name} needs n > 2 * num_malicious_nodes + 2 = {2 * declared + 2} "
            f"nodes, got n = {num_nodes}"
        )
    if z == "max" and num_byzantine > 0:
        try:
            z_max(num_nodes - num_byzantine, num_byzantine)
        except ValueError as err:
            problems.append(str(err))
    return problems
