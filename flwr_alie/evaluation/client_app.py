"""The evaluation's ClientApp: honest local training, with the ALIE mod.

The SuperNodes of a run form groups of ``n`` (``clients`` in the run config), so that
several cells train at once without queueing on the same node: node ``g * n + p``
plays partition ``p``. :func:`group_mod` tells the rest of the app (the ALIE mod
included) the partition ``p`` the node plays; a QUERY message asks a node which node
of the run it is, so that the ServerApp can form the groups.
"""

from __future__ import annotations

import dataclasses
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

from flwr_alie.evaluation.task import load_data, make_model, train
from flwr_alie.mod import alie_mod

__all__ = ["KEY_NODE_INDEX", "app", "group_mod", "minibatch_seed"]

KEY_NODE_INDEX = "node-index"


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
    model = make_model(data.num_features, data.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    loss = train(
        model,
        partition,
        epochs=int(_get(config, "epochs")),
        lr=float(_get(config, "lr")),
        batch_size=int(_get(config, "batch-size")),
        seed=minibatch_seed(seed, int(_get(config, "server-round")), partition_id),
    )
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "train-loss": loss,
        "num-examples": len(partition),
        "train-seconds": time.perf_counter() - started,
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)
