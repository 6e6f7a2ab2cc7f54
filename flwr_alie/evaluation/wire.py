"""The wire between the evaluation's ServerApp and ClientApp, and the row schema.

Everything both sides of the evaluation agree on is here, once:

- **A cell's task, as records.** :class:`TaskOptions` is what a client needs to know
  of a cell (the data, the model, the local regime); the ServerApp writes it into
  the train messages' ConfigRecord (:meth:`TaskOptions.to_record`, with the cell's
  ``alie.*`` keys for the ALIE mod), and the ClientApp reads it back, typed and
  checked (:meth:`TaskOptions.from_record`). Each key is its field's name, so a new
  task option is one field here.
- **A block of partitions per message.** Flower's Simulation Engine costs about
  10 ms a client message, far more than a FedSGD step. So the ServerApp sends one
  Message per *block* of a cell's partitions (:func:`pack_block`); the ClientApp
  opens it into one Message per partition (:func:`open_block`), runs each through
  the per-partition app, and packs the replies (:func:`close_block`); the ServerApp
  splits them back into one reply per partition (:func:`split_block_reply`), each
  with its partition's node id as source and replying to its own instruction.
  Records that several partitions' replies hold alike (the weights of a vectorised
  pass) may travel stacked, one array a layer (:class:`Stacked`); each partition's
  reply gets its own record of its rows, and a stack that does not match its
  description fails the partitions it names, by name.
- **The row schema** of ``results.jsonl``: :func:`row_columns` (a cell's
  configuration columns) and the ``ROW_*`` keys of a round's outcome.
"""

from __future__ import annotations

import dataclasses
import typing
import uuid
from collections.abc import Sequence
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from flwr_alie.evaluation.grid import Cell
from flwr_alie.params import arrays_of_rows, layers_from_record, record_from_layers

__all__ = [
    "BLOCK_ACTION",
    "NODE_ID_BASE",
    "ROW_ACCURACY",
    "ROW_CELL",
    "ROW_CELL_SECONDS",
    "ROW_LOSS",
    "ROW_REASON",
    "ROW_ROUND",
    "ROW_STATUS",
    "STATUS_ERROR",
    "STATUS_INVALID",
    "STATUS_OK",
    "TASK_PREFIX",
    "Block",
    "Stacked",
    "TaskOptions",
    "close_block",
    "open_block",
    "pack_block",
    "partition_node_id",
    "row_columns",
    "split_block_reply",
]

# ------------------------------------------------------------------ the task

TASK_PREFIX = "task."
"""Prefix of the task options' keys in a train message's ConfigRecord."""


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """What a client needs of a cell: its data, model and local regime.

    The fields are :class:`~flwr_alie.evaluation.grid.Cell`'s of the same name
    (``cell`` is the cell's key): they travel in the train messages' ConfigRecord
    under ``task.<field>`` (underscores as dashes), typed as declared here.
    """

    cell: str
    dataset: str
    split: str
    alpha: float
    seed: int
    rounds: int
    epochs: int
    steps: int
    lr: float
    batch_size: int
    model: str
    worker_momentum: float
    vectorised: bool
    device: str

    @classmethod
    def of(cls, cell: Cell) -> TaskOptions:
        """Return the task options of `cell`."""
        values = {f.name: getattr(cell, f.name) for f in _FIELDS if f.name != "cell"}
        return cls(cell=cell.key, **values)

    def to_record(self, alie: dict[str, Any] | None = None) -> ConfigRecord:
        """Return the ConfigRecord of a cell's train messages (plus `alie` keys)."""
        record = ConfigRecord({_key(f.name): getattr(self, f.name) for f in _FIELDS})
        for key, value in (alie or {}).items():
            record[key] = value
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TaskOptions:
        """Read the options back; ``ValueError`` names a missing or mistyped key."""
        values: dict[str, Any] = {}
        for f in _FIELDS:
            key, kind = _key(f.name), _TYPES[f.name]
            value = record.get(key)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ValueError(
                    f"Expected {key!r} in the train message's config to be a "
                    f"{kind.__name__}, got {value!r}; the ServerApp and ClientApp "
                    "must come from the same flwr-alie"
                )
            values[f.name] = value
        return cls(**values)


_FIELDS = dataclasses.fields(TaskOptions)
_TYPES: dict[str, type] = typing.get_type_hints(TaskOptions)


def _key(name: str) -> str:
    return TASK_PREFIX + name.replace("_", "-")


# ------------------------------------------------------------------ the rows

ROW_CELL = "cell"
ROW_ROUND = "round"
ROW_STATUS = "status"
ROW_REASON = "reason"
ROW_ACCURACY = "accuracy"
ROW_LOSS = "loss"
ROW_CELL_SECONDS = "cell_seconds"
STATUS_OK, STATUS_INVALID, STATUS_ERROR = "ok", "invalid", "error"


def row_columns(cell: Cell) -> dict[str, object]:
    """Return the configuration columns of a cell's rows: every field of the cell.

    Plus its key (``cell``), its ``attack`` label and ``num_byzantine``; ``z``,
    ``direction`` and ``knowledge`` of a clean cell read ``"none"``.

    Examples
    --------
    >>> from flwr_alie.evaluation.grid import Cell
    >>> row = row_columns(Cell(strategy="krum", split="iid", seed=0, declared=2))
    >>> row["cell"], row["attack"], row["z"], row["num_byzantine"]
    ('krum@f2/clean/byz0/iid/seed0', 'clean', 'none', 0)
    """
    fields = dataclasses.asdict(cell)
    for name in ("z", "direction", "knowledge"):
        if fields[name] is None:
            fields[name] = "none"
    fields["byzantine_ids"] = list(cell.byzantine_ids)
    return {
        ROW_CELL: cell.key,
        "attack": cell.attack,
        "num_byzantine": len(cell.byzantine_ids),
        **fields,
    }


# ------------------------------------------------------------------ blocks

BLOCK_ACTION = "block"
"""The action of a block message: ``train.block`` carries train instructions."""

NODE_ID_BASE = 1000
"""Partition ``p`` of a cell shows as node ``NODE_ID_BASE + p`` to its strategy."""

_HEADER = "block"  # the ConfigRecord that describes a block
_LAYOUT = "block.layout"  # "<position>/<record name>" -> the record's slot
_SLOT = "slot/"  # slot k of a block instruction: one distinct record
_OK = -1  # the code of a partition that replied without an error
_STACK = "stack/"  # stacked record k of a block reply: rows of several partitions'
_STACK_NAMES = "stack-names"  # the record name of each stack in its partitions' replies


def partition_node_id(partition: int) -> int:
    """Return the node id a cell's strategy sees for `partition`."""
    return NODE_ID_BASE + partition


@dataclasses.dataclass(frozen=True)
class Block:
    """A block opened on the client: its partitions' own instruction Messages."""

    partitions: tuple[int, ...]
    num_partitions: int
    messages: tuple[Message, ...]


def pack_block(
    instructions: Sequence[Message],
    partitions: Sequence[int],
    *,
    num_partitions: int,
    dst_node_id: int,
) -> Message:
    """Return one Message carrying `instructions` (one per partition) to a node.

    Instructions must share a message type (``train``: the block is
    ``train.block``). A record shared by several instructions (Flower's strategies
    send one RecordDict to every node) travels once.
    """
    types = {m.metadata.message_type for m in instructions}
    if len(types) != 1:
        raise ValueError(f"Expected one message type in a block, got {sorted(types)}")
    (message_type,) = types
    slots: dict[int, int] = {}  # id(record) -> slot
    content = RecordDict()
    layout = ConfigRecord()
    for position, message in enumerate(instructions):
        for name, record in message.content.items():
            if id(record) not in slots:
                slots[id(record)] = len(slots)
                content[f"{_SLOT}{slots[id(record)]}"] = record
            layout[f"{position}/{name}"] = slots[id(record)]
    content[_LAYOUT] = layout
    content[_HEADER] = ConfigRecord(
        {
            "partitions": [int(p) for p in partitions],
            "message-ids": [m.metadata.message_id for m in instructions],
            "message-type": message_type,
            "num-partitions": int(num_partitions),
        }
    )
    category = message_type.split(".")[0]
    return Message(
        content,
        dst_node_id=dst_node_id,
        message_type=f"{category}.{BLOCK_ACTION}",
        group_id=instructions[0].metadata.group_id,
    )


def open_block(message: Message) -> Block:
    """Return the partitions of a block instruction and their own Messages."""
    content = message.content
    header = content.config_records[_HEADER]
    layout = content.config_records[_LAYOUT]
    partitions = tuple(_ints(header["partitions"]))
    ids = [str(i) for i in _list(header["message-ids"])]
    records: list[dict[str, ArrayRecord | MetricRecord | ConfigRecord]] = [
        {} for _ in partitions
    ]
    for key, slot in layout.items():
        position, name = key.split("/", 1)
        records[int(position)][name] = content[f"{_SLOT}{slot!s}"]
    meta = message.metadata
    messages = tuple(
        _with_metadata(
            RecordDict(records[j]),
            Metadata(
                run_id=meta.run_id,
                message_id=ids[j],
                src_node_id=meta.src_node_id,
                dst_node_id=partition_node_id(p),
                reply_to_message_id="",
                group_id=meta.group_id,
                created_at=meta.created_at,
                ttl=meta.ttl,
                message_type=str(header["message-type"]),
            ),
        )
        for j, p in enumerate(partitions)
    )
    return Block(partitions, int(header["num-partitions"]), messages)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Stacked:
    """One record of several partitions' replies, as stacked layers.

    Row ``r`` of each layer (``(len(positions), *shape)``) is the layer of the
    partition at ``positions[r]`` of the block: that partition's reply holds the
    ArrayRecord `name` of those rows, once split (:func:`split_block_reply`). The
    layers travel as one array each, not as one per partition: a FedSGD block of
    51 partitions of the 1-D CNN sends 8 arrays instead of 408.
    """

    name: str
    layers: dict[str, NDArray[Any]]
    positions: tuple[int, ...]


def close_block(
    message: Message,
    block: Block,
    replies: Sequence[Message],
    stacked: Sequence[Stacked] = (),
) -> Message:
    """Return the reply to a block: every partition's reply (or error) in one.

    A record in `stacked` is part of the replies of the partitions it names;
    those replies must not hold a record of that name themselves.
    """
    content = RecordDict()
    codes, reasons = [], []
    for position, reply in enumerate(replies):
        if reply.has_error():
            codes.append(int(reply.error.code))
            reasons.append(str(reply.error.reason))
            continue
        codes.append(_OK)
        reasons.append("")
        for name, record in reply.content.items():
            content[f"{position}/{name}"] = record
    header = ConfigRecord(
        {"partitions": list(block.partitions), "codes": codes, "reasons": reasons}
    )
    if stacked:
        header[_STACK_NAMES] = [stack.name for stack in stacked]
    for k, stack in enumerate(stacked):
        content[f"{_STACK}{k}"] = record_from_layers(stack.layers)
        header[f"{_STACK}{k}"] = [int(p) for p in stack.positions]
    content[_HEADER] = header
    return Message(content, reply_to=message)


def split_block_reply(
    reply: Message, instructions: Sequence[Message], partitions: Sequence[int]
) -> list[Message]:
    """Return one reply per instruction of a block, from the block's reply.

    Each reply has its partition's node id as source, replies to its own
    instruction, and holds that partition's records, or its error. A block that
    failed as a whole (the node was lost, the ClientApp raised) gives every
    partition that error; a partition the block reply lacks gets an error naming
    it.
    """
    per_partition: list[RecordDict | Error]
    if reply.has_error():
        per_partition = [reply.error] * len(instructions)
    else:
        per_partition = _unpack_replies(reply, partitions)
    return [
        _reply_to(instruction, result, reply.metadata)
        for instruction, result in zip(instructions, per_partition, strict=True)
    ]


def _unpack_replies(
    reply: Message, partitions: Sequence[int]
) -> list[RecordDict | Error]:
    content = reply.content
    header = content.config_records.get(_HEADER)
    count = len(partitions)
    codes = _ints(None if header is None else header.get("codes"))
    reasons = None if header is None else header.get("reasons")
    if (
        header is None
        or _ints(header.get("partitions")) != [int(p) for p in partitions]
        or len(codes) != count
        or not isinstance(reasons, list)
        or len(reasons) != count
    ):
        error = Error(
            code=ErrorCode.UNKNOWN,
            reason="flwr-alie: the block's reply does not describe the block's "
            f"partitions {list(partitions)}",
        )
        return [error] * count
    records: list[dict[str, ArrayRecord | MetricRecord | ConfigRecord]] = [
        {} for _ in partitions
    ]
    for key, record in content.items():
        position, _, name = key.partition("/")
        if key != _HEADER and position.isdigit() and int(position) < count and name:
            records[int(position)][name] = record
    malformed: dict[int, str] = {}
    for k, stack_name in enumerate(_list(header.get(_STACK_NAMES))):
        stack_key = f"{_STACK}{k}"
        positions = _ints(header.get(stack_key))
        stack = content.array_records.get(stack_key)
        fault = _unstack(stack, stack_key, positions, str(stack_name), records)
        if fault is not None:  # its partitions reply without their arrays
            for p in positions:
                if 0 <= p < count:
                    malformed.setdefault(p, fault)
    return [
        Error(code=codes[j], reason=str(reasons[j]))
        if codes[j] != _OK
        else Error(
            code=ErrorCode.UNKNOWN,
            reason=f"flwr-alie: the reply of partition {partitions[j]} is "
            f"malformed: {malformed[j]}",
        )
        if j in malformed
        else RecordDict(records[j])
        for j in range(count)
    ]


def _unstack(
    record: ArrayRecord | None,
    key: str,
    positions: list[int],
    name: str,
    records: list[dict[str, ArrayRecord | MetricRecord | ConfigRecord]],
) -> str | None:
    """Give each partition of a stacked record (`key`) its row (:class:`Stacked`).

    Return the fault of a stack that does not match its description, if any: its
    partitions then get no row.
    """
    if not positions or len(set(positions)) != len(positions):
        return f"stack {key!r} names positions {positions}"
    if not all(0 <= p < len(records) for p in positions):
        return f"stack {key!r} names positions {positions} of {len(records)}"
    if record is None:
        return f"stack {key!r} is missing"
    try:
        layers = layers_from_record(record)
    except Exception as err:  # a hostile node's bytes fail NumPy in many ways
        return f"stack {key!r} is unreadable: {err}"
    wrong = {
        k: v.shape[:1] for k, v in layers.items() if v.shape[:1] != (len(positions),)
    }
    if wrong:
        return f"stack {key!r} has {wrong} rows for {len(positions)} partitions"
    if any(name in records[p] for p in positions):
        return f"stack {key!r} and a partition both send record {name!r}"
    columns = {k: arrays_of_rows(v) for k, v in layers.items()}
    for row, p in enumerate(positions):
        records[p][name] = record_from_layers({k: c[row] for k, c in columns.items()})
    return None


def _reply_to(
    instruction: Message, result: RecordDict | Error, meta: Metadata
) -> Message:
    ins = instruction.metadata
    metadata = Metadata(
        run_id=ins.run_id,
        message_id=str(uuid.uuid4()),
        src_node_id=ins.dst_node_id,
        dst_node_id=ins.src_node_id,
        reply_to_message_id=ins.message_id,
        group_id=ins.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=ins.message_type,
    )
    return _with_metadata(result, metadata)


def _with_metadata(body: RecordDict | Error, metadata: Metadata) -> Message:
    """Return a Message with explicit metadata (Flower's overloads omit it)."""
    if isinstance(body, Error):
        return Message(error=body, metadata=metadata)  # type: ignore[call-overload,no-any-return]
    return Message(content=body, metadata=metadata)  # type: ignore[call-overload,no-any-return]


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _ints(value: object) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return []
    return [int(v) for v in value]
