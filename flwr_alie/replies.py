"""Train replies as a round sees them: read strictly, and checked before any strategy.

A :class:`Reply` is what a round needs of one train reply, whichever Flower API it
came in; :func:`message_view` reads one from a Message-API reply (the tag of
:func:`flwr_alie.mod.alie_mod` parsed strictly: ``byzantine`` a bool,
``partition-id`` a non-negative int), and :func:`validate` names the replies no
strategy should see: :class:`flwr_alie.ALIEStrategy`, the legacy wrapper and the
defences of :mod:`flwr_alie.defenses` all set them aside as failures
(:func:`as_failure`), so that one hostile client cannot end a run or corrupt an
aggregate without a word.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from logging import WARNING

from flwr.app import ConfigRecord, Error, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode

from flwr_alie.config import (
    TAG_BYZANTINE,
    TAG_PARTITION_ID,
    TAG_RECORD_KEY,
    TAG_SKIPPED_TRAINING,
)
from flwr_alie.params import Layers, PackSpec, layers_from_reply

__all__ = [
    "Reply",
    "as_failure",
    "message_view",
    "reply_order",
    "reply_weight",
    "validate",
]

_UNTAGGED = 1 << 62  # untagged replies sort after tagged ones


def reply_order(partition_id: object, fallback: int) -> tuple[int, int]:
    """Sort key of a reply: its partition id if tagged, else after all tagged ones.

    Flower hands replies over in arrival order; sorting by this key makes a round
    deterministic.
    """
    if isinstance(partition_id, int) and not isinstance(partition_id, bool):
        return (partition_id, 0)
    return (_UNTAGGED, fallback)


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the round needs of one train reply, as its adapter read it.

    Attributes
    ----------
    name : str
        How warnings name the reply (``"partition 3 (node 42)"``, ``"node 42"``).
    byzantine, skipped : bool
        Tagged Byzantine; skipped local training (sent the global model back).
    weight : float
        Its sample count, as the wrapped strategy weighs it (NaN if none).
    read_layers : Callable[[], Layers]
        Reads the reply's arrays (views, not copies) when the round needs them.
    partition : int, optional
        The partition id the client side tagged the reply with.
    metric_keys : frozenset of str, optional
        The keys of its metrics, when the API has any (``None``: not compared).
    problem : str, optional
        What the adapter found wrong with the reply's tag or records (a tag that
        is not a bool or an int, no MetricRecord, two of them): it is set aside.
    """

    name: str
    byzantine: bool
    skipped: bool
    weight: float
    read_layers: Callable[[], Layers]
    partition: int | None = None
    metric_keys: frozenset[str] | None = None
    problem: str | None = None

    @functools.cached_property
    def layers(self) -> Layers:
        """The reply's arrays, read once a round (views of its bytes, no copy)."""
        return self.read_layers()


def validate(
    server_round: int,
    replies: Sequence[Reply],
    global_layers: Layers | None,
    who: str = "ALIE",
) -> dict[int, str]:
    """Return the replies no strategy should see, index -> why, each logged.

    Each warning starts with `who` and the round (``"ALIE round 3: ..."``; a
    defence that screens its own replies names itself).

    A reply is set aside when its adapter found a problem with its tag or records;
    when its sample count is not a finite number > 0; when its metric keys differ
    from those most of the round's replies have (Byzantine replies that skipped
    training are not compared: they get an honest reply's metrics); when its arrays
    do not fit the global model (keys, shapes, dtypes: a float64 array in a
    float32 model too); and when it is the second reply of one partition.
    """
    found: dict[int, str] = {}
    compared = [
        r.metric_keys
        for r in replies
        if r.metric_keys is not None and not (r.byzantine and r.skipped)
    ]
    usual = Counter(compared).most_common(1)[0][0] if compared else None
    spec = None if global_layers is None else PackSpec.of(global_layers)
    seen: dict[int, str] = {}
    for i, reply in enumerate(replies):
        problem = _problem(reply, usual, spec)
        if problem is None and reply.partition is not None:
            if reply.partition in seen:
                problem = f"a second reply of partition {reply.partition}"
            else:
                seen[reply.partition] = reply.name
        if problem is not None:
            found[i] = problem
            log(WARNING, "%s round %d: %s: %s; the reply goes on as a failure",
                who, server_round, reply.name, problem)  # fmt: skip
    return found


def _problem(
    reply: Reply, usual: frozenset[str] | None, spec: PackSpec | None
) -> str | None:
    if reply.problem is not None:
        return reply.problem
    if not (math.isfinite(reply.weight) and reply.weight > 0):
        return f"its sample count is {reply.weight!r}, not a finite number > 0"
    keys = reply.metric_keys
    compared = usual is not None and keys is not None
    if compared and not (reply.byzantine and reply.skipped) and keys != usual:
        return (
            f"its metric keys {sorted(keys or ())} differ from the round's "
            f"{sorted(usual or ())}"
        )
    if spec is not None:
        try:
            spec.check(reply.layers, reply.name, exact_dtypes=True)
        except (TypeError, ValueError) as err:  # unreadable arrays too
            return f"malformed arrays: {err}"
    return None


# ------------------------------------------------------------ the Message API


def reply_weight(message: Message, key: str) -> float:
    """Return a train reply's sample count: the number under `key` in its metrics.

    The last MetricRecord that holds a number (not a bool) under `key` counts; NaN
    if none does (which :func:`validate` refuses).
    """
    weight = math.nan
    for record in message.content.values():  # not .metric_records: it copies
        if isinstance(record, MetricRecord):
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                weight = float(value)
    return weight


def message_view(message: Message, weight_key: str) -> Reply:
    """Read a Message-API train reply into a :class:`Reply`, its tag strictly.

    A tag (the ``"alie"`` ConfigRecord) whose ``byzantine`` or ``skipped-training``
    is not a bool, or whose ``partition-id`` is not a non-negative int, and a reply
    without exactly one MetricRecord, become the view's ``problem``: such a reply
    is set aside.
    """
    node = message.metadata.src_node_id
    content = message.content
    problems = []
    tag = content.get(TAG_RECORD_KEY)
    if tag is not None and not isinstance(tag, ConfigRecord):
        problems.append(f"its {TAG_RECORD_KEY!r} record is a {type(tag).__name__}")
        tag = None
    fields = tag if tag is not None else ConfigRecord()
    byzantine = fields.get(TAG_BYZANTINE, False)
    skipped = fields.get(TAG_SKIPPED_TRAINING, False)
    partition = fields.get(TAG_PARTITION_ID)
    for key, value in ((TAG_BYZANTINE, byzantine), (TAG_SKIPPED_TRAINING, skipped)):
        if not isinstance(value, bool):
            problems.append(f"its tag's {key!r} is {value!r}, not a bool")
    if partition is not None and (
        isinstance(partition, bool) or not isinstance(partition, int) or partition < 0
    ):
        problems.append(
            f"its tag's {TAG_PARTITION_ID!r} is {partition!r}, not an int >= 0"
        )
        partition = None
    metric_records = [r for r in content.values() if isinstance(r, MetricRecord)]
    if len(metric_records) != 1:
        problems.append(f"it holds {len(metric_records)} MetricRecords, not one")
    name = (
        f"partition {partition} (node {node})"
        if partition is not None
        else f"node {node}"
    )
    return Reply(
        name=name,
        byzantine=byzantine is True,
        skipped=skipped is True,
        weight=reply_weight(message, weight_key),
        read_layers=functools.partial(layers_from_reply, message, name),
        partition=partition if isinstance(partition, int) else None,
        metric_keys=frozenset(metric_records[0]) if len(metric_records) == 1 else None,
        problem="; ".join(problems) or None,
    )


def as_failure(message: Message, reason: str) -> Message:
    """Return a failed reply in place of `message`: the wrapped strategy skips it."""
    error = Error(code=ErrorCode.UNKNOWN, reason=f"flwr-alie: {reason}")
    # the reply's own metadata (Flower's overloads list reply_to= only)
    failed: Message = Message(error=error, metadata=copy.copy(message.metadata))  # type: ignore[call-overload]
    return failed
