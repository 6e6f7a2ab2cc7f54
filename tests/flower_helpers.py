"""Hand-built Flower messages and a recording inner strategy: tests without a run."""

import contextlib
import logging
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from flwr_alie.config import (
    TAG_BYZANTINE,
    TAG_PARTITION_ID,
    TAG_RECORD_KEY,
    TAG_SKIPPED_TRAINING,
)


def metadata(node_id: int, message_type: str = "train") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"msg-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node_id}",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )


def instruction(
    dst_node_id: int, content: RecordDict, message_type: str = "train"
) -> Message:
    """An instruction Message as a grid pushes it: with its id, to one node."""
    return Message(
        content=content,
        metadata=Metadata(
            run_id=1,
            message_id=f"ins-{dst_node_id}",
            src_node_id=1,
            dst_node_id=dst_node_id,
            reply_to_message_id="",
            group_id="1",
            created_at=0.0,
            ttl=3600.0,
            message_type=message_type,
        ),
    )


def record(layers: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in layers.items()})


def train_reply(
    node_id: int,
    layers: dict[str, np.ndarray],
    num_examples: int = 10,
    *,
    partition_id: int | None = None,
    byzantine: bool | None = None,
    skipped: bool = False,
    loss: float = 0.5,
) -> Message:
    content = RecordDict(
        {
            "arrays": record(layers),
            "metrics": MetricRecord({"num-examples": num_examples, "loss": loss}),
        }
    )
    if byzantine is not None:
        tag = ConfigRecord({TAG_BYZANTINE: byzantine, TAG_SKIPPED_TRAINING: skipped})
        if partition_id is not None:
            tag[TAG_PARTITION_ID] = partition_id
        content[TAG_RECORD_KEY] = tag
    return Message(content=content, metadata=metadata(node_id))


def error_reply(node_id: int) -> Message:
    return Message(
        error=Error(code=0, reason="node failed"), metadata=metadata(node_id)
    )


def layers_of(message: Message) -> dict[str, np.ndarray]:
    (rec,) = message.content.array_records.values()
    return {k: a.numpy() for k, a in rec.items()}


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps a snapshot of what it was asked to aggregate."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.received = [
            {
                "node": m.metadata.src_node_id,
                "error": m.has_error(),
                "records": None if m.has_error() else sorted(m.content.keys()),
                "layers": None if m.has_error() else layers_of(m),
                "metrics": None
                if m.has_error()
                else dict(next(iter(m.content.metric_records.values()))),
            }
            for m in replies
        ]
        return super().aggregate_train(server_round, replies)


class StubGrid:
    """Just enough of a Grid for ``configure_train``: a fixed set of node ids."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@contextlib.contextmanager
def flwr_log(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Collect what is logged through Flower's logger at `level` and above."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=level)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    previous = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
