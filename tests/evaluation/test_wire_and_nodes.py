"""The wire between the evaluation's apps, its SuperNodes, and Flower's arrays."""

import dataclasses
import re
import uuid

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flwr_alie.evaluation.client_app import app
from flwr_alie.evaluation.grid import Cell
from flwr_alie.evaluation.nodes import BlockGrid, NodeSlots, wait_for_nodes
from flwr_alie.evaluation.wire import (
    Block,
    Stacked,
    TaskOptions,
    close_block,
    open_block,
    pack_block,
    partition_node_id,
    row_columns,
    split_block_reply,
)
from flwr_alie.params import array_from_numpy, arrays_of_rows, record_from_layers
from tests.flower_helpers import instruction

pytestmark = pytest.mark.usefixtures("server_identity")

# ------------------------------------------------------------------ the task


def test_task_options_travel_as_records_and_come_back_typed():
    cell = Cell(strategy="krum", split="iid", seed=3, declared=2, lr=0.25, steps=1,
                vectorised=True)  # fmt: skip
    options = TaskOptions.of(cell)
    assert options.cell == cell.key
    record = options.to_record({"alie.z": 1.5})
    assert record["task.batch-size"] == cell.batch_size
    assert record["alie.z"] == 1.5
    assert TaskOptions.from_record(record) == options
    record["task.lr"] = 1  # an integer where a float is meant is a float
    assert TaskOptions.from_record(record).lr == 1.0


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("task.steps", "2", r"'task.steps' .* to be a int, got '2'"),
        ("task.vectorised", 1, r"'task.vectorised' .* to be a bool, got 1"),
        ("task.seed", 1.0, r"'task.seed' .* to be a int, got 1.0"),
    ],
)
def test_a_mistyped_task_option_is_named(key, value, match):
    record = TaskOptions.of(Cell(strategy="fedavg", split="iid", seed=0,
                                 declared=0)).to_record()  # fmt: skip
    record[key] = value
    with pytest.raises(ValueError, match=match):
        TaskOptions.from_record(record)


def test_a_row_holds_every_field_of_its_cell():
    cell = Cell(strategy="krum", split="iid", seed=3, declared=2, byzantine_ids=(1, 4),
                z=1.5, direction="negative", knowledge="oracle")  # fmt: skip
    row = row_columns(cell)
    for field in dataclasses.fields(Cell):
        assert field.name in row, field.name
    assert row["byzantine_ids"] == [1, 4]
    assert (row["cell"], row["attack"], row["num_byzantine"]) == (cell.key, "z=1.5", 2)
    clean = row_columns(cell.reference())
    assert (clean["z"], clean["direction"], clean["knowledge"]) == ("none",) * 3


# ------------------------------------------------------------------ blocks


def _instructions(partitions, content=None):
    content = content or RecordDict({"config": ConfigRecord({"a": 1})})
    return [instruction(partition_node_id(p), content) for p in partitions]


def test_a_block_reply_that_does_not_describe_its_partitions_fails_each_by_name():
    partitions = [0, 3]
    messages = _instructions(partitions)
    block = pack_block(messages, partitions, num_partitions=4, dst_node_id=9)
    block.metadata.__dict__["_message_id"] = "block"
    for content in (
        RecordDict(),  # no header
        RecordDict({"block": ConfigRecord({"partitions": [0, 3], "codes": [-1]})}),
        RecordDict(
            {
                "block": ConfigRecord(
                    {"partitions": [0, 1], "codes": [-1, -1], "reasons": ["", ""]}
                )
            }
        ),
    ):
        replies = split_block_reply(Message(content, reply_to=block), messages,
                                    partitions)  # fmt: skip
        assert [r.has_error() for r in replies] == [True, True]
        assert "[0, 3]" in replies[0].error.reason
        assert [r.metadata.src_node_id for r in replies] == [1000, 1003]


def test_a_failed_block_fails_every_partition_with_its_error():
    partitions = [1, 2]
    messages = _instructions(partitions)
    block = pack_block(messages, partitions, num_partitions=4, dst_node_id=9)
    block.metadata.__dict__["_message_id"] = "block"
    failed = Message(Error(code=3, reason="node lost"), reply_to=block)
    replies = split_block_reply(failed, messages, partitions)
    assert [(r.error.code, r.error.reason) for r in replies] == [(3, "node lost")] * 2
    assert [r.metadata.reply_to_message_id for r in replies] == [
        m.metadata.message_id for m in messages
    ]


def _stacked_reply(partitions, replies, stacked):
    """The block reply a ClientApp sends: `replies` per partition, `stacked` rows."""
    messages = _instructions(partitions)
    block = pack_block(messages, partitions, num_partitions=8, dst_node_id=9)
    block.metadata.__dict__["_message_id"] = "block"
    opened = open_block(block)
    answers = [
        Message(reply, reply_to=m)
        for reply, m in zip(replies, opened.messages, strict=True)
    ]
    reply = close_block(block, Block(opened.partitions, 8, opened.messages), answers,
                        stacked)  # fmt: skip
    return reply, messages


def _metrics():
    return RecordDict({"metrics": MetricRecord({"num-examples": 5})})


def test_stacked_layers_come_back_as_each_partitions_own_record():
    rng = np.random.default_rng(0)
    layers = {"w": rng.normal(size=(2, 3, 4)).astype(np.float32),
              "b": rng.normal(size=(2, 4)).astype(np.float64)}  # fmt: skip
    partitions = [4, 0, 6]
    replies = [_metrics(), Error(code=7, reason="boom"), _metrics()]
    # partitions 4 and 6 (positions 0 and 2) trained; their rows travel stacked
    reply, messages = _stacked_reply(
        partitions, replies, [Stacked("arrays", layers, (2, 0))]
    )
    # one array per layer in the block's reply, not one per partition
    assert [len(r) for r in reply.content.array_records.values()] == [2]
    split = split_block_reply(reply, messages, partitions)
    assert split[1].error.reason == "boom"
    for position, row in ((2, 0), (0, 1)):
        got = split[position].content
        assert got.metric_records["metrics"]["num-examples"] == 5
        record = got.array_records["arrays"]
        assert list(record) == ["w", "b"]
        for key, layer in layers.items():
            # the same Array, byte for byte, as the partition's own record
            assert record[key].data == array_from_numpy(layer[row]).data
            assert tuple(record[key].shape) == layer.shape[1:]


@pytest.mark.parametrize(
    ("header", "stack", "match"),
    [
        ({"stack/0": [0, 1]}, {"w": np.zeros((3, 2))}, r"\{'w': \(3,\)\} rows"),
        ({"stack/0": [0, 1]}, {"w": np.zeros(())}, r"rows for 2 partitions"),
        ({"stack/0": [0, 0]}, {"w": np.zeros((2, 2))}, r"names positions \[0, 0\]"),
        ({"stack/0": [0, 5]}, {"w": np.zeros((2, 2))}, r"positions \[0, 5\] of 2"),
        ({"stack/0": [0, 1]}, None, r"'stack/0' is missing"),
        ({"stack/0": [0, 1]}, "garbage", r"'stack/0' is unreadable: .*pickled"),
        ({"stack/0": [0, 1], "stack-names": ["metrics"]}, {"w": np.zeros((2, 1))},
         r"both send record 'metrics'"),
    ],
)  # fmt: skip
def test_a_malformed_stack_fails_the_partitions_it_names(header, stack, match):
    partitions = [3, 5]
    reply, messages = _stacked_reply(
        partitions, [_metrics(), _metrics()],
        [Stacked("arrays", {"w": np.zeros((2, 2))}, (0, 1))],
    )  # fmt: skip
    content = reply.content  # a hostile node's edits of a well-formed reply
    del content["stack/0"]
    if stack == "garbage":
        garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                        data=b"garbage")  # fmt: skip
        content["stack/0"] = ArrayRecord({"w": garbage})
    elif stack is not None:
        content["stack/0"] = record_from_layers(stack)
    for key, value in header.items():
        content.config_records["block"][key] = value
    split = split_block_reply(reply, messages, partitions)
    named = sorted(set(header["stack/0"]) & {0, 1})  # the positions it names
    assert [r.has_error() for r in split] == [j in named for j in (0, 1)]
    for j in named:
        reason = split[j].error.reason
        assert f"the reply of partition {partitions[j]} is malformed" in reason
        assert re.search(match, reason), reason
    for j in {0, 1} - set(named):  # the rest of the block is unharmed
        assert split[j].content.metric_records["metrics"]["num-examples"] == 5


def test_a_block_holds_one_message_type():
    messages = [
        *_instructions([0]),
        instruction(partition_node_id(1), RecordDict(), "evaluate"),
    ]
    with pytest.raises(ValueError, match=r"one message type .*'evaluate', 'train'"):
        pack_block(messages, [0, 1], num_partitions=2, dst_node_id=9)


# ------------------------------------------------------------------ nodes


class InProcessGrid(Grid):
    """The run's grid as the ServerApp sees it, its nodes running the app here."""

    def __init__(self, node_ids, *, lose=()):
        self.node_ids = list(node_ids)
        self.contexts = {
            n: Context(
                run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}
            )
            for n in self.node_ids
        }
        self.lose = set(lose)
        self.pushed: list[Message] = []
        self.replies: dict[str, Message] = {}

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pushed.append(message)
            node = message.metadata.dst_node_id
            if node not in self.lose:
                reply = app(message, self.contexts[node])
                self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def _train_messages(grid, n):
    from flwr_alie.config import ALIEConfig
    from flwr_alie.evaluation.task import make_model

    cell = Cell(strategy="fedavg", split="iid", seed=0, declared=0, clients=n,
                steps=1, batch_size=4)  # fmt: skip
    config = TaskOptions.of(cell).to_record(ALIEConfig().to_run_config())
    arrays = ArrayRecord(make_model(64, 10, seed=0).state_dict())
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=n)
    return list(strategy.configure_train(1, arrays, config, grid))


@pytest.mark.parametrize(("block_size", "blocks"), [(1, 6), (4, 2), (6, 1), (9, 1)])
def test_a_cells_strategy_sees_a_node_per_partition_and_a_block_per_message(
    block_size, blocks
):
    base = InProcessGrid([71, 72])
    grid = BlockGrid(base, num_partitions=6, block_size=block_size, nodes=[71, 72])
    assert sorted(grid.get_node_ids()) == [partition_node_id(p) for p in range(6)]
    messages = _train_messages(grid, 6)
    replies = list(grid.send_and_receive(messages, timeout=5))
    assert len(base.pushed) == blocks
    for pushed in base.pushed:  # block b: partitions bK .. bK + K - 1, on nodes[b % 2]
        partitions = pushed.content.config_records["block"]["partitions"]
        (block,) = {p // block_size for p in partitions}
        assert sorted(partitions) == list(
            range(block * block_size, min(6, (block + 1) * block_size))
        )
        assert pushed.metadata.dst_node_id == [71, 72][block % 2]
    assert [r.metadata.reply_to_message_id for r in replies] == [
        m.metadata.message_id for m in messages
    ]  # one reply per instruction, in the instructions' order
    assert [r.metadata.src_node_id for r in replies] == [
        m.metadata.dst_node_id for m in messages
    ]
    assert not any(r.has_error() for r in replies)
    assert all(r.content.metric_records["metrics"]["num-examples"] for r in replies)


def test_the_replies_of_a_lost_node_are_missing_after_the_timeout():
    base = InProcessGrid([71, 72], lose={72})
    grid = BlockGrid(base, num_partitions=6, block_size=3, nodes=[71, 72],
                     interval=0.01)  # fmt: skip
    replies = list(grid.send_and_receive(_train_messages(grid, 6), timeout=0.2))
    assert sorted(r.metadata.src_node_id for r in replies) == [1000, 1001, 1002]


def test_a_message_to_a_node_that_is_no_partition_is_refused():
    grid = BlockGrid(InProcessGrid([71]), num_partitions=2, block_size=2, nodes=[71])
    message = instruction(5, RecordDict())
    with pytest.raises(ValueError, match=r"dst_node_id=5"):
        grid.push_messages([message])


def test_slots_hand_each_running_cell_its_own_nodes():
    slots = NodeSlots([11, 12, 13, 14], slots=2, per_slot=2)
    with slots.slot() as first, slots.slot() as second:
        assert sorted(first + second) == [11, 12, 13, 14]
    shared = NodeSlots([11, 12, 13], slots=2, per_slot=2)  # too few: round robin
    with shared.slot() as first, shared.slot() as second:
        assert (first, second) == ([11, 12], [13, 11])


def test_waiting_for_nodes_names_how_many_came():
    with pytest.raises(RuntimeError, match=r"2 of 3 SuperNodes registered"):
        wait_for_nodes(InProcessGrid([1, 2]), 3, timeout=0.1)
    assert wait_for_nodes(InProcessGrid([5, 2]), 2) == [2, 5]


# ------------------------------------------------------------ Flower's arrays

_ARRAYS = hnp.arrays(
    dtype=st.sampled_from(
        [np.float32, np.float64, np.float16, np.int64, np.int8, np.bool_, ">f4"]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


@settings(max_examples=60, deadline=None)
@given(array=_ARRAYS, fortran=st.booleans())
def test_arrays_are_serialized_as_flower_serializes_them(array, fortran):
    if fortran:
        array = np.asfortranarray(array)
    ours, flowers = array_from_numpy(array), Array(array)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )
    # the same object as far as Flower can tell: fields, their order, the dirty
    # flag, the content id, and what it reads back
    assert list(ours.__dict__.items()) == list(flowers.__dict__.items())
    assert ours == flowers
    assert ours.is_dirty
    assert flowers.is_dirty
    assert ours.object_id == flowers.object_id
    assert ours.deflate() == flowers.deflate()
    np.testing.assert_array_equal(ours.numpy(), flowers.numpy())


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int8, np.bool_, ">f4"]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
    ),
    layout=st.sampled_from(["C", "F", "strided"]),
)
def test_the_rows_of_a_stack_are_the_arrays_flower_makes_of_them(array, layout):
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided":
        array = array[::2]
    rows = arrays_of_rows(array)
    assert len(rows) == len(array)
    for ours, row in zip(rows, array, strict=True):
        flowers = Array(np.asarray(row))  # a 1-d stack's rows: NumPy scalars
        assert list(ours.__dict__.items()) == list(flowers.__dict__.items())
        assert ours.object_id == flowers.object_id
        np.testing.assert_array_equal(ours.numpy(), row)


def test_a_stack_needs_rows():
    with pytest.raises(ValueError, match="0-d array"):
        arrays_of_rows(np.float32(1.0))


@settings(max_examples=60, deadline=None)
@given(array=_ARRAYS, fortran=st.booleans())
def test_arrays_are_read_as_flower_reads_them(array, fortran):
    from flwr_alie.evaluation import flower_patches

    if fortran:
        array = np.asfortranarray(array)
    expected = Array(array).numpy()  # Flower's own (the patch is not applied here)
    got = flower_patches._numpy(Array(array))
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert got.flags.writeable
    assert got.flags.f_contiguous == expected.flags.f_contiguous
    np.testing.assert_array_equal(got, expected)


def test_a_rebuilt_record_shares_the_arrays_it_keeps_and_leaves_its_base_alone():
    base = ArrayRecord({"w": Array(np.ones(3, np.float32)),
                        "n": Array(np.array(4))})  # fmt: skip
    before = {k: (v.data, v.shape) for k, v in base.items()}
    rebuilt = record_from_layers({"w": np.zeros(3, np.float32)}, base=base)
    assert list(rebuilt) == ["w", "n"]
    assert rebuilt["n"] is base["n"]  # shared, not copied
    np.testing.assert_array_equal(rebuilt["w"].numpy(), np.zeros(3, np.float32))
    assert {k: (v.data, v.shape) for k, v in base.items()} == before


def test_logs_keep_warnings_and_progress_only():
    import logging

    from flwr_alie.evaluation.flower_patches import _ProgressOnly

    keep = _ProgressOnly("[tag]")

    def record(level, msg):
        return logging.LogRecord("flwr", level, "f", 1, msg, (), None)

    assert keep.filter(record(logging.WARNING, "anything"))
    assert keep.filter(record(logging.INFO, "[tag] rounds %d"))
    assert not keep.filter(record(logging.INFO, "configure_train: Sampled %s"))
    assert not keep.filter(record(logging.INFO, MetricRecord({"a": 1.0})))


_RECORD_VALUES = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.text(max_size=3), st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.lists(st.floats(allow_nan=False), max_size=2),
    st.lists(st.one_of(st.integers(), st.text(max_size=2)), max_size=3),
    st.none(), st.binary(max_size=3), st.just(object()),
    st.just(Array(np.ones(2, np.float32))), st.just(ConfigRecord({"a": 1})),
)  # fmt: skip


def _outcome(call):
    try:
        return "ok", call()
    except Exception as err:  # the kind and the words of Flower's refusal
        return type(err).__name__, str(err)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([ConfigRecord, MetricRecord, ArrayRecord, RecordDict]),
    key=st.one_of(st.text(max_size=4), st.integers(), st.none()),
    value=_RECORD_VALUES,
)
def test_records_without_casts_set_get_and_list_items_as_flower_does(kind, key, value):
    from flwr_alie.evaluation import flower_patches

    flowers = flower_patches._flower_typed_dict
    ours, theirs = kind(), kind()
    set_ours = _outcome(lambda: flower_patches._setitem(ours, key, value))
    set_theirs = _outcome(lambda: flowers["__setitem__"](theirs, key, value))
    assert set_ours == set_theirs
    assert _outcome(lambda: flower_patches._getitem(ours, key)) == _outcome(
        lambda: flowers["__getitem__"](theirs, key)
    )
    assert list(flower_patches._items(ours)) == list(flowers["items"](theirs))
    assert list(flower_patches._iter(ours)) == list(flowers["__iter__"](theirs))
    for probe in (key, "absent"):
        assert flower_patches._contains(ours, probe) == flowers["__contains__"](
            theirs, probe
        )
    assert ours.__dict__["_data"] == theirs.__dict__["_data"]


_RECORDS = st.sampled_from(
    [
        lambda: ArrayRecord({"w": Array(np.ones(2, np.float32))}),
        lambda: MetricRecord({"m": 1.0}),
        lambda: ConfigRecord({"c": "x"}),
    ]
)


@settings(max_examples=100, deadline=None)
@given(
    records=st.lists(st.tuples(st.text(min_size=1, max_size=3), _RECORDS), max_size=6),
    view=st.sampled_from(["array_records", "metric_records", "config_records"]),
    new=_RECORDS,
)
def test_record_views_without_casts_are_flowers_views(records, view, new):
    from flwr_alie.evaluation import flower_patches

    def build():
        return RecordDict({key: make() for key, make in records}), new()

    (ours, new_ours), (theirs, new_theirs) = build(), build()
    patched = {
        "array_records": flower_patches._array_records,
        "metric_records": flower_patches._metric_records,
        "config_records": flower_patches._config_records,
    }[view](ours)
    flowers = flower_patches._flower_views[view].fget(theirs)
    assert type(patched) is type(flowers)
    assert patched.allowed_type is flowers.allowed_type
    assert patched.recorddict is ours
    assert [(k, type(r)) for k, r in patched.items()] == [
        (k, type(r)) for k, r in flowers.items()
    ]
    assert all(patched[k] is ours[k] for k in patched)
    # the RecordDict is unchanged
    assert [(k, type(r)) for k, r in ours.items()] == [
        (k, type(r)) for k, r in theirs.items()
    ]
    # both write through to their RecordDict, and refuse the same records
    assert _outcome(lambda: patched.__setitem__("new", new_ours)) == _outcome(
        lambda: flowers.__setitem__("new", new_theirs)
    )
    assert [(k, type(r)) for k, r in ours.items()] == [
        (k, type(r)) for k, r in theirs.items()
    ]
    if "new" in patched:
        del patched["new"], flowers["new"]
        assert list(ours) == list(theirs)
