"""The evaluation's ServerApp: one Flower run serves every cell of a grid.

Starting Ray and Flower costs seconds, so a single run serves the whole grid: its
ServerApp runs the cells concurrently (each in a thread, each with its own strategy
calling Flower's own ``Strategy.start``). Each running cell holds a slot of the
run's SuperNodes (:mod:`flwr_alie.evaluation.nodes`), and its strategy sees a
:class:`~flwr_alie.evaluation.nodes.BlockGrid`: one node per partition, its
messages a block of partitions each. A cell's task travels in its train messages'
ConfigRecord (:class:`~flwr_alie.evaluation.wire.TaskOptions`, and the ``alie.*``
keys of the ALIE mod), so the ClientApp serves every cell alike. Each round's row is
appended to ``results.jsonl`` as the round ends.
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

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flwr_alie.evaluation.flower_patches import (
    collect_young_generation_only,
    keep_progress_logs_only,
    read_arrays_with_cached_headers,
    records_without_casts,
)
from flwr_alie.evaluation.grid import Cell, load_cells
from flwr_alie.evaluation.nodes import BlockGrid, NodeSlots, wait_for_nodes
from flwr_alie.evaluation.task import evaluate, load_data, make_model
from flwr_alie.evaluation.wire import (
    ROW_ACCURACY,
    ROW_CELL_SECONDS,
    ROW_LOSS,
    ROW_REASON,
    ROW_ROUND,
    ROW_STATUS,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_OK,
    TaskOptions,
    row_columns,
)
from flwr_alie.momentum import ServerMomentum
from flwr_alie.strategy import ALIEStrategy

__all__ = ["PROGRESS_TAG", "app"]

PROGRESS_TAG = "[flwr-alie]"

app = ServerApp()


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
                PROGRESS_TAG + " rounds %d/%d | %s",
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


def _run_cell(cell: Cell, grid: Grid, slots: NodeSlots, output: _Output) -> str:
    """Run one cell with Flower's Strategy.start; return its status."""
    started = time.perf_counter()
    base = row_columns(cell)
    problems = cell.problems()
    if problems:
        output.write(
            {
                **base,
                ROW_ROUND: None,
                ROW_STATUS: STATUS_INVALID,
                ROW_REASON: "; ".join(problems),
            }
        )
        return STATUS_INVALID
    inner = cell.strategy_object()
    if (cell.server_lr, cell.server_momentum) != (1.0, 0.0):
        inner = ServerMomentum(inner, lr=cell.server_lr, momentum=cell.server_momentum)
    alie = cell.alie_config()  # the cell's options, built once: server and clients
    strategy = _Recorder(ALIEStrategy(inner, alie))
    data = load_data(cell.dataset, cell.clients, cell.split, cell.alpha, cell.seed)  # type: ignore[arg-type]
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
            ROW_ROUND: server_round,
            ROW_ACCURACY: accuracy,
            ROW_LOSS: loss,
            **strategy.train_metrics.get(server_round, {}),
            ROW_STATUS: STATUS_OK,
            ROW_CELL_SECONDS: time.perf_counter() - started,
        }
        output.write(row)
        if server_round:
            output.round_done()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    with slots.slot() as nodes:
        strategy.start(
            grid=BlockGrid(
                grid,
                num_partitions=cell.clients,
                block_size=cell.block_size or cell.clients,
                nodes=nodes,
            ),
            initial_arrays=initial,
            num_rounds=cell.rounds,
            train_config=TaskOptions.of(cell).to_record(alie.to_run_config()),
            evaluate_fn=central_evaluation,
        )
    return STATUS_OK


@app.main()
def _main(grid: Grid, context: Context) -> None:
    config = context.run_config
    cells = load_cells(Path(str(config["grid-path"])))
    for cell in cells:  # load every data set once, before the cells start
        load_data(cell.dataset, cell.clients, cell.split, cell.alpha, cell.seed)  # type: ignore[arg-type]
    parallel = min(len(cells), int(config["parallel"]) or len(cells))
    slots = NodeSlots(
        wait_for_nodes(grid, int(config["supernodes"])),
        slots=parallel,
        per_slot=max(cell.blocks for cell in cells),
    )
    # the cells' threads are the ServerApp's parallelism: one intra-op thread each
    # (with more, the cells' small ops wait at torch's barriers for a busy core)
    torch.set_num_threads(1)
    collect_young_generation_only()
    read_arrays_with_cached_headers()
    records_without_casts()
    if not config.get("verbose"):
        keep_progress_logs_only(PROGRESS_TAG)
    gc.freeze()  # what is loaded by now stays out of every later collection
    output = _Output(
        Path(str(config["results-path"])),
        sum(cell.rounds for cell in cells),
        int(config["cli-pid"]),
    )
    log(
        INFO,
        PROGRESS_TAG + " %d cells, %d at a time, on %d SuperNodes",
        len(cells),
        parallel,
        int(config["supernodes"]),
    )
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {
            pool.submit(_run_cell, cell, grid, slots, output): cell for cell in cells
        }
        for future in as_completed(futures):
            cell = futures[future]
            try:
                status = future.result()
            except Exception as err:  # a failed cell is reported, the grid goes on
                reason = "".join(traceback.format_exception_only(err)).strip()
                output.write(
                    {
                        **row_columns(cell),
                        ROW_ROUND: None,
                        ROW_STATUS: STATUS_ERROR,
                        ROW_REASON: reason,
                    }
                )
                status = STATUS_ERROR
            done += 1
            log(
                INFO,
                PROGRESS_TAG + " cell %d/%d %s: %s | %s",
                done,
                len(cells),
                status,
                cell.key,
                output.timing(),
            )
    done_path = str(config.get("done-path", ""))
    if done_path:  # every row is written: the command need not wait for Flower
        Path(done_path).touch()
