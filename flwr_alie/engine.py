"""One ALIE round as data, whichever Flower API the replies came in.

Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019. The adapters
(:mod:`flwr_alie.strategy` for the Message API, :mod:`flwr_alie.legacy` for the
legacy API) turn each train reply into a :class:`Reply`, in a stable order, and call
:meth:`RoundEngine.attack`; the engine packs the honest updates (differences from
the round's global model) into one ``(h, d)`` tensor, takes their moments once,
crafts the ALIE update from them and reports the round's telemetry. The adapters then
put the crafted arrays into the Byzantine replies and delegate to the real strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Collection, Sequence
from logging import INFO, WARNING
from typing import Literal

import numpy as np
import torch
from flwr.common import log
from numpy.typing import NDArray

from flwr_alie.attacks import Direction, alie_vector, moments, z_max
from flwr_alie.config import ALIEConfig, Knowledge, resolve_device
from flwr_alie.params import Layers, PackSpec, pack, pack_aggregate, unpack

__all__ = [
    "KEY_AGGREGATE_TO_CRAFTED",
    "KEY_AGGREGATE_TO_MEAN",
    "KEY_ATTACKED",
    "KEY_DISTANCE",
    "KEY_DISTANCE_SIGMA",
    "KEY_HONEST_SPREAD",
    "KEY_NUM_BYZANTINE",
    "KEY_NUM_HONEST",
    "KEY_SECONDS",
    "KEY_Z",
    "Reply",
    "RoundEngine",
    "RoundResult",
    "engine_for",
    "reply_order",
]

# Telemetry keys, added to the aggregated train metrics of every round.
KEY_ATTACKED = "alie.attacked"
KEY_Z = "alie.z"
KEY_NUM_HONEST = "alie.num-honest"
KEY_NUM_BYZANTINE = "alie.num-byzantine"
KEY_DISTANCE = "alie.distance"
KEY_HONEST_SPREAD = "alie.honest-spread"
KEY_DISTANCE_SIGMA = "alie.distance-sigma"
KEY_AGGREGATE_TO_CRAFTED = "alie.aggregate-to-crafted"
KEY_AGGREGATE_TO_MEAN = "alie.aggregate-to-mean"
KEY_SECONDS = "alie.seconds"
KEY_SKIP_REASON = "alie.skip-reason"
KEY_NUM_NON_FINITE = "alie.num-non-finite"
KEY_MISSING_BYZANTINE = "alie.num-missing-byzantine"

# Values of alie.skip-reason: why a round was (0) or was not attacked. Numbers, since
# a MetricRecord holds numbers only; the README lists them.
ATTACKED = 0
SKIP_NO_BYZANTINE = 1  # no Byzantine reply arrived
SKIP_NO_GLOBAL = 2  # the round's global model was not seen in configure_train
SKIP_NO_HONEST = 3  # no honest reply arrived
SKIP_UNTRAINED = 4  # byzantine-only knowledge, but a Byzantine node did not train
SKIP_MISMATCHED = 5  # a reply's arrays do not match the global model
SKIP_Z_MAX = 6  # z="max" has no non-negative value for this h and f
SKIP_NON_FINITE = 7  # no finite statistics

_UNTAGGED = 1 << 62  # untagged replies sort after tagged ones


class _OneThread:
    """Run torch's CPU ops on one intra-op thread, restoring the setting after.

    A round's own work is memory-bound: on 2 cores two intra-op threads gain
    nothing, and when another process holds a core (a simulation's clients always
    share the server's machine) every op waits at its barrier for the thread that
    lost its core: measured, the wrapper's own work went from 1.0x to 3.5x FedAvg's
    aggregation. Reference-counted under a lock, so that rounds running in several
    threads at once restore torch's setting once, when the last one ends.
    """

    _lock = threading.Lock()
    _depth = 0
    _saved = 0

    def __enter__(self) -> None:
        with self._lock:
            if _OneThread._depth == 0:
                _OneThread._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            _OneThread._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            _OneThread._depth -= 1
            if _OneThread._depth == 0:
                torch.set_num_threads(_OneThread._saved)


def reply_order(partition_id: object, fallback: int) -> tuple[int, int]:
    """Sort key of a reply: its partition id if tagged, else after all tagged ones.

    Flower hands replies over in arrival order; sorting by this key makes a round
    deterministic.
    """
    if isinstance(partition_id, int) and not isinstance(partition_id, bool):
        return (partition_id, 0)
    return (_UNTAGGED, fallback)


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the round needs of one valid train reply.

    Attributes
    ----------
    name : str
        How warnings name the reply (``"partition 3"``, ``"node 42"``).
    byzantine, skipped : bool
        Tagged Byzantine; skipped local training (sent the global model back).
    weight : float
        Its sample count, as the wrapped strategy weighs it.
    read_layers : Callable[[], Layers]
        Reads the reply's arrays (views, not copies) when the round packs them.
    partition : int, optional
        The partition id the client side tagged the reply with.
    """

    name: str
    byzantine: bool
    skipped: bool
    weight: float
    read_layers: Callable[[], Layers]
    partition: int | None = None

    @functools.cached_property
    def layers(self) -> Layers:
        """The reply's arrays, read once a round (views of its bytes, no copy)."""
        return self.read_layers()


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """The outcome of one round of the attack.

    Attributes
    ----------
    crafted : dict or None
        The crafted model (global + crafted update) as a whole layer set, or
        ``None`` when the round was not attacked (replies go on as sent).
    replaced_keys : tuple of str
        The keys a Byzantine reply gets from `crafted` (the floating ones); its
        other arrays stay as the node sent them.
    template : int or None
        Index, among the round's replies, of the honest reply with the median
        weight: a Byzantine node that skipped training claims its metrics.
    metrics : dict
        The round's telemetry (``alie.*``).
    dropped : tuple of int
        Indices of the Byzantine replies the adapters hand on as failures: in a
        round that could not be crafted, those that skipped training carry the
        global model, no update at all, and would enter the aggregate at a typical
        weight; the round aggregates without them instead.
    """

    crafted: dict[str, NDArray[np.generic]] | None
    replaced_keys: tuple[str, ...]
    template: int | None
    metrics: dict[str, float | int]
    dropped: tuple[int, ...] = ()
    _row: torch.Tensor | None = None
    _mu: torch.Tensor | None = None
    _spread: float = 0.0


class RoundEngine:
    """Craft each round's ALIE update: the state both adapters keep across rounds.

    Parameters
    ----------
    z, direction, knowledge, device
        As in :class:`flwr_alie.ALIEConfig`.

    Notes
    -----
    The honest deltas are packed into one ``(h, d)`` float32 tensor on `device`,
    kept from round to round so that it is allocated once, and so are five ``(d,)``
    vectors (the moments, the crafted row, the packed aggregate, scratch): a
    :class:`RoundResult`'s tensors are valid until the next round. The moments are
    taken once (:func:`flwr_alie.attacks.moments`) and serve both the attack and
    the telemetry.
    """

    def __init__(
        self,
        *,
        z: float | Literal["max"] = "max",
        direction: Direction = Direction.NEGATIVE,
        knowledge: Knowledge = "oracle",
        device: str = "auto",
    ) -> None:
        self.config = ALIEConfig(
            z=z, direction=direction, knowledge=knowledge, device=device
        )
        self.device = resolve_device(device)
        # the Byzantine partitions that should reply each round, when known
        self.expected_byzantine: frozenset[int] | None = None
        self._global: tuple[int, Layers] | None = None
        self._buffer: torch.Tensor | None = None
        # (5, d) float32 kept across rounds: mu, sigma, the crafted row, the packed
        # aggregate, scratch. Fresh d-sized buffers every round cost page faults
        # worth a good part of the round's own work.
        self._vectors: torch.Tensor | None = None

    def __repr__(self) -> str:
        """Name the options."""
        c = self.config
        return (
            f"z={c.z!r}, direction={c.direction.value!r}, "
            f"knowledge={c.knowledge!r}, device={str(self.device)!r}"
        )

    def expect(self, byzantine_ids: Collection[int] | None) -> None:
        """Expect these Byzantine partitions to reply each round (``None``: unknown)."""
        if byzantine_ids is None:
            self.expected_byzantine = None
            return
        ids = list(byzantine_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(
                f"Expected `byzantine_ids` to hold non-negative ints, got {ids!r}"
            )
        self.expected_byzantine = frozenset(ids)

    def remember(self, server_round: int, global_layers: Layers) -> None:
        """Keep the global model the round's updates are differences from."""
        self._global = (server_round, global_layers)

    def global_for(self, server_round: int) -> Layers | None:
        """Return the global model of `server_round`, if it was seen."""
        if self._global is None or self._global[0] != server_round:
            return None
        return self._global[1]

    @property
    def held_bytes(self) -> int:
        """Bytes held between rounds: the packed honest updates and five vectors."""
        return sum(
            t.numel() * t.element_size()
            for t in (self._buffer, self._vectors)
            if t is not None
        )

    def _vectors_for(self, like: torch.Tensor) -> torch.Tensor:
        d = like.shape[1]
        v = self._vectors
        if (
            v is None
            or v.shape[1] != d
            or v.dtype != like.dtype
            or v.device != like.device
        ):
            v = self._vectors = torch.empty(
                (5, d), dtype=like.dtype, device=like.device
            )
        return v

    def log_settings(self) -> None:
        """Log the attack settings, Flower's summary style."""
        log(INFO, "\t├──> ALIE attack (Baruch, Baruch and Goldberg, NeurIPS 2019):")
        log(INFO, "\t│\t├── z: %s", self.config.z)
        log(INFO, "\t│\t├── direction: %s", self.config.direction.value)
        log(INFO, "\t│\t├── knowledge: %s", self.config.knowledge)
        log(INFO, "\t│\t└── device: %s", self.device)

    def malformed(self, server_round: int, replies: Sequence[Reply]) -> dict[int, str]:
        """Return the replies whose arrays do not fit the global model, with why.

        Keys, shapes and dtype kinds are compared with the round's global model
        (headers only, no copy); each one found is logged at WARNING by name. The
        adapters hand them to the wrapped strategy as failed replies, so that one
        malformed reply neither crashes the round nor switches the attack off.
        """
        global_layers = self.global_for(server_round)
        if global_layers is None:
            return {}
        spec = PackSpec.of(global_layers)
        found: dict[int, str] = {}
        for i, reply in enumerate(replies):
            try:
                spec.check(reply.layers, reply.name)
            except ValueError as err:
                found[i] = str(err)
                log(
                    WARNING,
                    "ALIE round %d: %s; the reply goes on as a failure",
                    server_round,
                    err,
                )
        return found

    def _threads(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type == "cpu":
            return _OneThread()
        return contextlib.nullcontext()

    def attack(self, server_round: int, replies: Sequence[Reply]) -> RoundResult:
        """Craft the round's update from sorted, error-free `replies`.

        On the CPU, torch runs the round on one intra-op thread (restored after):
        see :class:`_OneThread` for the measurement.
        """
        with self._threads():
            return self._attack(server_round, replies)

    def _attack(self, server_round: int, replies: Sequence[Reply]) -> RoundResult:
        honest = [i for i, r in enumerate(replies) if not r.byzantine]
        byzantine = [i for i, r in enumerate(replies) if r.byzantine]
        h, f = len(honest), len(byzantine)
        metrics: dict[str, float | int] = {
            KEY_ATTACKED: 0,
            KEY_SKIP_REASON: SKIP_NO_BYZANTINE,
            KEY_NUM_HONEST: h,
            KEY_NUM_BYZANTINE: f,
        }
        template = _median_weight(replies, honest)

        def skip(code: int, reason: str, *args: object) -> RoundResult:
            metrics[KEY_SKIP_REASON] = code
            dropped = tuple(i for i in byzantine if replies[i].skipped)
            log(
                WARNING,
                "ALIE round %d: " + reason + "; not attacked: %d Byzantine replies "
                "that trained go on as sent, %d that skipped training (the global "
                "model, no update) go on as failures",
                server_round,
                *args,
                f - len(dropped),
                len(dropped),
            )
            return RoundResult(None, (), template, metrics, dropped)

        config = self.config
        global_layers = self.global_for(server_round)
        expected = self.expected_byzantine
        if expected is not None:
            missing = sorted(expected - {replies[i].partition for i in byzantine})
            metrics[KEY_MISSING_BYZANTINE] = len(missing)
            if missing:
                log(
                    WARNING,
                    "ALIE round %d: no reply from %d of the %d Byzantine "
                    "partitions: %s",
                    server_round,
                    len(missing),
                    len(expected),
                    ", ".join(map(str, missing)),
                )
        if f == 0:
            return RoundResult(None, (), template, metrics)
        if global_layers is None:
            return skip(
                SKIP_NO_GLOBAL,
                "the global model of this round was not seen in configure_train",
            )
        if h == 0:
            return skip(SKIP_NO_HONEST, "no honest reply among the %d replies", f)
        untrained = [replies[i].name for i in byzantine if replies[i].skipped]
        if config.knowledge == "byzantine-only" and untrained:
            return skip(
                SKIP_UNTRAINED,
                "knowledge='byzantine-only' needs the Byzantine nodes' trained "
                "updates, but %s skipped training (set alie.skip-training to false)",
                ", ".join(untrained),
            )
        if config.z == "max":
            try:
                z = z_max(h, f)
            except ValueError as err:
                return skip(
                    SKIP_Z_MAX,
                    "z='max' is undefined for h = %d honest, f = %d: %s",
                    h,
                    f,
                    err,
                )
        else:
            z = float(config.z)
        try:
            honest_x, spec = self._pack(replies, honest, global_layers, self._buffer)
        except ValueError as err:
            return skip(SKIP_MISMATCHED, "%s", err)
        self._buffer = honest_x
        v = self._vectors_for(honest_x)
        mu, sigma = moments(honest_x, out=(v[0], v[1]))
        if not _finite(mu, sigma):
            # NaN or inf in some honest update: find them (the only extra read of
            # the updates, and only in such a round), name them, and take the
            # statistics from the finite updates alone
            finite_rows = torch.isfinite(honest_x).all(dim=1)
            bad = [replies[honest[i]].name for i in range(h) if not finite_rows[i]]
            counts = (~torch.isfinite(honest_x)).sum(dim=1)
            log(
                WARNING,
                "ALIE round %d: non-finite values in %d honest update(s): %s; the "
                "statistics come from the %d finite ones",
                server_round,
                len(bad),
                ", ".join(
                    f"{name} ({int(counts[i])} values)"
                    for i, name in zip(
                        [i for i in range(h) if not finite_rows[i]], bad, strict=True
                    )
                ),
                h - len(bad),
            )
            if not bool(finite_rows.any()):
                return skip(SKIP_NON_FINITE, "no honest update is finite")
            kept = honest_x[finite_rows]
            mu, sigma = moments(kept, out=(v[0], v[1]))
            metrics[KEY_NUM_NON_FINITE] = len(bad)
        if config.knowledge == "byzantine-only":
            try:
                own_x, _ = self._pack(replies, byzantine, global_layers, None)
            except ValueError as err:
                return skip(SKIP_MISMATCHED, "%s", err)
            own = moments(own_x)
            if not _finite(*own):
                return skip(
                    SKIP_NON_FINITE, "the Byzantine nodes' updates are not finite"
                )
            row = alie_vector(*own, z=z, direction=config.direction, out=v[2])
        else:
            row = alie_vector(mu, sigma, z=z, direction=config.direction, out=v[2])
        spread = float(torch.linalg.vector_norm(sigma, dtype=torch.float64))
        distance = _distance(row, mu, v[4])
        metrics.update(
            {
                KEY_ATTACKED: 1,
                KEY_SKIP_REASON: ATTACKED,
                KEY_Z: z,
                KEY_DISTANCE: distance,
                KEY_HONEST_SPREAD: spread,
            }
        )
        if spread > 0:
            metrics[KEY_DISTANCE_SIGMA] = distance / spread
        crafted = unpack(row, spec, global_layers)
        return RoundResult(
            crafted, spec.packed_keys, template, metrics, (), row, mu, spread
        )

    def _pack(
        self,
        replies: Sequence[Reply],
        indices: Sequence[int],
        global_layers: Layers,
        buffer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, PackSpec]:
        return pack(
            [replies[i].layers for i in indices],
            global_layers,
            device=self.device,
            names=[replies[i].name for i in indices],
            out=buffer,
        )

    def aggregate_metrics(
        self, server_round: int, result: RoundResult, aggregate: Layers | None
    ) -> dict[str, float]:
        """Where the wrapped strategy's aggregate landed, in honest spreads.

        ``alie.aggregate-to-crafted`` is 0 when the strategy selected the crafted
        update (Krum); ``alie.aggregate-to-mean`` is the aggregate's distance from
        the honest mean. Empty when the round was not attacked.
        """
        with self._threads():
            return self._aggregate_metrics(server_round, result, aggregate)

    def _aggregate_metrics(
        self, server_round: int, result: RoundResult, aggregate: Layers | None
    ) -> dict[str, float]:
        global_layers = self.global_for(server_round)
        row, mu, spread = result._row, result._mu, result._spread
        if row is None or mu is None or not spread:
            return {}
        if aggregate is None or global_layers is None:
            return {}
        v = self._vectors
        try:
            kept = None if v is None else v[3:4]
            a, _ = pack_aggregate(aggregate, global_layers, device=row.device, out=kept)
        except (KeyError, ValueError):
            return {}
        scratch = v[4] if v is not None else None
        return {
            KEY_AGGREGATE_TO_CRAFTED: _distance(a, row, scratch) / spread,
            KEY_AGGREGATE_TO_MEAN: _distance(a, mu, scratch) / spread,
        }


def _distance(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None) -> float:
    """Return ``||a - b||_2`` in float64; the difference is written to `scratch`."""
    difference = torch.sub(a, b) if scratch is None else torch.sub(a, b, out=scratch)
    return float(torch.linalg.vector_norm(difference, dtype=torch.float64))


def _finite(mu: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether both moments are finite (NaN and inf in a row reach them)."""
    return bool(torch.isfinite(mu).all()) and bool(torch.isfinite(sigma).all())


def engine_for(
    z: float | Literal["max"],
    direction: Direction,
    knowledge: Knowledge,
    device: str,
    byzantine_ids: Collection[int] | None,
) -> RoundEngine:
    """Build the engine of a wrapper from its options, all checked here."""
    engine = RoundEngine(z=z, direction=direction, knowledge=knowledge, device=device)
    engine.expect(byzantine_ids)
    return engine


def _median_weight(replies: Sequence[Reply], honest: Sequence[int]) -> int | None:
    """Index of the honest reply with the median weight (ties: the earlier)."""
    if not honest:
        return None
    order = sorted(honest, key=lambda i: (replies[i].weight, i))
    return order[(len(order) - 1) // 2]
