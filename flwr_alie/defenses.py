"""Defences that resist ALIE, as Flower Message-API strategies.

Built on the pure functions of :mod:`flwr_alie.aggregators`, on *updates*: each
reply's floating arrays minus the round's global arrays (which the strategy sees in
``configure_train``). Non-floating arrays (BatchNorm's counters) are aggregated as
Flower's FedAvg aggregates them. Sample counts are not weights unless a class says so.

- :class:`CenteredClipping` (Karimireddy, He and Jaggi, ICML 2021)
- :class:`GeometricMedian` (RFA; Pillutla, Kakade and Harchaoui, IEEE TSP 2022)
- :class:`NNM` (nearest-neighbour mixing; Allouah et al., AISTATS 2023), a wrapper
- :class:`Bucketing` (Karimireddy, He and Jaggi, ICLR 2022), a wrapper

They compose with :class:`flwr_alie.ALIEStrategy`, which wraps the outermost one:
``ALIEStrategy(NNM(Krum(num_malicious_nodes=f), f=f))`` crafts, then mixes, then
selects.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flwr_alie._wrapping import StrategyWrapper, reply_weight
from flwr_alie.aggregators import (
    bucketing,
    centered_clipping,
    geometric_median,
    nearest_neighbor_mixing,
)
from flwr_alie.aggregators._checks import check_count, check_real
from flwr_alie.params import (
    Layers,
    PackSpec,
    arrays_from_layers,
    layers_from_record,
    layers_from_reply,
    pack,
    record_from_layers,
    unpack,
)

__all__ = ["NNM", "Bucketing", "CenteredClipping", "GeometricMedian"]


def _pack_updates(
    replies: Sequence[Message], global_layers: Layers
) -> tuple[torch.Tensor, PackSpec]:
    """Pack the replies' floating arrays minus the global ones, a row per reply."""
    readers: list[Callable[[], Layers]] = [
        functools.partial(layers_from_reply, m, f"node {m.metadata.src_node_id}")
        for m in replies
    ]
    return pack(
        readers,
        global_layers,
        names=[f"node {m.metadata.src_node_id}" for m in replies],
    )


def _with_arrays(message: Message, arrays: dict[str, Array]) -> Message:
    """Return a copy of `message` whose ArrayRecord holds `arrays` instead."""
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    for key, record in message.content.items():
        if isinstance(record, ArrayRecord):
            record = record_from_layers(arrays, base=record)
        records[key] = record
    rebuilt = copy.copy(message)  # same metadata; the original keeps its content
    rebuilt.content = RecordDict(records)
    return rebuilt


def _by_node(replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
    """Split valid replies (sorted by node id: a deterministic round) from errors."""
    replies = list(replies)
    valid = sorted(
        (m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id
    )
    return valid, [m for m in replies if m.has_error()]


class _RobustFedAvg(FedAvg):
    """FedAvg whose floating arrays come from a robust aggregate of the updates."""

    def __init__(self, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self._global: tuple[int, Layers] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model, then sample as FedAvg does."""
        self._global = (server_round, layers_from_record(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def _robust(
        self, x: torch.Tensor, replies: Sequence[Message]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the updates robustly; the rest as FedAvg does."""
        valid, _ = _by_node(replies)
        valid, _ = self._check_and_log_replies(valid, is_train=True)
        if not valid or self._global is None or self._global[0] != server_round:
            return super().aggregate_train(server_round, valid)
        global_layers = self._global[1]
        x, spec = _pack_updates(valid, global_layers)  # read before FedAvg's pass
        update, extra = self._robust(x, valid)
        arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is None:
            return arrays, metrics
        robust = unpack(update, spec, global_layers)
        arrays = record_from_layers(
            {k: robust[k] for k in spec.packed_keys}, base=arrays
        )
        merged = MetricRecord(dict(metrics or {}))
        for key, value in extra.items():
            merged[key] = value
        return arrays, merged


class CenteredClipping(_RobustFedAvg):
    """Centered clipping (Karimireddy, He and Jaggi, ICML 2021) as a Flower strategy.

    New global model = global + :math:`v_L`, where :math:`v_L` is
    :func:`flwr_alie.aggregators.centered_clipping` of the round's updates with
    ``center`` = the previous round's aggregated update (zeros in round 1): the
    clipping centre is state kept across rounds. Sample counts are not used.

    Parameters
    ----------
    tau : float
        The clipping radius, ``> 0``, in the units of an update's L2 norm.
    iterations : int
        ``L >= 1`` (the paper uses 1).
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, keys).

    Notes
    -----
    The paper clips workers' momenta around the previous aggregate momentum; here
    the updates of a round are clipped around the previous aggregated update
    (server-side, no client momentum). The round's metrics gain ``cc.tau``,
    ``cc.clipped`` (replies clipped in the last iteration) and ``cc.update-norm``.
    """

    def __init__(
        self, *, tau: float, iterations: int = 1, **fedavg_kwargs: Any
    ) -> None:
        self.tau = check_real(tau, "tau", positive=True)
        self.iterations = check_count(iterations, "iterations", low=1)
        super().__init__(**fedavg_kwargs)
        self._center: torch.Tensor | None = None

    def __repr__(self) -> str:
        """Name the options."""
        return f"CenteredClipping(tau={self.tau}, iterations={self.iterations})"

    def _robust(
        self, x: torch.Tensor, replies: Sequence[Message]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        d = x.shape[1]
        center = self._center
        if center is None or center.shape != (d,):
            center = torch.zeros(d, dtype=x.dtype)
        update = centered_clipping(
            x, center=center, tau=self.tau, iterations=self.iterations
        )
        self._center = update
        # which replies the last iteration clipped: distance to the centre it used
        previous = center if self.iterations == 1 else None
        clipped = float("nan")
        if previous is not None:
            distances = torch.linalg.vector_norm(x - previous, dim=1)
            clipped = float((distances > self.tau).sum())
        return update, {
            "cc.tau": self.tau,
            "cc.clipped": clipped,
            "cc.update-norm": float(torch.linalg.vector_norm(update)),
        }


class GeometricMedian(_RobustFedAvg):
    """The geometric median of the updates (RFA's smoothed Weiszfeld) as a strategy.

    New global model = global + :func:`flwr_alie.aggregators.geometric_median` of
    the round's updates (Pillutla, Kakade and Harchaoui, IEEE TSP 2022).

    Parameters
    ----------
    nu, iterations, tol
        As in :func:`flwr_alie.aggregators.geometric_median`.
    weighted : bool
        Weight the replies by their sample counts (``weighted_by_key``); the
        default weighs every reply alike, since a Byzantine client can claim any
        count.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        *,
        nu: float = 1e-6,
        iterations: int = 100,
        tol: float = 1e-6,
        weighted: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        self.nu = check_real(nu, "nu", positive=True)
        self.iterations = check_count(iterations, "iterations", low=1)
        self.tol = check_real(tol, "tol", positive=False)
        if not isinstance(weighted, bool):
            raise TypeError(f"Expected `weighted` to be a bool, got {weighted!r}")
        self.weighted = weighted
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        """Name the options."""
        return (
            f"GeometricMedian(nu={self.nu}, iterations={self.iterations}, "
            f"tol={self.tol}, weighted={self.weighted})"
        )

    def _robust(
        self, x: torch.Tensor, replies: Sequence[Message]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        weights = None
        if self.weighted:
            weights = torch.tensor(
                [reply_weight(m, self.weighted_by_key) for m in replies]
            )
        update = geometric_median(
            x, weights=weights, nu=self.nu, iterations=self.iterations, tol=self.tol
        )
        return update, {"gm.update-norm": float(torch.linalg.vector_norm(update))}


class NNM(StrategyWrapper):
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023) before any strategy.

    Every train reply's floating arrays are replaced by global + the mean of the
    ``n - f`` updates nearest to its own
    (:func:`flwr_alie.aggregators.nearest_neighbor_mixing`); then `inner`
    aggregates the mixed replies. Error replies pass through.

    Parameters
    ----------
    inner : Strategy
        The strategy that aggregates the mixed replies (e.g. ``Krum``,
        ``FedMedian``, a user's own).
    f : int
        The number of Byzantine replies to resist, ``>= 0`` (``f < n`` is checked
        by :func:`flwr_alie.check_setup` before a run, and in each round).
    """

    def __init__(self, inner: Strategy, *, f: int) -> None:
        super().__init__(inner)
        self.f = check_count(f, "f", low=0)

    def __repr__(self) -> str:
        """Name the inner strategy and `f`."""
        return f"NNM({self.strategy!r}, f={self.f})"

    def setup_problems(self, num_nodes: int) -> list[str]:
        """NNM needs ``f < n``."""
        if self.f >= num_nodes:
            return [f"NNM needs f < n, got f = {self.f} with n = {num_nodes}"]
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Mix the updates, then delegate."""
        valid, errors = _by_node(replies)
        global_layers = self._global_for(server_round)
        if global_layers is None or not valid or self.f >= len(valid):
            return self.strategy.aggregate_train(server_round, valid + errors)
        x, spec = _pack_updates(valid, global_layers)
        mixed = nearest_neighbor_mixing(x, f=self.f)
        forwarded = []
        for message, row in zip(valid, mixed, strict=True):
            layers = unpack(row, spec, global_layers)
            shared = arrays_from_layers({k: layers[k] for k in spec.packed_keys})
            forwarded.append(_with_arrays(message, shared))
        arrays, metrics = self.strategy.aggregate_train(
            server_round, forwarded + errors
        )
        merged = MetricRecord(dict(metrics or {}))
        merged["nnm.f"] = self.f
        return arrays, merged


class Bucketing(StrategyWrapper):
    """Bucketing (Karimireddy, He and Jaggi, ICLR 2022) before any strategy.

    The round's valid replies (sorted by node id) are shuffled into buckets of `s`
    with a generator seeded by ``(seed, server_round)``; `inner` receives one reply
    per bucket: global + the bucket's mean update, claiming the bucket's summed
    sample count. Error replies pass through.

    Parameters
    ----------
    inner : Strategy
        The strategy that aggregates the bucket means; it sees ``ceil(n / s)``
        replies (:func:`flwr_alie.check_setup` applies its limits to that count).
    s : int
        Bucket size, ``>= 1`` (the paper uses 2).
    seed : int
        Seed of the shuffles.
    """

    def __init__(self, inner: Strategy, *, s: int, seed: int = 0) -> None:
        super().__init__(inner)
        self.s = check_count(s, "s", low=1)
        self.seed = check_count(seed, "seed", low=0)

    def __repr__(self) -> str:
        """Name the inner strategy and the options."""
        return f"Bucketing({self.strategy!r}, s={self.s}, seed={self.seed})"

    def inner_num_nodes(self, num_nodes: int) -> int:
        """Return the number of replies `inner` receives: ``ceil(n / s)``."""
        return math.ceil(num_nodes / self.s)

    def _generator(self, server_round: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average random buckets, then delegate one reply per bucket."""
        valid, errors = _by_node(replies)
        global_layers = self._global_for(server_round)
        if global_layers is None or not valid:
            return self.strategy.aggregate_train(server_round, valid + errors)
        x, spec = _pack_updates(valid, global_layers)
        means = bucketing(x, s=self.s, generator=self._generator(server_round))
        # the same permutation bucketing drew, from the same seed
        perm = torch.randperm(
            len(valid), generator=self._generator(server_round)
        ).tolist()
        weight_key = str(getattr(self.strategy, "weighted_by_key", "num-examples"))
        forwarded = []
        for k, row in enumerate(means):
            members = [valid[i] for i in perm[k * self.s : (k + 1) * self.s]]
            count = float(sum(reply_weight(m, weight_key) for m in members))
            layers = unpack(row, spec, global_layers)
            first = _with_arrays(
                members[0],
                arrays_from_layers({k2: layers[k2] for k2 in spec.packed_keys}),
            )
            metric_key = next(iter(first.content.metric_records), "metrics")
            total = int(count) if count.is_integer() else count
            first.content[metric_key] = MetricRecord({weight_key: total})
            forwarded.append(first)
        arrays, metrics = self.strategy.aggregate_train(
            server_round, forwarded + errors
        )
        merged = MetricRecord(dict(metrics or {}))
        merged["bucketing.buckets"] = len(forwarded)
        return arrays, merged
