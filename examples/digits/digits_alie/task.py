"""The task of this app: scikit-learn's digits (offline), an MLP, local SGD."""

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

__all__ = ["evaluate", "local_seed", "make_model", "task_data", "train"]


@dataclass(frozen=True)
class Partition:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class TaskData:
    partitions: tuple[Partition, ...]
    test: Partition


@functools.lru_cache(maxsize=4)
def task_data(num_partitions: int, seed: int) -> TaskData:
    """IID partitions of 80% of the digits, one per node; the rest for testing."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.tensor(np.random.default_rng(seed).permutation(len(y)))
    n_test = len(y) // 5
    test, rest = order[:n_test], order[n_test:]
    parts = tuple(
        Partition(x[idx], y[idx]) for idx in torch.tensor_split(rest, num_partitions)
    )
    return TaskData(parts, Partition(x[test], y[test]))


def make_model(seed: int = 0) -> nn.Module:
    """A 64-64-10 MLP, initialised from a generator of its own (no global seeding)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            bound = 1.0 / layer.in_features**0.5  # PyTorch's default range
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def local_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one node's minibatch order in one round."""
    return zlib.crc32(f"{seed}/{server_round}/{partition_id}".encode())


def train(
    model: nn.Module, data: Partition, *, epochs: int, lr: float, seed: int
) -> float:
    """Local SGD; minibatches of 32 in an order drawn from `seed`. Returns the loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), 32):
            idx = order[start : start + 32]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
            loss.backward()
            optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, data: Partition) -> tuple[float, float]:
    """(loss, accuracy) on `data`."""
    model.eval()
    logits = model(data.x)
    loss = float(nn.functional.cross_entropy(logits, data.y))
    return loss, float((logits.argmax(1) == data.y).float().mean())
