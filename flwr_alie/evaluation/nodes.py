"""The evaluation's SuperNodes: who serves which cell, blocks of partitions, polling.

A run's SuperNodes are a pool: the ServerApp waits for them (:func:`wait_for_nodes`)
and hands each running cell a *slot*, a few nodes of its own (:class:`NodeSlots`),
for as long as the cell runs. The cell's strategy sees a :class:`BlockGrid`: one
node per partition, so that Flower's own sampling, ``configure_train`` and
``aggregate_train`` run unchanged, while its messages travel a block of partitions
at a time to the slot's nodes (:mod:`flwr_alie.evaluation.wire`).

Flower's Simulation Engine hands a node one message per 0.1 s sweep, and each sweep
scans every stored message once for every node: a few nodes, each carrying a
block, serve a cell far faster than one node per partition.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from flwr_alie.evaluation.wire import pack_block, partition_node_id, split_block_reply

__all__ = ["BlockGrid", "NodeSlots", "wait_for_nodes"]


def wait_for_nodes(grid: Grid, count: int, timeout: float = 120) -> list[int]:
    """Return the run's node ids once `count` SuperNodes have registered.

    ``RuntimeError`` after `timeout` seconds with fewer.
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{len(node_ids)} of {count} SuperNodes registered within "
                f"{timeout:.0f} s"
            )
        time.sleep(0.05)
    return node_ids


class NodeSlots:
    """Hand each running cell a slot of `per_slot` nodes of its own.

    With fewer nodes than ``slots * per_slot``, slots share nodes (round robin):
    their messages then queue on the shared nodes, and the results are the same.
    """

    def __init__(self, node_ids: Sequence[int], *, slots: int, per_slot: int) -> None:
        if not node_ids:
            raise ValueError("Expected at least one node id, got none")
        ids = list(node_ids)
        self._slots: list[list[int]] = [
            [ids[(s * per_slot + b) % len(ids)] for b in range(per_slot)]
            for s in range(max(1, slots))
        ]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for s in range(len(self._slots)):
            self._free.put(s)

    @contextmanager
    def slot(self) -> Iterator[list[int]]:
        """Hold a free slot while the cell runs (waits for one)."""
        index = self._free.get()
        try:
            yield list(self._slots[index])
        finally:
            self._free.put(index)


class BlockGrid(Grid):
    """One cell's grid: a node per partition, messages a block of partitions each.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    num_partitions : int
        ``n``: :meth:`get_node_ids` returns one node id per partition
        (:func:`~flwr_alie.evaluation.wire.partition_node_id`).
    block_size : int
        ``K``: partitions ``b K .. (b + 1) K - 1`` travel as block ``b``.
    nodes : Sequence[int]
        The SuperNodes block ``b`` goes to (``nodes[b % len(nodes)]``).
    interval : float
        Seconds between polls for replies. Flower's own grids wait 0.1 s or 3 s;
        a block's round trip takes at least one of the Simulation Engine's 0.1 s
        sweeps, and each poll takes the SuperLink state's lock: measured with 12
        cells in flight, polling every 5 ms spent a third of the ServerApp's
        interpreter time in polls.

    Notes
    -----
    Replies come back in the order of the instructions, one per partition, each
    with its partition's node id as source and replying to its own instruction:
    what a strategy would receive from one SuperNode per partition.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        num_partitions: int,
        block_size: int,
        nodes: Sequence[int],
        interval: float = 0.02,
    ) -> None:
        if block_size < 1 or not nodes:
            raise ValueError(
                f"Expected block_size >= 1 and some nodes, got {block_size} and "
                f"{list(nodes)}"
            )
        self.grid = grid
        self.num_partitions = num_partitions
        self.block_size = block_size
        self.nodes = list(nodes)
        self.interval = interval
        self._partition = {
            partition_node_id(p): p for p in range(num_partitions)
        }  # node id -> partition
        # block message id -> its instructions and their partitions
        self._pending: dict[str, tuple[list[Message], list[int]]] = {}
        self._block_of: dict[str, str] = {}  # instruction id -> block message id
        self._replies: dict[str, Message] = {}  # instruction id -> its reply

    def set_run(self, run: Run) -> None:
        """Set the run on the underlying grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The run of the underlying grid."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Delegate (deprecated in Flower: build Messages with ``Message(...)``)."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Return one node id per partition of the cell."""
        return list(self._partition)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send the instructions a block at a time; return their ids."""
        blocks: dict[tuple[int, str], tuple[list[Message], list[int]]] = {}
        ids = []
        for message in messages:
            partition = self._partition.get(message.metadata.dst_node_id)
            if partition is None:
                raise ValueError(
                    f"Expected a message to one of the cell's {self.num_partitions} "
                    f"partition nodes, got dst_node_id={message.metadata.dst_node_id}"
                )
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(message.metadata.message_id)
            key = (partition // self.block_size, message.metadata.message_type)
            members, partitions = blocks.setdefault(key, ([], []))
            members.append(message)
            partitions.append(partition)
        outgoing = []
        for (block, _), (members, partitions) in blocks.items():
            outgoing.append(
                (
                    pack_block(
                        members,
                        partitions,
                        num_partitions=self.num_partitions,
                        dst_node_id=self.nodes[block % len(self.nodes)],
                    ),
                    members,
                    partitions,
                )
            )
        pushed = self.grid.push_messages([m for m, _, _ in outgoing])
        for block_id, (_, members, partitions) in zip(pushed, outgoing, strict=True):
            if block_id:
                self._pending[block_id] = (members, partitions)
                for member in members:
                    self._block_of[member.metadata.message_id] = block_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return the replies that arrived for these instruction ids."""
        message_ids = list(message_ids)
        waiting = {self._block_of[i] for i in message_ids if i in self._block_of}
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                members, partitions = self._pending.pop(
                    reply.metadata.reply_to_message_id
                )
                for split in split_block_reply(reply, members, partitions):
                    instruction = split.metadata.reply_to_message_id
                    self._block_of.pop(instruction, None)
                    self._replies[instruction] = split
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send the instructions and wait for their replies, in instruction order."""
        order = list(self.push_messages(messages))
        pending = set(order)
        end = None if timeout is None else time.monotonic() + timeout
        got: dict[str, Message] = {}
        while pending and (end is None or time.monotonic() < end):
            for reply in self.pull_messages(pending):
                got[reply.metadata.reply_to_message_id] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            if pending:
                time.sleep(self.interval)
        return [got[i] for i in order if i in got]
