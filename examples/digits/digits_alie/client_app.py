"""ClientApp: honest training, with ALIE's mod marking the Byzantine nodes."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from digits_alie.task import local_seed, make_model, task_data, train
from flwr_alie import alie_mod

# The mod reads alie.* from the run config and tags (or short-circuits) the train
# replies of the Byzantine nodes; the training below is the app's own, untouched.
app = ClientApp(mods=[alie_mod])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
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
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train-loss": loss, "num-examples": len(data)}),
        }
    )
    return Message(content=content, reply_to=msg)
