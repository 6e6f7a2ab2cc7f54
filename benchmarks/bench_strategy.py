"""Time the ALIE wrapper's own work against the wrapped FedAvg's aggregation.

40 train replies of a ResNet-18-sized model (CIFAR-10 variant: 11.2 M floats in its
real per-layer arrays, BatchNorm's integer counters included), 10 of them Byzantine
(skipped training, oracle mode). In one run, the median of ``--repeats`` times of:

- ``fedavg``: ``FedAvg.aggregate_train`` on the replies;
- ``wrapped``: ``ALIEStrategy(FedAvg).aggregate_train`` on the same replies;
- ``own = wrapped - fedavg``: the wrapper's own work (sort, pack the honest deltas,
  the attack, unpack, substitute, telemetry);

and the peak resident memory each adds above what the replies already hold (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``), against the size of
one copy of the honest updates in float32.

``--busy`` keeps one core busy with ``yes > /dev/null`` during the timings (a
simulation's server always shares the machine with its clients); ``--threads N``
sets torch's intra-op threads (default: torch's choice). ``--stages`` adds the
wrapper's own work split into its stages (reading and packing the honest deltas,
the moments and the crafted row, unpacking, the rebuilt replies and telemetry).

Usage: ``python benchmarks/bench_strategy.py [--replies 40] [--byzantine 10]
[--busy] [--threads N] [--stages]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flwr_alie import ALIEConfig, ALIEStrategy


def resnet18_shapes(num_classes: int = 10) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and dtypes of a CIFAR-style ResNet-18's state dict."""
    layers: list[tuple[str, tuple[int, ...], str]] = []

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            layers.append((f"{prefix}.{name}", (c,), "float32"))
        layers.append((f"{prefix}.num_batches_tracked", (), "int64"))

    layers.append(("conv1.weight", (64, 3, 3, 3), "float32"))
    bn("bn1", 64)
    c_in = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            layers.append((f"{p}.conv1.weight", (c, c_in, 3, 3), "float32"))
            bn(f"{p}.bn1", c)
            layers.append((f"{p}.conv2.weight", (c, c, 3, 3), "float32"))
            bn(f"{p}.bn2", c)
            if c_in != c:
                layers.append((f"{p}.downsample.0.weight", (c, c_in, 1, 1), "float32"))
                bn(f"{p}.downsample.1", c)
            c_in = c
    layers.append(("fc.weight", (num_classes, 512), "float32"))
    layers.append(("fc.bias", (num_classes,), "float32"))
    return layers


def _metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
        reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600.0,
        message_type="train",
    )  # fmt: skip


def build_round(
    num_replies: int, num_byzantine: int
) -> tuple[ArrayRecord, list[Message], int]:
    rng = np.random.default_rng(0)
    shapes = resnet18_shapes()
    global_layers = {
        name: (rng.normal(0, 0.05, shape).astype(dtype) if dtype == "float32"
               else np.array(100, dtype))
        for name, shape, dtype in shapes
    }  # fmt: skip
    d = sum(int(np.prod(s)) for _, s, t in shapes if t == "float32")
    replies = []
    for i in range(num_replies):
        byzantine = i >= num_replies - num_byzantine
        layers = {
            k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)
            if v.dtype == np.float32 and not byzantine
            else v
            for k, v in global_layers.items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in layers.items()}),
                "metrics": MetricRecord({"num-examples": 500}),
            }
        )
        if byzantine:
            content["alie"] = ConfigRecord(
                {"byzantine": True, "partition-id": i, "skipped-training": True}
            )
        replies.append(Message(content=content, metadata=_metadata(i + 1)))
    record = ArrayRecord({k: Array(v) for k, v in global_layers.items()})
    return record, replies, d


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory `fn` adds, in MiB (Linux only; NaN elsewhere)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to VmRSS
    except OSError:
        return float("nan")
    before = _rss_mib("VmRSS")
    fn()
    return _rss_mib("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=40)
    parser.add_argument("--byzantine", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--stages", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if args.busy else None
    try:
        _measure(args)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def _measure(args: argparse.Namespace) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    global_record, replies, d = build_round(args.replies, args.byzantine)
    h = args.replies - args.byzantine
    fedavg = FedAvg()
    wrapper = ALIEStrategy(FedAvg(), ALIEConfig(z="max", device="cpu"))

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return list(range(1, args.replies + 1))

    wrapper.configure_train(1, global_record, ConfigRecord(), _Grid())  # type: ignore[arg-type]

    def run_fedavg() -> object:
        return fedavg.aggregate_train(1, replies)

    def run_wrapped() -> object:
        return wrapper.aggregate_train(1, replies)

    times: dict[str, list[float]] = {"fedavg": [], "wrapped": []}
    run_wrapped()  # warm up
    for _ in range(args.repeats):
        for name, fn in (("fedavg", run_fedavg), ("wrapped", run_wrapped)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t_fedavg = statistics.median(times["fedavg"])
    t_wrapped = statistics.median(times["wrapped"])
    own = t_wrapped - t_fedavg
    mem_fedavg = peak_extra_mib(run_fedavg)
    mem_wrapped = peak_extra_mib(run_wrapped)
    honest_copy = h * d * 4 / 2**20

    print(f"replies: {args.replies} ({h} honest, {args.byzantine} Byzantine), "
          f"d = {d:,} floats per update, {len(resnet18_shapes())} arrays, "
          f"torch threads {torch.get_num_threads()}, "
          f"{'one core busy' if args.busy else 'quiet'}")  # fmt: skip
    print(f"{'':>26} {'time':>9} {'peak extra memory':>18}")
    print(f"{'FedAvg.aggregate_train':>26} {t_fedavg:>8.2f}s {mem_fedavg:>14.0f} MiB")
    print(f"{'ALIEStrategy(FedAvg)':>26} {t_wrapped:>8.2f}s {mem_wrapped:>14.0f} MiB")
    print(
        f"{'wrapper own work':>26} {own:>8.2f}s {mem_wrapped - mem_fedavg:>14.0f} MiB"
    )
    held = wrapper.engine.held_bytes / 2**20
    print(f"own work / FedAvg: {own / t_fedavg:.2f}x")
    print(f"held by the wrapper between rounds (packed honest deltas): {held:.0f} MiB")
    extra = held + mem_wrapped - mem_fedavg
    print(
        f"one float32 copy of the honest updates: {honest_copy:.0f} MiB; the "
        f"wrapper's extra memory (held + transient peak): {extra:.0f} MiB = "
        f"{extra / honest_copy:.2f} copies"
    )
    if args.stages:
        _stages(wrapper, replies, args.repeats)


def _stages(wrapper: ALIEStrategy, replies: list[Message], repeats: int) -> None:
    """Time each stage of the wrapper's own work, as the engine runs it."""
    from flwr_alie.attacks import alie_vector, moments
    from flwr_alie.params import (
        arrays_from_layers,
        layers_from_record,
        pack,
        record_from_layers,
        unpack,
    )

    engine = wrapper.engine
    global_layers = engine.global_for(1)
    assert global_layers is not None
    honest = [m for m in replies if "alie" not in m.content]
    byzantine = [m for m in replies if "alie" in m.content]
    readers = [
        (lambda m=m: layers_from_record(m.content.array_records["arrays"]))
        for m in honest
    ]
    buffer, spec = pack(readers, global_layers)
    state: dict[str, object] = {}

    def do_pack() -> None:
        pack(readers, global_layers, out=buffer)

    def do_moments() -> None:
        mu, sigma = moments(buffer)
        state["row"] = alie_vector(mu, sigma, z=1.0)

    def do_unpack() -> None:
        state["crafted"] = unpack(state["row"], spec, global_layers)  # type: ignore[arg-type]

    def do_rebuild() -> None:
        crafted = state["crafted"]
        shared = arrays_from_layers({k: crafted[k] for k in spec.packed_keys})  # type: ignore[index]
        for m in byzantine:
            record_from_layers(shared, base=m.content.array_records["arrays"])

    stages = {"pack": do_pack, "moments+row": do_moments, "unpack": do_unpack,
              "rebuild": do_rebuild}  # fmt: skip
    for fn in stages.values():
        fn()
    print("stage        median")
    for name, fn in stages.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name:<12} {statistics.median(times):>6.3f}s")


if __name__ == "__main__":
    main()
