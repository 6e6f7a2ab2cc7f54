"""The evaluation's ClientApp, called as Flower calls it: blocks of partitions."""

import gc

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flwr_alie.config import ALIEConfig
from flwr_alie.evaluation.client_app import app, minibatch_seed
from flwr_alie.evaluation.task import (
    StepsJob,
    load_data,
    make_model,
    run_steps_vectorised,
    train,
    train_steps,
)
from flwr_alie.evaluation.wire import (
    TaskOptions,
    open_block,
    pack_block,
    partition_node_id,
    split_block_reply,
)
from tests.flower_helpers import instruction

pytestmark = pytest.mark.usefixtures("server_identity")

N = 8


def _config(
    cell="cell-a",
    steps=2,
    momentum=0.9,
    server_round=1,
    rounds=5,
    vectorised=False,
    byzantine=(),
    model="mlp",
):
    options = TaskOptions(
        cell=cell, dataset="digits", split="iid", alpha=0.5, seed=0, rounds=rounds,
        epochs=0 if steps else 1, steps=steps, lr=0.5, batch_size=4, model=model,
        worker_momentum=momentum, vectorised=vectorised, device="cpu",
    )  # fmt: skip
    alie = ALIEConfig(z=1.0, byzantine_ids=tuple(byzantine)).to_run_config()
    record = options.to_record(alie)
    record["server-round"] = server_round
    return record


def _model(kind="mlp"):
    shape = (1, 8, 8) if kind == "cnn" else ()
    return make_model(64, 10, seed=0, kind=kind, input_shape=shape)


def _block(weights, config, partitions):
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    messages = [instruction(partition_node_id(p), content) for p in partitions]
    block = pack_block(messages, partitions, num_partitions=N, dst_node_id=7)
    block.metadata.__dict__["_message_id"] = "block-1"
    return block, messages


def _run(weights, config, partitions, context):
    block, messages = _block(weights, config, partitions)
    reply = app(block, context)
    assert not reply.has_error(), reply.error
    return split_block_reply(reply, messages, partitions)


def _arrays(reply: Message):
    assert not reply.has_error(), reply.error
    return reply.content.array_records["arrays"].to_torch_state_dict()


def _context():
    return Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}
    )


def test_a_block_comes_back_as_one_reply_per_partition_to_its_own_instruction():
    start = _model().state_dict()
    partitions = [2, 5, 6]
    block, messages = _block(start, _config(steps=1), partitions)
    # the global model and the config travel once for the three partitions
    assert len(block.content.array_records) == 1
    assert len(block.content.config_records) == 3  # config, layout, header
    opened = open_block(block)
    assert opened.partitions == (2, 5, 6)
    assert [m.metadata.message_id for m in opened.messages] == [
        m.metadata.message_id for m in messages
    ]
    assert [m.metadata.dst_node_id for m in opened.messages] == [1002, 1005, 1006]
    replies = split_block_reply(app(block, _context()), messages, partitions)
    assert [r.metadata.src_node_id for r in replies] == [1002, 1005, 1006]
    assert [r.metadata.reply_to_message_id for r in replies] == [
        m.metadata.message_id for m in messages
    ]
    # each partition trained on its own data: three different models
    firsts = [_arrays(r)["0.weight"] for r in replies]
    assert not torch.equal(firsts[0], firsts[1])
    assert not torch.equal(firsts[1], firsts[2])


@pytest.mark.parametrize("steps", [1, 3])
def test_fedsgd_steps_with_momentum_kept_per_partition_and_per_cell(steps):
    context = _context()
    start = _model().state_dict()
    data = load_data("digits", N, "iid", 0.5, 0)
    partitions = [2, 5]
    models = {p: _model() for p in partitions}
    buffers = dict.fromkeys(partitions)
    for server_round in (1, 2):
        replies = _run(
            start, _config(steps=steps, server_round=server_round), partitions, context
        )
        for p, reply in zip(partitions, replies, strict=True):
            assert reply.content.metric_records["metrics"]["local-steps"] == steps
            models[p].load_state_dict(start)
            _, buffers[p] = train_steps(
                models[p], data.partitions[p], steps=steps, lr=0.5, batch_size=4,
                seed=minibatch_seed(0, server_round, p), momentum=0.9,
                buffers=buffers[p],
            )  # fmt: skip
            got = _arrays(reply)
            for key, value in models[p].state_dict().items():
                assert torch.allclose(got[key], value, atol=1e-6), (p, key)
    # the node keeps each partition's buffers apart, one key per cell
    assert sorted(context.state.array_records) == [
        "partition/2/worker-momentum/cell-a",
        "partition/5/worker-momentum/cell-a",
    ]
    # another cell on the same node starts from zero momentum
    (reply,) = _run(start, _config(cell="cell-b", steps=steps, server_round=2), [2],
                    context)  # fmt: skip
    model = _model()
    model.load_state_dict(start)
    train_steps(model, data.partitions[2], steps=steps, lr=0.5, batch_size=4,
                seed=minibatch_seed(0, 2, 2), momentum=0.9)  # fmt: skip
    got = _arrays(reply)
    assert all(
        torch.allclose(got[k], v, atol=1e-6) for k, v in model.state_dict().items()
    )
    assert len(context.state.array_records) == 3


def test_a_cells_last_round_leaves_no_state_behind():
    context = _context()
    start = _model().state_dict()
    _run(start, _config(server_round=4, rounds=5), [1, 3], context)
    assert len(context.state.array_records) == 2
    _run(start, _config(server_round=5, rounds=5), [1, 3], context)
    assert len(context.state.array_records) == 0


def test_a_partition_that_raises_is_its_own_error_and_the_rest_of_the_block_trains():
    start = _model().state_dict()
    # partition 9 does not exist among the N = 8 partitions of the data set
    replies = _run(start, _config(steps=1), [1, 9, 4], _context())
    assert [r.has_error() for r in replies] == [False, True, False]
    assert "partition 9" in replies[1].error.reason
    assert "IndexError" in replies[1].error.reason
    assert replies[1].metadata.src_node_id == partition_node_id(9)


def test_byzantine_partitions_of_a_block_are_tagged_and_skip_training():
    start = _model().state_dict()
    replies = _run(start, _config(steps=1, byzantine=[3]), [2, 3], _context())
    tags = [r.content.config_records["alie"] for r in replies]
    assert [t["byzantine"] for t in tags] == [False, True]
    assert [t["partition-id"] for t in tags] == [2, 3]
    assert tags[1]["skipped-training"] is True
    skipped = _arrays(replies[1])
    assert all(torch.equal(skipped[k], v) for k, v in start.items())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_vectorised_block_equals_the_loop(model):
    start = _model(model).state_dict()
    partitions = [0, 2, 3, 7]
    results = {}
    for vectorised in (False, True):
        context = _context()
        rounds = []
        for server_round in (1, 2):  # momentum carried between the rounds
            config = _config(
                steps=2, server_round=server_round, vectorised=vectorised,
                byzantine=[3], model=model,
            )  # fmt: skip
            rounds.append(_run(start, config, partitions, context))
        results[vectorised] = rounds
    for loop, vector in zip(results[False], results[True], strict=True):
        for a, b in zip(loop, vector, strict=True):
            for key, value in _arrays(a).items():  # float32 rounding apart
                torch.testing.assert_close(_arrays(b)[key], value, rtol=1e-5, atol=1e-6)
            la = a.content.metric_records["metrics"].get("train-loss")
            lb = b.content.metric_records["metrics"].get("train-loss")
            assert (la is None) == (lb is None)  # Byzantine partition 3 skips
            if la is not None:
                assert lb == pytest.approx(la, rel=1e-5)


def test_a_vectorised_block_sends_the_pass_itself_each_layer_once():
    start = _model().state_dict()
    partitions = [0, 2, 3, 7]  # 3 is Byzantine: it skips training
    config = _config(steps=2, vectorised=True, byzantine=[3])
    block, messages = _block(start, config, partitions)
    reply = app(block, _context())
    # the three trained partitions' weights: one array a layer; 3's own record
    records = reply.content.array_records
    assert sorted(records) == ["2/arrays", "stack/0"]
    assert [a.shape[0] for a in records["stack/0"].values()] == [3] * len(start)
    replies = split_block_reply(reply, messages, partitions)
    # exactly the vectorised pass's weights, bit for bit, each its partition's
    data = load_data("digits", N, "iid", 0.5, 0)
    jobs = [
        StepsJob(start, data.partitions[p], steps=2, lr=0.5, batch_size=4,
                 seed=minibatch_seed(0, 1, p), momentum=0.9)
        for p in (0, 2, 7)
    ]  # fmt: skip
    expected = run_steps_vectorised(_model(), jobs)
    for result, position in zip(expected, (0, 1, 3), strict=True):
        got = _arrays(replies[position])
        assert list(got) == list(start)
        for key, value in result.weights.items():
            assert torch.equal(got[key], value), (position, key)
        loss = replies[position].content.metric_records["metrics"]["train-loss"]
        assert loss == result.loss
    assert all(torch.equal(_arrays(replies[2])[k], v) for k, v in start.items())


def test_a_vectorised_partition_that_raises_is_its_own_error_and_left_out():
    start = _model().state_dict()
    config = _config(steps=1, vectorised=True)
    block, messages = _block(start, config, [1, 9, 4])  # no partition 9 of N = 8
    reply = app(block, _context())
    stack = reply.content.config_records["block"]["stack/0"]
    assert stack == [0, 2]  # the positions of partitions 1 and 4
    replies = split_block_reply(reply, messages, [1, 9, 4])
    assert [r.has_error() for r in replies] == [False, True, False]
    assert "partition 9" in replies[1].error.reason
    assert not torch.equal(_arrays(replies[0])["0.weight"], start["0.weight"])


def test_local_epochs_when_steps_are_zero():
    context = _context()
    start = _model().state_dict()
    (reply,) = _run(start, _config(steps=0, momentum=0.0), [1], context)
    assert reply.content.metric_records["metrics"]["local-steps"] == 0
    assert len(context.state.array_records) == 0
    model = _model()
    model.load_state_dict(start)
    data = load_data("digits", N, "iid", 0.5, 0)
    train(model, data.partitions[1], epochs=1, lr=0.5, batch_size=4,
          seed=minibatch_seed(0, 1, 1))  # fmt: skip
    got = _arrays(reply)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_a_config_from_another_version_is_a_named_error():
    start = _model().state_dict()
    config = _config()
    del config["task.batch-size"]
    (reply,) = _run(start, config, [1], _context())
    assert reply.has_error()
    assert "'task.batch-size'" in reply.error.reason


def test_each_partition_runs_with_its_own_node_config_and_state():
    from flwr.clientapp import ClientApp

    from flwr_alie.evaluation.client_app import run_block

    seen = []
    inner = ClientApp()

    @inner.train()
    def _train(msg, ctxt):
        p = ctxt.node_config["partition-id"]
        seen.append((p, ctxt.node_config["num-partitions"], ctxt.node_id,
                     sorted(ctxt.state)))  # fmt: skip
        ctxt.state[f"mine-{p}"] = ConfigRecord({"p": p})
        return Message(RecordDict(), reply_to=msg)

    context = _context()
    for _ in range(2):
        block, _ = _block(_model().state_dict(), _config(steps=1), [4, 6])
        run_block(block, context, inner)
    assert seen == [
        (4, N, partition_node_id(4), []),
        (6, N, partition_node_id(6), []),
        (4, N, partition_node_id(4), ["mine-4"]),  # its own state only
        (6, N, partition_node_id(6), ["mine-6"]),
    ]
    assert sorted(context.state) == ["partition/4/mine-4", "partition/6/mine-6"]


def test_an_empty_config_record_is_refused_naming_the_first_key():
    with pytest.raises(ValueError, match=r"'task.cell'"):
        TaskOptions.from_record(ConfigRecord())


def test_a_block_prepares_its_process_once(monkeypatch):
    from flwr.app.message import typeddict

    from flwr_alie.evaluation import client_app as module
    from flwr_alie.evaluation import flower_patches

    monkeypatch.setattr(module, "_process", [])  # as in a fresh Ray actor
    setitem = typeddict.TypedDict.__setitem__
    monkeypatch.setattr(  # restored after the test, whatever it was
        typeddict.TypedDict, "__setitem__", lambda *args: setitem(*args)
    )
    gc.unfreeze()
    try:
        _run(_model().state_dict(), _config(steps=1), [1], _context())
        frozen = gc.get_freeze_count()
        assert frozen > 0  # what the first block loaded is out of the collections
        assert typeddict.TypedDict.__setitem__ is flower_patches._setitem
        _run(_model().state_dict(), _config(steps=1), [2], _context())
        assert gc.get_freeze_count() == frozen  # once a process
    finally:
        gc.unfreeze()
