"""ALIE as a Message-API strategy wrapper: craft the Byzantine replies, then delegate.

Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019. Shaped like Flower's
own wrappers (``DifferentialPrivacyServerSideFixedClipping``): it holds the inner
strategy, intercepts ``configure_train`` (to see the round's global model) and
``aggregate_train``, and forwards everything else. The round itself is
:class:`flwr_alie.engine.RoundEngine`'s.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Collection, Iterable
from typing import Literal

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import Strategy

from flwr_alie._wrapping import StrategyWrapper, reply_weight
from flwr_alie.attacks import Direction
from flwr_alie.config import (
    TAG_BYZANTINE,
    TAG_PARTITION_ID,
    TAG_RECORD_KEY,
    TAG_SKIPPED_TRAINING,
    ALIEConfig,
    Knowledge,
)
from flwr_alie.engine import KEY_SECONDS, Reply, engine_for, reply_order
from flwr_alie.params import (
    Layers,
    arrays_from_layers,
    layers_from_record,
    layers_from_reply,
    record_from_layers,
)

__all__ = ["ALIEStrategy"]


class ALIEStrategy(StrategyWrapper):
    """Run ALIE on each training round, then aggregate with the wrapped strategy.

    For Message-API strategies (``flwr.serverapp.strategy``: FedAvg, FedMedian,
    FedTrimmedAvg, Krum, MultiKrum, Bulyan, the defences of
    :mod:`flwr_alie.defenses`, a user's own). The Byzantine nodes are those whose
    train reply carries the tag of :func:`flwr_alie.mod.alie_mod`.

    In each round: the replies are sorted by partition id; error replies are set
    aside; the honest updates (differences from the round's global model) give the
    crafted update; every Byzantine reply gets new arrays (same keys, shapes and
    dtypes; non-floating arrays as the node sent them); the tags are stripped; all
    replies, error replies included, go to the wrapped strategy's
    ``aggregate_train``. The caller's messages are never modified.

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
    byzantine_ids : Collection[int], optional
        The Byzantine partitions, when known: each round then warns, naming them,
        about those that sent no reply, and reports their count as
        ``alie.num-missing-byzantine`` (for runs that train on every node).

    Notes
    -----
    A Byzantine node that skipped training (oracle mode) sends the global model
    back; its metrics are replaced by those of the honest reply with the median
    weight, so that it claims a typical number of examples. The train metrics of a
    round gain ``alie.attacked`` (1 or 0), ``alie.z``, ``alie.num-honest``,
    ``alie.num-byzantine``, ``alie.distance`` (L2 distance of the crafted update
    from the honest mean), ``alie.honest-spread`` (root-mean-square distance of an
    honest update from the honest mean, ``||sigma||_2``), ``alie.distance-sigma``
    (the distance in units of the honest spread), ``alie.aggregate-to-crafted`` and
    ``alie.aggregate-to-mean`` (where the wrapped strategy's aggregate landed, in
    honest spreads: 0 to the crafted update when Krum selected it) and
    ``alie.seconds`` (the wrapper's own time in the round).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        z: float | Literal["max"] = "max",
        direction: Direction = Direction.NEGATIVE,
        knowledge: Knowledge = "oracle",
        device: str = "auto",
        byzantine_ids: Collection[int] | None = None,
    ) -> None:
        super().__init__(
            strategy, hint="; wrap legacy strategies in ALIELegacyStrategy"
        )
        self.engine = engine_for(z, direction, knowledge, device, byzantine_ids)

    @property
    def config(self) -> ALIEConfig:
        """The attack options."""
        return self.engine.config

    @classmethod
    def from_config(
        cls, strategy: Strategy, config: ALIEConfig, *, num_nodes: int | None = None
    ) -> ALIEStrategy:
        """Wrap `strategy` with the server-side options of `config`.

        With `num_nodes`, the Byzantine partitions of `config` among them are
        expected to reply each round (see `byzantine_ids`).
        """
        return cls(
            strategy,
            z=config.z,
            direction=config.direction,
            knowledge=config.knowledge,
            device=config.device,
            byzantine_ids=None
            if num_nodes is None
            else config.byzantine_partitions(num_nodes),
        )

    def __repr__(self) -> str:
        """Name the wrapped strategy and the options."""
        return f"ALIEStrategy({self.strategy!r}, {self.engine!r})"

    def summary(self) -> None:
        """Log the attack settings, then the wrapped strategy's summary."""
        self.engine.log_settings()
        super().summary()

    def _remember(self, server_round: int, global_layers: Layers) -> None:
        self.engine.remember(server_round, global_layers)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replace the Byzantine updates by the ALIE update, then delegate."""
        started = time.perf_counter()
        replies = list(replies)
        valid = sorted((m for m in replies if not m.has_error()), key=_order)
        errors = [m for m in replies if m.has_error()]
        weight_key = str(getattr(self.strategy, "weighted_by_key", "num-examples"))
        views = [_view(m, weight_key) for m in valid]
        malformed = self.engine.malformed(server_round, views)
        if malformed:
            errors += [
                _as_error(valid[i], f"malformed reply: {why}")
                for i, why in malformed.items()
            ]
            valid = [m for i, m in enumerate(valid) if i not in malformed]
            views = [v for i, v in enumerate(views) if i not in malformed]
        result = self.engine.attack(server_round, views)
        if result.dropped:
            errors += [
                _as_error(valid[i], "Byzantine node without a crafted update")
                for i in result.dropped
            ]
        crafted = (
            None
            if result.crafted is None
            else arrays_from_layers(
                {k: result.crafted[k] for k in result.replaced_keys}
            )
        )
        template = None if result.template is None else valid[result.template]
        forwarded = [
            _rebuild(m, v, crafted, template, weight_key)
            for i, (m, v) in enumerate(zip(valid, views, strict=True))
            if i not in result.dropped
        ]
        seconds = time.perf_counter() - started
        arrays, metrics = self.strategy.aggregate_train(
            server_round, forwarded + errors
        )
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        aggregate = None if arrays is None else layers_from_record(arrays)
        telemetry = {
            **result.metrics,
            **self.engine.aggregate_metrics(server_round, result, aggregate),
            KEY_SECONDS: seconds,
        }
        for key, value in telemetry.items():
            merged[key] = value
        return arrays, merged


def _tag(message: Message) -> ConfigRecord | None:
    tag = message.content.get(TAG_RECORD_KEY)
    return tag if isinstance(tag, ConfigRecord) else None


def _partition(message: Message) -> object:
    tag = _tag(message)
    return None if tag is None else tag.get(TAG_PARTITION_ID)


def _order(message: Message) -> tuple[int, int]:
    return reply_order(_partition(message), message.metadata.src_node_id)


def _view(message: Message, weight_key: str) -> Reply:
    tag = _tag(message)
    partition = _partition(message)
    name = (
        f"partition {partition} (node {message.metadata.src_node_id})"
        if isinstance(partition, int)
        else f"node {message.metadata.src_node_id}"
    )

    return Reply(
        partition=partition if isinstance(partition, int) else None,
        name=name,
        byzantine=bool(tag is not None and tag.get(TAG_BYZANTINE, False)),
        skipped=bool(tag is not None and tag.get(TAG_SKIPPED_TRAINING, False)),
        weight=reply_weight(message, weight_key),
        read_layers=functools.partial(layers_from_reply, message, name),
    )


def _as_error(message: Message, reason: str) -> Message:
    """Return a failed reply in place of `message`: the wrapped strategy skips it."""
    error = Error(code=ErrorCode.UNKNOWN, reason=f"flwr-alie: {reason}")
    # the reply's own metadata (Flower's overloads list reply_to= only)
    failed: Message = Message(error=error, metadata=copy.copy(message.metadata))  # type: ignore[call-overload]
    return failed


def _rebuild(
    message: Message,
    view: Reply,
    crafted: dict[str, Array] | None,
    template: Message | None,
    weight_key: str,
) -> Message:
    """Return `message` without the tag; a Byzantine one with the crafted arrays."""
    content = message.content
    if TAG_RECORD_KEY not in content and not view.byzantine:
        return message
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    for key, record in content.items():
        if key == TAG_RECORD_KEY:
            continue
        if view.byzantine and crafted is not None and isinstance(record, ArrayRecord):
            record = record_from_layers(crafted, base=record)
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
