"""The experiment grid: attacked cells, each with its paired clean reference.

Every attacked cell (a strategy configured for ``f`` Byzantine nodes, ``f`` of the
``n`` clients running ALIE) has a reference: the same strategy, configured
identically, with all ``n`` clients honest, on the same seed. A clean FedAvg cell per
split and seed measures each defence's own cost. Within a seed every cell shares the
initial model, the partitions and the Byzantine partition ids (the first ``f`` of
one permutation of the clients drawn from the seed), and every honest client draws
the same minibatches given (seed, round, partition): common random numbers, so that
a difference between two cells is the difference of their configurations.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from flwr.serverapp.strategy import Strategy

from flwr_alie.attacks import Direction
from flwr_alie.config import ALIEConfig, Knowledge, draw_byzantine
from flwr_alie.evaluation.strategies import DefenceOptions, spec

__all__ = [
    "Cell",
    "build_grid",
    "byzantine_ids",
    "count_for",
    "load_cells",
    "save_cells",
]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One federated training: a strategy, a data split, a seed, and an attack or none.

    ``declared`` is the number of Byzantine nodes the strategy is configured for
    (``num_malicious_nodes``, the trimmed count); ``byzantine_ids`` the partitions
    that attack (empty for a clean cell). `z`, `direction` and `knowledge` are
    ``None`` in a clean cell.

    The training regime: ``steps = 0`` trains `epochs` local epochs a round
    (FedAvg-style); ``steps = K > 0`` takes K local SGD steps on minibatches
    instead (FedSGD-style, the ALIE paper's with ``K = 1``), with worker momentum
    `worker_momentum`. The server applies `server_lr` and `server_momentum` to
    the aggregate's update (:class:`flwr_alie.momentum.ServerMomentum`; the default
    1 and 0 leave the aggregate as it is). ``vectorised`` runs the FedSGD steps of
    a block's clients in one vectorised pass rather than one after the other
    (equal up to rounding, :func:`flwr_alie.evaluation.task.run_steps_vectorised`),
    on ``device`` (``"cuda"`` where the ClientApps have a GPU).

    How the cell travels: ``block_size`` partitions per Flower message (``0``:
    all ``clients`` in one). With one after the other (``vectorised`` off) any
    block size gives the same numbers.
    """

    strategy: str
    split: str
    seed: int
    declared: int
    byzantine_ids: tuple[int, ...] = ()
    z: float | Literal["max"] | None = None
    direction: str | None = None
    knowledge: Knowledge | None = None
    dataset: str = "digits"
    alpha: float = 0.5
    clients: int = 20
    rounds: int = 15
    epochs: int = 3
    lr: float = 0.5
    batch_size: int = 8
    model: str = "mlp"
    steps: int = 0
    worker_momentum: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    vectorised: bool = False
    device: str = "cpu"
    cc_tau: float = 1.0
    cc_iterations: int = 1
    geomed_iterations: int = 100
    block_size: int = 0

    @property
    def blocks(self) -> int:
        """How many Flower messages a round of the cell takes (one per block)."""
        size = self.block_size or self.clients
        return -(-self.clients // size)

    @property
    def attacked(self) -> bool:
        """Whether some clients are Byzantine."""
        return bool(self.byzantine_ids)

    @property
    def attack(self) -> str:
        """The attack's label: ``clean``, or ``z=1.5`` plus what is not the default."""
        if not self.attacked:
            return "clean"
        label = f"z={self.z}"
        if self.direction != Direction.NEGATIVE.value:
            label += f" {self.direction}"
        if self.knowledge != "oracle":
            label += f" {self.knowledge}"
        return label

    @property
    def key(self) -> str:
        """A readable identity, unique within a grid."""
        return (
            f"{self.strategy}@f{self.declared}/{self.attack.replace(' ', ',')}/"
            f"byz{len(self.byzantine_ids)}/{self.split}/seed{self.seed}"
        )

    def reference(self) -> Cell:
        """Return the paired clean cell: same strategy and configuration, all honest."""
        return dataclasses.replace(
            self, byzantine_ids=(), z=None, direction=None, knowledge=None
        )

    def fedavg_reference(self) -> Cell:
        """Return the clean FedAvg cell of the same split and seed."""
        return dataclasses.replace(self.reference(), strategy="fedavg", declared=0)

    def defence_options(self) -> DefenceOptions:
        """Return the parameters of flwr-alie's defences in this cell."""
        return DefenceOptions(
            cc_tau=self.cc_tau,
            cc_iterations=self.cc_iterations,
            geomed_iterations=self.geomed_iterations,
        )

    def strategy_object(self) -> Strategy:
        """Build the cell's strategy, configured for its declared Byzantine nodes."""
        from flwr_alie.evaluation.strategies import make_strategy

        return make_strategy(
            self.strategy,
            num_nodes=self.clients,
            num_byzantine=self.declared,
            options=self.defence_options(),
        )

    def alie_config(self) -> ALIEConfig:
        """Return the attack options of the cell (no Byzantine node when clean).

        The attack runs on the ServerApp's CPU: the evaluation's models are small.
        """
        return ALIEConfig(
            z="max" if self.z is None else self.z,
            direction=Direction(self.direction or Direction.NEGATIVE.value),
            knowledge=self.knowledge or "oracle",
            byzantine_ids=self.byzantine_ids,
            seed=self.seed,
            device="cpu",
        )

    def problems(self) -> list[str]:
        """Why the cell cannot run (empty if it can); no strategy is built."""
        from flwr_alie.limits import check_setup

        f = len(self.byzantine_ids)
        inner = self.strategy_object()
        z = self.z if self.z is not None else 0.0
        return check_setup(inner, num_nodes=self.clients, num_byzantine=f, z=z)


def count_for(fraction: float, clients: int) -> int:
    """Return the Byzantine count of `fraction` of `clients`, or say why there is none.

    ``round(fraction * clients)``; ``ValueError`` when that is 0 (nothing would be
    attacked), naming the smallest fraction that gives one, or when it is half the
    clients or more (no honest majority).

    Examples
    --------
    >>> count_for(0.2, 20)
    4
    """
    count = round(fraction * clients)
    if count < 1:
        raise ValueError(
            f"--fractions {fraction:g} gives round({fraction:g} * {clients}) = 0 "
            f"Byzantine clients of {clients}, so nothing would be attacked; the "
            f"nearest valid fraction is {1 / clients:g} (1 of {clients})"
        )
    if 2 * count >= clients:
        raise ValueError(
            f"--fractions {fraction:g} gives {count} Byzantine clients of {clients}, "
            "not a minority; use a fraction below 0.5"
        )
    return count


def byzantine_ids(seed: int, clients: int, count: int) -> tuple[int, ...]:
    """Return a seed's Byzantine partitions (:func:`flwr_alie.config.draw_byzantine`).

    Nested across counts: the 2 Byzantine clients of a seed are among its 4, and
    the same as ``alie.fraction`` picks in a user's app for that seed.

    Examples
    --------
    >>> set(byzantine_ids(0, 20, 2)) <= set(byzantine_ids(0, 20, 4))
    True
    """
    return draw_byzantine(clients, count, seed)


def build_grid(
    *,
    strategies: Sequence[str],
    fractions: Sequence[float] = (0.2,),
    zs: Sequence[float | Literal["max"]] = (1.5,),
    directions: Sequence[str] = ("negative",),
    knowledge: Sequence[Knowledge] = ("oracle",),
    splits: Sequence[str] = ("iid",),
    seeds: Sequence[int] = (0, 1, 2),
    **task: Any,
) -> list[Cell]:
    """Return the attacked cells, their clean references and clean FedAvg, deduplicated.

    For every strategy, split, seed and fraction: the clean reference (the strategy
    configured for ``f = round(fraction * clients)``, all clients honest), and one
    attacked cell per ``z``, direction and knowledge; per split and seed, clean
    FedAvg. `task` sets the remaining :class:`Cell` fields (``clients``,
    ``rounds``, ...). Every option is checked here, before anything runs.

    Examples
    --------
    >>> cells = build_grid(strategies=["krum"], zs=[1.5], seeds=[0], rounds=2)
    >>> [c.key for c in cells]  # doctest: +NORMALIZE_WHITESPACE
    ['krum@f4/clean/byz0/iid/seed0',
     'krum@f4/z=1.5/byz4/iid/seed0',
     'fedavg@f0/clean/byz0/iid/seed0']
    """
    for name in strategies:
        spec(name)  # ValueError naming the choices
    for direction in directions:
        Direction(direction)  # ValueError naming the bad value
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {list(seeds)}")
    clients = int(task.get("clients", Cell.clients))
    counts = [count_for(fraction, clients) for fraction in fractions]
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> None:
        cells.setdefault(cell.key, cell)

    for strategy, split, seed in itertools.product(strategies, splits, seeds):
        base = Cell(strategy=strategy, split=split, seed=seed, declared=0, **task)
        for count in counts:
            declared = count if spec(strategy).uses_f else 0
            reference = dataclasses.replace(base, declared=declared)
            add(reference)
            ids = byzantine_ids(seed, clients, count)
            for z, direction, known in itertools.product(zs, directions, knowledge):
                add(
                    dataclasses.replace(
                        reference,
                        byzantine_ids=ids,
                        z=z,
                        direction=direction,
                        knowledge=known,
                    )
                )
        add(dataclasses.replace(base, strategy="fedavg"))
    for cell in cells.values():
        cell.alie_config()  # checks z, direction and knowledge
    return list(cells.values())


def save_cells(cells: Iterable[Cell], path: Path) -> None:
    """Write cells as JSON (the evaluation's ServerApp reads them back)."""
    path.write_text(json.dumps([dataclasses.asdict(c) for c in cells], indent=1))


def load_cells(path: Path) -> list[Cell]:
    """Read cells written by :func:`save_cells`."""
    cells = []
    for fields in json.loads(path.read_text()):
        fields["byzantine_ids"] = tuple(fields["byzantine_ids"])
        cells.append(Cell(**fields))
    return cells
