"""The evaluation's speed against the arithmetic it does, in one run.

The cells of the paper regime (``--preset paper``: MNIST-1D, the 1-D CNN, n = 51,
f = 12, FedSGD with one local step, server momentum 0.9 and lr 0.1): FedAvg, the
median, the trimmed mean and Krum, each clean and under ALIE (z = 1.5, oracle), so
8 cells a seed. In one run:

- **floor**: the same cells in plain torch in one process, on one thread: a
  cell-round is the clients' gradients in one grouped pass (a grouped convolution
  over the clients' stacked parameters: every client's step at once), the ALIE row
  of an attacked cell, the aggregation, the server's momentum step and the central
  test evaluation; no Flower, no flwr-alie. It runs in processes of its own with
  the allocator settings the evaluation gives Flower's processes
  (``flwr_alie.evaluation.runtime.ALLOCATOR_ENV``), which make it faster too: first
  one alone, then two at once, one a core (the cells are independent), timed over
  the same span; the best of three of each. The floor on two cores is the two
  processes' rates added up; twice the rate of one alone is printed beside it
  (two processes share the caches and the memory bus, and may be slower than one
  alone: 8% on one machine, not at all on another).
- **K = 1** and **K = n**: ``flwr-alie`` itself (Flower's Simulation Engine, one
  Flower message per client, or one per cell-round), watched from outside: start-up
  is the time from launch to the first round's row, steady throughput the rate of
  round rows between 10% and 50% of them (while every one of ``--parallel`` cells
  is in flight: the later ones start as the first finish).

A second table times a block's FedSGD step, one client after the other (the
reference loop) against the vectorised pass, for each model the evaluation builds:
``--vectorise auto`` follows it.

Usage: ``python benchmarks/bench_evaluation.py [--rounds 60] [--seeds 0 1]
[--skip-k1]``. Prints the tables, with the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

N, F_BYZ, BATCH, Z = 51, 12, 32, 1.5
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")


# ------------------------------------------------------------------ the floor


class GroupedCNN:
    """The evaluation's 1-D CNN for `clients` at once, as grouped convolutions.

    Layers as in ``--model cnn`` on MNIST-1D: 1 -> 16 -> 32 -> 32 channels,
    kernel 5, padding 2, the last two with stride 2, then a linear layer.
    """

    def __init__(self, length: int, classes: int, generator: torch.Generator) -> None:
        def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
            bound = 1 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=generator) * 2 - 1) * bound

        out = (length + 3) // 4
        self.shapes = {
            "w1": ((16, 1, 5), 5),
            "b1": ((16,), 5),
            "w2": ((32, 16, 5), 80),
            "b2": ((32,), 80),
            "w3": ((32, 32, 5), 160),
            "b3": ((32,), 160),
            "w4": ((classes, 32 * out), 32 * out),
            "b4": ((classes,), 32 * out),
        }
        self.params = {k: uniform(s, f) for k, (s, f) in self.shapes.items()}
        self.sizes = [int(torch.tensor(s).prod()) for s, _ in self.shapes.values()]
        self.d = sum(self.sizes)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params.values()])

    def unflat(self, v: torch.Tensor, clients: int = 0) -> dict[str, torch.Tensor]:
        lead = (clients,) if clients else ()
        parts = torch.split(v, self.sizes, dim=-1)
        return {
            k: p.reshape(*lead, *s)
            for (k, (s, _)), p in zip(self.shapes.items(), parts, strict=True)
        }

    @staticmethod
    def logits(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`x` (c, b, L), parameters (c, ...) -> logits (c, b, classes)."""
        c, b, length = x.shape
        h = x.permute(1, 0, 2).reshape(b, c, length)
        for layer, channels, stride in (("1", 1, 1), ("2", 16, 2), ("3", 32, 2)):
            weight = p["w" + layer].reshape(-1, channels, 5)
            bias = p["b" + layer].reshape(-1)
            h = F.relu(F.conv1d(h, weight, bias, stride=stride, padding=2, groups=c))
        h = h.reshape(b, c, -1).permute(1, 0, 2)
        return torch.baddbmm(p["b4"].unsqueeze(1), h, p["w4"].transpose(1, 2))

    def gradients(
        self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Every client's gradient at the global weights `w`: (c, d)."""
        c = x.shape[0]
        stacked = w.unsqueeze(0).expand(c, -1).clone().requires_grad_(True)
        logits = self.logits(self.unflat(stacked, c), x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        (grad,) = torch.autograd.grad(loss * c, stacked)  # each client's mean loss
        return grad

    def evaluate(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            logits = self.logits(self.unflat(w.unsqueeze(0), 1), x.unsqueeze(0))[0]
            return float((logits.argmax(1) == y).float().mean())


def aggregate(name: str, updates: torch.Tensor, f: int) -> torch.Tensor:
    if name == "fedavg":
        return updates.mean(0)
    if name == "fedmedian":
        return updates.median(0).values
    if name == "fedtrimmedavg":
        return updates.sort(0).values[f : len(updates) - f].mean(0)
    distances = torch.cdist(updates, updates) ** 2  # krum
    closest = distances.sort(1).values[:, 1 : len(updates) - f - 1]
    return updates[int(closest.sum(1).argmin())]


def floor(rounds: int, wait: bool = False) -> float:
    """Seconds per cell-round of the plain-torch cells on one thread.

    With `wait`, the cells start once a line is read from stdin, after
    ``ready`` is printed (so that processes started together time the same span).
    """
    from flwr_alie.evaluation.task import load_data

    torch.set_num_threads(1)
    data = load_data("mnist1d", N, "iid", 0.5, 0)
    parts = data.partitions
    test_x, test_y = data.test.x, data.test.y
    gen = torch.Generator().manual_seed(0)
    cells = [(s, attacked) for s in STRATEGIES for attacked in (False, True)]
    model = GroupedCNN(test_x.shape[1], 10, gen)
    byzantine = set(range(F_BYZ))
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    started = time.perf_counter()
    for strategy, attacked in cells:
        w = model.flat()
        momentum = torch.zeros_like(w)
        honest = [p for p in range(N) if not (attacked and p in byzantine)]
        for _ in range(rounds):
            idx = [torch.randperm(len(parts[p]), generator=gen)[:BATCH] for p in honest]
            x = torch.stack([parts[p].x[i] for p, i in zip(honest, idx, strict=True)])
            y = torch.stack([parts[p].y[i] for p, i in zip(honest, idx, strict=True)])
            updates = -model.gradients(w, x, y)  # one step at lr 1
            if attacked:
                mu, sigma = updates.mean(0), updates.std(0, unbiased=False)
                crafted = (mu - Z * sigma).expand(F_BYZ, -1)
                updates = torch.cat([updates, crafted])
            momentum = 0.9 * momentum + aggregate(strategy, updates, F_BYZ)
            w = w + 0.1 * momentum
            model.evaluate(w, test_x, test_y)
    return (time.perf_counter() - started) / (rounds * len(cells))


# ------------------------------------------------------- the vectorised pass


def vectorised_against_loop() -> list[str]:
    """Rows of the table: a block's FedSGD step, loop against vectorised pass."""
    from flwr_alie.evaluation.task import (
        Partition,
        StepsJob,
        make_model,
        run_steps,
        run_steps_vectorised,
    )

    torch.set_num_threads(1)
    rows = []
    for kind, shape, features, clients, batch in (
        ("mlp", (), 40, 51, 32),
        ("cnn", (1, 40), 40, 51, 32),
        ("mlp", (), 64, 20, 8),
        ("cnn", (1, 8, 8), 64, 20, 8),
        ("mlp", (), 784, 25, 32),
        ("cnn", (1, 28, 28), 784, 25, 32),
    ):
        model = make_model(features, 10, kind=kind, input_shape=shape)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        jobs = [
            StepsJob(
                weights,
                Partition(torch.rand(200, features, generator=gen),
                          torch.randint(0, 10, (200,), generator=gen)),
                steps=1, lr=0.1, batch_size=batch, seed=c,
            )
            for c in range(clients)
        ]  # fmt: skip

        def timed(run: object) -> float:
            run()  # type: ignore[operator]
            started = time.perf_counter()
            for _ in range(5):
                run()  # type: ignore[operator]
            return (time.perf_counter() - started) / 5 * 1e3

        loop = timed(lambda: [run_steps(model, job) for job in jobs])  # noqa: B023
        vector = timed(lambda: run_steps_vectorised(model, jobs))  # noqa: B023
        name = f"{kind} {shape or (features,)}"
        rows.append(
            f"| {name} | {clients} | {batch} | {loop:.1f} | {vector:.1f} | "
            f"{loop / vector:.2f}x |"
        )
    return rows


# ------------------------------------------------------------------ flwr-alie


def evaluation(rounds: int, seeds: list[str], block_size: int) -> tuple[float, float]:
    """Run flwr-alie on the cells; return (start-up seconds, cell-rounds/s)."""
    out = Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
    argv = [
        sys.executable, "-m", "flwr_alie.evaluation.cli", "--preset", "paper",
        "--strategies", *STRATEGIES, "--knowledge", "oracle", "--z", "1.5",
        "--rounds", str(rounds), "--seeds", *seeds, "--block-size", str(block_size),
        "--out", str(out / "run"),
    ]  # fmt: skip
    results = out / "run" / "results.jsonl"
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: list[tuple[float, int]] = []
    offset, done = 0, 0
    while proc.poll() is None:
        if results.exists():  # read the new whole lines only: a cheap watch
            with results.open("rb") as rows:
                rows.seek(offset)
                chunk = rows.read()
            whole = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(whole)
            done += sum(
                1 for line in whole.splitlines() if json.loads(line).get("round")
            )
            if not seen or done > seen[-1][1]:
                seen.append((time.monotonic() - started, done))
        time.sleep(0.2)
    _, stderr = proc.communicate()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(stderr.decode()[-2000:])
    total = seen[-1][1]
    first = next(t for t, done in seen if done > 0)
    low = next(p for p in seen if p[1] >= 0.1 * total)
    high = next(p for p in seen if p[1] >= 0.5 * total)
    return first, (high[1] - low[1]) / (high[0] - low[0])


def floor_in_own_processes(rounds: int, copies: int) -> list[float]:
    """:func:`floor` in `copies` fresh processes at once: each one's time a round.

    The processes have the evaluation's allocator settings, and their cells start
    together, once every one has loaded its data.
    """
    from flwr_alie.evaluation.runtime import ALLOCATOR_ENV

    env = {**os.environ, **ALLOCATOR_ENV}
    argv = [sys.executable, __file__, "--floor-only", "--rounds", str(rounds)]
    pipe = subprocess.PIPE
    procs = [
        subprocess.Popen(argv, env=env, stdin=pipe, stdout=pipe, text=True)
        for _ in range(copies)
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the floor's process failed: {proc.wait()}")
    for proc in procs:  # all at once
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"the floor's process failed: {outputs}")
    return [float(out.split()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--skip-k1", action="store_true")
    parser.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_only:  # a child of floor_in_own_processes
        print(floor(args.rounds, wait=True))
        return
    cells = len(STRATEGIES) * 2 * len(args.seeds)
    print(
        f"{cells} cells (4 strategies x clean/z=1.5 x {len(args.seeds)} seeds), "
        f"n = {N}, {args.rounds} rounds\n"
    )
    # the best of three of each, taken in turn: the floor at its fastest
    alone, together = math.inf, [math.inf, math.inf]
    for _ in range(3):
        alone = min(alone, *floor_in_own_processes(20, 1))
        pair = floor_in_own_processes(20, 2)
        together = max(together, pair, key=lambda ts: sum(1 / t for t in ts))
    floor_rate = sum(1 / t for t in together)
    doubled = 2 / alone
    rows = [
        ("floor: plain torch, two processes at once", "", floor_rate),
        ("floor: one process alone, its rate doubled", "", doubled),
    ]
    runs = [] if args.skip_k1 else [("flwr-alie, K = 1", 1)]
    runs.append(("flwr-alie, K = n", 0))
    for label, k in runs:
        startup, rate = evaluation(args.rounds, args.seeds, k)
        rows.append((label, f"{startup:.1f}", rate))
    print(
        f"floor: {1e3 * alone:.1f} ms a cell-round on one thread alone, "
        + " and ".join(f"{1e3 * t:.1f}" for t in together)
        + " two at once\n"
    )
    print("| run | start-up (s) | cell-rounds/s | floor / run | doubled / run |")
    print("|---|---|---|---|---|")
    for label, startup, rate in rows:
        print(
            f"| {label} | {startup} | {rate:.1f} | {floor_rate / rate:.2f}x "
            f"| {doubled / rate:.2f}x |"
        )
    print("\nA block's FedSGD step on one thread (ms):\n")
    print("| model (input) | clients | batch | loop | vectorised | loop / vectorised |")
    print("|---|---|---|---|---|---|")
    print("\n".join(vectorised_against_loop()))


if __name__ == "__main__":
    main()
