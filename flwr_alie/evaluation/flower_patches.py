"""What the evaluation changes of Flower in its own processes, and why.

Each change is measured, keeps every number the same, and applies to the
evaluation's own processes only: the ``flwr-simulation`` process that runs its
ServerApp (called from the ServerApp's ``main``) and, for
:func:`records_without_casts`, those that run its ClientApp (called by its block
runner); never at import, so not for a library.

- :func:`collect_young_generation_only`: ``ArrayRecord.to_numpy_ndarrays`` forces
  full garbage collections.
- :func:`read_arrays_with_cached_headers`: ``Array.numpy`` parses each array's
  ``.npy`` header with ``ast.literal_eval``.
- :func:`keep_progress_logs_only`: every cell-round logs eight INFO lines, each sent
  to the SuperLink and streamed to ``flwr run``.
- :func:`records_without_casts`: every item set in one of Flower's records builds a
  ``typing.Callable`` alias twice; the evaluation sets tens of thousands a second.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.app.message import arrayrecord, recorddict, typeddict
from numpy.typing import NDArray

from flwr_alie.params import npy_view

__all__ = [
    "collect_young_generation_only",
    "keep_progress_logs_only",
    "read_arrays_with_cached_headers",
    "records_without_casts",
]


class _YoungGenerationGC:
    """Stands in for the ``gc`` module in Flower's ``arrayrecord`` module."""

    @staticmethod
    def collect(generation: int = 0) -> int:
        return gc.collect(0)


def collect_young_generation_only() -> None:
    """Stop ``ArrayRecord.to_numpy_ndarrays`` from forcing full collections.

    ``ArrayRecord.to_numpy_ndarrays(keep_input=False)``, which Flower's Bulyan
    calls for each selected reply, runs ``gc.collect()``: about 0.08 s each with
    torch and Flower loaded, 1 s a Bulyan round, while holding the interpreter lock
    over every other cell of the run. The arrays it pops hold no reference cycles
    (reference counting frees them), so that call collects the youngest generation
    only.
    """
    arrayrecord.gc = _YoungGenerationGC()  # type: ignore[assignment,attr-defined]


_flower_numpy = Array.numpy


def _numpy(self: Array) -> NDArray[Any]:
    """``Array.numpy``: the same writable copy, the header parsed once per layout."""
    view = npy_view(self.data) if self.stype == "numpy.ndarray" else None
    if view is None:  # not plain .npy bytes: Flower's own path (and its errors)
        return _flower_numpy(self)
    return np.array(view, copy=True, order="K")


def read_arrays_with_cached_headers() -> None:
    """Make ``Array.numpy`` parse each ``.npy`` header layout once, not per call.

    Flower's aggregations read every reply's arrays with ``Array.numpy``, which is
    ``np.load``: for the small arrays of the evaluation's models, most of its time
    goes to parsing the header with ``ast.literal_eval`` (10.8 ms for the 408 arrays
    of 51 replies of the 1-D CNN, about three quarters of FedAvg's aggregation).
    The replacement returns the same thing, a writable copy of the same dtype, shape
    and memory order, from a cached parse of the header; anything that is not plain
    ``.npy`` bytes goes through Flower's own method.
    """
    Array.numpy = _numpy  # type: ignore[method-assign]


class _ProgressOnly(logging.Filter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(record.msg).startswith(self.tag)


def keep_progress_logs_only(tag: str) -> None:
    """Drop Flower's INFO logs, keep warnings and the lines that start with `tag`.

    Flower's ``Strategy.start`` logs eight INFO lines a round (the sampled nodes,
    the aggregated metrics, the evaluation), and each is formatted, pushed to the
    SuperLink and streamed to ``flwr run``, which the ``flwr-alie`` command reads
    only for its own progress lines. ``--verbose`` keeps them all.
    """
    logging.getLogger("flwr").addFilter(_ProgressOnly(tag))


_flower_typed_dict = {
    name: getattr(typeddict.TypedDict, name)
    for name in ("__setitem__", "__getitem__", "__contains__", "__iter__", "items")
}  # Flower's own methods, kept for the tests to compare with


def _setitem(self: typeddict.TypedDict[Any, Any], key: Any, value: Any) -> None:
    fields = self.__dict__
    fields["_check_key_fn"](key)
    fields["_check_value_fn"](value)
    fields["_data"][key] = value


def _getitem(self: typeddict.TypedDict[Any, Any], key: Any) -> Any:
    return self.__dict__["_data"][key]


def _contains(self: typeddict.TypedDict[Any, Any], key: object) -> bool:
    return key in self.__dict__["_data"]


def _iter(self: typeddict.TypedDict[Any, Any]) -> Any:
    return iter(self.__dict__["_data"])


def _items(self: typeddict.TypedDict[Any, Any]) -> Any:
    return self.__dict__["_data"].items()


_flower_views = {
    name: getattr(recorddict.RecordDict, name)
    for name in ("array_records", "metric_records", "config_records")
}  # Flower's own properties, kept for the tests to compare with


def _view(self: recorddict.RecordDict, kind: type[Any]) -> Any:
    """Flower's view of a RecordDict's records of one `kind`, built without casts.

    Flower fills the view item by item through its ``__setitem__``, which sets
    each record again in the RecordDict it mirrors (the same record under the
    same key: a no-op); here the view's items are filled directly.
    """
    view = recorddict._SyncedDict(self, kind)
    items = view.__dict__["_data"]
    for key, record in self.__dict__["_data"].items():
        if isinstance(record, kind):
            items[key] = record
    return view


def _array_records(self: recorddict.RecordDict) -> Any:
    return _view(self, ArrayRecord)


def _metric_records(self: recorddict.RecordDict) -> Any:
    return _view(self, MetricRecord)


def _config_records(self: recorddict.RecordDict) -> Any:
    return _view(self, ConfigRecord)


def records_without_casts() -> None:
    """Make setting, getting, finding and listing a record's items skip ``cast``.

    ``TypedDict``, the base of Flower's ``ArrayRecord``, ``ConfigRecord``,
    ``MetricRecord`` and ``RecordDict``, writes ``cast(Callable[[K], None], f)`` for
    each check of ``__setitem__`` and ``cast(dict[K, V], d)`` in ``__getitem__``,
    ``__contains__``, ``__iter__`` and ``items``: ``typing.cast`` returns its
    argument, but its first argument, a typing alias, is built anew on every call
    (about 1.5 us for ``Callable[[K], None]``).
    ``RecordDict.array_records``, ``metric_records`` and ``config_records``
    rebuild a view item by item on every access, setting each record again in the
    RecordDict as well, so a block of 51 partitions sets some 1,600 items on the
    ClientApp and as many when its strategy aggregates them: 2.5 ms of the 47 ms
    a block took on one thread. The replacements run the same checks on the same
    data, in the same order, and raise the same errors; the views hold the same
    records in the same order and write through to their RecordDict as Flower's
    do.
    """
    typed = typeddict.TypedDict
    typed.__setitem__ = _setitem  # type: ignore[method-assign]
    typed.__getitem__ = _getitem  # type: ignore[method-assign]
    typed.__contains__ = _contains  # type: ignore[method-assign]
    typed.__iter__ = _iter  # type: ignore[method-assign]
    typed.items = _items  # type: ignore[method-assign]
    records = recorddict.RecordDict
    records.array_records = property(_array_records)  # type: ignore[method-assign,assignment]
    records.metric_records = property(_metric_records)  # type: ignore[method-assign,assignment]
    records.config_records = property(_config_records)  # type: ignore[method-assign,assignment]
