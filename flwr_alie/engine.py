"""One ALIE round as data, whichever Flower API the replies came in.

Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019. The adapters
(:mod:`flwr_alie.strategy` for the Message API, :mod:`flwr_alie.legacy` for the
legacy API) turn each train reply into a :class:`Reply`, in a stable order, and call
:meth:`RoundEngine.attack` with the round's global model. A round is these steps,
each a function below:

1. **validate**: set aside the replies no strategy should see (a malformed tag,
   metrics or sample count, arrays that do not fit the global model, a second
   reply of one partition), each named in a warning;
2. **split** the rest into honest and Byzantine, and check that the round can be
   attacked at all (:class:`SkipReason` says why not);
3. **pack** the honest updates (differences from the global model) into one
   ``(h, d)`` tensor;
4. **statistics**: their exact moments, from the finite updates only, and never
   overflowing;
5. **craft** the ALIE row from them (or from the Byzantine nodes' own updates);
6. **unpack** it into arrays, the exact inverse of the packing;
7. **telemetry**: the round's ``alie.*`` metrics.

The adapters then put the crafted arrays into the Byzantine replies and delegate to
the real strategy; :meth:`RoundEngine.aggregate_metrics` says where its aggregate
landed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.common import log
from numpy.typing import NDArray

from flwr_alie.attacks import alie_vector, moments, z_max
from flwr_alie.config import ALIEConfig, resolve_device
from flwr_alie.params import Layers, PackSpec, pack, pack_aggregate, unpack
from flwr_alie.replies import Reply, validate

__all__ = [
    "KEY_AGGREGATE_TO_CRAFTED",
    "KEY_AGGREGATE_TO_MEAN",
    "KEY_ATTACKED",
    "KEY_BELOW_LIMIT",
    "KEY_DISTANCE",
    "KEY_DISTANCE_SIGMA",
    "KEY_HONEST_SPREAD",
    "KEY_MISSING_BYZANTINE",
    "KEY_NUM_BYZANTINE",
    "KEY_NUM_HONEST",
    "KEY_NUM_NON_FINITE",
    "KEY_NUM_REJECTED",
    "KEY_NUM_UNEXPECTED",
    "KEY_SECONDS",
    "KEY_SKIP_REASON",
    "KEY_Z",
    "RoundEngine",
    "RoundResult",
    "SkipReason",
]

# Telemetry keys, added to the aggregated train metrics of every round.
KEY_ATTACKED = "alie.attacked"
KEY_SKIP_REASON = "alie.skip-reason"
KEY_Z = "alie.z"
KEY_NUM_HONEST = "alie.num-honest"
KEY_NUM_BYZANTINE = "alie.num-byzantine"
KEY_NUM_REJECTED = "alie.num-rejected"
KEY_NUM_NON_FINITE = "alie.num-non-finite"
KEY_MISSING_BYZANTINE = "alie.num-missing-byzantine"
KEY_NUM_UNEXPECTED = "alie.num-unexpected-byzantine"
KEY_DISTANCE = "alie.distance"
KEY_HONEST_SPREAD = "alie.honest-spread"
KEY_DISTANCE_SIGMA = "alie.distance-sigma"
KEY_AGGREGATE_TO_CRAFTED = "alie.aggregate-to-crafted"
KEY_AGGREGATE_TO_MEAN = "alie.aggregate-to-mean"
KEY_SECONDS = "alie.seconds"
KEY_BELOW_LIMIT = "alie.below-limit"


class SkipReason(enum.IntEnum):
    """Why a round was (0) or was not attacked: ``alie.skip-reason``.

    A number, since a MetricRecord holds numbers only; the values are fixed (they
    are in results files). A new reason is one member here: its number and text.
    ``MISMATCHED`` is no longer produced: a reply whose arrays do not fit is set
    aside before the round (:func:`flwr_alie.replies.validate`).
    """

    text: str

    def __new__(cls, value: int, text: str) -> SkipReason:
        """Make a member of its number and text."""
        member = int.__new__(cls, value)
        member._value_ = value
        member.text = text
        return member

    ATTACKED = 0, "attacked"
    NO_BYZANTINE = 1, "no Byzantine reply arrived"
    NO_GLOBAL = 2, "the global model of this round was not seen in configure_train"
    NO_HONEST = 3, "no honest reply arrived"
    UNTRAINED = (
        4,
        (
            "knowledge='byzantine-only' needs the Byzantine nodes' trained updates, "
            "but some skipped training (set alie.skip-training to false)"
        ),
    )
    MISMATCHED = 5, "the updates cannot be packed"
    Z_MAX = 6, "z='max' has no non-negative value for this h and f"
    NON_FINITE = 7, "no finite, representable statistics"


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """The outcome of one round of the attack; it owns its tensors.

    Attributes
    ----------
    reason : SkipReason
        ``ATTACKED``, or why the round was not.
    crafted : dict or None
        The crafted model's floating layers (global + crafted update), which a
        Byzantine reply gets instead of its own; ``None`` when not attacked.
    rejected : dict
        Index (among the replies given) -> why the reply was set aside: the
        adapters hand it on as a failure.
    dropped : tuple of int
        Indices of the Byzantine replies handed on as failures because the round
        could not be crafted: those that skipped training carry the global model,
        no update at all, and would enter the aggregate at a typical weight.
    template : int or None
        Index of the honest reply with the median weight: a Byzantine node that
        skipped training claims its metrics.
    metrics : dict
        The round's telemetry (``alie.*``).
    crafted_row, honest_mean : Tensor or None
        The crafted update and the honest mean as packed rows, for
        :meth:`RoundEngine.aggregate_metrics`.
    spec : PackSpec or None
        How those rows map onto the model's layers.
    """

    reason: SkipReason
    crafted: dict[str, NDArray[np.generic]] | None
    rejected: dict[int, str]
    dropped: tuple[int, ...]
    template: int | None
    metrics: dict[str, float | int]
    crafted_row: torch.Tensor | None = None
    honest_mean: torch.Tensor | None = None
    spec: PackSpec | None = None


@dataclasses.dataclass
class _Scratch:
    """The ``(d,)`` vectors a round writes, kept from round to round.

    Fresh d-sized buffers every round cost page faults worth a good part of the
    round's own work.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    row: torch.Tensor
    difference: torch.Tensor

    @classmethod
    def like(cls, x: torch.Tensor) -> _Scratch:
        d = x.shape[1]
        return cls(*(torch.empty(d, dtype=x.dtype, device=x.device) for _ in range(4)))

    def fits(self, x: torch.Tensor) -> bool:
        return (
            self.mu.shape[0] == x.shape[1]
            and self.mu.dtype == x.dtype
            and self.mu.device == x.device
        )


@dataclasses.dataclass(frozen=True)
class _Split:
    """The valid replies of a round, by kind."""

    honest: tuple[int, ...]
    byzantine: tuple[int, ...]


class RoundEngine:
    """Craft each round's ALIE update: the state both adapters keep across rounds.

    Parameters
    ----------
    config : ALIEConfig
        The attack's options, validated once (when it was built).
    num_nodes : int, optional
        With it, the Byzantine partitions of `config` among that many are
        expected to reply each round (see :meth:`ALIEConfig.byzantine_partitions`):
        each round names those that sent nothing and those that claim to be
        Byzantine without being expected.

    Notes
    -----
    The honest deltas are packed into one ``(h, d)`` float32 tensor on the
    config's device, kept from round to round so that it is allocated once, and so
    are four ``(d,)`` vectors (:class:`_Scratch`). The moments are taken once
    (:func:`flwr_alie.attacks.moments`) and serve both the attack and the
    telemetry. torch's thread settings are the caller's: the evaluation's
    ServerApp runs one intra-op thread, as a process sharing its cores with
    clients should (the round is memory-bound).
    """

    def __init__(self, config: ALIEConfig, *, num_nodes: int | None = None) -> None:
        if not isinstance(config, ALIEConfig):
            raise TypeError(
                f"Expected `config` to be an ALIEConfig, got {type(config).__name__}"
            )
        self.config = config
        self.device = resolve_device(config.device)
        self.expected: frozenset[int] | None = (
            config.byzantine_partitions(num_nodes)
            if num_nodes is not None
            else (
                frozenset(config.byzantine_ids)
                if config.byzantine_ids is not None
                else None
            )
        )
        self._buffer: torch.Tensor | None = None
        self._scratch: _Scratch | None = None

    def __repr__(self) -> str:
        """Name the options."""
        c = self.config
        return (
            f"z={c.z!r}, direction={c.direction.value!r}, "
            f"knowledge={c.knowledge!r}, device={str(self.device)!r}"
        )

    @property
    def held_bytes(self) -> int:
        """Bytes held between rounds: the packed honest updates and the scratch."""
        tensors = [self._buffer]
        if self._scratch is not None:
            tensors += list(dataclasses.astuple(self._scratch))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def log_settings(self) -> None:
        """Log the attack settings, Flower's summary style."""
        log(INFO, "\t├──> ALIE attack (Baruch, Baruch and Goldberg, NeurIPS 2019):")
        log(INFO, "\t│\t├── z: %s", self.config.z)
        log(INFO, "\t│\t├── direction: %s", self.config.direction.value)
        log(INFO, "\t│\t├── knowledge: %s", self.config.knowledge)
        log(INFO, "\t│\t└── device: %s", self.device)

    # ------------------------------------------------------------------ a round

    def attack(
        self,
        server_round: int,
        replies: Sequence[Reply],
        global_layers: Layers | None,
    ) -> RoundResult:
        """Craft the round's update from the sorted, error-free `replies`."""
        rejected = validate(server_round, replies, global_layers)
        valid = [i for i in range(len(replies)) if i not in rejected]
        split = _Split(
            tuple(i for i in valid if not replies[i].byzantine),
            tuple(i for i in valid if replies[i].byzantine),
        )
        metrics = self._counts(server_round, replies, split, rejected)
        reason = self._precondition(replies, split, global_layers)
        if reason is not None:
            return self._skip(server_round, replies, split, rejected, metrics, reason)
        assert global_layers is not None
        z, why = self._factor(len(split.honest), len(split.byzantine))
        if z is None:
            return self._skip(
                server_round, replies, split, rejected, metrics, SkipReason.Z_MAX, why
            )
        honest, spec = self._pack(replies, split.honest, global_layers)
        statistics = self._statistics(server_round, replies, split, honest, metrics)
        if statistics is None:
            return self._skip(
                server_round, replies, split, rejected, metrics, SkipReason.NON_FINITE
            )
        row = self._craft(replies, split, global_layers, statistics, z)
        if row is None:
            return self._skip(
                server_round, replies, split, rejected, metrics, SkipReason.NON_FINITE
            )
        mu, sigma = statistics
        metrics.update(_telemetry(row, mu, sigma, z, self._scratch_for(honest)))
        return RoundResult(
            reason=SkipReason.ATTACKED,
            crafted=unpack(row, spec),
            rejected=rejected,
            dropped=(),
            template=_median_weight(replies, split.honest),
            metrics=metrics,
            crafted_row=row.clone(),
            honest_mean=mu.clone(),
            spec=spec,
        )

    def _counts(
        self,
        server_round: int,
        replies: Sequence[Reply],
        split: _Split,
        rejected: dict[int, str],
    ) -> dict[str, float | int]:
        """Count the round's replies; warn about the expected Byzantine partitions."""
        metrics: dict[str, float | int] = {
            KEY_ATTACKED: 0,
            KEY_SKIP_REASON: int(SkipReason.NO_BYZANTINE),
            KEY_NUM_HONEST: len(split.honest),
            KEY_NUM_BYZANTINE: len(split.byzantine),
            KEY_NUM_REJECTED: len(rejected),
        }
        if self.expected is None:
            return metrics
        claims = {replies[i].partition for i in split.byzantine}
        missing = sorted(self.expected - claims)
        unexpected = sorted(
            p for p in claims if p is not None and p not in self.expected
        )
        metrics[KEY_MISSING_BYZANTINE] = len(missing)
        metrics[KEY_NUM_UNEXPECTED] = len(unexpected)
        if missing:
            log(WARNING, "ALIE round %d: no reply from %d of the %d Byzantine "
                "partitions: %s", server_round, len(missing), len(self.expected),
                ", ".join(map(str, missing)))  # fmt: skip
        if unexpected:
            log(WARNING, "ALIE round %d: partitions %s claim to be Byzantine but are "
                "not among the expected %s; they are treated as Byzantine",
                server_round, ", ".join(map(str, unexpected)),
                sorted(self.expected))  # fmt: skip
        return metrics

    def _precondition(
        self, replies: Sequence[Reply], split: _Split, global_layers: Layers | None
    ) -> SkipReason | None:
        """Why the round cannot be attacked before any update is read, if it can't."""
        if not split.byzantine:
            return SkipReason.NO_BYZANTINE
        if global_layers is None:
            return SkipReason.NO_GLOBAL
        if not split.honest:
            return SkipReason.NO_HONEST
        untrained = any(replies[i].skipped for i in split.byzantine)
        if self.config.knowledge == "byzantine-only" and untrained:
            return SkipReason.UNTRAINED
        return None

    def _factor(self, h: int, f: int) -> tuple[float | None, str]:
        """Return the round's ``z``: the option or ``z_max(h, f)``, or why none."""
        if self.config.z != "max":
            return float(self.config.z), ""
        try:
            return z_max(h, f), ""
        except ValueError as err:
            return None, f"h = {h} honest, f = {f}: {err}"

    def _pack(
        self, replies: Sequence[Reply], indices: Sequence[int], global_layers: Layers
    ) -> tuple[torch.Tensor, PackSpec]:
        """Pack the updates of `indices` (the honest ones: into the kept buffer)."""
        honest = not any(replies[i].byzantine for i in indices)
        x, spec = pack(
            [replies[i].layers for i in indices],
            global_layers,
            device=self.device,
            names=[replies[i].name for i in indices],
            out=self._buffer if honest else None,
        )
        if honest:
            self._buffer = x
        return x, spec

    def _scratch_for(self, x: torch.Tensor) -> _Scratch:
        if self._scratch is None or not self._scratch.fits(x):
            self._scratch = _Scratch.like(x)
        return self._scratch

    def _statistics(
        self,
        server_round: int,
        replies: Sequence[Reply],
        split: _Split,
        honest: torch.Tensor,
        metrics: dict[str, float | int],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the honest moments, of the finite updates (``None``: there are none).

        NaN or inf in an update: that update is named and left out of the
        statistics (the only extra read of the updates, in such a round only). If
        the finite updates' statistics still overflow (a finite update near the
        dtype's largest value), the round is not attacked, naming the largest.
        """
        scratch = self._scratch_for(honest)
        mu, sigma = moments(honest, out=(scratch.mu, scratch.sigma))
        if _finite(mu, sigma):
            return mu, sigma
        finite = torch.isfinite(honest).all(dim=1)
        names = [replies[i].name for i in split.honest]
        bad = [j for j in range(len(names)) if not finite[j]]
        if bad:
            counts = (~torch.isfinite(honest[bad])).sum(dim=1).tolist()
            log(WARNING, "ALIE round %d: non-finite values in %d honest update(s): "
                "%s; the statistics come from the %d finite ones", server_round,
                len(bad), ", ".join(f"{names[j]} ({int(c)} values)"
                                     for j, c in zip(bad, counts, strict=True)),
                len(names) - len(bad))  # fmt: skip
            metrics[KEY_NUM_NON_FINITE] = len(bad)
            if len(bad) == len(names):
                log(WARNING, "ALIE round %d: no honest update is finite; not "
                    "attacked", server_round)  # fmt: skip
                return None
            mu, sigma = moments(honest[finite], out=(scratch.mu, scratch.sigma))
            if _finite(mu, sigma):
                return mu, sigma
        largest = honest[finite].abs().amax(dim=1)
        order = torch.argsort(largest, descending=True)[:3].tolist()
        finite_names = [n for n, ok in zip(names, finite.tolist(), strict=True) if ok]
        log(WARNING, "ALIE round %d: the honest statistics overflow %s; the largest "
            "updates: %s; not attacked", server_round, honest.dtype,
            ", ".join(f"{finite_names[j]} (max |value| {float(largest[j]):.3g})"
                      for j in order))  # fmt: skip
        return None

    def _craft(
        self,
        replies: Sequence[Reply],
        split: _Split,
        global_layers: Layers,
        statistics: tuple[torch.Tensor, torch.Tensor],
        z: float,
    ) -> torch.Tensor | None:
        """Return the crafted row, always finite (``None`` when it would not be)."""
        config = self.config
        mu, sigma = statistics
        if config.knowledge == "byzantine-only":
            own, _ = self._pack(replies, split.byzantine, global_layers)
            mu, sigma = moments(own)
            if not _finite(mu, sigma):
                log(WARNING, "ALIE: the Byzantine nodes' own updates give no finite "
                    "statistics; not attacked")  # fmt: skip
                return None
        scratch = self._scratch_for(statistics[0].unsqueeze(0))
        row = alie_vector(mu, sigma, z=z, direction=config.direction, out=scratch.row)
        if not bool(torch.isfinite(row).all()):
            log(WARNING, "ALIE: the crafted update overflows %s (z = %g); not "
                "attacked", row.dtype, z)  # fmt: skip
            return None
        return row

    def _skip(
        self,
        server_round: int,
        replies: Sequence[Reply],
        split: _Split,
        rejected: dict[int, str],
        metrics: dict[str, float | int],
        reason: SkipReason,
        detail: str = "",
    ) -> RoundResult:
        """Report a round that is not attacked: replies go on, untrained ones fail."""
        metrics[KEY_SKIP_REASON] = int(reason)
        dropped: tuple[int, ...] = ()
        if reason is not SkipReason.NO_BYZANTINE:
            dropped = tuple(i for i in split.byzantine if replies[i].skipped)
            text = f"{reason.text} ({detail})" if detail else reason.text
            log(WARNING, "ALIE round %d: %s; not attacked: %d Byzantine replies "
                "that trained go on as sent, %d that skipped training (the global "
                "model, no update) go on as failures", server_round, text,
                len(split.byzantine) - len(dropped), len(dropped))  # fmt: skip
        template = _median_weight(replies, split.honest)
        return RoundResult(reason, None, rejected, dropped, template, metrics)

    # ------------------------------------------------------------ the aggregate

    def aggregate_metrics(
        self, result: RoundResult, aggregate: Layers | None
    ) -> dict[str, float]:
        """Where the wrapped strategy's aggregate landed, in honest spreads.

        ``alie.aggregate-to-crafted`` is 0 when the strategy selected the crafted
        update (Krum); ``alie.aggregate-to-mean`` is the aggregate's distance from
        the honest mean. Empty when the round was not attacked.
        """
        row, mu, spec = result.crafted_row, result.honest_mean, result.spec
        spread = float(result.metrics.get(KEY_HONEST_SPREAD, 0.0))
        if row is None or mu is None or spec is None or aggregate is None:
            return {}
        if not spread:
            return {}
        try:
            a, _ = pack_aggregate(aggregate, spec.reference, device=row.device)
        except (KeyError, ValueError):
            return {}
        return {
            KEY_AGGREGATE_TO_CRAFTED: _distance(a, row) / spread,
            KEY_AGGREGATE_TO_MEAN: _distance(a, mu) / spread,
        }


# ------------------------------------------------------------------ helpers


def _telemetry(
    row: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, z: float, s: _Scratch
) -> dict[str, float | int]:
    spread = float(torch.linalg.vector_norm(sigma, dtype=torch.float64))
    distance = _distance(row, mu, s.difference)
    metrics: dict[str, float | int] = {
        KEY_ATTACKED: 1,
        KEY_SKIP_REASON: int(SkipReason.ATTACKED),
        KEY_Z: z,
        KEY_DISTANCE: distance,
        KEY_HONEST_SPREAD: spread,
    }
    if spread > 0:
        metrics[KEY_DISTANCE_SIGMA] = distance / spread
    return metrics


def _distance(
    a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None
) -> float:
    """Return ``||a - b||_2`` in float64; the difference goes to `scratch`."""
    difference = torch.sub(a, b) if scratch is None else torch.sub(a, b, out=scratch)
    return float(torch.linalg.vector_norm(difference, dtype=torch.float64))


def _finite(mu: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether both moments are finite (NaN and inf in a row reach them)."""
    return bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())


def _median_weight(replies: Sequence[Reply], honest: Sequence[int]) -> int | None:
    """Index of the honest reply with the median weight (ties: the earlier)."""
    if not honest:
        return None
    order = sorted(honest, key=lambda i: (replies[i].weight, i))
    return order[(len(order) - 1) // 2]
