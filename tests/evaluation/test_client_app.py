"""The evaluation's ClientApp, called as Flower calls it: FedSGD steps and state."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flwr_alie.evaluation.client_app import app, minibatch_seed
from flwr_alie.evaluation.task import get_weights, load_data, make_model, train_steps
from tests.flower_helpers import metadata

N = 4


def _config(cell="cell-a", steps=2, momentum=0.9, server_round=1):
    return ConfigRecord(
        {
            "cell": cell, "dataset": "digits", "split": "iid", "alpha": 0.5,
            "seed": 0, "epochs": 0, "lr": 0.5, "batch-size": 4, "model": "mlp",
            "local-steps": steps, "worker-momentum": momentum,
            "alie.byzantine-ids": "", "alie.knowledge": "oracle", "alie.seed": 0,
            "server-round": server_round,
        }
    )  # fmt: skip


def _call(weights, config, context):
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    reply = app(Message(content=content, metadata=metadata(0, "train")), context)
    assert not reply.has_error(), reply.error
    arrays = reply.content.array_records["arrays"].to_torch_state_dict()
    return arrays, reply.content.metric_records["metrics"]


def _context(node_index):
    return Context(
        run_id=1,
        node_id=100 + node_index,
        node_config={"partition-id": node_index, "num-partitions": 2 * N},
        state=RecordDict(),
        run_config={"clients": N},
    )


@pytest.mark.parametrize("steps", [1, 3])
def test_fedsgd_client_takes_the_configured_steps_with_momentum_kept_per_cell(steps):
    node_index = N + 2  # the second group's node playing partition 2
    context = _context(node_index)
    start = make_model(64, 10, seed=0).state_dict()
    data = load_data("digits", N, "iid", 0.5, 0)
    partition = data.partitions[2]

    model, buffers = make_model(64, 10, seed=0), None
    for server_round in (1, 2):
        got, metrics = _call(
            start, _config(steps=steps, server_round=server_round), context
        )
        assert metrics["local-steps"] == steps
        model.load_state_dict(start)
        _, buffers = train_steps(
            model, partition, steps=steps, lr=0.5, batch_size=4,
            seed=minibatch_seed(0, server_round, 2), momentum=0.9, buffers=buffers,
        )  # fmt: skip
        expected = model.state_dict()
        for key, value in expected.items():
            assert torch.allclose(got[key], value, atol=1e-6), (server_round, key)
    # another cell on the same node starts from zero momentum
    got, _ = _call(start, _config(cell="cell-b", steps=steps, server_round=2), context)
    model.load_state_dict(start)
    train_steps(
        model, partition, steps=steps, lr=0.5, batch_size=4,
        seed=minibatch_seed(0, 2, 2), momentum=0.9,
    )  # fmt: skip
    assert all(
        torch.allclose(got[k], v, atol=1e-6) for k, v in model.state_dict().items()
    )
    assert len(context.state.array_records) == 2


def test_local_epochs_are_used_when_steps_are_zero():
    context = _context(1)
    start = make_model(64, 10, seed=0).state_dict()
    config = _config(steps=0, momentum=0.0)
    config["epochs"] = 1
    got, metrics = _call(start, config, context)
    assert metrics["local-steps"] == 0
    assert len(context.state.array_records) == 0
    before = get_weights(make_model(64, 10, seed=0))
    assert not torch.equal(got["0.weight"], torch.as_tensor(before["0.weight"]))
