"""``flwr-alie``: measure how much ALIE hurts a Flower aggregation strategy.

``flwr-alie [options]`` runs a grid of federated trainings on Flower's Simulation
Engine (one ``flwr run``), each attacked cell beside its paired clean reference, over
several seeds, then writes the results, a table of paired differences with 95%
intervals, and plots. ``flwr-alie report DIR`` rebuilds the table and plots of a
results folder from its ``results.jsonl`` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Literal

from flwr_alie.attacks import check_z
from flwr_alie.evaluation.folder import (
    ACCURACY_PLOT,
    EFFECT_PLOT,
    RESULTS,
    TABLE,
    TEMP_PREFIX,
    FolderError,
    FolderLock,
    check_writable,
    claim_temporary,
    prepare,
    remove_stale_temporaries,
    run_options,
)
from flwr_alie.evaluation.grid import Cell, build_grid, save_cells
from flwr_alie.evaluation.presets import PRESETS
from flwr_alie.evaluation.strategies import (
    DEFAULT_STRATEGIES,
    DEFENCES,
    FLOWER_STRATEGIES,
    STRATEGIES,
)
from flwr_alie.evaluation.task import MODELS, SPLITS

__all__ = ["build_parser", "main", "parse"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROGRESS_TAG = "[flwr-alie]"  # what the ServerApp prefixes its progress lines with
_EXTRA = ("sklearn", "matplotlib", "flwr_datasets", "ray", "scipy", "mlxtend")
_MAX_SUPERNODES = 200


class _StoppedError(Exception):
    """SIGINT or SIGTERM arrived; carries the exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# ------------------------------------------------------------------ flag types


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {value!r}"
            ) from None
        if number < low:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {value!r}"
            )
        return number

    return parse


def _as_float(value: str) -> float:
    """`value` as a float; NaN (which every range check rejects) if it is none."""
    try:
        return float(value)
    except ValueError:
        return math.nan


def _positive(value: str) -> float:
    number = _as_float(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return number


def _non_negative(value: str) -> float:
    number = _as_float(value)
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(
            f"expected a finite number >= 0, got {value!r}"
        )
    return number


def _fraction(value: str) -> float:
    number = _as_float(value)
    if not 0 < number < 0.5:
        raise argparse.ArgumentTypeError(
            f"expected a Byzantine fraction in (0, 0.5), got {value!r} (the clean "
            "reference of every attacked cell is run anyway)"
        )
    return number


def _momentum(value: str) -> float:
    number = _as_float(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a momentum in [0, 1), got {value!r}"
        )
    return number


def _z(value: str) -> float | Literal["max"]:
    if value == "max":
        return "max"
    number = _as_float(value)
    if math.isnan(number):
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or 'max' (z_max of each round), got {value!r}"
        )
    try:
        z = check_z(number)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}, got {value!r}") from None
    assert z is not None
    return z


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's lines as written; every flag states its default itself."""


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``flwr-alie`` (the run; ``report`` has its own)."""
    parser = argparse.ArgumentParser(
        prog="flwr-alie",
        formatter_class=_Formatter,
        description=(
            "Evaluate Flower aggregation strategies under the 'A Little Is Enough'\n"
            "attack (Baruch, Baruch and Goldberg, NeurIPS 2019). Every attacked cell\n"
            "is paired with its clean reference (same strategy and configuration,\n"
            "all clients honest, same seed); differences are reported with 95%\n"
            "intervals across seeds."
        ),
        epilog=(
            "examples:\n"
            "  flwr-alie\n"
            "  flwr-alie --strategies krum fedmedian --fractions 0.1 0.2 --z 0 1 max\n"
            "  flwr-alie --out results/mine --resume\n"
            "  flwr-alie report results/mine\n"
            "\n"
            "z = 0 is the null attack (the Byzantine clients send the honest mean):\n"
            "what is left of an 'effect' without any shift.\n"
            "Scale out: point RAY_ADDRESS at a running Ray cluster and the\n"
            "simulation joins it."
        ),
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="start from a named set of options; flags given win: "
        + "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
        + " (default: none)",
    )
    grid = parser.add_argument_group("grid (every combination is a cell)")
    grid.add_argument(
        "--strategies",
        nargs="+",
        choices=STRATEGIES,
        default=list(DEFAULT_STRATEGIES),
        metavar="NAME",
        help=f"Flower's strategies ({', '.join(FLOWER_STRATEGIES)}) and "
        f"flwr-alie's defences ({', '.join(DEFENCES)}) (default: "
        f"{' '.join(DEFAULT_STRATEGIES)})",
    )
    grid.add_argument(
        "--fractions",
        nargs="+",
        type=_fraction,
        default=[0.2],
        metavar="F",
        help="Byzantine fractions of the clients, in (0, 0.5) (default: 0.2)",
    )
    grid.add_argument(
        "--z",
        nargs="+",
        type=_z,
        default=[1.5],
        dest="zs",
        metavar="Z",
        help="attack factors: numbers >= 0 or 'max' (z_max of each round) "
        "(default: 1.5)",
    )
    grid.add_argument(
        "--directions",
        nargs="+",
        default=["negative"],
        choices=["negative", "positive", "opposite-mean"],
        metavar="D",
        help="which way the crafted update leaves the honest mean: negative, "
        "positive, opposite-mean (default: negative)",
    )
    grid.add_argument(
        "--knowledge",
        nargs="+",
        default=["oracle"],
        choices=["oracle", "byzantine-only"],
        metavar="K",
        help="statistics of all honest updates (oracle) or of the Byzantine "
        "clients' own (byzantine-only, the paper's threat model) (default: oracle)",
    )
    grid.add_argument(
        "--splits",
        nargs="+",
        default=["dirichlet"],
        choices=SPLITS,
        metavar="S",
        help="data splits: iid, dirichlet (non-IID over the labels, --alpha), "
        "sorted (label-sorted shards, one a client) (default: dirichlet)",
    )
    grid.add_argument(
        "--alpha",
        type=_positive,
        default=0.3,
        help="concentration of the Dirichlet split, > 0 (default: %(default)s)",
    )
    grid.add_argument(
        "--seeds",
        nargs="+",
        type=_int_at_least(0),
        default=[0, 1, 2, 3, 4],
        metavar="SEED",
        help="seeds, distinct; intervals need two or more (default: 0 1 2 3 4)",
    )
    task = parser.add_argument_group("training")
    task.add_argument(
        "--dataset",
        default="digits",
        help="'digits', 'mnist1d' or 'mnist-5k' (offline), a folder of a Hugging "
        "Face dataset's Parquet files, or a Hub id with image/label columns, e.g. "
        "ylecun/mnist (needs a network) (default: %(default)s)",
    )
    task.add_argument(
        "--clients",
        type=_int_at_least(3),
        default=20,
        help="clients n, every one trains each round (default: %(default)s)",
    )
    task.add_argument(
        "--rounds",
        type=_int_at_least(1),
        default=200,
        help="federated rounds (default: %(default)s)",
    )
    task.add_argument(
        "--model",
        default="mlp",
        choices=MODELS,
        help="mlp, or cnn (1-D for mnist1d, 2-D for images) (default: %(default)s)",
    )
    task.add_argument(
        "--epochs",
        type=_int_at_least(1),
        default=3,
        help="local epochs per round, unless --local-steps (default: %(default)s)",
    )
    task.add_argument(
        "--local-steps",
        type=_int_at_least(0),
        default=1,
        help="FedSGD: K local SGD steps on minibatches per round; 1 is the ALIE "
        "paper's distributed SGD; 0 trains --epochs local epochs instead "
        "(default: %(default)s)",
    )
    task.add_argument(
        "--lr",
        type=_positive,
        default=0.2,
        help="local SGD learning rate, > 0 (default: %(default)s)",
    )
    task.add_argument(
        "--worker-momentum",
        type=_momentum,
        default=0.9,
        help="with --local-steps: each client's momentum in [0, 1), kept across "
        "rounds (Karimireddy et al., 2021); 0 with local epochs (default: "
        "%(default)s)",
    )
    task.add_argument(
        "--server-lr",
        type=_positive,
        default=1.0,
        help="server learning rate on the aggregate's update, > 0 "
        "(default: %(default)s)",
    )
    task.add_argument(
        "--server-momentum",
        type=_momentum,
        default=0.0,
        help="server momentum in [0, 1) on the aggregate's update "
        "(default: %(default)s)",
    )
    task.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=32,
        help="local minibatch size (default: %(default)s)",
    )
    task.add_argument(
        "--vectorise",
        choices=["auto", "on", "off"],
        default="auto",
        help="FedSGD: run a block's local steps in one vectorised pass (on) or one "
        "client after the other (off); auto: on for the MLP and the 1-D CNN, where "
        "it is faster, off for the 2-D CNN and local epochs (default: %(default)s)",
    )
    task.add_argument(
        "--last",
        type=_int_at_least(1),
        default=20,
        help="a cell's metric: mean test accuracy over its last LAST rounds "
        "(default: %(default)s)",
    )
    defences = parser.add_argument_group("flwr-alie's defences")
    defences.add_argument(
        "--cc-tau",
        type=_positive,
        default=1.0,
        help="centered clipping's radius, in units of an update's L2 norm "
        "(default: %(default)s)",
    )
    defences.add_argument(
        "--cc-iterations",
        type=_int_at_least(1),
        default=1,
        help="centered clipping's iterations L (default: %(default)s)",
    )
    defences.add_argument(
        "--geomed-iterations",
        type=_int_at_least(1),
        default=100,
        help="the geometric median's Weiszfeld iterations (RFA's T) "
        "(default: %(default)s)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: results/<date-time>)",
    )
    existing = run.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="finish the run in --out: keep its finished cells, run the others",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the results already in --out first",
    )
    run.add_argument(
        "--parallel",
        type=_int_at_least(0),
        default=12,
        help="cells in flight at once, 0 for all (default: %(default)s)",
    )
    run.add_argument(
        "--block-size",
        type=_int_at_least(0),
        default=0,
        metavar="K",
        help="partitions per Flower message: a SuperNode plays K of a cell's "
        "clients at once; 0: all n, one message a cell-round; 1: one message per "
        "client (default: %(default)s)",
    )
    run.add_argument(
        "--cpus-per-client",
        type=_int_at_least(1),
        default=1,
        help="CPUs of one ClientApp in the Ray backend (default: %(default)s)",
    )
    run.add_argument(
        "--gpus-per-client",
        type=_non_negative,
        default=0.0,
        help="GPUs of one ClientApp in the Ray backend (a fraction shares one); "
        "above 0, the vectorised FedSGD pass runs on CUDA, for every model "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--timeout",
        type=_positive,
        default=600,
        help="stop the run when no round has finished for this many seconds: a "
        "hang, not a long run (default: %(default)s)",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show Flower's and Ray's own logs (default: off)",
    )
    return parser  # fmt: skip


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flwr-alie report",
        description="Rebuild table.md and the plots of a results folder from its "
        "results.jsonl.",
    )
    parser.add_argument("dir", type=Path, help="a folder written by flwr-alie")
    parser.add_argument(
        "--last", type=_int_at_least(1), default=None,
        help="rounds a cell's metric averages, at most the run's rounds "
        "(default: the run's own --last)",
    )  # fmt: skip
    return parser


def _missing_extra() -> list[str]:
    return [name for name in _EXTRA if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flwr-alie``; return the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = _missing_extra()
    if missing:
        print(
            "flwr-alie: the evaluation needs its extra (missing: "
            f"{', '.join(missing)}): pip install 'flwr-alie[evaluation]'",
            file=sys.stderr,
        )
        return 2
    if argv[:1] == ["report"]:
        args = _report_parser().parse_args(argv[1:])
        return _report(args.dir, args.last, given=args.last is not None)
    args, cells = parse(argv)
    out: Path = args.out or Path("results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        check_writable(out)
        with FolderLock(out):
            todo = prepare(
                out,
                cells,
                resume=args.resume,
                overwrite=args.overwrite,
                options={"last": args.last},
            )
            if args.resume:
                done = len(cells) - len(todo)
                print(f"flwr-alie: resuming {out}: {done} cells done, "
                      f"{len(todo)} to run")  # fmt: skip
            return _run_and_report(todo, cells, out, args)
    except FolderError as err:
        print(f"flwr-alie: {err}", file=sys.stderr)
        return 2


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Cell]]:
    """Return the options of a run and its cells; exit 2 naming a bad flag.

    A ``--preset``'s values replace the defaults; flags given win over them.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset].options)
        args = parser.parse_args(argv)
    if args.gpus_per_client and not _has_gpus():
        parser.error(
            f"argument --gpus-per-client: got {args.gpus_per_client:g} on a machine "
            "without CUDA (and no RAY_ADDRESS of a cluster that may have some)"
        )
    if not args.local_steps and not _given(argv, "--worker-momentum"):
        args.worker_momentum = 0.0  # a default (or a preset's) follows --local-steps
    if args.worker_momentum and not args.local_steps:
        parser.error(
            "argument --worker-momentum: applies to --local-steps K > 0 (FedSGD), "
            f"got {args.worker_momentum:g} with local epochs"
        )
    if args.last > args.rounds and not _given(argv, "--last"):
        args.last = args.rounds  # a default (or a preset's) follows --rounds
    if args.last > args.rounds:
        parser.error(f"argument --last: expected at most --rounds ({args.rounds}), "
                     f"got {args.last}")  # fmt: skip
    if args.resume and args.out is None:
        parser.error("argument --resume: needs --out DIR, the folder of the run to "
                     "finish")  # fmt: skip
    problem = _dataset_problem(args.dataset)
    if problem:
        parser.error(f"argument --dataset: {problem}")
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
            clients=args.clients,
            rounds=args.rounds,
            epochs=0 if args.local_steps else args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            model=args.model,
            steps=args.local_steps,
            worker_momentum=args.worker_momentum,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            cc_tau=args.cc_tau,
            cc_iterations=args.cc_iterations,
            geomed_iterations=args.geomed_iterations,
            vectorised=_vectorised(args),
            device="cuda" if args.gpus_per_client else "cpu",
            block_size=min(args.block_size, args.clients),
        )
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    attacked = [c for c in cells if c.attacked]
    with _quiet_flower():  # building a strategy logs Flower's own warnings
        problems = {c.key: c.problems() for c in attacked}
    reasons = {r for found in problems.values() for r in found}
    if attacked and all(problems.values()):
        parser.error(
            "no attacked cell of this grid can run, so nothing would be measured: "
            + "; ".join(sorted(reasons))
        )
    return args, cells


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Keep Flower's warnings off the console for a moment."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dataset_problem(name: str) -> str | None:
    """Why `name` cannot be a data set, as far as can be told offline (else None).

    An offline name, or a folder that holds Parquet files, is fine; anything else
    must look like a Hugging Face Hub id (``owner/name``), which only a network can
    confirm (and ``HF_HUB_OFFLINE=1`` rules out).
    """
    from flwr_alie.evaluation.task import OFFLINE

    if name in OFFLINE:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{name!r} is a file; expected a folder of Parquet files"
        if not any(path.rglob("*.parquet")):
            return f"the folder {name!r} holds no Parquet files"
        return None
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or name.startswith("."):
        return (
            f"expected one of {', '.join(OFFLINE)}, an existing folder, or a "
            f"Hugging Face Hub id like ylecun/mnist, got {name!r}"
        )
    if (
        os.environ.get("HF_HUB_OFFLINE") == "1"
        or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    ):
        return f"{name!r} is not a folder here, and the Hub is off (HF_HUB_OFFLINE)"
    return None


def _vectorised(args: argparse.Namespace) -> bool:
    """``--vectorise``: ``auto`` is on where the pass was measured faster.

    Measured on one core (``benchmarks/bench_evaluation.py``), one FedSGD step of
    a block of clients: the MLP 1.5x to 4.6x faster vectorised, the 1-D CNN on
    MNIST-1D 2.2x (51 clients, batch 32), the 2-D CNN on digits' 8x8 images 4.4x
    (20 clients, batch 8), but on 28x28 images 0.64x (25 clients, batch 32: its
    grouped convolutions are slower here than the loop's). Local epochs
    (``--local-steps 0``) always run one client after the other. With a GPU
    (``--gpus-per-client``), every FedSGD model runs vectorised, on it.
    """
    if not args.local_steps or args.vectorise == "off":
        return False
    if args.vectorise == "on" or args.gpus_per_client:
        return True
    return args.model == "mlp" or args.dataset in ("digits", "mnist1d")


def _given(argv: Sequence[str], flag: str) -> bool:
    """Whether `flag` is on the command line (``--flag V`` or ``--flag=V``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _has_gpus() -> bool:
    import torch

    return torch.cuda.is_available() or bool(os.environ.get("RAY_ADDRESS"))


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _StoppedError(128 + signum)


def _run_and_report(
    todo: list[Cell], cells: list[Cell], out: Path, args: argparse.Namespace
) -> int:
    started = time.perf_counter()
    previous = {
        s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)
    }
    ok = True
    try:
        rounds = sum(c.rounds for c in todo)
        print(
            f"flwr-alie: {len(todo)} cells ({rounds} cell-rounds), {args.clients} "
            f"clients, seeds {' '.join(map(str, args.seeds))} -> {out}",
            flush=True,
        )
        if todo:
            ok = _run(todo, out, args)
    except (_StoppedError, KeyboardInterrupt) as stop:
        status = stop.status if isinstance(stop, _StoppedError) else 130
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nflwr-alie: interrupted; {_saved(out, cells)}; rerun with "
              f"--out {out} --resume to finish", file=sys.stderr)  # fmt: skip
        return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    status = _report(out, args.last)
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return status if ok else 1


def _saved(out: Path, cells: list[Cell]) -> str:
    from flwr_alie.evaluation.results import is_finished, read_rows

    path = out / RESULTS
    rows = read_rows(path) if path.exists() else []
    done = sum(is_finished(rows, c.key, c.rounds) for c in cells)
    return f"{len(rows)} rows saved in {path} ({done} of {len(cells)} cells finished)"


def _run(cells: list[Cell], out: Path, args: argparse.Namespace) -> bool:
    """Run the cells in one Flower run; return whether it ended cleanly."""
    from flwr_alie.evaluation.runtime import flwr_run, superlink
    from flwr_alie.evaluation.task import prepare as prepare_data

    remove_stale_temporaries()
    # once here, not once in each of the run's processes
    prepare_data((c.dataset, c.clients, c.split, c.alpha, c.seed) for c in cells)  # type: ignore[misc]
    parallel = min(len(cells), args.parallel or len(cells))
    # A node takes one message every 0.1 s, and each 0.1 s Flower's dispatcher scans
    # every stored message once per node: a node for each block in flight, at most
    # _MAX_SUPERNODES (more blocks share them).
    supernodes = min(parallel * max(cell.blocks for cell in cells), _MAX_SUPERNODES)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        home = Path(tmp)
        claim_temporary(home)
        app = home / "app"
        app.mkdir()
        source = (
            resources.files("flwr_alie.evaluation") / "flower_app" / "pyproject.toml"
        )
        (app / "pyproject.toml").write_text(source.read_text())
        grid_path = home / "todo.json"
        save_cells(cells, grid_path)
        done = home / "done"  # the ServerApp creates it once every row is written
        run_config = (
            f"grid-path='{grid_path}' results-path='{(out / RESULTS).resolve()}' "
            f"parallel={parallel} supernodes={supernodes} cli-pid={os.getpid()} "
            f"cpus-per-client={args.cpus_per_client} "
            f"verbose={str(args.verbose).lower()} done-path='{done}'"
        )
        federation = (
            f"num-supernodes={supernodes} "
            f"client-resources-num-cpus={args.cpus_per_client} "
            f"client-resources-num-gpus={args.gpus_per_client:g}"
        )
        with superlink(home, simulation=True, finished=done):
            result = flwr_run(
                home,
                app,
                run_config,
                extra=["--federation-config", federation],
                timeout=args.timeout,
                idle=True,
                on_line=_printer(args.verbose),
                finished=done,
            )
    failed = result.returncode != 0 or "ERROR" in result.stdout
    if failed and not args.verbose:
        print(_ANSI.sub("", result.stdout[-4000:]), file=sys.stderr)
    return not failed


def _printer(verbose: bool) -> Callable[[str], None]:
    """Return what shows a line of the run's output: all of it, or our progress."""

    def show(line: str) -> None:
        if verbose:
            print(line, flush=True)
        elif _PROGRESS_TAG in line:
            print(_ANSI.sub("", line).split(_PROGRESS_TAG, 1)[1].strip(), flush=True)

    return show


def _report(out: Path, last: int | None, *, given: bool = True) -> int:
    """Write table.md and the plots of `out` from its results.jsonl; print the table.

    `last` defaults to the run's own (``run.json``) and may not exceed the rounds
    of the run's cells. Unfinished cells are named; the status is 1 when some are,
    since the table then has blanks.
    """
    from flwr_alie.evaluation.results import (
        attack_contrasts,
        paired_table,
        plot_accuracy,
        plot_effect,
        read_rows,
        unfinished,
    )

    path = out / RESULTS
    rows = read_rows(path) if path.exists() else []
    if not rows:
        print(f"flwr-alie: no results in {path}; rerun with --verbose", file=sys.stderr)
        return 1
    if last is None:
        stored = run_options(out).get("last")
        last = stored if isinstance(stored, int) and stored > 0 else 5
    rounds = min((int(r["rounds"]) for r in rows if "rounds" in r), default=last)
    if last > rounds:
        flag = "--last" if given else "the run's --last"
        print(
            f"flwr-alie report: {flag} {last} exceeds the rounds of the run in "
            f"{out} ({rounds}); pass --last between 1 and {rounds}",
            file=sys.stderr,
        )
        return 2
    table = paired_table(rows, last=last)
    contrasts = attack_contrasts(rows, last=last)
    if contrasts:
        table += (
            "\n\nAttacks compared (attacked minus attacked, paired by seed; "
            "negative: the first hurts more):\n\n" + contrasts
        )
    (out / TABLE).write_text(table + "\n")
    plot_accuracy(rows, out / ACCURACY_PLOT, last=last)
    plot_effect(rows, out / EFFECT_PLOT, last=last)
    print(f"\nTest accuracy, mean of the last {last} rounds, ± half the 95% interval "
          "across seeds;\neffects are paired differences [95% interval], * where it "
          "excludes 0:\n")  # fmt: skip
    print(table)
    print(f"\nresults: {path}\ntable:   {out / TABLE}")
    print(f"plots:   {out / ACCURACY_PLOT}, {out / EFFECT_PLOT}")
    missing = unfinished(rows)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(
            f"flwr-alie: {len(missing)} cells are unfinished, so the table has "
            f"blanks: {shown}; finish them with --out {out} --resume",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
