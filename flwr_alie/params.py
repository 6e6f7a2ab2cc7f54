"""The one pack/unpack pair between Flower's arrays and a torch tensor.

Flower carries a model as named arrays: an ``ArrayRecord`` in the Message API, a
``Parameters`` object (a list of NDArrays) in the legacy API. Both are read here into
*layers*, an ordered mapping from a name to a NumPy array (legacy arrays are named by
their position, ``"0"``, ``"1"``, ...). :func:`pack` flattens the floating-point
layers of several updates, as differences from a reference model, into one
``(n, d)`` tensor and returns the :class:`PackSpec` that :func:`unpack` takes to turn
a row back into the floating layers, the exact inverse: ``unpack(pack(...))``
gives the packed arrays back, from the spec alone. Non-floating layers (BatchNorm's
``num_batches_tracked``) are not packed; :func:`record_from_layers` keeps them from
a base record. Nothing else in flwr-alie flattens or rebuilds records.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from numpy.typing import NDArray
from torch import Tensor

__all__ = [
    "Layers",
    "PackSpec",
    "array_from_numpy",
    "arrays_from_layers",
    "arrays_of_rows",
    "layers_from_parameters",
    "layers_from_record",
    "layers_from_reply",
    "npy_view",
    "pack",
    "pack_aggregate",
    "parameters_from_layers",
    "record_from_layers",
    "tensors_from_layers",
    "torch_views_of_record",
    "unpack",
]

Layers = Mapping[str, NDArray[np.generic]]


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """How a packed row maps back onto named layers.

    Attributes
    ----------
    keys, shapes, dtypes : tuple
        Name, shape and NumPy dtype of every layer of the reference, in order.
    offsets : tuple of int or None
        Start of each floating layer in a packed row; ``None`` for a layer that is
        not packed (not floating point).
    d : int
        Length of a packed row.
    reference : Layers
        The layers the rows are differences from (views, not copies): what
        :func:`unpack` adds a row back to.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[np.generic], ...]
    offsets: tuple[int | None, ...]
    d: int
    reference: Layers = dataclasses.field(repr=False, compare=False)

    @classmethod
    def of(cls, layers: Layers) -> PackSpec:
        """Describe `layers`: every floating layer is packed, in order."""
        shapes: list[tuple[int, ...]] = []
        dtypes: list[np.dtype[np.generic]] = []
        offsets: list[int | None] = []
        d = 0
        for array in layers.values():
            shapes.append(tuple(array.shape))
            dtypes.append(array.dtype)
            if np.issubdtype(array.dtype, np.floating):
                offsets.append(d)
                d += int(array.size)
            else:
                offsets.append(None)
        return cls(
            tuple(layers), tuple(shapes), tuple(dtypes), tuple(offsets), d, layers
        )

    @property
    def packed_keys(self) -> tuple[str, ...]:
        """Names of the floating layers, which a packed row holds."""
        return tuple(
            k for k, o in zip(self.keys, self.offsets, strict=True) if o is not None
        )

    def check(self, layers: Layers, who: str, *, exact_dtypes: bool = False) -> None:
        """Raise ``ValueError`` naming `who` and the key if `layers` does not fit.

        The keys and shapes must be the reference's, and each dtype of its kind
        (floating or not); with `exact_dtypes`, a floating layer's dtype must be
        the reference's own (a float64 reply to a float32 model does not fit).
        """
        if set(layers) != set(self.keys):
            missing = sorted(set(self.keys) - set(layers))
            extra = sorted(set(layers) - set(self.keys))
            raise ValueError(
                f"{who}: arrays do not match the global model: missing keys "
                f"{missing}, unexpected keys {extra}"
            )
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            array = layers[key]
            if tuple(array.shape) != shape:
                raise ValueError(
                    f"{who}: array {key!r} has shape {tuple(array.shape)}, the "
                    f"global model's has shape {shape}"
                )
            floating = dtype.kind == "f"
            if floating != (array.dtype.kind == "f") or (
                exact_dtypes and floating and array.dtype != dtype
            ):
                raise ValueError(
                    f"{who}: array {key!r} has dtype {array.dtype}, the global "
                    f"model's has dtype {dtype}"
                )


def pack(
    updates: Sequence[Layers | Callable[[], Layers]],
    reference: Layers,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    names: Sequence[str] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, PackSpec]:
    """Pack the floating layers of `updates`, minus `reference`, into one tensor.

    Row ``i`` is the concatenation, in the order of `reference`, of
    ``updates[i][key] - reference[key]`` over the floating keys, computed in `dtype`.

    Parameters
    ----------
    updates : Sequence[Layers or Callable[[], Layers]]
        The models to pack; each must have the keys and shapes of `reference`. A
        callable is called when its row is filled, so that only one update at a
        time needs to be read into memory.
    reference : Layers
        The model the differences are taken from (the round's global model).
    dtype : torch.dtype
        Dtype of the packed tensor.
    device : torch.device or str
        Device of the packed tensor.
    names : Sequence[str], optional
        How to name each update in an error (e.g. ``"node 42"``).
    out : Tensor, optional
        A tensor to pack into when it has the right shape, dtype and device (for
        instance last round's, to spare the allocation); otherwise a new one.

    Returns
    -------
    tuple[Tensor, PackSpec]
        The ``(len(updates), d)`` tensor and the spec that inverts it.

    Raises
    ------
    ValueError
        If an update's keys, shapes or dtype kinds differ from the reference's; the
        message names the update and the key.

    Examples
    --------
    >>> import numpy as np
    >>> ref = {"w": np.zeros((2, 2), np.float32), "steps": np.array(3)}
    >>> upd = {"w": np.ones((2, 2), np.float32), "steps": np.array(4)}
    >>> x, spec = pack([upd, upd], ref)
    >>> x.shape, spec.packed_keys
    (torch.Size([2, 4]), ('w',))
    >>> unpack(x[0], spec)
    {'w': array([[1., 1.],
           [1., 1.]], dtype=float32)}
    """
    spec = PackSpec.of(reference)
    device = torch.device(device)
    shape = (len(updates), spec.d)
    if out is None or out.shape != shape or out.dtype != dtype or out.device != device:
        out = torch.empty(shape, dtype=dtype, device=device)
    floating = [
        (
            key,
            offset,
            _tensor(reference[key]).reshape(-1).to(device=device, dtype=dtype),
        )
        for key, offset in zip(spec.keys, spec.offsets, strict=True)
        if offset is not None
    ]
    numpy_rows = (
        device.type == "cpu" and dtype in _NUMPY_FLOATS and not out.requires_grad
    )
    rows = out.numpy() if numpy_rows else None
    flat_ref = None
    if rows is not None and floating:
        flat_ref = torch.cat([ref for _, _, ref in floating]).numpy()
    for i, update in enumerate(updates):
        layers = update() if callable(update) else update
        spec.check(layers, names[i] if names is not None else f"update {i}")
        if rows is not None and flat_ref is not None:
            # a row in two NumPy calls instead of three torch calls a layer: the same
            # values (each converted exactly or rounded once, then one subtraction
            # in `dtype`, as below), the per-call overhead once a row
            row = rows[i, : flat_ref.size]
            parts = [np.asarray(layers[key]).reshape(-1) for key, _, _ in floating]
            np.concatenate(parts, out=row, casting="same_kind")
            np.subtract(row, flat_ref, out=row)
            continue
        for key, offset, ref in floating:
            segment = out[i, offset : offset + ref.numel()]
            value = _tensor(layers[key]).reshape(-1)
            if value.dtype == dtype and value.device == segment.device:
                torch.sub(value, ref, out=segment)  # one pass: read both, write once
            else:
                segment.copy_(value).sub_(ref)
    return out, spec


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def unpack(row: Tensor, spec: PackSpec) -> dict[str, NDArray[np.generic]]:
    """Turn a packed row back into the floating layers: the inverse of :func:`pack`.

    Each packed layer is ``spec.reference[key] + row[segment]``, in the shape and
    dtype of the reference's; the keys are :attr:`PackSpec.packed_keys`, in order,
    and nothing else (the layers that were not packed belong to whatever record the
    result goes into: :func:`record_from_layers` with ``base=``).
    """
    if row.shape != (spec.d,):
        raise ValueError(f"Expected `row` of shape ({spec.d},), got {tuple(row.shape)}")
    row = row.detach().cpu()
    layers: dict[str, NDArray[np.generic]] = {}
    for key, shape, dtype, offset in zip(
        spec.keys, spec.shapes, spec.dtypes, spec.offsets, strict=True
    ):
        if offset is None:
            continue
        size = math.prod(shape)
        ref = _tensor(spec.reference[key]).reshape(-1)
        acc = torch.promote_types(ref.dtype, row.dtype)
        value = ref.to(acc) + row[offset : offset + size].to(acc)
        layers[key] = value.numpy().astype(dtype, copy=False).reshape(shape)
    return layers


def pack_aggregate(
    aggregate: Layers,
    reference: Layers,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    out: Tensor | None = None,
) -> tuple[Tensor, PackSpec]:
    """Pack an aggregate's floating layers as one update row from `reference`.

    Only the floating layers count: strategies average integer counters (BatchNorm's
    ``num_batches_tracked``) into floats, which :func:`pack` would refuse as a
    dtype of another kind. Returns the ``(d,)`` row and the spec that inverts it.

    Raises
    ------
    KeyError
        If `aggregate` lacks a floating layer of `reference`.
    ValueError
        If a floating layer's shape differs.
    """
    floating = set(PackSpec.of(reference).packed_keys)
    layers = {
        key: aggregate[key] if key in floating else value
        for key, value in reference.items()
    }
    x, spec = pack([layers], reference, dtype=dtype, device=device, out=out)
    return x[0], spec


def _tensor(array: NDArray[np.generic]) -> torch.Tensor:
    """Share the memory of `array`, read-only views included (never written to)."""
    _readonly_warning_given()
    return torch.from_numpy(np.ascontiguousarray(array))


@functools.cache
def _readonly_warning_given() -> None:
    """Have torch give its one warning on read-only arrays now, silenced.

    ``torch.from_numpy`` warns once per process that a read-only array makes a
    tensor that must not be written to, which these views never are; after this,
    it never warns again (and no per-call ``warnings.catch_warnings``, which is
    not thread-safe, is needed).
    """
    readonly = np.zeros(1, np.float32)
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not")
        torch.from_numpy(readonly)


def layers_from_record(record: ArrayRecord) -> dict[str, NDArray[np.generic]]:
    """Read an ``ArrayRecord`` into layers: read-only views of the record's bytes.

    The record is not changed; an array it holds in a form other than NumPy's
    ``.npy`` bytes is read with ``Array.numpy()`` (a copy). Reading the record just
    read again (the same object with the same ``Array`` objects, on the same
    thread: a chain of wrappers each reading the round's global model) returns the
    same views without reading it again.
    """
    arrays = tuple(id(a) for a in record.values())
    last = getattr(_last_read, "entry", None)
    if last is not None and last[0] is record and last[1] == arrays:
        return dict(last[2])
    layers = {}
    for key, array in record.items():
        view = npy_view(array.data)
        layers[key] = array.numpy() if view is None else view
    _last_read.entry = (record, arrays, layers)
    return dict(layers)


_last_read = threading.local()


def torch_views_of_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Read an ``ArrayRecord`` as torch tensors that share the record's bytes.

    No copy (unlike ``ArrayRecord.to_torch_state_dict``): the tensors are views of
    read-only memory and must not be written to; ``load_state_dict`` and
    ``torch.stack`` copy out of them.
    """
    return {key: _tensor(array) for key, array in layers_from_record(record).items()}


def array_from_numpy(value: NDArray[np.generic]) -> Array:
    """Return ``Array(value)`` with the ``.npy`` header of each layout made once.

    The same ``Array`` (the same bytes, the same fields) as Flower's
    ``Array(ndarray)``, which runs ``np.save`` and formats the header afresh for
    every array: most of the cost for the small arrays of a model's layers. The
    fields are set as Flower's constructor sets them once it has parsed its
    arguments, without the parsing (which takes ten times as long as the rest; the
    tests compare the two). Object arrays go through Flower's own constructor
    (which refuses them).
    """
    array = np.asarray(value)
    if array.dtype.hasobject:
        return Array(array)
    fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)
    header, dtype, shape = _npy_header(array.dtype, fortran, array.shape)
    data = header + array.tobytes(order="F" if fortran else "C")
    made = object.__new__(Array)
    made.__dict__.update(
        _is_dirty=True, dtype=dtype, shape=shape, stype="numpy.ndarray", data=data
    )
    return made


def arrays_of_rows(stacked: NDArray[np.generic]) -> list[Array]:
    """Return ``[array_from_numpy(row) for row in stacked]``, with less work a row.

    The same ``Array`` objects (the same bytes, the same fields), the header made
    once for all rows and each row's bytes copied once: what turns a block's
    stacked layers back into each partition's own arrays. A stack that is not in
    C order (whose rows could be in Fortran order) goes row by row, and so does
    a stack of scalars (NumPy gives each in native byte order).
    """
    array = np.asarray(stacked)
    if array.ndim == 0:
        raise ValueError(f"Expected an array of rows, got a 0-d array {array!r}")
    if array.ndim == 1 or array.dtype.hasobject or not array.flags.c_contiguous:
        return [array_from_numpy(row) for row in array]  # (scalars: native order)
    header, dtype, shape = _npy_header(array.dtype, False, array.shape[1:])
    size = math.prod(shape)
    rows = array.reshape(len(array), size).view(np.uint8)  # each row's bytes
    arrays = []
    for row in rows:
        made = object.__new__(Array)
        made.__dict__.update(
            _is_dirty=True,
            dtype=dtype,
            shape=shape,
            stype="numpy.ndarray",
            data=header + row.data,
        )
        arrays.append(made)
    return arrays


@functools.lru_cache(maxsize=4096)
def _npy_header(
    dtype: np.dtype[np.generic], fortran: bool, shape: tuple[int, ...]
) -> tuple[bytes, str, tuple[int, ...]]:
    """Return what ``np.save`` writes before an array's data, and its Array fields."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        stream, {"descr": dtype.str, "fortran_order": fortran, "shape": shape}
    )
    return stream.getvalue(), str(dtype), tuple(int(n) for n in shape)


def record_from_layers(
    layers: Mapping[str, NDArray[np.generic] | Array],
    *,
    base: ArrayRecord | None = None,
) -> ArrayRecord:
    """Build a new ``ArrayRecord`` from layers, keeping their names and order.

    With `base`, the record has the keys of `base`, in its order: a key in `layers`
    takes that value, any other keeps the ``Array`` of `base`. A value may be an
    ``Array`` already (serialized once, shared by several records). ``Array``
    objects are shared, not copied (Flower's ``ArrayRecord(dict)`` copies each one;
    an ``Array`` is never changed in place). `base` is never modified.
    """

    def as_array(value: NDArray[np.generic] | Array) -> Array:
        return value if isinstance(value, Array) else array_from_numpy(value)

    record = ArrayRecord()
    if base is None:
        for key, value in layers.items():
            record[key] = as_array(value)
        return record
    for key, array in base.items():
        record[key] = as_array(layers[key]) if key in layers else array
    return record


def arrays_from_layers(layers: Layers) -> dict[str, Array]:
    """Serialize layers once, for :func:`record_from_layers` to share."""
    return {key: array_from_numpy(value) for key, value in layers.items()}


def layers_from_reply(message: Message, name: str) -> dict[str, NDArray[np.generic]]:
    """Read the one ``ArrayRecord`` of a train reply into layers (views).

    Raises ``ValueError`` naming the reply (`name`) when it holds no or several.
    """
    records = list(message.content.array_records.values())
    if len(records) != 1:
        raise ValueError(
            f"{name}: expected one ArrayRecord in the train reply, got {len(records)}"
        )
    return layers_from_record(records[0])


def layers_from_parameters(parameters: Parameters) -> dict[str, NDArray[np.generic]]:
    """Read legacy ``Parameters`` into layers named ``"0"``, ``"1"``, ...

    Read-only views of the tensors' ``.npy`` bytes where possible.
    """
    views = [npy_view(t) for t in parameters.tensors]
    if parameters.tensor_type == "numpy.ndarray" and all(v is not None for v in views):
        return {str(i): v for i, v in enumerate(views) if v is not None}
    return {str(i): a for i, a in enumerate(parameters_to_ndarrays(parameters))}


def npy_view(data: bytes) -> NDArray[np.generic] | None:
    """Return a read-only view of ``.npy`` bytes, or ``None`` if not plain ``.npy``.

    The header of each layout is parsed once (cached): what ``np.load`` spends most
    of its time on for a small array.
    """
    magic = data[:8]
    if magic == _NPY_V1:  # what np.save writes, and array_from_numpy
        end = 10 + int.from_bytes(data[8:10], "little")
    elif magic == _NPY_V2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return None
    parsed = _parse_header(data[:end])
    if parsed is None:
        return None
    shape, fortran, dtype, count = parsed
    view = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return view.reshape(shape, order="F") if fortran else view.reshape(shape)


_NPY_V1, _NPY_V2 = b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00"


@functools.lru_cache(maxsize=4096)
def _parse_header(
    header: bytes,
) -> tuple[tuple[int, ...], bool, np.dtype[np.generic], int] | None:
    """Parse a ``.npy`` header once: the arrays of one layer all share it.

    Returns the shape, the Fortran order, the dtype and the element count.
    """
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(stream)
    except (ValueError, OSError):
        return None
    if dtype.hasobject:
        return None
    return tuple(shape), bool(fortran), dtype, math.prod(shape)


def parameters_from_layers(
    layers: Mapping[str, NDArray[np.generic] | bytes],
    *,
    base: Parameters | None = None,
) -> Parameters:
    """Build legacy ``Parameters`` from layers named ``"0"``, ``"1"``, ...

    Without `base`, the tensors are the layers in their order. With `base`, tensor
    ``i`` is layer ``str(i)`` where `layers` has it and the bytes of `base`
    otherwise (as the node sent them); a value may be serialized bytes already.
    `base` is never modified.
    """

    def as_bytes(value: NDArray[np.generic] | bytes) -> bytes:
        if isinstance(value, bytes):
            return value
        return as_npy_bytes(value)

    if base is None:
        return Parameters(
            tensors=[as_bytes(v) for v in layers.values()], tensor_type="numpy.ndarray"
        )
    return Parameters(
        tensors=[
            as_bytes(layers[str(i)]) if str(i) in layers else t
            for i, t in enumerate(base.tensors)
        ],
        tensor_type=base.tensor_type,
    )


def tensors_from_layers(layers: Layers) -> dict[str, bytes]:
    """Serialize legacy layers once, for :func:`parameters_from_layers` to share."""
    return {key: as_npy_bytes(value) for key, value in layers.items()}


def as_npy_bytes(value: NDArray[np.generic]) -> bytes:
    """Serialize one array as Flower's legacy API does (``.npy`` bytes)."""
    return ndarrays_to_parameters([np.asarray(value)]).tensors[0]
