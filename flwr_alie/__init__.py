"""flwr-alie: the "A Little Is Enough" attack on Byzantine robustness in Flower.

Moran Baruch, Gilad Baruch and Yoav Goldberg, "A Little Is Enough: Circumventing
Defenses For Distributed Learning", NeurIPS 2019.
"""

from flwr_alie.attacks import ALIEAttack, Attack, Direction, z_max

__all__ = ["ALIEAttack", "Attack", "Direction", "z_max"]
