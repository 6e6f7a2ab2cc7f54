"""The experiment grid: one cell per configuration, each a full federated training."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from flwr_alie.attacks import Direction
from flwr_alie.config import ALIEConfig, Knowledge
from flwr_alie.evaluation.strategies import STRATEGIES

__all__ = ["Cell", "build_grid", "load_cells", "save_cells"]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration: a strategy against ALIE (or no attack) on one data split.

    ``fraction == 0`` is the no-attack cell; its `z`, `direction` and `knowledge`
    are not used (and are set to ``"none"`` in the results).
    """

    strategy: str
    fraction: float
    z: float | Literal["max"]
    direction: str
    knowledge: Knowledge
    split: str
    seed: int
    dataset: str = "digits"
    alpha: float = 0.5
    rounds: int = 20
    clients: int = 20
    epochs: int = 1
    lr: float = 0.5

    @property
    def attacked(self) -> bool:
        """Whether the cell has Byzantine nodes."""
        return self.fraction > 0

    @property
    def key(self) -> str:
        """A readable identity of the cell, unique within a grid."""
        attack = (
            f"f{self.fraction:g}-z{self.z}-{self.direction}-{self.knowledge}"
            if self.attacked
            else "no-attack"
        )
        return f"{self.strategy}/{attack}/{self.split}/seed{self.seed}"

    def alie_config(self) -> ALIEConfig:
        """Return the attack options (the Byzantine draw uses the cell's seed)."""
        return ALIEConfig(
            z=self.z,
            direction=Direction(self.direction),
            knowledge=self.knowledge,
            fraction=self.fraction,
            seed=self.seed,
        )

    def num_byzantine(self) -> int:
        """Return the number of Byzantine clients of this cell."""
        return len(self.alie_config().byzantine_partitions(self.clients))


def build_grid(
    *,
    strategies: Sequence[str] = STRATEGIES,
    fractions: Sequence[float] = (0.2,),
    zs: Sequence[float | Literal["max"]] = ("max", 1.5),
    directions: Sequence[str] = ("negative",),
    knowledge: Sequence[Knowledge] = ("oracle",),
    splits: Sequence[str] = ("iid",),
    seeds: Sequence[int] = (0,),
    dataset: str = "digits",
    alpha: float = 0.5,
    rounds: int = 20,
    clients: int = 20,
    epochs: int = 1,
    lr: float = 0.5,
) -> list[Cell]:
    """Return the cells of the full product, plus one no-attack cell per strategy.

    A fraction of 0 in `fractions` is the no-attack cell; it is added once per
    strategy, split and seed whether listed or not, as the reference of the drop in
    accuracy. The remaining arguments set the :class:`Cell` fields of that name.

    Examples
    --------
    >>> cells = build_grid(strategies=["krum"], zs=["max", 1.5], rounds=2)
    >>> [c.key for c in cells]  # doctest: +NORMALIZE_WHITESPACE
    ['krum/no-attack/iid/seed0',
     'krum/f0.2-zmax-negative-oracle/iid/seed0',
     'krum/f0.2-z1.5-negative-oracle/iid/seed0']
    """
    for name in strategies:
        if name not in STRATEGIES:
            raise ValueError(f"Expected strategies among {STRATEGIES}, got {name!r}")
    for direction in directions:
        Direction(direction)  # raises ValueError naming the bad value
    cells: list[Cell] = []
    for strategy, split, seed in itertools.product(strategies, splits, seeds):
        make = functools.partial(
            Cell,
            strategy=strategy,
            split=split,
            seed=seed,
            dataset=dataset,
            alpha=alpha,
            rounds=rounds,
            clients=clients,
            epochs=epochs,
            lr=lr,
        )
        cells.append(
            make(fraction=0.0, z=0.0, direction="negative", knowledge="oracle")
        )
        attacked = itertools.product(
            [f for f in fractions if f > 0], zs, directions, knowledge
        )
        cells.extend(
            make(fraction=f, z=z, direction=d, knowledge=k) for f, z, d, k in attacked
        )
    for each in cells:
        each.alie_config()  # check every option before anything runs
    return cells


def save_cells(cells: Iterable[Cell], path: Path) -> None:
    """Write cells as JSON (the ServerApp of the evaluation reads them back)."""
    path.write_text(json.dumps([dataclasses.asdict(c) for c in cells], indent=1))


def load_cells(path: Path) -> list[Cell]:
    """Read cells written by :func:`save_cells`."""
    return [Cell(**c) for c in json.loads(path.read_text())]
