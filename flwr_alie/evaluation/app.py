"""The Flower app of the evaluation: one ServerApp drives every cell of a grid.

Starting Ray and Flower costs seconds, and a ServerApp waits seconds between polls
for replies, so running one Flower run per cell would spend most of a grid waiting.
Here a single run serves the whole grid: its ServerApp runs the cells concurrently
(each in a thread, each with its own strategy calling Flower's own
``Strategy.start``), all of them sending their train messages to the same
SuperNodes. A cell's options travel in its train messages' ConfigRecord, so the
ClientApp, and the ALIE mod in it, serve every cell alike.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from logging import INFO
from pathlib import Path
from typing import TypeVar

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flwr_alie.evaluation.grid import Cell, load_cells
from flwr_alie.evaluation.strategies import make_strategy
from flwr_alie.evaluation.task import evaluate, load_data, make_model, train
from flwr_alie.limits import check_setup
from flwr_alie.mod import alie_mod
from flwr_alie.strategy import ALIEStrategy

__all__ = ["PROGRESS_TAG", "client_app", "server_app"]

PROGRESS_TAG = "[flwr-alie]"

client_app = ClientApp(mods=[alie_mod])
server_app = ServerApp()

_T = TypeVar("_T")


def _cell_config(cell: Cell) -> ConfigRecord:
    """Return what a client needs of a cell: the task and the alie.* keys."""
    return ConfigRecord(
        {
            "cell": cell.key,
            "dataset": cell.dataset,
            "split": cell.split,
            "alpha": float(cell.alpha),
            "seed": cell.seed,
            "epochs": cell.epochs,
            "lr": float(cell.lr),
            "alie.fraction": float(cell.fraction),
            "alie.seed": cell.seed,
            "alie.knowledge": cell.knowledge,
            "alie.byzantine-ids": "",
        }
    )


def _value(record: ConfigRecord, key: str, kind: type[_T]) -> _T:
    """Read one typed value of a cell's ConfigRecord."""
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise TypeError(f"Expected {key!r} of type {kind.__name__}, got {value!r}")
    return value


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data = load_data(
        _value(config, "dataset", str),
        num_partitions,
        _value(config, "split", str),
        _value(config, "alpha", float),
        _value(config, "seed", int),
    )
    partition = data.partitions[partition_id]
    model = make_model(data.num_features, data.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    cell, server_round = (
        _value(config, "cell", str),
        _value(config, "server-round", int),
    )
    loss = train(
        model,
        partition,
        epochs=_value(config, "epochs", int),
        lr=_value(config, "lr", float),
        seed=zlib.crc32(f"{cell}/{server_round}/{partition_id}".encode()),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train-loss": loss, "num-examples": len(partition)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


class _Progress:
    """Rounds done across all cells, logged with the elapsed time and an ETA."""

    def __init__(self, total_rounds: int, every: float = 10.0) -> None:
        self.total = total_rounds
        self.done = 0
        self.every = every
        self.started = time.perf_counter()
        self.last = self.started
        self.lock = threading.Lock()

    def timing(self) -> str:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return f"elapsed {elapsed:.0f}s | ETA {eta:.0f}s"

    def round_done(self) -> None:
        with self.lock:
            self.done += 1
            now = time.perf_counter()
            if now - self.last < self.every:
                return
            self.last = now
            log(
                INFO,
                "%s rounds %d/%d | %s",
                PROGRESS_TAG,
                self.done,
                self.total,
                self.timing(),
            )


class _Results:
    """Rows of the results file, appended by several cell threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def write(self, rows: list[dict[str, object]]) -> None:
        with self.lock, self.path.open("a") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")


def _describe(cell: Cell) -> dict[str, object]:
    return {
        "cell": cell.key,
        "strategy": cell.strategy,
        "fraction": cell.fraction,
        "num_byzantine": cell.num_byzantine(),
        "z": cell.z if cell.attacked else "none",
        "direction": cell.direction if cell.attacked else "none",
        "knowledge": cell.knowledge if cell.attacked else "none",
        "split": cell.split,
        "alpha": cell.alpha,
        "seed": cell.seed,
        "dataset": cell.dataset,
        "clients": cell.clients,
        "rounds": cell.rounds,
    }


def _run_cell(cell: Cell, grid: Grid, progress: _Progress) -> list[dict[str, object]]:
    """Run one cell with Flower's Strategy.start; return one row per round."""
    started = time.perf_counter()
    base = _describe(cell)
    f = cell.num_byzantine()
    inner = make_strategy(cell.strategy, num_nodes=cell.clients, num_byzantine=f)
    problems = (
        check_setup(inner, num_nodes=cell.clients, num_byzantine=f, z=cell.z)
        if f
        else []
    )
    if problems:
        return [
            {**base, "round": None, "status": "invalid", "reason": "; ".join(problems)}
        ]
    alie = cell.alie_config()
    strategy = ALIEStrategy(
        inner,
        z=alie.z,
        direction=alie.direction,
        knowledge=alie.knowledge,
        device="cpu",
    )
    data = load_data(cell.dataset, cell.clients, cell.split, cell.alpha, cell.seed)
    model = make_model(data.num_features, data.num_classes, seed=cell.seed)
    initial = ArrayRecord(model.state_dict())
    rows: dict[int, dict[str, object]] = {}

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, data.test)
        rows[server_round] = {"round": server_round, "accuracy": accuracy, "loss": loss}
        if server_round:
            progress.round_done()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cell.rounds,
        train_config=_cell_config(cell),
        evaluate_fn=central_evaluation,
    )
    for server_round, metrics in result.train_metrics_clientapp.items():
        rows[server_round].update(dict(metrics))
    seconds = time.perf_counter() - started
    return [
        {**base, **row, "status": "ok", "cell_seconds": seconds}
        for _, row in sorted(rows.items())
    ]


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    config = context.run_config
    cells = load_cells(Path(str(config["grid-path"])))
    for cell in cells:  # load every data set once, before the cells start
        load_data(cell.dataset, cell.clients, cell.split, cell.alpha, cell.seed)
    # Flower's Bulyan calls gc.collect() once per reply, and with torch, Flower and
    # the data loaded a full collection takes about 0.15 s here (3 s a round, and
    # every cell thread waits on it): moving what is loaded by now out of the
    # collector's sight makes those collections nearly free.
    gc.freeze()
    results = _Results(Path(str(config["results-path"])))
    parallel = max(1, int(config["parallel"]))
    progress = _Progress(sum(cell.rounds for cell in cells))
    done = 0
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(_run_cell, cell, grid, progress): cell for cell in cells}
        for future in as_completed(futures):
            cell = futures[future]
            try:
                rows = future.result()
            except Exception as err:  # a failed cell is reported, the grid goes on
                reason = "".join(traceback.format_exception_only(err)).strip()
                rows = [
                    {
                        **_describe(cell),
                        "round": None,
                        "status": "error",
                        "reason": reason,
                    }
                ]
            results.write(rows)
            done += 1
            log(
                INFO,
                "%s cell %d/%d %s: %s | %s",
                PROGRESS_TAG,
                done,
                len(cells),
                rows[-1]["status"],
                cell.key,
                progress.timing(),
            )
