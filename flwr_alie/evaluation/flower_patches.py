"""What the evaluation's ServerApp changes of Flower in its own process, and why.

Each change is measured, keeps every number the same, and applies to the
``flwr-simulation`` process that runs the evaluation's ServerApp only (it is called
from the ServerApp's ``main``, never at import): not for a library.

- :func:`collect_young_generation_only`: ``ArrayRecord.to_numpy_ndarrays`` forces
  full garbage collections.
- :func:`read_arrays_with_cached_headers`: ``Array.numpy`` parses each array's
  ``.npy`` header with ``ast.literal_eval``.
- :func:`keep_progress_logs_only`: every cell-round logs eight INFO lines, each sent
  to the SuperLink and streamed to ``flwr run``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import numpy as np
from flwr.app import Array
from flwr.app.message import arrayrecord
from numpy.typing import NDArray

from flwr_alie.params import npy_view

__all__ = [
    "collect_young_generation_only",
    "keep_progress_logs_only",
    "read_arrays_with_cached_headers",
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
