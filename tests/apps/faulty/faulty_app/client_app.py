"""The example's honest training, with faults injected on chosen partitions.

``fault-nan`` (a partition id, -1 for none) sends NaN and inf in its update from
round 1 on; ``fault-raise`` raises in its training function.
"""

import numpy as np
from digits_alie.task import local_seed, make_model, task_data, train
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_alie import alie_mod

app = ClientApp(mods=[alie_mod])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if partition_id == int(context.run_config["fault-raise"]):
        raise RuntimeError(f"partition {partition_id} fails on purpose")
    seed = int(context.run_config["seed"])
    server_round = int(msg.content["config"]["server-round"])
    data = task_data(num_partitions, seed).partitions[partition_id]
    model = make_model(seed=seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = train(
        model,
        data,
        epochs=int(context.run_config["local-epochs"]),
        lr=float(context.run_config["lr"]),
        seed=local_seed(seed, server_round, partition_id),
    )
    arrays = ArrayRecord(model.state_dict())
    if partition_id == int(context.run_config["fault-nan"]):
        weights = {k: a.numpy().copy() for k, a in arrays.items()}
        first = next(iter(weights))
        weights[first].flat[0] = np.nan
        weights[first].flat[1] = np.inf
        arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"train-loss": loss, "num-examples": len(data)}),
        }
    )
    return Message(content=content, reply_to=msg)
