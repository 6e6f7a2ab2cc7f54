import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_alie.params import (
    PackSpec,
    arrays_from_layers,
    layers_from_parameters,
    layers_from_record,
    layers_from_reply,
    npy_view,
    pack,
    pack_aggregate,
    parameters_from_layers,
    record_from_layers,
    tensors_from_layers,
    unpack,
)

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def model(seed: int, shapes, dtypes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    layers = {}
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
        if np.issubdtype(dtype, np.floating):
            layers[f"layer{i}"] = rng.normal(size=shape).astype(dtype)
        else:
            layers[f"layer{i}"] = rng.integers(0, 100, size=shape).astype(dtype)
    return layers


layer_shapes = st.lists(
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=5,
)
layer_dtypes = st.sampled_from([*FLOAT_DTYPES, np.int64])


@settings(max_examples=60, deadline=None)
@given(shapes=layer_shapes, data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_unpack_inverts_pack(shapes, data, seed):
    dtypes = [data.draw(layer_dtypes) for _ in shapes]
    reference = model(seed, shapes, dtypes)
    update = model(seed + 1, shapes, dtypes)
    x, spec = pack([update], reference, dtype=torch.float64)
    back = unpack(x[0], spec)  # from the spec alone
    floating = [k for k, v in update.items() if np.issubdtype(v.dtype, np.floating)]
    assert list(back) == floating  # exactly the packed layers, in order
    for key, value in back.items():
        assert value.dtype == update[key].dtype
        assert value.shape == update[key].shape
        if value.dtype == np.float64:  # one rounding of the float64 difference
            bound = (
                2 * np.finfo(np.float64).eps * (abs(update[key]) + abs(reference[key]))
            )
            assert np.all(np.abs(value - update[key]) <= bound)
        else:  # narrower floats come back exactly through float64
            np.testing.assert_array_equal(value, update[key])


@settings(max_examples=80, deadline=None)
@given(
    shapes=layer_shapes,
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    rows=st.integers(1, 4),
)
def test_pack_rounds_each_value_once_then_subtracts_in_its_dtype(
    shapes, data, seed, dtype, rows
):
    # each packed value is (update converted to dtype) - (reference converted to
    # dtype), one subtraction in dtype: the bits of that computation in torch, for
    # every mix of layer dtypes (the CPU path reads a row in NumPy calls)
    dtypes = [data.draw(layer_dtypes) for _ in shapes]
    reference = model(seed, shapes, dtypes)
    updates = [model(seed + 1 + r, shapes, dtypes) for r in range(rows)]
    x, spec = pack(updates, reference, dtype=dtype)
    assert x.dtype == dtype
    assert x.shape == (rows, spec.d)
    for r, update in enumerate(updates):
        expected = [
            torch.from_numpy(update[k]).reshape(-1).to(dtype)
            - torch.from_numpy(reference[k]).reshape(-1).to(dtype)
            for k in spec.packed_keys
        ]
        want = torch.cat(expected) if expected else torch.empty(0, dtype=dtype)
        assert torch.equal(x[r], want)


def test_pack_holds_differences_from_the_reference():
    reference = {
        "w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
        "b": np.float32(5.0) * np.ones(()),
    }
    updates = [
        {"w": np.array([[2.0, 2.0], [3.0, 5.0]], np.float32), "b": np.array(4.0)},
        {"w": np.array([[1.0, 1.0], [1.0, 1.0]], np.float32), "b": np.array(5.0)},
    ]
    reference["b"] = np.array(5.0)  # a 0-dim float64 layer beside a float32 one
    x, spec = pack(updates, reference)
    assert spec.d == 5
    torch.testing.assert_close(
        x, torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0], [0.0, -1.0, -2.0, -3.0, 0.0]])
    )


def test_non_floating_layers_are_not_packed():
    reference = {"w": np.zeros(3, np.float32), "steps": np.array(7, np.int64)}
    spec = PackSpec.of(reference)
    assert spec.packed_keys == ("w",)
    assert spec.offsets == (0, None)
    back = unpack(torch.ones(3), spec)
    assert list(back) == ["w"]  # not packed, not unpacked: "steps" stays the base's
    np.testing.assert_array_equal(back["w"], np.ones(3, np.float32))
    sent = ArrayRecord({"w": Array(np.zeros(3, np.float32)),
                        "steps": Array(np.array(9, np.int64))})  # fmt: skip
    rebuilt = record_from_layers(back, base=sent)
    assert list(rebuilt) == ["w", "steps"]
    assert int(rebuilt["steps"].numpy()) == 9
    assert rebuilt["steps"] is sent["steps"]


def test_rebuilt_records_keep_the_base_and_share_what_they_do_not_replace():
    base = ArrayRecord(
        {"w": Array(np.zeros(2, np.float32)), "steps": Array(np.array(3, np.int64))}
    )
    shared = arrays_from_layers({"w": np.ones(2, np.float32)})
    rebuilt = record_from_layers(shared, base=base)
    assert list(rebuilt) == ["w", "steps"]
    assert rebuilt["steps"] is base["steps"]  # shared, not copied
    np.testing.assert_array_equal(rebuilt["w"].numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(base["w"].numpy(), [0.0, 0.0])  # untouched


def test_rebuilt_parameters_keep_the_other_tensors_bytes():
    base = parameters_from_layers(
        {"0": np.zeros(2, np.float32), "1": np.array(3, np.int64)}
    )
    rebuilt = parameters_from_layers(
        tensors_from_layers({"0": np.ones(2, np.float32)}), base=base
    )
    assert rebuilt.tensors[1] is base.tensors[1]
    layers = layers_from_parameters(rebuilt)
    np.testing.assert_array_equal(layers["0"], [1.0, 1.0])
    assert int(layers["1"]) == 3


def test_small_deltas_on_large_weights_keep_their_precision():
    # float32 weights of 1000 with updates of 1e-4: deltas are exact in float32
    reference = {"w": np.full(4, 1000.0, np.float32)}
    update = {"w": reference["w"] + np.float32(2**-13)}
    x, _ = pack([update], reference)
    assert torch.all(x == 2**-13)


def test_zero_size_and_empty_models():
    reference = {"empty": np.zeros((0, 3), np.float32)}
    x, spec = pack([reference, reference], reference)
    assert x.shape == (2, 0)
    assert unpack(x[0], spec)["empty"].shape == (0, 3)


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"w": np.zeros(3, np.float32)}, r"node 7: .*missing keys \['steps'\]"),
        (
            {"w": np.zeros(3, np.float32), "steps": np.array(1), "x": np.zeros(1)},
            r"node 7: .*unexpected keys \['x'\]",
        ),
        (
            {"w": np.zeros(4, np.float32), "steps": np.array(1)},
            r"node 7: array 'w' has shape \(4,\), the global model's has shape \(3,\)",
        ),
        (
            {"w": np.zeros(3, np.int32), "steps": np.array(1)},
            r"node 7: array 'w' has dtype int32",
        ),
    ],
)
def test_mismatched_update_names_the_node_and_key(update, match):
    reference = {"w": np.zeros(3, np.float32), "steps": np.array(0)}
    with pytest.raises(ValueError, match=match):
        pack([reference, update], reference, names=["node 1", "node 7"])


def test_pack_does_not_modify_its_inputs():
    reference = model(0, [(3, 2), (4,)], [np.float32, np.float16])
    update = model(1, [(3, 2), (4,)], [np.float32, np.float16])
    before = {k: v.copy() for k, v in update.items()}
    ref_before = {k: v.copy() for k, v in reference.items()}
    pack([update], reference)
    for k in update:
        np.testing.assert_array_equal(update[k], before[k])
        np.testing.assert_array_equal(reference[k], ref_before[k])


def test_record_and_parameters_adapters_round_trip():
    layers = model(3, [(2, 3), (), (5,)], [np.float32, np.int64, np.float64])
    record = record_from_layers(layers)
    assert isinstance(record, ArrayRecord)
    for src, back in [
        (layers, layers_from_record(record)),
        (
            layers,
            dict(
                zip(
                    layers,
                    layers_from_parameters(parameters_from_layers(layers)).values(),
                    strict=True,
                )
            ),
        ),
    ]:
        assert list(back) == list(src)
        for k in src:
            assert back[k].dtype == src[k].dtype
            np.testing.assert_array_equal(back[k], src[k])


def test_unpack_checks_the_row_length():
    spec = PackSpec.of({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"`row` of shape \(3,\), got \(4,\)"):
        unpack(torch.zeros(4), spec)


def test_records_are_read_as_views_of_their_bytes_in_any_memory_order():
    layers = {
        "f": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        "c": np.arange(6, dtype=np.float64).reshape(2, 3),
        "scalar": np.array(3, np.int64),
    }
    back = layers_from_record(record_from_layers(layers))
    for key, value in layers.items():
        np.testing.assert_array_equal(back[key], value)
        assert not back[key].flags.writeable  # a view of the record's bytes


def test_an_aggregate_packs_as_its_floating_update():
    reference = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array(4)}
    # FedAvg averages the integer counter into a float: not part of the update
    aggregate = {"w": np.array([1.5, 1.0], np.float32), "steps": np.array(4.5)}
    row, spec = pack_aggregate(aggregate, reference)
    np.testing.assert_array_equal(row.numpy(), [0.5, -1.0])
    assert spec.packed_keys == ("w",)
    with pytest.raises(ValueError, match="dtype float64"):
        pack([aggregate], reference)  # what pack_aggregate spares its callers


def test_a_reply_with_several_array_records_is_refused_by_name():
    from flwr.app import Message, RecordDict

    from tests.flower_helpers import metadata

    content = RecordDict(
        {
            "a": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
            "b": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
        }
    )
    message = Message(content=content, metadata=metadata(7))
    with pytest.raises(
        ValueError, match=r"partition 3: expected one ArrayRecord.*got 2"
    ):
        layers_from_reply(message, "partition 3")


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    dtype=st.sampled_from(["<f4", ">f8", "<f2", "<i8", "|b1", "|u1"]),
    fortran=st.booleans(),
    version=st.sampled_from([(1, 0), (2, 0), (3, 0)]),
)
def test_npy_view_reads_what_np_load_reads(shape, dtype, fortran, version):
    import io

    array = np.arange(int(np.prod(shape)), dtype=np.int64).astype(dtype)
    array = array.reshape(shape, order="F" if fortran else "C")
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, version=version)
    data = stream.getvalue()
    view = npy_view(data)
    if version == (3, 0):  # utf-8 headers: not read here (np.load's path)
        assert view is None
        return
    expected = np.load(io.BytesIO(data))
    assert view is not None
    assert view.dtype == expected.dtype
    assert view.shape == expected.shape
    assert view.flags.f_contiguous == expected.flags.f_contiguous
    assert not view.flags.writeable
    np.testing.assert_array_equal(view, expected)


@pytest.mark.parametrize(
    "data", [b"", b"\x93NUMPY", b"\x93NUMPY\x01", b"PK\x03\x04" + bytes(60), b"x" * 200]
)
def test_npy_view_refuses_what_is_not_npy(data):
    assert npy_view(data) is None
