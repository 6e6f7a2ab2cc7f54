"""Time ALIEAttack.generate against the naive baseline and the memory floor.

For each (h, d), f = h / 4, float32, on the CPU (and on CUDA when present), prints the
median wall time of:

- ``generate``: ``ALIEAttack.generate(x, out, f=f, z=1.5)``;
- ``naive``: ``torch.std_mean(x, dim=0, correction=0)`` then the broadcast write;
- ``floor``: one read of the ``h*d`` inputs and one write of the ``f*d`` outputs,
  ``x.sum(0)`` then ``out.copy_(row.expand(f, d))``;
- ``floor_mv``: the same with the read done by a GEMV (``ones @ x``), which on some
  CPUs reads faster than ``sum(0)``; the stricter floor.

All timings of a row are taken in the same run, interleaved, so the ratios are what
to compare across machines. Usage: ``python benchmarks/bench_core.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from flwr_alie import ALIEAttack

CASES = [(8, 1_000_000), (40, 1_000_000), (40, 11_000_000), (200, 100_000)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _contenders(
    x: torch.Tensor, out: torch.Tensor, f: int
) -> dict[str, Callable[[], object]]:
    h, d = x.shape
    ones = torch.ones(1, h, device=x.device)

    def generate() -> object:
        return ALIEAttack.generate(x, out, f=f, z=1.5)

    def naive() -> object:
        sigma, mu = torch.std_mean(x, dim=0, correction=0)
        return out.copy_((mu - 1.5 * sigma).expand(f, d))

    def floor() -> object:
        return out.copy_(x.sum(0).expand(f, d))

    def floor_mv() -> object:
        return out.copy_((ones @ x).expand(f, d))

    return {"generate": generate, "naive": naive, "floor": floor, "mv": floor_mv}


def bench(device: torch.device, repeats: int) -> None:
    print(f"\ndevice: {device}, float32, threads: {torch.get_num_threads()}")
    header = (
        f"{'h':>4} {'d':>11} {'f':>3} | {'generate':>9} {'naive':>9} {'floor':>9} "
        f"{'floor_mv':>9} | {'gen/floor':>9} {'gen/mv':>7} {'naive/gen':>9}"
    )
    print(header)
    print("-" * len(header))
    for h, d in CASES:
        f = h // 4
        x = torch.randn(h, d, device=device)
        out = torch.empty(f, d, device=device)

        t = _median_times(
            _contenders(x, out, f),
            repeats,
            device,
        )
        ms = {k: v * 1e3 for k, v in t.items()}
        print(
            f"{h:>4} {d:>11,} {f:>3} | {ms['generate']:>7.2f}ms {ms['naive']:>7.2f}ms "
            f"{ms['floor']:>7.2f}ms {ms['mv']:>7.2f}ms | "
            f"{t['generate'] / t['floor']:>8.2f}x {t['generate'] / t['mv']:>6.2f}x "
            f"{t['naive'] / t['generate']:>8.1f}x"
        )
        del x, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    bench(torch.device("cpu"), args.repeats)
    if torch.cuda.is_available():
        bench(torch.device("cuda"), args.repeats)


if __name__ == "__main__":
    main()
