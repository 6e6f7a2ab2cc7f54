"""Named sets of ``flwr-alie`` options (``--preset NAME``); flags given win.

``paper`` is the regime of the ALIE paper (Baruch, Baruch and Goldberg, NeurIPS
2019) as its authors' code runs it: distributed SGD with n = 51 workers of which
12 are Byzantine (51 = 4 * 12 + 3, Bulyan's least n), one minibatch gradient per
worker a step, and momentum 0.9 with learning rate 0.1 at the server. Here a
client's update after one local step at lr 1 is minus its gradient, so server
learning rate 0.1 and momentum 0.9 on the aggregate is exactly that optimiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["PRESETS", "Preset", "describe"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A set of option values, keyed by the flags' destinations (named in PRESETS)."""

    summary: str
    options: Mapping[str, object]

    def flags(self) -> list[tuple[str, str]]:
        """Return (flag, value) pairs, as one would type them."""
        pairs = []
        for dest, value in self.options.items():
            shown = value if isinstance(value, list) else [value]
            flag = "--z" if dest == "zs" else "--" + dest.replace("_", "-")
            pairs.append(
                (
                    flag,
                    " ".join(
                        f"{v:g}" if isinstance(v, float) else str(v) for v in shown
                    ),
                )
            )
        return pairs


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        summary=(
            "the ALIE paper's regime: FedSGD (one local step), server momentum "
            "0.9 and lr 0.1, n = 51, f = 12, z in {1.5, max}, Byzantine-only and "
            "oracle statistics, on MNIST-1D with a 1-D CNN"
        ),
        options={
            "dataset": "mnist1d",
            "model": "cnn",
            "clients": 51,
            "fractions": [12 / 51],
            "zs": [1.5, "max"],
            "knowledge": ["byzantine-only", "oracle"],
            "strategies": [
                "fedavg",
                "fedtrimmedavg",
                "krum",
                "bulyan",
                "fedmedian",
                "cc",
            ],
            "splits": ["iid"],
            "seeds": [0, 1, 2],
            "rounds": 80,
            "last": 10,
            "local_steps": 1,
            "lr": 1.0,
            "batch_size": 32,
            "server_lr": 0.1,
            "server_momentum": 0.9,
        },
    ),
}


def describe(name: str) -> str:
    """Return the preset as a Markdown table of flags (the README shows it)."""
    preset = PRESETS[name]
    lines = [
        f"`--preset {name}`: {preset.summary}.",
        "",
        "| flag | value |",
        "|---|---|",
    ]
    lines += [f"| `{flag}` | {value} |" for flag, value in preset.flags()]
    return "\n".join(lines)
