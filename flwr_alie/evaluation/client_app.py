"""The evaluation's ClientApp: honest local training, with the ALIE mod.

The SuperNodes of a run form groups of ``n`` (``clients`` in the run config), so that
several cells train at once without queueing on the same node: node ``g * n + p``
plays partition ``p``. :func:`group_mod` tells the rest of the app (the ALIE mod
included) the partition ``p`` the node plays; a QUERY message asks a node which node
of the run it is, so that the ServerApp can form the groups.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from torch import nn

from flwr_alie.evaluation.task import (
    Partition,
    load_data,
    make_model,
    train,
    train_steps,
)
from flwr_alie.mod import alie_mod

__all__ = [
    "KEY_NODE_INDEX",
    "WORKER_MOMENTUM_PREFIX",
    "app",
    "group_mod",
    "minibatch_seed",
]

KEY_NODE_INDEX = "node-index"
WORKER_MOMENTUM_PREFIX = "worker-momentum/"
"""``Context.state`` key prefix of a cell's worker-momentum buffers (+ cell key)."""


def minibatch_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's minibatch order in one round: the same in every cell."""
    return zlib.crc32(f"{seed}/{server_round}/{partition_id}".encode())


def group_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Give the app the partition this node plays: its node index modulo ``n``."""
    n = int(ctxt.run_config["clients"])
    index = int(ctxt.node_config["partition-id"])
    node_config = {
        **ctxt.node_config,
        KEY_NODE_INDEX: index,
        "partition-id": index % n,
        "num-partitions": n,
    }
    return call_next(msg, dataclasses.replace(ctxt, node_config=node_config))


app = ClientApp(mods=[group_mod, alie_mod])


@app.query()
def _query(msg: Message, context: Context) -> Message:
    index = int(context.node_config[KEY_NODE_INDEX])
    return Message(
        RecordDict({"node": ConfigRecord({KEY_NODE_INDEX: index})}), reply_to=msg
    )


def _get(record: ConfigRecord, key: str) -> float | int | str | bool:
    value = record[key]
    if isinstance(value, list | bytes):
        raise TypeError(f"Expected a scalar for {key!r}, got {value!r}")
    return value


_local = threading.local()


def _model(
    num_features: int, num_classes: int, kind: str, input_shape: tuple[int, ...]
) -> nn.Module:
    """Return this thread's model of that architecture, to be loaded with weights.

    Building a model costs more than a FedSGD step; every parameter is then
    overwritten by ``load_state_dict``, so each thread keeps one per architecture.
    """
    models: dict[tuple[object, ...], nn.Module] = _local.__dict__.setdefault(
        "models", {}
    )
    key = (num_features, num_classes, kind, input_shape)
    if key not in models:
        models[key] = make_model(
            num_features, num_classes, kind=kind, input_shape=input_shape
        )
    return models[key]


@app.train()
def _train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = msg.content.config_records["config"]
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    seed = int(_get(config, "seed"))
    data = load_data(
        str(_get(config, "dataset")),
        num_partitions,
        str(_get(config, "split")),
        float(_get(config, "alpha")),
        seed,
    )
    partition = data.partitions[partition_id]
    model = _model(
        data.num_features,
        data.num_classes,
        str(_get(config, "model")),
        data.input_shape,
    )
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    lr, batch_size = float(_get(config, "lr")), int(_get(config, "batch-size"))
    batch_seed = minibatch_seed(seed, int(_get(config, "server-round")), partition_id)
    steps = int(_get(config, "local-steps"))
    if steps:
        loss = _fedsgd(
            model, partition, config, context, steps, lr, batch_size, batch_seed
        )
    else:
        loss = train(
            model,
            partition,
            epochs=int(_get(config, "epochs")),
            lr=lr,
            batch_size=batch_size,
            seed=batch_seed,
        )
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "train-loss": loss,
        "num-examples": len(partition),
        "local-steps": steps,
        "train-seconds": time.perf_counter() - started,
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


def _fedsgd(
    model: nn.Module,
    partition: Partition,
    config: ConfigRecord,
    context: Context,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Take the cell's local steps; keep its worker momentum in ``context.state``.

    The node's Context lives as long as the run, and a node serves several cells,
    so each cell's buffers have a key of their own.
    """
    momentum = float(_get(config, "worker-momentum"))
    key = WORKER_MOMENTUM_PREFIX + str(_get(config, "cell"))
    buffers = None
    if momentum and key in context.state.array_records:
        buffers = dict(context.state.array_records[key].to_torch_state_dict())
    loss, buffers = train_steps(
        model,
        partition,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        momentum=momentum,
        buffers=buffers,
    )
    if momentum:
        context.state[key] = ArrayRecord(buffers)
    return loss
