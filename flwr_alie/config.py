"""Typed options of the attack, the run-config keys, and the record keys.

Client and server read the same options from Flower's ``run_config`` (keys under
``alie.``) and exchange a small tag through the record keys below; both are defined
here once.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import random
from collections.abc import Mapping
from typing import Literal, get_args

import torch

from flwr_alie.attacks import Direction, check_z

__all__ = [
    "LEGACY_TAG_PREFIX",
    "RUN_CONFIG_PREFIX",
    "SKIPPED_WEIGHT",
    "TAG_BYZANTINE",
    "TAG_PARTITION_ID",
    "TAG_RECORD_KEY",
    "TAG_SKIPPED_TRAINING",
    "ALIEConfig",
    "Knowledge",
    "draw_byzantine",
    "resolve_device",
]

Knowledge = Literal["oracle", "byzantine-only"]

# Message API: the key of the ConfigRecord that tags a train reply.
TAG_RECORD_KEY = "alie"
# Legacy API: the prefix of the same tags in ``FitRes.metrics``.
LEGACY_TAG_PREFIX = "alie."
# Fields of the tag.
TAG_BYZANTINE = "byzantine"
TAG_PARTITION_ID = "partition-id"
TAG_SKIPPED_TRAINING = "skipped-training"

RUN_CONFIG_PREFIX = "alie."

# The sample count a Byzantine node that skipped training claims; the server-side
# wrappers replace it by the weight of a typical honest reply.
SKIPPED_WEIGHT = 1

# run_config key (without the prefix) -> ALIEConfig field
_RUN_CONFIG_FIELDS = {
    "z": "z",
    "direction": "direction",
    "knowledge": "knowledge",
    "fraction": "fraction",
    "byzantine-ids": "byzantine_ids",
    "seed": "seed",
    "skip-training": "skip_training",
    "device": "device",
}


@dataclasses.dataclass(frozen=True)
class ALIEConfig:
    """Options of an ALIE run, shared by the client and the server side.

    Parameters
    ----------
    z : float or "max"
        Attack factor in honest standard deviations, ``>= 0``, or ``"max"`` for
        ``z_max`` of each round's ``h`` honest and ``f`` Byzantine replies.
    direction : Direction
        Which way the crafted update leaves the honest mean.
    knowledge : {"oracle", "byzantine-only"}
        ``"oracle"``: the statistics of all honest updates of the round (the
        statistics-oracle variant). ``"byzantine-only"``: the statistics of the
        Byzantine nodes' own honestly trained updates (the paper's threat model),
        so Byzantine nodes must train.
    fraction : float
        Fraction of the partitions that are Byzantine, in ``[0, 1)``; the
        ``round(fraction * num_partitions)`` Byzantine partitions are drawn with
        `seed`. Ignored when `byzantine_ids` is given.
    byzantine_ids : tuple of int, optional
        Explicit Byzantine partition ids.
    seed : int
        Seed of the draw of Byzantine partitions.
    skip_training : bool, optional
        Whether Byzantine nodes skip local training. ``None`` chooses: skip in
        ``"oracle"`` mode (their update is replaced anyway), train in
        ``"byzantine-only"`` mode (their update is the attacker's knowledge).
    device : str
        Where the server-side attack runs: ``"auto"`` (CUDA when present, else the
        CPU) or any torch device string.
    """

    z: float | Literal["max"] = "max"
    direction: Direction = Direction.NEGATIVE
    knowledge: Knowledge = "oracle"
    fraction: float = 0.0
    byzantine_ids: tuple[int, ...] | None = None
    seed: int = 0
    skip_training: bool | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """Check every option; see the class docstring for what is accepted."""
        check_z(self.z)
        if not isinstance(self.direction, Direction):
            raise TypeError(
                f"Expected `direction` to be a Direction, got {self.direction!r}"
            )
        if self.knowledge not in get_args(Knowledge):
            raise ValueError(
                f"Expected `knowledge` in {get_args(Knowledge)}, got {self.knowledge!r}"
            )
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(f"Expected `fraction` to be a number, got {fraction!r}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"Expected `fraction` in [0, 1), got {fraction!r}")
        if self.byzantine_ids is not None:
            ids = self.byzantine_ids
            if not isinstance(ids, tuple) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids
            ):
                raise ValueError(
                    "Expected `byzantine_ids` to be a tuple of non-negative ints, "
                    f"got {ids!r}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Expected `seed` to be an int, got {self.seed!r}")
        if self.skip_training is not None and not isinstance(self.skip_training, bool):
            raise TypeError(
                f"Expected `skip_training` to be a bool or None, got "
                f"{self.skip_training!r}"
            )
        if self.knowledge == "byzantine-only" and self.skip_training:
            raise ValueError(
                "Expected `skip_training` to be False or None with knowledge="
                "'byzantine-only': the Byzantine nodes' own updates are the "
                "attacker's statistics, so they must train"
            )
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"Expected `device` to be 'auto' or a torch device, got "
                    f"{self.device!r}"
                ) from err
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"Expected `device` to be available, got {self.device!r} on a "
                    "machine without CUDA; use 'auto' or 'cpu'"
                )

    @property
    def skips_training(self) -> bool:
        """Whether Byzantine nodes skip local training under these options."""
        if self.skip_training is None:
            return self.knowledge == "oracle"
        return self.skip_training

    def byzantine_partitions(self, num_partitions: int) -> frozenset[int]:
        """Return the Byzantine partition ids among ``range(num_partitions)``.

        The explicit `byzantine_ids` if given, else ``round(fraction * n)`` ids drawn
        by :func:`draw_byzantine` from `seed`: the same on every node, in every run,
        and the ones the evaluation (``flwr-alie``) attacks for that seed.

        Examples
        --------
        >>> sorted(ALIEConfig(fraction=0.2, seed=0).byzantine_partitions(10))
        [6, 9]
        >>> sorted(ALIEConfig(byzantine_ids=(1, 3)).byzantine_partitions(10))
        [1, 3]
        """
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
            raise TypeError(
                f"Expected `num_partitions` to be an int, got {num_partitions!r}"
            )
        if num_partitions < 0:
            raise ValueError(f"Expected `num_partitions` >= 0, got {num_partitions}")
        if self.byzantine_ids is not None:
            return frozenset(self.byzantine_ids)
        count = round(self.fraction * num_partitions)
        return frozenset(draw_byzantine(num_partitions, count, self.seed))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> ALIEConfig:
        """Parse the ``alie.*`` keys of a Flower ``run_config``; others are ignored.

        Keys: ``alie.z`` (number or ``"max"``), ``alie.direction`` (``"negative"``,
        ``"positive"``, ``"opposite-mean"``), ``alie.knowledge``, ``alie.fraction``,
        ``alie.byzantine-ids`` (comma-separated ids, ``""`` for none given),
        ``alie.seed``, ``alie.skip-training`` (``"auto"``, ``true`` or ``false``),
        ``alie.device``. An unknown ``alie.*`` key raises ``ValueError``.

        Examples
        --------
        >>> ALIEConfig.from_run_config({"alie.z": 1.5, "alie.fraction": 0.2})
        ... # doctest: +ELLIPSIS
        ALIEConfig(z=1.5, direction=<Direction.NEGATIVE: 'negative'>, ...)
        """
        values: dict[str, object] = {}
        for key, value in run_config.items():
            if not key.startswith(RUN_CONFIG_PREFIX):
                continue
            name = key[len(RUN_CONFIG_PREFIX) :]
            if name not in _RUN_CONFIG_FIELDS:
                known = ", ".join(RUN_CONFIG_PREFIX + k for k in _RUN_CONFIG_FIELDS)
                raise ValueError(
                    f"Unknown run-config key {key!r} (value {value!r}); known keys: "
                    f"{known}"
                )
            values[_RUN_CONFIG_FIELDS[name]] = _parse_value(key, name, value)
        return cls(**values)  # type: ignore[arg-type]

    def to_run_config(self) -> dict[str, bool | float | int | str]:
        """Return the ``alie.*`` run-config keys of these options.

        The inverse of :meth:`from_run_config` (an empty `byzantine_ids` reads
        back as ``None``, "none given", which with ``fraction = 0`` also means no
        Byzantine partition): a ServerApp that sends the options to its
        ClientApp's mod in a message's ConfigRecord (the evaluation does, for each
        cell) writes them with this.

        Examples
        --------
        >>> options = ALIEConfig(z=1.5, byzantine_ids=(1, 3), seed=2)
        >>> ALIEConfig.from_run_config(options.to_run_config()) == options
        True
        """
        ids = self.byzantine_ids
        values: dict[str, bool | float | int | str] = {
            "z": self.z if self.z == "max" else float(self.z),
            "direction": self.direction.value,
            "knowledge": self.knowledge,
            "fraction": float(self.fraction),
            "byzantine-ids": "" if ids is None else ",".join(map(str, ids)),
            "seed": self.seed,
            "skip-training": "auto"
            if self.skip_training is None
            else self.skip_training,
            "device": self.device,
        }
        assert set(values) == set(_RUN_CONFIG_FIELDS)
        return {RUN_CONFIG_PREFIX + key: value for key, value in values.items()}


@functools.lru_cache(maxsize=256)  # the mod asks once per partition and round
def draw_byzantine(n: int, count: int, seed: int) -> tuple[int, ...]:
    """Return the Byzantine partitions of `seed`: the first `count` of a permutation.

    The permutation of ``range(n)`` is ``random.Random(seed)``'s; the ids come
    sorted. Nested across counts: the 2 Byzantine partitions of a seed are among its
    4. The one draw of flwr-alie: the mod's ``alie.fraction`` and the evaluation's
    grid both use it.

    Examples
    --------
    >>> draw_byzantine(20, 4, seed=0)
    (1, 8, 12, 13)
    >>> set(draw_byzantine(20, 2, seed=0)) <= set(draw_byzantine(20, 4, seed=0))
    True
    """
    order = random.Random(seed).sample(range(n), n)
    return tuple(sorted(order[:count]))


def _parse_value(key: str, name: str, value: object) -> object:
    """Turn one run-config value into the type of its ALIEConfig field."""
    if name == "direction":
        try:
            return Direction(value)
        except ValueError as err:
            choices = [d.value for d in Direction]
            raise ValueError(f"Expected {key!r} in {choices}, got {value!r}") from err
    if name == "byzantine-ids":
        if not isinstance(value, str):
            raise TypeError(
                f"Expected {key!r} to be a comma-separated string, got {value!r}"
            )
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            return None
        try:
            return tuple(int(p) for p in parts)
        except ValueError as err:
            raise ValueError(
                f"Expected {key!r} to list integer ids, got {value!r}"
            ) from err
    if name == "skip-training":
        if value == "auto":
            return None
        if not isinstance(value, bool):
            raise TypeError(
                f"Expected {key!r} to be true, false or 'auto', got {value!r}"
            )
        return value
    if (
        name in ("z", "fraction")
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return float(value)
    return value


def resolve_device(device: str) -> torch.device:
    """Return the torch device for an option value: ``"auto"`` picks CUDA if present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
