"""Named sets of ``flwr-alie`` options (``--preset NAME``); flags given win.

- ``paper`` is the regime of the ALIE paper (Baruch, Baruch and Goldberg, NeurIPS
  2019) as its authors' code runs it: distributed SGD with n = 51 workers of which
  12 are Byzantine (51 = 4 * 12 + 3, Bulyan's least n), one minibatch gradient per
  worker a step, and momentum 0.9 with learning rate 0.1 at the server. Here a
  client's update after one local step at lr 1 is minus its gradient, so server
  learning rate 0.1 and momentum 0.9 on the aggregate is exactly that optimiser.
- ``iclr2022`` is the set-up of Karimireddy, He and Jaggi (ICLR 2022, bucketing)
  on the offline 5,000-image MNIST subset, with an MLP where they train a CNN.
- ``local-epochs`` is the FedAvg regime of several local epochs a round, where
  the attack is blunted: the first default of ``flwr-alie``.
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
            "oracle statistics, on MNIST-1D with a 1-D CNN, trained to its plateau"
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
            "seeds": [0, 1, 2, 3, 4],
            "rounds": 500,
            "last": 50,
            "local_steps": 1,
            "lr": 1.0,
            "batch_size": 32,
            "worker_momentum": 0.0,
            "server_lr": 0.1,
            "server_momentum": 0.9,
        },
    ),
    "iclr2022": Preset(
        summary=(
            "Karimireddy, He and Jaggi, ICLR 2022 (bucketing): 5,000 MNIST images "
            "in label-sorted shards, n = 25, f = 5, ALIE at z_max, 600 FedSGD steps "
            "of batch 32 with worker momentum 0.9, the median, Krum, the geometric "
            "median (RFA, T = 8) and centered clipping (3 iterations), each with and "
            "without bucketing s = 2"
        ),
        options={
            "dataset": "mnist-5k",
            "model": "mlp",
            "clients": 25,
            "fractions": [0.2],
            "zs": ["max"],
            "strategies": [
                "fedmedian",
                "krum",
                "geomed",
                "cc",
                "bucketing-median",
                "bucketing-krum",
                "bucketing-geomed",
                "bucketing-cc",
            ],
            "splits": ["sorted"],
            "seeds": [0, 1, 2, 3, 4],
            "rounds": 600,
            "last": 50,
            "local_steps": 1,
            "batch_size": 32,
            # their worker momentum is m <- beta m + g at lr 0.01; this one is
            # m <- beta m + (1 - beta) g, so lr 0.1 takes the same steps at beta
            # 0.9 (pass --lr 0.01 with --worker-momentum 0), and their clipping
            # radius tau = 10 on momenta is 0.1 on these updates, -lr m
            "lr": 0.1,
            "worker_momentum": 0.9,
            "cc_tau": 0.1,
            "cc_iterations": 3,
            "geomed_iterations": 8,
        },
    ),
    "local-epochs": Preset(
        summary=(
            "FedAvg-style local training: 3 local epochs a round on digits, 15 "
            "rounds, Flower's six strategies on IID and Dirichlet(0.5) data, 3 "
            "seeds (the first default: local epochs blunt the attack)"
        ),
        options={
            "strategies": [
                "fedavg",
                "fedmedian",
                "fedtrimmedavg",
                "krum",
                "multikrum",
                "bulyan",
            ],
            "splits": ["iid", "dirichlet"],
            "alpha": 0.5,
            "seeds": [0, 1, 2],
            "rounds": 15,
            "last": 5,
            "local_steps": 0,
            "epochs": 3,
            "lr": 0.5,
            "batch_size": 8,
            "worker_momentum": 0.0,
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
