"""ServerApp: a robust strategy wrapped in ALIEStrategy, evaluated centrally."""

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
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
from flwr_alie import ALIEConfig, ALIEStrategy, check_setup
from flwr_alie.defenses import NNM

app = ServerApp()


def make_strategy(name: str, *, num_nodes: int, num_byzantine: int) -> Strategy:
    """A robust strategy configured for the Byzantine nodes it faces."""
    f = num_byzantine
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": num_nodes,
        "min_available_nodes": num_nodes,
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    alie = ALIEConfig.from_run_config(config)  # the attack options, parsed once
    num_nodes = int(config["num-nodes"])
    num_byzantine = len(alie.byzantine_partitions(num_nodes))
    inner = make_strategy(
        str(config["strategy"]), num_nodes=num_nodes, num_byzantine=num_byzantine
    )
    problems = check_setup(
        inner, num_nodes=num_nodes, num_byzantine=num_byzantine, z=alie.z
    )
    if problems:
        raise ValueError(
            "This configuration cannot be evaluated: " + "; ".join(problems)
        )
    strategy = ALIEStrategy.from_config(inner, alie)

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
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model(seed=seed).state_dict()),
        num_rounds=int(config["num-server-rounds"]),
        evaluate_fn=central_evaluation,
    )
    if config["save-path"]:
        for server_round, metrics in result.train_metrics_clientapp.items():
            history[server_round]["train"] = dict(metrics)
        Path(str(config["save-path"])).write_text(json.dumps(history))
