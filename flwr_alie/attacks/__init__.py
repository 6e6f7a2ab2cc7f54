"""Byzantine attacks in torch: the base class, the direction, ALIE and its moments.

Nothing here imports Flower or NumPy.
"""

from flwr_alie.attacks.alie import ALIEAttack, alie_vector, check_z, z_max
from flwr_alie.attacks.base import Attack, Direction
from flwr_alie.attacks.stats import moments

__all__ = [
    "ALIEAttack",
    "Attack",
    "Direction",
    "alie_vector",
    "check_z",
    "moments",
    "z_max",
]
