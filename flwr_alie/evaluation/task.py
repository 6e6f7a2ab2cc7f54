"""The learning task of the evaluation: data, partitions, model, local training.

The default task is scikit-learn's ``load_digits`` (1,797 8x8 images of digits,
shipped inside scikit-learn: no network) with a small MLP. Partitions come from
Flower Datasets' partitioners (IID, or Dirichlet non-IID over the labels), applied
to a held-out-free training split; a fixed 20% test split serves the server-side
evaluation. MNIST-1D (``mnist1d``) is generated locally too. Online users can name
a Hugging Face dataset with an image and a label column (``ylecun/mnist``,
``uoft-cs/cifar10``), or a local folder of such a dataset's Parquet files; both go
through ``flwr_datasets.FederatedDataset``, and the dataset's own ``test`` split, when
it has one, is the test set.

Two local regimes: FedAvg-style local epochs (:func:`train`), and FedSGD-style local
steps (:func:`train_steps`: ``K`` SGD steps on minibatches, optionally with worker
momentum, as in the ALIE paper's distributed SGD with ``K = 1``). Two model families:
an MLP and a small CNN (1-D for MNIST-1D, 2-D for images).

Everything is deterministic given the seed: the split, the partitions, the model
initialisation and the order of local minibatches (a ``torch.Generator`` per round
and partition, never the global RNG).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

__all__ = [
    "DIGITS",
    "MNIST1D",
    "MODELS",
    "Partition",
    "TaskData",
    "evaluate",
    "get_weights",
    "input_shape_text",
    "load_data",
    "make_model",
    "minibatches",
    "train",
    "train_steps",
]

DIGITS = "digits"
MNIST1D = "mnist1d"
# MNIST-1D samples generated: 8,000 for training (157 a client at n = 51), 2,000 test
_MNIST1D_SAMPLES = 10_000
Split = Literal["iid", "dirichlet"]
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


@functools.lru_cache(maxsize=8)
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
        ``"digits"`` or ``"mnist1d"`` (both offline); a Hugging Face dataset id
        with an image column and a ``label`` column (online), or a local folder of
        such a dataset's Parquet files (``<folder>/**/train-*.parquet``); the last
        two are loaded through Flower Datasets' ``FederatedDataset``.
    num_partitions : int
        Number of clients.
    split : {"iid", "dirichlet"}
        ``IidPartitioner`` or ``DirichletPartitioner`` over the labels.
    alpha : float
        Concentration of the Dirichlet split (smaller: more skewed).
    seed : int
        Seed of the test split and the partitioners.

    Returns
    -------
    TaskData
        Cached per process, so that the clients of a simulation share one load.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

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
    train = Dataset.from_dict({"x": x, "label": y})
    partitioner: IidPartitioner | DirichletPartitioner
    if split == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif split == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            seed=seed,
            min_partition_size=2,
            self_balancing=True,
        )
    else:
        raise ValueError(f"Expected `split` in ('iid', 'dirichlet'), got {split!r}")
    partitioner.dataset = train
    partitions = []
    for pid in range(num_partitions):
        part = partitioner.load_partition(pid).with_format("numpy")
        partitions.append(
            _as_partition(np.asarray(part["x"]), np.asarray(part["label"]))
        )
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
    return _hf_arrays(dataset)


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
    restored afterwards.
    """
    import random

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
    return x, y


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


@torch.no_grad()
def evaluate(model: nn.Module, data: Partition) -> tuple[float, float]:
    """Return (loss, accuracy) of the model on `data`."""
    model.eval()
    logits = model(data.x)
    loss = float(nn.functional.cross_entropy(logits, data.y))
    accuracy = float((logits.argmax(1) == data.y).float().mean())
    return loss, accuracy
