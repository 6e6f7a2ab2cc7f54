"""Time the robust aggregators against the memory floor, in one run.

On (n, d) = (40, 1.1e7) float32 by default (a ResNet-18's updates from 40 clients),
the median of ``--repeats`` wall times of each function of
``flwr_alie.aggregators`` and of the floor, one read of ``x`` (``x.sum(0)``),
interleaved so that every ratio comes from the same run.

- ``centered_clipping``: ``L = 1`` iteration (two reads of ``x`` per iteration);
- ``geometric_median``: 3 iterations, ``tol = 0`` (a mean, then two reads per
  iteration): time per iteration = (time - mean) / 3 is printed too;
- ``nearest_neighbor_mixing``: pairwise distances (``n^2 / 2`` multiply-adds per
  coordinate: compute-bound) and one GEMM;
- ``bucketing``: ``s = 2``, one GEMM with the assignment matrix.

Usage: ``python benchmarks/bench_aggregators.py [--n 40] [--d 11000000]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from flwr_alie.aggregators import (
    bucketing,
    centered_clipping,
    geometric_median,
    nearest_neighbor_mixing,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--d", type=int, default=11_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = 1 + 1e-3 * torch.randn(args.n, args.d, generator=g)
    center = x.mean(0)
    fns: dict[str, Callable[[], object]] = {
        "floor (x.sum(0))": lambda: x.sum(0),
        "mean (GEMV)": lambda: torch.mv(x.T, torch.full((args.n,), 1 / args.n)),
        "centered_clipping L=1": lambda: centered_clipping(x, center=center, tau=1e-3),
        "geometric_median 3 it.": lambda: geometric_median(x, iterations=3, tol=0),
        "nearest_neighbor_mixing": lambda: nearest_neighbor_mixing(x, f=args.n // 4),
        "bucketing s=2": lambda: bucketing(x, s=2, generator=torch.Generator()),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    floor = median["floor (x.sum(0))"]
    print(f"(n, d) = ({args.n}, {args.d:,}) float32, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}")  # fmt: skip
    print(f"{'':<26} {'time':>9} {'/ floor':>8}")
    for name, t in median.items():
        print(f"{name:<26} {t:>8.3f}s {t / floor:>7.2f}x")
    per_iteration = (median["geometric_median 3 it."] - median["mean (GEMV)"]) / 3
    print(f"{'geometric_median / iter.':<26} {per_iteration:>8.3f}s "
          f"{per_iteration / floor:>7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
