"""``flwr-alie``: evaluate robust aggregation strategies under the ALIE attack.

Runs a grid of Flower simulations (strategies x Byzantine fractions x z x ...) with
``flwr run`` on the Simulation Engine, then writes the tidy results, a markdown table
of final accuracy and PNG plots.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from flwr_alie.evaluation.app import PROGRESS_TAG
from flwr_alie.evaluation.grid import Cell, build_grid, save_cells
from flwr_alie.evaluation.results import (
    final_accuracy_table,
    plot_accuracy,
    plot_heatmap,
    read_rows,
)
from flwr_alie.evaluation.runtime import flwr_run, superlink
from flwr_alie.evaluation.strategies import STRATEGIES

__all__ = ["main"]

_APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flwr-alie-evaluation"
version = "1.0.0"
dependencies = ["flwr-alie"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flwr-alie"

[tool.flwr.app.components]
serverapp = "flwr_alie.evaluation.app:server_app"
clientapp = "flwr_alie.evaluation.app:client_app"

[tool.flwr.app.config]
grid-path = ""
results-path = ""
parallel = 1
"""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _z(value: str) -> float | Literal["max"]:
    if value == "max":
        return "max"
    try:
        z = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or 'max', got {value!r}"
        ) from None
    if not z >= 0:
        raise argparse.ArgumentTypeError(f"expected z >= 0, got {value!r}")
    return z


def _fraction(value: str) -> float:
    fraction = float(value)
    if not 0 <= fraction < 0.5:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in [0, 0.5), got {value!r}"
        )
    return fraction


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``flwr-alie``."""
    parser = argparse.ArgumentParser(
        prog="flwr-alie",
        description=(
            "Evaluate Flower aggregation strategies under the 'A Little Is Enough' "
            "attack (Baruch, Baruch and Goldberg, NeurIPS 2019). Every cell of the "
            "grid is a federated training on Flower's Simulation Engine; a no-attack "
            "cell per strategy is the reference. Writes results.jsonl (one row per "
            "cell and round), table.md and PNG plots to --out."
        ),
        epilog=(
            "example: flwr-alie --strategies krum fedmedian --fractions 0.1 0.2 "
            "--z max 1.0 1.5 --rounds 20 --seeds 0 1 2\n"
            "Scale out: point RAY_ADDRESS at a running Ray cluster and the simulation "
            "joins it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    grid = parser.add_argument_group("grid (every combination is a cell)")
    grid.add_argument(
        "--strategies",
        nargs="+",
        choices=STRATEGIES,
        default=list(STRATEGIES),
        metavar="NAME",
        help=f"strategies among {', '.join(STRATEGIES)}",
    )
    grid.add_argument(
        "--fractions",
        nargs="+",
        type=_fraction,
        default=[0.2],
        help="Byzantine fractions of the clients (0: no attack, always run)",
    )
    grid.add_argument(
        "--z",
        nargs="+",
        type=_z,
        default=["max", 1.5],
        dest="zs",
        help="attack factors: numbers >= 0 or 'max' (z_max of each round)",
    )
    grid.add_argument(
        "--directions",
        nargs="+",
        default=["negative"],
        choices=["negative", "positive", "opposite-mean"],
    )
    grid.add_argument(
        "--knowledge",
        nargs="+",
        default=["oracle"],
        choices=["oracle", "byzantine-only"],
        help="statistics of all honest updates (oracle) or of the "
        "Byzantine nodes' own (byzantine-only, the paper's threat model)",
    )
    grid.add_argument(
        "--splits",
        nargs="+",
        default=["iid", "dirichlet"],
        choices=["iid", "dirichlet"],
        help="data splits: IID, and Dirichlet over the labels (non-IID)",
    )
    grid.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration of the non-IID split",
    )
    grid.add_argument("--seeds", nargs="+", type=int, default=[0])
    task = parser.add_argument_group("training")
    task.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (offline) or a Hugging Face id with image/label "
        "columns, e.g. ylecun/mnist (needs a network)",
    )
    task.add_argument("--clients", type=int, default=20)
    task.add_argument("--rounds", type=int, default=10)
    task.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    task.add_argument("--lr", type=float, default=0.5, help="local SGD learning rate")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: results/<date-time>)",
    )
    run.add_argument(
        "--parallel", type=int, default=0, help="cells run at once (0: all)"
    )
    run.add_argument(
        "--cpus-per-client",
        type=int,
        default=1,
        help="CPUs of one ClientApp in the Ray backend",
    )
    run.add_argument(
        "--timeout", type=float, default=3600, help="seconds for the whole run"
    )
    run.add_argument(
        "--verbose", action="store_true", help="show Flower's and Ray's own logs"
    )
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; return the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cells = build_grid(
            strategies=args.strategies,
            fractions=args.fractions,
            zs=args.zs,
            directions=args.directions,
            knowledge=args.knowledge,
            splits=args.splits,
            seeds=args.seeds,
            dataset=args.dataset,
            alpha=args.alpha,
            rounds=args.rounds,
            clients=args.clients,
            epochs=args.epochs,
            lr=args.lr,
        )
    except ValueError as err:
        print(f"flwr-alie: {err}", file=sys.stderr)
        return 2
    out: Path = args.out or Path("results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results_path.unlink(missing_ok=True)
    started = time.perf_counter()
    print(
        f"flwr-alie: {len(cells)} cells, {args.rounds} rounds, {args.clients} "
        f"clients -> {out}",
        flush=True,
    )
    ok = _run(cells, out, results_path, args)
    rows = read_rows(results_path) if results_path.exists() else []
    if not rows:
        print(
            "flwr-alie: the run produced no results; rerun with --verbose",
            file=sys.stderr,
        )
        return 1
    table = final_accuracy_table(rows)
    (out / "table.md").write_text(table + "\n")
    plot_accuracy(rows, out / "accuracy.png")
    plot_heatmap(rows, out / "heatmap.png")
    print(
        f"\nFinal test accuracy after {args.rounds} rounds (change from no attack):\n"
    )
    print(table)
    print(f"\nwall time {time.perf_counter() - started:.0f}s")
    print(f"results: {results_path}\ntable:   {out / 'table.md'}")
    print(f"plots:   {out / 'accuracy.png'}, {out / 'heatmap.png'}")
    return 0 if ok else 1


def _run(
    cells: list[Cell], out: Path, results_path: Path, args: argparse.Namespace
) -> bool:
    """Run the cells, one Flower run per client count; return whether all ran."""
    ok = True
    by_clients: dict[int, list[Cell]] = {}
    for cell in cells:
        by_clients.setdefault(cell.clients, []).append(cell)
    for clients, group in by_clients.items():
        with tempfile.TemporaryDirectory(prefix="flwr-alie-") as tmp:
            home = Path(tmp)
            app = home / "app"
            app.mkdir()
            (app / "pyproject.toml").write_text(_APP_PYPROJECT)
            grid_path = out / f"grid-{clients}.json"
            save_cells(group, grid_path)
            parallel = args.parallel or len(group)
            run_config = (
                f"grid-path='{grid_path.resolve()}' "
                f"results-path='{results_path.resolve()}' parallel={parallel}"
            )
            federation = (
                f"num-supernodes={clients} "
                f"client-resources-num-cpus={args.cpus_per_client}"
            )
            with superlink(home, simulation=True):
                result = flwr_run(
                    home,
                    app,
                    run_config,
                    extra=["--federation-config", federation],
                    timeout=args.timeout,
                    on_line=_printer(args.verbose),
                )
            if result.returncode != 0 or "ERROR" in result.stdout:
                ok = False
                if not args.verbose:
                    print(_ANSI.sub("", result.stdout[-4000:]), file=sys.stderr)
    return ok


def _printer(verbose: bool) -> Callable[[str], None]:
    """Return what shows a line of the run's output: all of it, or our progress."""

    def show(line: str) -> None:
        if verbose:
            print(line, flush=True)
        elif PROGRESS_TAG in line:
            print(_ANSI.sub("", line).split(PROGRESS_TAG, 1)[1].strip(), flush=True)

    return show


if __name__ == "__main__":
    raise SystemExit(main())
