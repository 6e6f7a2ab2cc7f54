"""Byzantine attacks in torch: the base class, the direction, and ALIE.

Nothing here imports Flower or NumPy.
"""

from flwr_alie.attacks.alie import ALIEAttack, z_max
from flwr_alie.attacks.base import Attack, Direction

__all__ = ["ALIEAttack", "Attack", "Direction", "z_max"]
