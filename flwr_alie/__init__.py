"""flwr-alie: the "A Little Is Enough" attack on Byzantine robustness in Flower.

Moran Baruch, Gilad Baruch and Yoav Goldberg, "A Little Is Enough: Circumventing
Defenses For Distributed Learning", NeurIPS 2019.

The torch core (:mod:`flwr_alie.attacks`) is imported at once; the Flower
integration (engine, strategy, mod, legacy, limits, config, params) is imported on
first use, so that the core works where Flower is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flwr_alie.attacks import ALIEAttack, Attack, Direction, moments, z_max

if TYPE_CHECKING:
    from flwr_alie.config import ALIEConfig
    from flwr_alie.legacy import ALIEClient, ALIELegacyStrategy
    from flwr_alie.limits import check_setup
    from flwr_alie.mod import alie_mod, make_alie_mod
    from flwr_alie.strategy import ALIEStrategy

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
    "moments",
    "z_max",
]

_LAZY = {
    "ALIEClient": "flwr_alie.legacy",
    "alie_mod": "flwr_alie.mod",
    "make_alie_mod": "flwr_alie.mod",
    "ALIEConfig": "flwr_alie.config",
    "ALIELegacyStrategy": "flwr_alie.legacy",
    "ALIEStrategy": "flwr_alie.strategy",
    "check_setup": "flwr_alie.limits",
}


def __getattr__(name: str) -> Any:
    """Import the Flower integration on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flwr_alie' has no attribute {name!r}")
