"""Defences that resist ALIE, as Flower Message-API strategies.

Built on the pure functions of :mod:`flwr_alie.aggregators`, on *updates*: each
reply's floating arrays minus the round's global arrays (which the strategy sees in
``configure_train``). Non-floating arrays (BatchNorm's counters) are aggregated as
Flower's FedAvg aggregates them. Sample counts are not weights unless a class says so.

- :class:`CenteredClipping` (Karimireddy, He and Jaggi, ICML 2021)
- :class:`GeometricMedian` (RFA; Pillutla, Kakade and Harchaoui, IEEE TSP 2022)
- :class:`NNM` (nearest-neighbour mixing; Allouah et al., AISTATS 2023), a wrapper
- :class:`Bucketing` (Karimireddy, He and Jaggi, ICLR 2022), a wrapper

Before any aggregation, each sets aside the replies that would break it, as
failures named in a warning and counted in its ``<prefix>.num-rejected`` metric:
those :func:`flwr_alie.replies.validate` refuses (malformed metrics, sample counts
or arrays), and updates that hold NaN or inf or whose norm overflows float32's
squared distances. One bad client then costs its own reply, not the aggregate.

They compose with :class:`flwr_alie.ALIEStrategy`, which wraps the outermost one:
``ALIEStrategy(NNM(Krum(num_malicious_nodes=f), f=f))`` crafts, then mixes, then
selects.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
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
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flwr_alie._checks import check_count, check_real
from flwr_alie._wrapping import RoundModel, StrategyWrapper, describe
from flwr_alie.aggregators import (
    bucket_permutation,
    bucketing,
    centered_clipping,
    geometric_median,
    nearest_neighbor_mixing,
)
from flwr_alie.aggregators._blocks import column_blocks
from flwr_alie.params import (
    Layers,
    PackSpec,
    arrays_from_layers,
    pack,
    record_from_layers,
    unpack,
)
from flwr_alie.replies import as_failure, message_view, reply_weight, validate

__all__ = ["NNM", "Bucketing", "CenteredClipping", "GeometricMedian"]

# An update whose norm is beyond this squares (and so do its distances to others)
# past float32's largest value.
_LARGEST_NORM = math.sqrt(torch.finfo(torch.float32).max) / 2


@dataclasses.dataclass
class _Screened:
    """A round's replies after screening: the updates fit to aggregate, as rows."""

    kept: list[Message]
    failures: list[Message]
    rejected: int
    x: torch.Tensor | None = None
    spec: PackSpec | None = None


def _screen(
    server_round: int,
    replies: Iterable[Message],
    global_layers: Layers | None,
    weight_key: str,
    who: str,
) -> _Screened:
    """Sort the replies by node, set aside those that would break an aggregate.

    Error replies, and those :func:`flwr_alie.replies.validate` refuses, go on as
    failures; so do updates that are not finite or whose norm overflows float32.
    The kept replies' updates are packed, a row each (when the round's global
    model is known).
    """
    replies = list(replies)
    valid = sorted(
        (m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id
    )
    failures = [m for m in replies if m.has_error()]
    views = [message_view(m, weight_key) for m in valid]
    rejected = validate(server_round, views, global_layers, who)
    failures += [as_failure(valid[i], why) for i, why in rejected.items()]
    keep = [i for i in range(len(valid)) if i not in rejected]
    if global_layers is None or not keep:
        return _Screened([valid[i] for i in keep], failures, len(rejected))
    x, spec = pack(
        [views[i].layers for i in keep],
        global_layers,
        names=[views[i].name for i in keep],
    )
    # float64 squares read through cache-sized blocks: no (n, d) float64 copy of x
    squares = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _, block in column_blocks(x, torch.float64):
        squares += block.square().sum(dim=1)
    norms = squares.sqrt().tolist()
    good = [j for j, norm in enumerate(norms) if norm <= _LARGEST_NORM]  # NaN: False
    for j in sorted(set(range(len(keep))) - set(good)):
        why = (
            "its update holds NaN or inf"
            if not math.isfinite(norms[j])
            else f"its update's norm {norms[j]:.3g} overflows float32's squares"
        )
        log(WARNING, "%s round %d: %s: %s; the reply goes on as a failure", who,
            server_round, views[keep[j]].name, why)  # fmt: skip
        failures.append(as_failure(valid[keep[j]], why))
    rows = x if len(good) == len(keep) else x[good]
    kept = [valid[keep[j]] for j in good]
    return _Screened(kept, failures, len(valid) - len(kept), rows, spec)


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


def _merged(metrics: MetricRecord | None, extra: dict[str, float]) -> MetricRecord:
    merged = MetricRecord(dict(metrics or {}))
    for key, value in extra.items():
        merged[key] = value
    return merged


class _RobustFedAvg(FedAvg):
    """FedAvg whose floating arrays come from a robust aggregate of the updates."""

    prefix = "robust"  # of the strategy's metrics

    def __init__(self, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.round_model = RoundModel()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model, then sample as FedAvg does."""
        self.round_model.see(server_round, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def summary(self) -> None:
        """Log the defence's own settings, then FedAvg's."""
        log(INFO, "\t├──> %r", self)
        super().summary()

    def _robust(
        self, x: torch.Tensor, replies: Sequence[Message]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the updates robustly; the rest as FedAvg does."""
        screened = _screen(
            server_round,
            replies,
            self.round_model.layers(server_round),
            self.weighted_by_key,
            type(self).__name__,
        )
        arrays, metrics = super().aggregate_train(
            server_round, screened.kept + screened.failures
        )
        extra: dict[str, float] = {f"{self.prefix}.num-rejected": screened.rejected}
        if arrays is None or screened.x is None or screened.spec is None:
            return arrays, _merged(metrics, extra)
        update, own = self._robust(screened.x, screened.kept)
        arrays = record_from_layers(unpack(update, screened.spec), base=arrays)
        return arrays, _merged(metrics, {**extra, **own})


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
    The paper clips the workers' momenta around the previous aggregate momentum;
    here each round's updates are clipped around the previous aggregated update.
    With worker momentum (clients that keep their own momentum and send
    ``-lr * m``), the two agree up to the factor ``lr`` in ``tau``. The round's
    metrics gain ``cc.tau``, ``cc.clipped`` (replies clipped in the last iteration),
    ``cc.update-norm`` and ``cc.num-rejected``.
    """

    prefix = "cc"

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
        clipped = float("nan")
        if self.iterations == 1:
            distances = torch.linalg.vector_norm(x - center, dim=1)
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

    Notes
    -----
    The round's metrics gain ``gm.update-norm`` and ``gm.num-rejected``.
    """

    prefix = "gm"

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
    (:func:`flwr_alie.aggregators.nearest_neighbor_mixing`); then `strategy`
    aggregates the mixed replies. Error replies, and those set aside, pass on as
    failures.

    Parameters
    ----------
    strategy : Strategy
        The strategy that aggregates the mixed replies (e.g. ``Krum``,
        ``FedMedian``, a user's own).
    f : int
        The number of Byzantine replies to resist, ``>= 0`` (``f < n`` is checked
        by :func:`flwr_alie.check_setup` before a run, and in each round).

    Notes
    -----
    The round's metrics gain ``nnm.f`` and ``nnm.num-rejected``.
    """

    def __init__(self, strategy: Strategy, *, f: int) -> None:
        super().__init__(strategy)
        self.f = check_count(f, "f", low=0)

    def __repr__(self) -> str:
        """Name the wrapped strategy and `f`."""
        return f"NNM({describe(self.strategy)}, f={self.f})"

    def setup_problems(self, num_nodes: int) -> list[str]:
        """NNM needs ``f < n``."""
        if self.f >= num_nodes:
            return [f"NNM needs f < n, got f = {self.f} with n = {num_nodes}"]
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Mix the updates, then delegate."""
        weight_key = self.weight_key
        screened = _screen(
            server_round, replies, self.round_model.layers(server_round), weight_key,
            "NNM",
        )  # fmt: skip
        forwarded = screened.kept
        if screened.x is not None and screened.spec is not None:
            if self.f < len(screened.kept):
                mixed = nearest_neighbor_mixing(screened.x, f=self.f)
                forwarded = [
                    _with_arrays(m, arrays_from_layers(unpack(row, screened.spec)))
                    for m, row in zip(screened.kept, mixed, strict=True)
                ]
            else:
                log(WARNING, "NNM round %d: f = %d of %d replies; they go on "
                    "unmixed", server_round, self.f, len(screened.kept))  # fmt: skip
        arrays, metrics = self.strategy.aggregate_train(
            server_round, forwarded + screened.failures
        )
        return arrays, _merged(
            metrics, {"nnm.f": self.f, "nnm.num-rejected": screened.rejected}
        )


class Bucketing(StrategyWrapper):
    """Bucketing (Karimireddy, He and Jaggi, ICLR 2022) before any strategy.

    The round's replies (sorted by node id) are shuffled into buckets of `s`
    (:func:`flwr_alie.aggregators.bucket_permutation`, from a generator seeded by
    ``(seed, server_round)``); `strategy` receives one reply per bucket: global +
    the bucket's mean update (:func:`flwr_alie.aggregators.bucketing`), claiming
    the bucket's summed sample count. Error replies, and those set aside, pass on
    as failures.

    Parameters
    ----------
    strategy : Strategy
        The strategy that aggregates the bucket means; it sees ``ceil(n / s)``
        replies (:func:`flwr_alie.check_setup` applies its limits to that count).
    s : int
        Bucket size, ``>= 1`` (the paper uses 2).
    seed : int
        Seed of the shuffles.

    Notes
    -----
    The round's metrics gain ``bucketing.buckets`` and ``bucketing.num-rejected``.
    """

    def __init__(self, strategy: Strategy, *, s: int, seed: int = 0) -> None:
        super().__init__(strategy)
        self.s = check_count(s, "s", low=1)
        self.seed = check_count(seed, "seed", low=0)

    def __repr__(self) -> str:
        """Name the wrapped strategy and the options."""
        return f"Bucketing({describe(self.strategy)}, s={self.s}, seed={self.seed})"

    def inner_num_nodes(self, num_nodes: int) -> int:
        """Return the number of replies `strategy` receives: ``ceil(n / s)``."""
        return math.ceil(num_nodes / self.s)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average random buckets, then delegate one reply per bucket."""
        weight_key = self.weight_key
        screened = _screen(
            server_round, replies, self.round_model.layers(server_round), weight_key,
            "Bucketing",
        )  # fmt: skip
        forwarded = screened.kept
        if screened.x is not None and screened.spec is not None:
            forwarded = self._buckets(server_round, screened, weight_key)
        arrays, metrics = self.strategy.aggregate_train(
            server_round, forwarded + screened.failures
        )
        return arrays, _merged(
            metrics,
            {"bucketing.buckets": len(forwarded),
             "bucketing.num-rejected": screened.rejected},
        )  # fmt: skip

    def _buckets(
        self, server_round: int, screened: _Screened, weight_key: str
    ) -> list[Message]:
        """One reply per bucket: its first member's, with the bucket's mean."""
        assert screened.x is not None
        assert screened.spec is not None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + server_round)
        perm = bucket_permutation(len(screened.kept), generator=generator)
        means = bucketing(screened.x, s=self.s, permutation=perm)
        order = perm.tolist()
        forwarded = []
        for k, row in enumerate(means):
            members = [screened.kept[i] for i in order[k * self.s : (k + 1) * self.s]]
            count = float(sum(reply_weight(m, weight_key) for m in members))
            first = _with_arrays(
                members[0], arrays_from_layers(unpack(row, screened.spec))
            )
            metric_key = next(iter(first.content.metric_records), "metrics")
            total = int(count) if count.is_integer() else count
            first.content[metric_key] = MetricRecord({weight_key: total})
            forwarded.append(first)
        return forwarded
