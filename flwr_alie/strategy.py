"""ALIE as a Message-API strategy wrapper: craft the Byzantine replies, then delegate.

Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019. Shaped like Flower's
own wrappers (``DifferentialPrivacyServerSideFixedClipping``): it holds the wrapped
strategy, intercepts ``configure_train`` (to see the round's global model) and
``aggregate_train``, and forwards everything else. The round itself is
:class:`flwr_alie.engine.RoundEngine`'s.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from flwr_alie._wrapping import StrategyWrapper, describe
from flwr_alie.config import TAG_PARTITION_ID, TAG_RECORD_KEY, ALIEConfig
from flwr_alie.engine import KEY_BELOW_LIMIT, KEY_SECONDS, RoundEngine, RoundResult
from flwr_alie.limits import replies_problems
from flwr_alie.params import arrays_from_layers, layers_from_record, record_from_layers
from flwr_alie.replies import Reply, as_failure, message_view, reply_order

__all__ = ["ALIEStrategy"]


class ALIEStrategy(StrategyWrapper):
    """Run ALIE on each training round, then aggregate with the wrapped strategy.

    For Message-API strategies (``flwr.serverapp.strategy``: FedAvg, FedMedian,
    FedTrimmedAvg, Krum, MultiKrum, Bulyan, the defences of
    :mod:`flwr_alie.defenses`, a user's own). The Byzantine nodes are those whose
    train reply carries the tag of :func:`flwr_alie.mod.alie_mod`.

    In each round: the replies are sorted by partition id; error replies are set
    aside, and so are the replies no strategy should see
    (:func:`flwr_alie.replies.validate`: a malformed tag, metrics, sample count or
    arrays, a second reply of one partition), each named in a warning; the honest
    updates (differences from the round's global model) give the crafted update;
    every Byzantine reply gets new arrays (same keys, shapes and dtypes;
    non-floating arrays as the node sent them); the tags are stripped; all
    replies, failures included, go to the wrapped strategy's ``aggregate_train``.
    The caller's messages are never modified.

    Parameters
    ----------
    strategy : Strategy
        The strategy whose aggregation is evaluated; it is not copied.
    config : ALIEConfig, optional
        The attack's options (``ALIEConfig()`` when ``None``): ``z``,
        ``direction``, ``knowledge``, ``device``, and the Byzantine partitions
        (``byzantine_ids``, or ``fraction`` with `num_nodes`).
    num_nodes : int, optional
        The number of partitions, when the Byzantine ones are drawn by
        ``fraction``: with it (or with ``byzantine_ids``), each round warns, naming
        them, about the Byzantine partitions that sent no reply and those that
        claim to be Byzantine without being expected, and counts them in
        ``alie.num-missing-byzantine`` and ``alie.num-unexpected-byzantine``.

    Notes
    -----
    A Byzantine node that skipped training (oracle mode) sends the global model
    back; its metrics are replaced by those of the honest reply with the median
    weight, so that it claims a typical number of examples. The train metrics of a
    round gain ``alie.attacked`` (1 or 0), ``alie.skip-reason``
    (:class:`flwr_alie.engine.SkipReason`), ``alie.z``, ``alie.num-honest``,
    ``alie.num-byzantine``, ``alie.num-rejected`` (replies set aside),
    ``alie.distance`` (L2 distance of the crafted update from the honest mean),
    ``alie.honest-spread`` (``||sigma||_2``), ``alie.distance-sigma``,
    ``alie.aggregate-to-crafted`` and ``alie.aggregate-to-mean`` (where the wrapped
    strategy's aggregate landed, in honest spreads: 0 to the crafted update when
    Krum selected it), ``alie.below-limit`` (1 when fewer replies reached the
    strategy than it needs, :func:`flwr_alie.check_setup`) and ``alie.seconds``
    (the wrapper's own time in the round).

    Examples
    --------
    >>> from flwr.serverapp.strategy import Krum
    >>> ALIEStrategy(Krum(num_malicious_nodes=2), ALIEConfig(z=1.5, device="cpu"))
    ... # doctest: +NORMALIZE_WHITESPACE
    ALIEStrategy(Krum(...), z=1.5, direction='negative', knowledge='oracle',
                 device='cpu')
    """

    def __init__(
        self,
        strategy: Strategy,
        config: ALIEConfig | None = None,
        *,
        num_nodes: int | None = None,
    ) -> None:
        super().__init__(
            strategy, hint="; wrap legacy strategies in ALIELegacyStrategy"
        )
        self.engine = RoundEngine(config or ALIEConfig(), num_nodes=num_nodes)

    @property
    def config(self) -> ALIEConfig:
        """The attack options."""
        return self.engine.config

    def __repr__(self) -> str:
        """Name the wrapped strategy and the options."""
        return f"ALIEStrategy({describe(self.strategy)}, {self.engine!r})"

    def _log_settings(self) -> None:
        self.engine.log_settings()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replace the Byzantine updates by the ALIE update, then delegate."""
        started = time.perf_counter()
        replies = list(replies)
        valid = sorted((m for m in replies if not m.has_error()), key=_order)
        errors = [m for m in replies if m.has_error()]
        weight_key = self.weight_key
        views = [message_view(m, weight_key) for m in valid]
        result = self.engine.attack(
            server_round, views, self.round_model.layers(server_round)
        )
        failed = {**result.rejected, **dict.fromkeys(result.dropped, _UNCRAFTED)}
        errors += [as_failure(valid[i], why) for i, why in failed.items()]
        forwarded = _forward(valid, views, result, failed, weight_key)
        metrics = dict(result.metrics)
        metrics[KEY_BELOW_LIMIT] = self._below_limit(server_round, len(forwarded))
        seconds = time.perf_counter() - started
        arrays, aggregated = self.strategy.aggregate_train(
            server_round, forwarded + errors
        )
        merged = MetricRecord(dict(aggregated) if aggregated is not None else {})
        aggregate = None if arrays is None else layers_from_record(arrays)
        metrics.update(self.engine.aggregate_metrics(result, aggregate))
        metrics[KEY_SECONDS] = seconds
        for key, value in metrics.items():
            merged[key] = value
        return arrays, merged

    def _below_limit(self, server_round: int, count: int) -> int:
        """Warn when fewer replies reach the strategy than it needs; 1 if so."""
        problems = replies_problems(self.strategy, count)
        if problems:
            log(WARNING, "ALIE round %d: %d replies reach %s: %s; its aggregate of "
                "this round is not the one it was configured for", server_round,
                count, type(self.strategy).__name__, "; ".join(problems))  # fmt: skip
        return int(bool(problems))


_UNCRAFTED = "Byzantine node without a crafted update"


def _order(message: Message) -> tuple[int, int]:
    tag = message.content.get(TAG_RECORD_KEY)
    partition = tag.get(TAG_PARTITION_ID) if isinstance(tag, ConfigRecord) else None
    return reply_order(partition, message.metadata.src_node_id)


def _forward(
    valid: list[Message],
    views: list[Reply],
    result: RoundResult,
    failed: dict[int, str],
    weight_key: str,
) -> list[Message]:
    """Return what the strategy gets: tags stripped, Byzantine replies crafted."""
    crafted = None if result.crafted is None else arrays_from_layers(result.crafted)
    template = None if result.template is None else valid[result.template]
    return [
        _rebuild(m, v, crafted, template, weight_key)
        for i, (m, v) in enumerate(zip(valid, views, strict=True))
        if i not in failed
    ]


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
