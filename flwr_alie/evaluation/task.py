"""The learning task of the evaluation: data, partitions, model, local training.

The default task is scikit-learn's ``load_digits`` (1,797 8x8 images of digits,
shipped inside scikit-learn: no network) with a small MLP. Partitions come from
Flower Datasets' partitioners (IID, or Dirichlet non-IID over the labels), applied
to a held-out-free training split; a fixed 20% test split serves the server-side
evaluation. Online users can name a Hugging Face dataset (e.g. ``ylecun/mnist``)
instead; it goes through ``flwr_datasets.FederatedDataset`` and is not used in
tests here.

Everything is deterministic given the seed: the split, the partitions, the model
initialisation and the order of local minibatches (a ``torch.Generator`` per round
and partition, never the global RNG).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

__all__ = [
    "DIGITS",
    "MNIST1D",
    "Partition",
    "TaskData",
    "evaluate",
    "get_weights",
    "load_data",
    "make_model",
    "train",
]

DIGITS = "digits"
MNIST1D = "mnist1d"
# MNIST-1D samples generated: 8,000 for training (157 a client at n = 51), 2,000 test
_MNIST1D_SAMPLES = 10_000
Split = Literal["iid", "dirichlet"]


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
        ``"digits"`` or ``"mnist1d"`` (both offline), or a Hugging Face dataset id
        with ``image`` and ``label`` columns (online; loaded through Flower
        Datasets).
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

    x, y = _load_arrays(dataset)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = len(y) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    train = Dataset.from_dict({"x": x[train_idx], "label": y[train_idx]})
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
        test=_as_partition(x[test_idx], y[test_idx]),
        num_features=int(x.shape[1]),
        num_classes=int(y.max()) + 1,
    )


def _load_arrays(dataset: str) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    if dataset == DIGITS:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    if dataset == MNIST1D:
        return _mnist1d_arrays()
    from flwr_datasets import FederatedDataset  # pragma: no cover - needs a network
    from flwr_datasets.partitioner import IidPartitioner

    fds = FederatedDataset(dataset=dataset, partitioners={"train": IidPartitioner(1)})
    part = fds.load_partition(0).with_format("numpy")
    images = np.asarray(part["image"], dtype=np.float32).reshape(len(part), -1) / 255.0
    return images, np.asarray(part["label"], dtype=np.int64)


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
    num_features: int = 64, num_classes: int = 10, seed: int = 0
) -> nn.Module:
    """Return a small MLP initialised from `seed` alone.

    The initialisation is PyTorch's default for ``nn.Linear`` (weights and biases
    uniform in ``+-1/sqrt(fan_in)``), drawn from a ``torch.Generator`` of its own:
    the global RNG is neither read nor seeded, so that models built concurrently
    (the evaluation's cells run in threads) do not depend on each other.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden = 64
    layers: list[nn.Module] = []
    for fan_in, fan_out in ((num_features, hidden), (hidden, num_classes)):
        linear = nn.Linear(fan_in, fan_out, device="meta").to_empty(device="cpu")
        bound = 1.0 / fan_in**0.5
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        layers.append(linear)
    return nn.Sequential(layers[0], nn.ReLU(), layers[1])


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


@torch.no_grad()
def evaluate(model: nn.Module, data: Partition) -> tuple[float, float]:
    """Return (loss, accuracy) of the model on `data`."""
    model.eval()
    logits = model(data.x)
    loss = float(nn.functional.cross_entropy(logits, data.y))
    accuracy = float((logits.argmax(1) == data.y).float().mean())
    return loss, accuracy
