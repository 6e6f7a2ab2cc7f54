"""ServerApp: a robust strategy wrapped in ALIEStrategy, evaluated centrally."""

import json
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from digits_alie.task import evaluate, make_model, task_data
from flwr_alie import ALIEConfig, ALIEStrategy, check_setup, z_max
from flwr_alie.defenses import NNM

app = ServerApp()


def make_strategy(
    name: str, *, num_nodes: int, num_byzantine: int, min_nodes: int
) -> Strategy:
    """A robust strategy configured for the Byzantine nodes it faces."""
    f = num_byzantine
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    strategies = {
        "fedavg": lambda: FedAvg(**common),
        "fedmedian": lambda: FedMedian(**common),
        # Flower trims int(beta * n) from each end: exactly f
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=(f + 0.5) / num_nodes),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: MultiKrum(
            **common, num_malicious_nodes=f, num_nodes_to_select=num_nodes - f
        ),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=f),
        # flwr-alie's defences compose: mix the updates, then take the median
        "nnm-median": lambda: NNM(FedMedian(**common), f=f),
    }
    if name not in strategies:
        raise ValueError(f"Expected `strategy` in {sorted(strategies)}, got {name!r}")
    return strategies[name]()


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Wait up to `timeout` seconds for `count` SuperNodes to connect."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    connected = len(list(grid.get_node_ids()))
    if connected < count:
        log(WARNING, "%d of %d nodes connected within %g s; the run starts with "
            "them", connected, count, timeout)  # fmt: skip


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    alie = ALIEConfig.from_run_config(config)  # the attack options, parsed once
    num_nodes = int(config["num-nodes"])
    num_byzantine = len(alie.byzantine_partitions(num_nodes))
    # a round starts with this many nodes, so that a dead SuperNode does not stop
    # the run; it waits round-timeout seconds at most for their replies
    min_nodes = int(config["min-nodes"]) or max(1, num_nodes - num_byzantine)
    timeout = float(config["round-timeout"])
    log(
        INFO,
        "a round needs %d of the %d nodes and waits at most %g s for their replies",
        min_nodes,
        num_nodes,
        timeout,
    )
    _wait_for_nodes(grid, num_nodes, timeout)  # round 1 with all of them, if they come
    inner = make_strategy(
        str(config["strategy"]),
        num_nodes=num_nodes,
        num_byzantine=num_byzantine,
        min_nodes=min_nodes,
    )
    problems = check_setup(
        inner, num_nodes=num_nodes, num_byzantine=num_byzantine, z=alie.z
    )
    if problems:
        raise ValueError(
            "This configuration cannot be evaluated: " + "; ".join(problems)
        )
    strategy = ALIEStrategy(inner, alie, num_nodes=num_nodes)
    if (
        alie.z == "max"
        and num_byzantine
        and z_max(num_nodes - num_byzantine, num_byzantine) == 0
    ):
        log(
            WARNING,
            "z = max is 0 for %d nodes with %d Byzantine: the crafted update is the "
            "honest mean and the attack is a no-op; set alie.z or alie.fraction",
            num_nodes,
            num_byzantine,
        )
    save_path = Path(str(config["save-path"])) if config["save-path"] else None

    seed = int(config["seed"])
    test = task_data(num_nodes, seed).test
    model = make_model(seed=seed)
    history: dict[int, dict[str, object]] = {}

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test)
        history[server_round] = {
            "loss": loss,
            "accuracy": accuracy,
            "weights": {
                k: v.tolist() for k, v in arrays.to_numpy_ndarrays_dict().items()
            }
            if hasattr(arrays, "to_numpy_ndarrays_dict")
            else {k: a.numpy().tolist() for k, a in arrays.items()},
        }
        if save_path is not None:  # every round: a stopped run keeps what it did
            save_path.write_text(json.dumps(history))
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model(seed=seed).state_dict()),
        num_rounds=int(config["num-server-rounds"]),
        timeout=timeout,
        evaluate_fn=central_evaluation,
    )
    if save_path is not None:
        for server_round, metrics in result.train_metrics_clientapp.items():
            history[server_round]["train"] = dict(metrics)
        save_path.write_text(json.dumps(history))
