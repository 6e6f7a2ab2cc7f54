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

import dataclasses
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from typing import Literal

import numpy as np
import torch
from flwr.common import log
from numpy.typing import NDArray

from flwr_alie.attacks import Direction, alie_vector, moments, z_max
from flwr_alie.config import ALIEConfig, Knowledge, resolve_device
from flwr_alie.params import Layers, PackSpec, pack, unpack

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

_UNTAGGED = 1 << 62  # untagged replies sort after tagged ones


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
    """

    name: str
    byzantine: bool
    skipped: bool
    weight: float
    read_layers: Callable[[], Layers]


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
    """

    crafted: dict[str, NDArray[np.generic]] | None
    replaced_keys: tuple[str, ...]
    template: int | None
    metrics: dict[str, float | int]
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
    kept from round to round so that it is allocated once. Their moments are taken
    once (:func:`flwr_alie.attacks.moments`) and serve both the attack and the
    telemetry.
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
        self._global: tuple[int, Layers] | None = None
        self._buffer: torch.Tensor | None = None

    def __repr__(self) -> str:
        """Name the options."""
        c = self.config
        return (
            f"z={c.z!r}, direction={c.direction.value!r}, "
            f"knowledge={c.knowledge!r}, device={str(self.device)!r}"
        )

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
        """Bytes of the packed honest updates held between rounds."""
        if self._buffer is None:
            return 0
        return self._buffer.numel() * self._buffer.element_size()

    def log_settings(self) -> None:
        """Log the attack settings, Flower's summary style."""
        log(INFO, "\t├──> ALIE attack (Baruch, Baruch and Goldberg, NeurIPS 2019):")
        log(INFO, "\t│\t├── z: %s", self.config.z)
        log(INFO, "\t│\t├── direction: %s", self.config.direction.value)
        log(INFO, "\t│\t├── knowledge: %s", self.config.knowledge)
        log(INFO, "\t│\t└── device: %s", self.device)

    def attack(self, server_round: int, replies: Sequence[Reply]) -> RoundResult:
        """Craft the round's update from sorted, error-free `replies`."""
        honest = [i for i, r in enumerate(replies) if not r.byzantine]
        byzantine = [i for i, r in enumerate(replies) if r.byzantine]
        h, f = len(honest), len(byzantine)
        metrics: dict[str, float | int] = {
            KEY_ATTACKED: 0,
            KEY_NUM_HONEST: h,
            KEY_NUM_BYZANTINE: f,
        }
        template = _median_weight(replies, honest)

        def skip(reason: str, *args: object) -> RoundResult:
            log(
                WARNING,
                "ALIE round %d: " + reason + "; the %d Byzantine replies go on as sent",
                server_round,
                *args,
                f,
            )
            return RoundResult(None, (), template, metrics)

        config = self.config
        global_layers = self.global_for(server_round)
        if f == 0:
            return RoundResult(None, (), template, metrics)
        if global_layers is None:
            return skip(
                "the global model of this round was not seen in configure_train"
            )
        if h == 0:
            return skip("no honest reply among the %d replies", len(replies))
        if config.knowledge == "byzantine-only" and any(
            replies[i].skipped for i in byzantine
        ):
            return skip(
                "knowledge='byzantine-only' needs the Byzantine nodes' trained "
                "updates, but some skipped training (set alie.skip-training to false)"
            )
        if config.z == "max":
            try:
                z = z_max(h, f)
            except ValueError as err:
                return skip(
                    "z='max' is undefined for h = %d honest, f = %d: %s", h, f, err
                )
        else:
            z = float(config.z)
        try:
            honest_x, spec = self._pack(replies, honest, global_layers, self._buffer)
            self._buffer = honest_x
            mu, sigma = moments(honest_x)
            if config.knowledge == "byzantine-only":
                own_x, _ = self._pack(replies, byzantine, global_layers, None)
                row = alie_vector(*moments(own_x), z=z, direction=config.direction)
            else:
                row = alie_vector(mu, sigma, z=z, direction=config.direction)
        except ValueError as err:
            return skip("%s", err)
        spread = float(torch.linalg.vector_norm(sigma, dtype=torch.float64))
        distance = float(torch.linalg.vector_norm(row - mu, dtype=torch.float64))
        metrics.update(
            {
                KEY_ATTACKED: 1,
                KEY_Z: z,
                KEY_DISTANCE: distance,
                KEY_HONEST_SPREAD: spread,
            }
        )
        if spread > 0:
            metrics[KEY_DISTANCE_SIGMA] = distance / spread
        crafted = unpack(row, spec, global_layers)
        return RoundResult(
            crafted, spec.packed_keys, template, metrics, row, mu, spread
        )

    def _pack(
        self,
        replies: Sequence[Reply],
        indices: Sequence[int],
        global_layers: Layers,
        buffer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, PackSpec]:
        return pack(
            [replies[i].read_layers for i in indices],
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
        global_layers = self.global_for(server_round)
        row, mu, spread = result._row, result._mu, result._spread
        if row is None or mu is None or not spread:
            return {}
        if aggregate is None or global_layers is None:
            return {}
        # compare the floating arrays only: strategies average integer buffers too
        floating = set(PackSpec.of(global_layers).packed_keys)
        try:
            layers = {
                k: aggregate[k] if k in floating else v
                for k, v in global_layers.items()
            }
            x, _ = pack([layers], global_layers, device=row.device)
        except (KeyError, ValueError):
            return {}
        a = x[0]
        return {
            KEY_AGGREGATE_TO_CRAFTED: float(
                torch.linalg.vector_norm(a - row, dtype=torch.float64) / spread
            ),
            KEY_AGGREGATE_TO_MEAN: float(
                torch.linalg.vector_norm(a - mu, dtype=torch.float64) / spread
            ),
        }


def _median_weight(replies: Sequence[Reply], honest: Sequence[int]) -> int | None:
    """Index of the honest reply with the median weight (ties: the earlier)."""
    if not honest:
        return None
    order = sorted(honest, key=lambda i: (replies[i].weight, i))
    return order[(len(order) - 1) // 2]
