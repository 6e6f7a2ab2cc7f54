"""The evaluation's ClientApp: a block of a cell's partitions per message.

A SuperNode of the evaluation plays whichever partitions a message brings: the
ServerApp sends one message per *block* of a cell's partitions
(:mod:`flwr_alie.evaluation.wire`), and :data:`app` runs each partition's own
instruction through :data:`partition_app`, the per-partition app (the ALIE mod,
then honest local training), with that partition's own :class:`Context`:

- ``node_config`` says ``partition-id`` and ``num-partitions``, as a SuperNode
  started with ``--node-config "partition-id=p num-partitions=n"`` would;
- ``state`` is the partition's own: its records live in the node's
  ``Context.state`` under ``partition/<p>/`` between messages (worker momentum,
  one key per cell), so a partition's state never mixes with another's.

A partition that raises comes back as that partition's error reply; the rest of the
block is unharmed. The partitions' calls run one after the other. In a cell that
is not vectorised, each call trains at once
(:func:`~flwr_alie.evaluation.task.run_steps`, the reference). In a *vectorised*
cell, a call's FedSGD job is collected instead (:class:`_Deferred`) and its reply
completed once every partition of the block has been called: all the jobs run in
one :func:`~flwr_alie.evaluation.task.run_steps_stacked` pass, and each reply gets
its metrics then. The trained weights stay as the pass left them, one array a layer
for all its partitions (:class:`~flwr_alie.evaluation.wire.Stacked`), and the
ServerApp gives each partition its own record of its rows. Until that moment a
deferred reply holds no records, so the mods of :data:`partition_app` must not read
the records of a train reply, nor replace it (the ALIE mod only adds its tag, or
answers without training).
"""

from __future__ import annotations

import contextvars
import gc
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from logging import ERROR
from typing import TypeVar, cast

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.constant import ErrorCode
from torch import nn

from flwr_alie.evaluation.flower_patches import records_without_casts
from flwr_alie.evaluation.task import (
    StepsJob,
    load_data,
    make_model,
    run_steps,
    run_steps_stacked,
    train,
)
from flwr_alie.evaluation.wire import (
    BLOCK_ACTION,
    Block,
    Stacked,
    TaskOptions,
    close_block,
    open_block,
)
from flwr_alie.mod import alie_mod
from flwr_alie.params import record_from_layers, torch_views_of_record

__all__ = [
    "PARTITION_STATE_PREFIX",
    "WORKER_MOMENTUM_PREFIX",
    "app",
    "minibatch_seed",
    "partition_app",
    "run_block",
]

WORKER_MOMENTUM_PREFIX = "worker-momentum/"
"""``Context.state`` key prefix of a cell's worker-momentum buffers (+ cell key)."""

PARTITION_STATE_PREFIX = "partition/"
"""A partition's state in the node's ``Context.state``: ``partition/<p>/<key>``."""

_CONFIG = "config"  # the ConfigRecord of Flower's train messages
_ARRAYS = "arrays"  # their ArrayRecord, and their replies'
_METRICS = "metrics"  # the replies' MetricRecord


def minibatch_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's minibatch order in one round: the same in every cell."""
    return zlib.crc32(f"{seed}/{server_round}/{partition_id}".encode())


# ------------------------------------------------------------ the per-partition app

partition_app = ClientApp(mods=[alie_mod])
"""One partition's app: the ALIE mod, then local training."""


@partition_app.train()
def _train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = msg.content.config_records[_CONFIG]
    task = _once_per_record(config, TaskOptions.from_record)
    partition_id = int(context.node_config["partition-id"])
    data = load_data(
        task.dataset,
        int(context.node_config["num-partitions"]),
        task.split,  # type: ignore[arg-type]
        task.alpha,
        task.seed,
    )
    partition = data.partitions[partition_id]
    architecture = (
        data.num_features,
        data.num_classes,
        task.model,
        data.input_shape,
        task.device,
    )
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    seed = minibatch_seed(task.seed, server_round, partition_id)
    weights = _once_per_record(
        msg.content.array_records[_ARRAYS], torch_views_of_record
    )

    def metrics(loss: float, seconds: float) -> MetricRecord:
        return MetricRecord(
            {
                "train-loss": loss,
                "num-examples": len(partition),
                "local-steps": task.steps,
                "train-seconds": seconds,
            }
        )

    if not task.steps:  # local epochs
        model = _model(architecture)
        model.load_state_dict(weights)
        loss = train(
            model,
            partition,
            epochs=task.epochs,
            lr=task.lr,
            batch_size=task.batch_size,
            seed=seed,
        )
        trained = _arrays(dict(model.state_dict()))
        seconds = time.perf_counter() - started
        content = RecordDict({_ARRAYS: trained, _METRICS: metrics(loss, seconds)})
        return Message(content, reply_to=msg)
    key = WORKER_MOMENTUM_PREFIX + task.cell
    buffers = None
    if task.worker_momentum and key in context.state.array_records:
        buffers = torch_views_of_record(context.state.array_records[key])
    job = StepsJob(
        weights,
        partition,
        steps=task.steps,
        lr=task.lr,
        batch_size=task.batch_size,
        seed=seed,
        momentum=task.worker_momentum,
        buffers=buffers,
    )

    def finish(
        loss: float, seconds: float, buffers: Mapping[str, torch.Tensor]
    ) -> MetricRecord:
        if task.worker_momentum and server_round < task.rounds:
            context.state[key] = _arrays(buffers)
        elif key in context.state:  # the cell's last round: nothing to keep
            del context.state[key]
        return metrics(loss, seconds)

    return (_trainer.get() or _LOOP).steps(msg, architecture, job, finish)


def _arrays(layers: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return record_from_layers({k: v.detach().numpy() for k, v in layers.items()})


R = TypeVar("R", ConfigRecord, ArrayRecord)
T = TypeVar("T")


def _once_per_record(record: R, read: Callable[[R], T]) -> T:
    """Return ``read(record)``, reusing the last result for the same record.

    A block's partitions share one global model and one config (the same record
    objects, :func:`~flwr_alie.evaluation.wire.open_block`): each is read once a
    block, not once a partition. The result must not be changed by the caller.
    """
    last: dict[object, tuple[object, object]] = _local.__dict__.setdefault("last", {})
    seen = last.get(read)  # bound methods are equal (not identical) across reads
    if seen is not None and seen[0] is record:
        return cast(T, seen[1])
    value = read(record)
    last[read] = (record, value)  # one record per reader: the block's
    return value


Architecture = tuple[int, int, str, tuple[int, ...], str]
"""A model's (features, classes, kind, input shape) and the device it trains on."""
_local = threading.local()
_templates: dict[Architecture, nn.Module] = {}
_templates_lock = threading.Lock()


def _model(architecture: Architecture) -> nn.Module:
    """Return this thread's model of that architecture, to be loaded with weights.

    Building a model costs more than a FedSGD step; every parameter is then
    overwritten by ``load_state_dict``, so each thread keeps one per architecture.
    The loop, the reference, trains on the CPU.
    """
    models: dict[Architecture, nn.Module] = _local.__dict__.setdefault("models", {})
    if architecture not in models:
        num_features, num_classes, kind, shape, _ = architecture
        models[architecture] = make_model(
            num_features, num_classes, kind=kind, input_shape=shape
        )
    return models[architecture]


def _template(architecture: Architecture) -> nn.Module:
    """Return the process's stateless model of that architecture (never trained)."""
    with _templates_lock:
        if architecture not in _templates:
            num_features, num_classes, kind, shape, _ = architecture
            _templates[architecture] = make_model(
                num_features, num_classes, kind=kind, input_shape=shape
            )
        return _templates[architecture]


Finish = Callable[[float, float, Mapping[str, torch.Tensor]], MetricRecord]
"""Turn a job's loss, seconds and buffers into its reply's metrics (and keep state)."""


class _Loop:
    """Run each FedSGD job at once, on this thread's model: the reference."""

    def steps(
        self, msg: Message, architecture: Architecture, job: StepsJob, finish: Finish
    ) -> Message:
        result = run_steps(_model(architecture), job)
        metrics = finish(result.loss, result.seconds, result.buffers)
        content = RecordDict({_ARRAYS: _arrays(result.weights), _METRICS: metrics})
        return Message(content, reply_to=msg)


class _Deferred:
    """Collect a block's FedSGD jobs; run them in one vectorised pass at the end.

    :meth:`steps` returns the partition's reply at once, without records;
    :meth:`complete`, called once every partition of the block has been called,
    runs every job (one pass per architecture) and gives each reply its metrics.
    The trained weights stay stacked, one array a layer for each pass
    (:class:`~flwr_alie.evaluation.wire.Stacked`), and travel so.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Architecture, StepsJob, Finish, Message]] = []

    def steps(
        self, msg: Message, architecture: Architecture, job: StepsJob, finish: Finish
    ) -> Message:
        reply = Message(RecordDict(), reply_to=msg)
        self._pending.append((architecture, job, finish, reply))
        return reply

    def complete(
        self, replies: Sequence[Message]
    ) -> tuple[list[Stacked], dict[int, BaseException]]:
        """Fill in every collected reply (of `replies`, the block's, in order).

        Return the stacked weights and the failed replies, by ``id``.
        """
        position = {id(reply): j for j, reply in enumerate(replies)}
        failed: dict[int, BaseException] = {}
        stacks: list[Stacked] = []
        by_architecture: dict[Architecture, list[int]] = {}
        for i, (architecture, *_) in enumerate(self._pending):
            by_architecture.setdefault(architecture, []).append(i)
        for architecture, members in by_architecture.items():
            try:
                passes = run_steps_stacked(
                    _template(architecture),
                    [self._pending[i][1] for i in members],
                    device=architecture[4],
                )
            except Exception as err:  # every job of the pass fails with it
                failed.update({id(self._pending[i][3]): err for i in members})
                continue
            for stacked in passes:
                rows = []
                for row, m in enumerate(stacked.members):
                    _, _, finish, reply = self._pending[members[m]]
                    buffers = _Row(stacked.buffers, row)
                    try:
                        metrics = finish(stacked.losses[row], stacked.seconds, buffers)
                    except Exception as err:
                        failed[id(reply)] = err
                        continue
                    reply.content[_METRICS] = metrics
                    if id(reply) in position:  # (a mod that replaced it lost it)
                        rows.append((row, position[id(reply)]))
                if rows:  # the weights of those that replied, stacked
                    kept = [r for r, _ in rows]
                    whole = len(kept) == len(stacked.members)
                    layers = {
                        k: (v if whole else v[kept]).numpy()
                        for k, v in stacked.weights.items()
                    }
                    positions = tuple(p for _, p in rows)
                    stacks.append(Stacked(_ARRAYS, layers, positions))
        self._pending.clear()
        return stacks, failed


class _Row(Mapping[str, torch.Tensor]):
    """Row `row` of each stacked tensor, read when asked for."""

    def __init__(self, stacked: Mapping[str, torch.Tensor], row: int) -> None:
        self._stacked, self._row = stacked, row

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._stacked[key][self._row]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stacked)

    def __len__(self) -> int:
        return len(self._stacked)


_LOOP = _Loop()
# the trainer of the block being run on this thread, when it defers its jobs
_trainer: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar(
    "trainer", default=None
)


# ------------------------------------------------------------ the block runner


def run_block(message: Message, context: Context, inner: ClientApp) -> Message:
    """Run a block's partitions through `inner`; return the block's reply.

    Each partition gets its own Context (see the module docstring); its state is
    written back to the node's ``Context.state`` after the block. A partition's
    exception becomes its error reply, logged with its partition id.
    """
    _use_threads(int(context.run_config.get("cpus-per-client", 1)))
    _prepare_process()
    block = open_block(message)
    positions = range(len(block.messages))
    contexts = [_partition_context(context, block, j) for j in positions]
    deferred = _Deferred() if _vectorised(block) else None
    token = _trainer.set(deferred)
    try:
        replies = [_call(inner, block, j, contexts[j]) for j in positions]
    finally:
        _trainer.reset(token)
    stacked: list[Stacked] = []
    if deferred is not None:
        stacked, failed = deferred.complete(replies)
        replies = [
            _error_reply(block, j, failed[id(reply)]) if id(reply) in failed else reply
            for j, reply in enumerate(replies)
        ]
    for partition, partition_context in zip(block.partitions, contexts, strict=True):
        _keep_state(context, partition, partition_context.state)
    return close_block(message, block, replies, stacked)


_prepared = threading.Lock()
_process: list[bool] = []  # set once the process is prepared


def _prepare_process() -> None:
    """Once per process (a Ray actor: the evaluation's own): make it the block's.

    Flower's records set and read their items without casts
    (:func:`~flwr_alie.evaluation.flower_patches.records_without_casts`), and what
    is loaded by the first block (torch, Ray, Flower and the data: over 200,000
    objects) is kept out of Python's collections, as the ServerApp does: every
    block allocates and frees thousands of Flower objects, and each full
    collection that this sets off walked all of them (50 to 85 ms, every few
    seconds in each actor).
    """
    with _prepared:
        if _process:
            return
        records_without_casts()
        gc.freeze()
        _process.append(True)


def _use_threads(cpus: int) -> None:
    """Give torch as many intra-op threads as the ClientApp has CPUs in Ray.

    Torch's default is one thread per core of the machine: with several ClientApp
    actors sharing the cores, their threads oversubscribe them, and a vectorised
    FedSGD pass of 51 clients took 450 ms instead of 40 ms (measured on two
    cores). The actor's process is the ClientApp's own.
    """
    if torch.get_num_threads() != cpus:
        torch.set_num_threads(cpus)


def _vectorised(block: Block) -> bool:
    """Whether the block's train instructions ask for the vectorised pass."""
    first = block.messages[0]
    config = first.content.config_records.get(_CONFIG)
    if first.metadata.message_type != "train" or config is None:
        return False
    try:
        task = TaskOptions.from_record(config)
    except ValueError:  # the partition's own call reports it
        return False
    return task.vectorised and task.steps > 0


def _call(inner: ClientApp, block: Block, j: int, context: Context) -> Message:
    try:
        return inner(block.messages[j], context)
    except Exception as err:
        return _error_reply(block, j, err)


def _error_reply(block: Block, j: int, err: BaseException) -> Message:
    """Return partition `j`'s error reply for `err`, logged with its partition id."""
    partition = block.partitions[j]
    log(
        ERROR,
        "partition %d raised: %s",
        partition,
        "".join(traceback.format_exception(err)),
    )
    return Message(
        Error(
            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
            reason=f"partition {partition}: {type(err).__name__}: {err}",
        ),
        reply_to=block.messages[j],
    )


def _partition_context(node: Context, block: Block, j: int) -> Context:
    partition = block.partitions[j]
    prefix = f"{PARTITION_STATE_PREFIX}{partition}/"
    state = RecordDict(
        {k[len(prefix) :]: v for k, v in node.state.items() if k.startswith(prefix)}
    )
    return Context(
        run_id=node.run_id,
        node_id=block.messages[j].metadata.dst_node_id,
        node_config={
            **node.node_config,
            "partition-id": partition,
            "num-partitions": block.num_partitions,
        },
        state=state,
        run_config=node.run_config,
    )


def _keep_state(node: Context, partition: int, state: RecordDict) -> None:
    prefix = f"{PARTITION_STATE_PREFIX}{partition}/"
    for key in [k for k in node.state if k.startswith(prefix)]:
        del node.state[key]
    for key, record in state.items():
        node.state[prefix + key] = record


app = ClientApp()
"""The evaluation's ClientApp: blocks of partitions (``<category>.block``)."""


@app.train(BLOCK_ACTION)
def _train_block(msg: Message, context: Context) -> Message:
    return run_block(msg, context, partition_app)


@app.evaluate(BLOCK_ACTION)
def _evaluate_block(msg: Message, context: Context) -> Message:
    return run_block(msg, context, partition_app)


@app.query(BLOCK_ACTION)
def _query_block(msg: Message, context: Context) -> Message:
    return run_block(msg, context, partition_app)
