"""The evaluation's ServerApp: one Flower run serves every cell of a grid.

Starting Ray and Flower costs seconds, so a single run serves the whole grid: its
ServerApp runs the cells concurrently (each in a thread, each with its own strategy
calling Flower's own ``Strategy.start``). The SuperNodes form groups of ``n``; each
cell trains on one group, so that cells do not queue behind each other on the same
node (the Simulation Engine hands a node one message every 0.1 s). A cell's options
travel in its train messages' ConfigRecord, so the ClientApp, and the ALIE mod in
it, serve every cell alike. Each round's row is appended to ``results.jsonl`` as the
round ends.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import arrayrecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from flwr_alie.evaluation.client_app import KEY_NODE_INDEX
from flwr_alie.evaluation.grid import Cell, load_cells
from flwr_alie.evaluation.strategies import make_strategy
from flwr_alie.evaluation.task import evaluate, load_data, make_model
from flwr_alie.optim import ServerMomentum
from flwr_alie.strategy import ALIEStrategy

__all__ = ["PROGRESS_TAG", "app", "describe"]

PROGRESS_TAG = "[flwr-alie]"

app = ServerApp()


class _GroupGrid(Grid):
    """The run's grid, seen by one cell: its group of nodes, polled every few ms.

    ``get_node_ids`` returns the group's nodes only, so that Flower's own sampling
    sends the cell's messages there. Flower's grids sleep 0.1 s (in-memory) or 3 s
    (HTTP) between polls for replies; a round of the evaluation's small model takes
    milliseconds, so this one polls at `interval`, growing to `longest`.
    """

    def __init__(
        self,
        grid: Grid,
        node_ids: list[int],
        interval: float = 0.05,
        longest: float = 0.5,
    ) -> None:
        self.grid = grid
        self.node_ids = node_ids
        self.interval = interval
        self.longest = longest

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = {i for i in self.grid.push_messages(messages) if i}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.interval
        while pending and (end is None or time.monotonic() < end):
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(wait)
                wait = min(self.longest, wait * 1.5)
        return replies


class _YoungGenerationGC:
    """Stands in for the ``gc`` module in Flower's ``arrayrecord`` module."""

    @staticmethod
    def collect(generation: int = 0) -> int:
        return gc.collect(0)


def _discover_groups(grid: Grid, n: int) -> list[list[int]]:
    """Ask every node its index; return the complete groups of `n` node ids."""
    deadline = time.monotonic() + 120
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < n and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    poller = _GroupGrid(grid, node_ids)
    queries = [
        Message(
            RecordDict(),
            dst_node_id=node_id,
            message_type=MessageType.QUERY,
            group_id="discover",
        )
        for node_id in node_ids
    ]
    index: dict[int, int] = {}
    for reply in poller.send_and_receive(queries, timeout=120):
        if not reply.has_error():
            index[reply.metadata.src_node_id] = int(
                reply.content.config_records["node"][KEY_NODE_INDEX]  # type: ignore[arg-type]
            )
    groups: dict[int, dict[int, int]] = {}
    for node_id, i in index.items():
        groups.setdefault(i // n, {})[i % n] = node_id
    complete = [
        [members[p] for p in range(n)]
        for _, members in sorted(groups.items())
        if len(members) == n
    ]
    if not complete:
        raise RuntimeError(
            f"no complete group of {n} SuperNodes answered (got {len(index)} of "
            f"{len(node_ids)}); run with num-supernodes a multiple of {n}"
        )
    return complete


def describe(cell: Cell) -> dict[str, object]:
    """Return the configuration columns of a cell's rows."""
    return {
        "cell": cell.key,
        "strategy": cell.strategy,
        "split": cell.split,
        "seed": cell.seed,
        "attack": cell.attack,
        "declared": cell.declared,
        "num_byzantine": len(cell.byzantine_ids),
        "byzantine_ids": list(cell.byzantine_ids),
        "z": "none" if cell.z is None else cell.z,
        "direction": cell.direction or "none",
        "knowledge": cell.knowledge or "none",
        "dataset": cell.dataset,
        "alpha": cell.alpha,
        "clients": cell.clients,
        "rounds": cell.rounds,
        "epochs": cell.epochs,
        "lr": cell.lr,
        "batch_size": cell.batch_size,
        "model": cell.model,
        "steps": cell.steps,
        "worker_momentum": cell.worker_momentum,
        "server_lr": cell.server_lr,
        "server_momentum": cell.server_momentum,
    }


def _train_config(cell: Cell) -> ConfigRecord:
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
            "batch-size": cell.batch_size,
            "model": cell.model,
            "local-steps": cell.steps,
            "worker-momentum": float(cell.worker_momentum),
            "alie.byzantine-ids": ",".join(map(str, cell.byzantine_ids)),
            "alie.knowledge": cell.knowledge or "oracle",
            "alie.seed": cell.seed,
        }
    )


class _Output:
    """Results rows, appended whole by several cell threads; progress lines."""

    def __init__(self, path: Path, total_rounds: int, cli_pid: int) -> None:
        self.path = path
        self.total = total_rounds
        self.done = 0
        self.cli_pid = cli_pid
        self.started = time.perf_counter()
        self.last_line = self.started
        self.lock = threading.Lock()

    def check_cli(self) -> None:
        """Stop the cell if the flwr-alie command that started the run is gone."""
        if self.cli_pid <= 0:
            return
        try:
            os.kill(self.cli_pid, 0)
        except ProcessLookupError:
            raise RuntimeError(
                f"the flwr-alie command (pid {self.cli_pid}) is gone; stopping"
            ) from None
        except PermissionError:
            return

    def write(self, row: dict[str, object]) -> None:
        line = json.dumps(row) + "\n"
        with self.lock, self.path.open("a") as out:
            out.write(line)  # one write per line: a line is whole or absent

    def timing(self) -> str:
        elapsed = time.perf_counter() - self.started
        text = f"elapsed {elapsed:.0f}s"
        if self.done >= max(1, self.total // 20):  # an ETA once there is a basis
            eta = elapsed / self.done * (self.total - self.done)
            text += f" | ETA {eta:.0f}s"
        return text

    def round_done(self) -> None:
        with self.lock:
            self.done += 1
            now = time.perf_counter()
            if now - self.last_line < 10:
                return
            self.last_line = now
            log(
                INFO,
                "%s rounds %d/%d | %s",
                PROGRESS_TAG,
                self.done,
                self.total,
                self.timing(),
            )


class _Recorder(Strategy):
    """Keep each round's aggregated train metrics for the row of that round."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.train_metrics: dict[int, dict[str, Any]] = {}

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, *args: Any) -> Iterable[Message]:
        return self.strategy.configure_train(*args)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.train_metrics[server_round] = dict(metrics or {})
        return arrays, metrics

    def configure_evaluate(self, *args: Any) -> Iterable[Message]:
        return self.strategy.configure_evaluate(*args)

    def aggregate_evaluate(self, *args: Any) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(*args)


def _run_cell(cell: Cell, grid: Grid, output: _Output) -> str:
    """Run one cell with Flower's Strategy.start; return its status."""
    started = time.perf_counter()
    base = describe(cell)
    problems = cell.problems()
    if problems:
        output.write(
            {**base, "round": None, "status": "invalid", "reason": "; ".join(problems)}
        )
        return "invalid"
    inner = make_strategy(
        cell.strategy, num_nodes=cell.clients, num_byzantine=cell.declared
    )
    if (cell.server_lr, cell.server_momentum) != (1.0, 0.0):
        inner = ServerMomentum(inner, lr=cell.server_lr, momentum=cell.server_momentum)
    alie = cell.alie_config()
    strategy = _Recorder(
        ALIEStrategy(
            inner,
            z=alie.z,
            direction=alie.direction,
            knowledge=alie.knowledge,
            device="cpu",
            byzantine_ids=cell.byzantine_ids,
        )
    )
    data = load_data(cell.dataset, cell.clients, cell.split, cell.alpha, cell.seed)
    model = make_model(
        data.num_features,
        data.num_classes,
        seed=cell.seed,
        kind=cell.model,
        input_shape=data.input_shape,
    )
    initial = ArrayRecord(model.state_dict())

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        output.check_cli()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, data.test)
        row = {
            **base,
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            **strategy.train_metrics.get(server_round, {}),
            "status": "ok",
            "cell_seconds": time.perf_counter() - started,
        }
        output.write(row)
        if server_round:
            output.round_done()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cell.rounds,
        train_config=_train_config(cell),
        evaluate_fn=central_evaluation,
    )
    return "ok"


@app.main()
def _main(grid: Grid, context: Context) -> None:
    config = context.run_config
    cells = load_cells(Path(str(config["grid-path"])))
    n = int(config["clients"])
    for cell in cells:  # load every data set once, before the cells start
        load_data(cell.dataset, cell.clients, cell.split, cell.alpha, cell.seed)
    groups = _discover_groups(grid, n)
    # ArrayRecord.to_numpy_ndarrays(keep_input=False), which Flower's Bulyan calls
    # for each selected reply, forces a full gc.collect(): about 0.08 s each with
    # torch and Flower loaded, 1 s a Bulyan round, while holding the GIL over every
    # other cell. The arrays it pops hold no reference cycles (reference counting
    # frees them), so in this process that call collects the young generation only.
    arrayrecord.gc = _YoungGenerationGC()  # type: ignore[assignment,attr-defined]
    gc.freeze()  # what is loaded by now stays out of every later collection
    output = _Output(
        Path(str(config["results-path"])),
        sum(cell.rounds for cell in cells),
        int(config["cli-pid"]),
    )
    parallel = int(config["parallel"]) or len(cells)
    log(
        INFO,
        "%s %d cells on %d groups of %d nodes, %d at a time",
        PROGRESS_TAG,
        len(cells),
        len(groups),
        n,
        parallel,
    )
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {
            pool.submit(
                _run_cell, cell, _GroupGrid(grid, groups[i % len(groups)]), output
            ): cell
            for i, cell in enumerate(cells)
        }
        for future in as_completed(futures):
            cell = futures[future]
            try:
                status = future.result()
            except Exception as err:  # a failed cell is reported, the grid goes on
                reason = "".join(traceback.format_exception_only(err)).strip()
                output.write(
                    {
                        **describe(cell),
                        "round": None,
                        "status": "error",
                        "reason": reason,
                    }
                )
                status = "error"
            done += 1
            log(
                INFO,
                "%s cell %d/%d %s: %s | %s",
                PROGRESS_TAG,
                done,
                len(cells),
                status,
                cell.key,
                output.timing(),
            )
