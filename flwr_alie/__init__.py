"""flwr-alie: the "A Little Is Enough" attack on Byzantine robustness in Flower.

Moran Baruch, Gilad Baruch and Yoav Goldberg, "A Little Is Enough: Circumventing
Defenses For Distributed Learning", NeurIPS 2019.

The torch core (:mod:`flwr_alie.attacks`) is imported at once; the Flower
integration (client, strategy, config, params) is imported on first use, so that the
core works where Flower is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flwr_alie.attacks import ALIEAttack, Attack, Direction, z_max

if TYPE_CHECKING:
    from flwr_alie.client import ALIEClient, alie_mod, make_alie_mod
    from flwr_alie.config import ALIEConfig
    from flwr_alie.strategy import ALIELegacyStrategy, ALIEStrategy, check_setup

__all__ = [
    "ALIEAttack",
    "ALIEClient",
    "ALIEConfig",
    "ALIELegacyStrategy",
    "ALIEStrategy",
    "Attack",
    "Direction",
    "alie_mod",
    "check_setup",
    "make_alie_mod",
    "z_max",
]

_LAZY = {
    "ALIEClient": "flwr_alie.client",
    "alie_mod": "flwr_alie.client",
    "make_alie_mod": "flwr_alie.client",
    "ALIEConfig": "flwr_alie.config",
    "ALIELegacyStrategy": "flwr_alie.strategy",
    "ALIEStrategy": "flwr_alie.strategy",
    "check_setup": "flwr_alie.strategy",
}


def __getattr__(name: str) -> Any:
    """Import the Flower integration on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flwr_alie' has no attribute {name!r}")
