"""The flwr-alie command: flag validation (fast) and a small grid end to end (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flwr_alie.evaluation.cli import build_parser, main, parse
from flwr_alie.evaluation.results import read_rows
from flwr_alie.evaluation.runtime import alive, descendants

# 3 strategies x 2 fractions x 2 z, 10 clients, 2 rounds, 2 seeds. Bulyan's
# n >= 4f + 3 makes some cells invalid, and so does z = max with f = 1 of n = 10.
ARGS = [
    "--strategies", "krum", "fedmedian", "bulyan",
    "--fractions", "0.1", "0.2",
    "--z", "0.5", "max",
    "--splits", "iid",
    "--clients", "10",
    "--rounds", "3",
    "--last", "2",
    "--seeds", "0", "1",
    "--parallel", "6",
]  # fmt: skip
TIMING = {"cell_seconds", "alie.seconds", "train-seconds"}


# ----------------------------------------------------------------- fast checks


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--z", "-1"], r"argument --z: Expected `z` >= 0, got -1.0"),
        (["--z", "min"], r"argument --z: .*got 'min'"),
        (["--fractions", "0.6"], r"argument --fractions: .*\(0, 0.5\), got '0.6'"),
        (["--fractions", "0"], r"argument --fractions: .*got '0'"),
        (["--strategies", "fedprox"], "invalid choice: 'fedprox'"),
        (["--rounds", "0"], r"argument --rounds: expected an integer >= 1, got '0'"),
        (["--epochs", "0"], r"argument --epochs: expected an integer >= 1, got '0'"),
        (["--clients", "0"], r"argument --clients: expected an integer >= 3, got '0'"),
        (["--seeds", "-1"], r"argument --seeds: expected an integer >= 0, got '-1'"),
        (["--lr", "-1"], r"argument --lr: expected a finite number > 0, got '-1'"),
        (["--lr", "nan"], r"argument --lr: expected a finite number > 0, got 'nan'"),
        (["--alpha", "0"], r"argument --alpha: expected a finite number > 0, got '0'"),
        (["--last", "9", "--rounds", "5"], r"--last: expected at most --rounds \(5\)"),
        (["--seeds", "1", "1"], r"--seeds must be distinct"),
        (["--model", "resnet"], r"argument --model: invalid choice: 'resnet'"),
        (["--preset", "nope"], r"argument --preset: invalid choice: 'nope'"),
        (["--local-steps", "-1"], r"--local-steps: expected an integer >= 0, got '-1'"),
        (["--server-momentum", "1"], r"--server-momentum: .*\[0, 1\), got '1'"),
        (["--server-lr", "0"], r"--server-lr: expected a finite number > 0, got '0'"),
        (
            ["--local-steps", "0", "--worker-momentum", "0.9"],
            r"--worker-momentum: applies to --local-steps K > 0 \(FedSGD\), got 0.9",
        ),
        (["--splits", "shuffled"], r"argument --splits: invalid choice: 'shuffled'"),
        (["--cc-tau", "0"], r"--cc-tau: expected a finite number > 0, got '0'"),
        (["--block-size", "-1"], r"--block-size: expected an integer >= 0, got '-1'"),
        (
            ["--gpus-per-client", "-0.5"],
            r"--gpus-per-client: expected a finite number >= 0, got '-0.5'",
        ),
        (
            ["--clients", "4", "--fractions", "0.1"],
            (
                r"--fractions 0.1 gives round\(0.1 \* 4\) = 0 .* nearest valid "
                r"fraction is 0.25"
            ),
        ),
    ],
)
def test_bad_flags_fail_at_once_naming_the_flag(argv, match, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert time.perf_counter() - started < 5  # before anything starts
    err = capsys.readouterr().err
    import re

    assert re.search(match, err), err


def test_help_gives_every_flag_a_line_and_a_default():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert any(o in text for o in action.option_strings)
            if action.default is not None and action.default is not False:
                assert action.help is not None
                assert "default" in action.help, action.dest
    assert text.count("results/<date-time>") == 1
    assert "  flwr-alie --strategies krum fedmedian --fractions 0.1 0.2" in text


@pytest.mark.parametrize("name", ["paper", "iclr2022", "local-epochs"])
def test_every_preset_is_the_grid_its_page_describes(name):
    from flwr_alie.evaluation.presets import describe

    _args, cells = parse(["--preset", name])
    page = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    assert describe(name) in page
    rounds = sum(c.rounds for c in cells)
    assert f"{describe(name)}\n\nThat is {len(cells)} cells ({rounds:,} " in page


def test_the_paper_preset_is_the_papers_regime():
    from flwr_alie.evaluation.presets import PRESETS

    args, cells = parse(["--preset", "paper"])
    options = PRESETS["paper"].options
    assert {c.strategy for c in cells} == set(options["strategies"])
    attacked = [c for c in cells if c.attacked]
    assert {len(c.byzantine_ids) for c in attacked} == {12}
    assert {c.z for c in attacked} == {1.5, "max"}
    assert {c.knowledge for c in attacked} == {"byzantine-only", "oracle"}
    assert len({c.seed for c in cells}) >= 3
    for cell in cells:
        assert (cell.clients, cell.steps, cell.epochs) == (51, 1, 0)
        assert (cell.server_lr, cell.server_momentum, cell.lr) == (0.1, 0.9, 1.0)
        assert (cell.dataset, cell.model) == ("mnist1d", "cnn")
        assert not cell.problems(), cell.key  # Bulyan's n >= 4f + 3 holds: 51
    # every attacked cell has its reference, and flags given win over the preset
    keys = {c.key for c in cells}
    assert all(c.reference().key in keys for c in attacked)
    args, cells = parse(
        ["--preset", "paper", "--rounds", "7", "--dataset", "ylecun/mnist"]
    )
    assert {(c.rounds, c.dataset) for c in cells} == {(7, "ylecun/mnist")}
    assert args.last == 7  # the preset's --last 20 follows a shorter --rounds


def _rows_of(cells: list[str], rounds: int) -> str:
    rows = [
        {"cell": c, "round": r, "status": "ok", "accuracy": 0.5}
        for c in cells
        for r in range(rounds + 1)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_an_existing_results_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(_rows_of(["a"], 1))
    assert main(["--out", str(tmp_path), "--rounds", "1", "--last", "1"]) == 2
    assert "already holds results; pass --resume" in capsys.readouterr().err
    assert (tmp_path / "results.jsonl").read_text() == _rows_of(["a"], 1)


def test_resume_refuses_other_options(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--rounds", "1", "--last", "1"]
    from flwr_alie.evaluation.grid import build_grid, save_cells

    save_cells(build_grid(strategies=["krum"]), tmp_path / "grid.json")
    (tmp_path / "results.jsonl").write_text(_rows_of(["a"], 1))
    assert main([*args, "--resume"]) == 2
    assert "--resume: the options differ" in capsys.readouterr().err


def test_without_the_evaluation_extra_one_line_says_what_to_install(
    monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "flwr-alie: the evaluation needs its extra (missing: matplotlib): "
        "pip install 'flwr-alie[evaluation]'"
    )


# ------------------------------------------------------------------ end to end


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flwr_alie.evaluation.cli", *ARGS, "--out", str(out),
            *extra]  # fmt: skip


def _numbers(out: Path) -> list[str]:
    rows = read_rows(out / "results.jsonl")
    return sorted(
        json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True)
        for r in rows
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cwd = tmp_path_factory.mktemp("cwd")
    result = subprocess.run(
        _command(out), capture_output=True, text=True, timeout=500, check=False,
        cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # nothing in the working directory: the SuperLink's state is in memory (a
    # database file there would be shared by every run started from it)
    assert list(cwd.iterdir()) == []
    return out, result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_files_table_and_progress(full_run):
    out, stdout = full_run
    for name in (
        "results.jsonl",
        "grid.json",
        "table.md",
        "accuracy.png",
        "effect.png",
    ):
        assert (out / name).exists(), name
    for name in ("accuracy.png", "effect.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "INFO" not in stdout  # Flower's own logs stay out of the way
    cells = json.loads((out / "grid.json").read_text())
    assert f"cell {len(cells)}/{len(cells)}" in stdout
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == (
        "| strategy | split | f | clean | cost vs FedAvg | z=0.5 | effect of z=0.5 "
        "| z=max | effect of z=max |"
    )
    assert [line.split(" | ")[0] for line in table[2:8]] == (
        ["| fedmedian"] * 2 + ["| krum"] * 2 + ["| bulyan"] * 2
    )
    assert "| krum | iid | 2/10 |" in "\n".join(table)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_invalid_configurations_are_reported(full_run):
    out, _ = full_run
    rows = read_rows(out / "results.jsonl")
    invalid = {r["cell"]: r["reason"] for r in rows if r["status"] == "invalid"}
    # z = max with f = 1 of 10 has no non-negative factor, for every strategy
    for key in ("krum@f1/z=max/byz1/iid/seed0", "fedmedian@f0/z=max/byz1/iid/seed1"):
        assert "No non-negative ALIE factor" in invalid[key]
    # Bulyan needs n >= 4 f + 3: configured for f = 2 of 10 is too many, clean too
    for key in ("bulyan@f2/clean/byz0/iid/seed0", "bulyan@f2/z=0.5/byz2/iid/seed1"):
        assert "Bulyan needs n >= 4 * num_malicious_nodes + 3 = 11" in invalid[key]
    table = (out / "table.md").read_text()
    assert "invalid (" in table
    assert "bulyan (iid, clean, f=2/10): invalid: Bulyan needs n >= 4" in table


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reference_and_attacked_cells_share_the_start_and_krum_selects(full_run):
    out, _ = full_run
    rows = read_rows(out / "results.jsonl")
    ok = [r for r in rows if r["status"] == "ok"]
    for seed in (0, 1):
        # same initial model in every cell of a seed: the same round-0 numbers
        start = {
            (r["accuracy"], r["loss"])
            for r in ok
            if r["round"] == 0 and r["seed"] == seed
        }
        assert len(start) == 1
    attacked = [
        r for r in ok if r["cell"] == "krum@f2/z=0.5/byz2/iid/seed0" and r["round"]
    ]
    assert len(attacked) == 3
    for r in attacked:
        assert r["alie.num-byzantine"] == 2
        assert r["byzantine_ids"] == [6, 9] or len(r["byzantine_ids"]) == 2
        assert r["alie.aggregate-to-crafted"] == pytest.approx(0.0, abs=1e-4)
        assert r["alie.distance-sigma"] == pytest.approx(0.5, rel=1e-4)
    clean = [r for r in ok if r["cell"] == "krum@f2/clean/byz0/iid/seed0"]
    assert all("alie.aggregate-to-crafted" not in r for r in clean)
    assert clean[-1]["loss"] != attacked[-1]["loss"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupt_stops_everything_and_resume_gives_the_same_numbers(
    full_run, tmp_path
):
    full, _ = full_run
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    results = out / "results.jsonl"
    children: set[int] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        children |= set(descendants(proc.pid))
        if results.exists() and len(read_rows(results)) >= 12:
            break
        time.sleep(0.5)
    children |= set(descendants(proc.pid))
    assert any(b"flwr-simulation" in _cmdline(p) for p in children)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert time.monotonic() - started < 15
    assert "Traceback" not in stderr
    assert "flwr-alie: interrupted;" in stderr
    assert "--resume" in stderr
    time.sleep(1)
    survivors = [p for p in children if alive(p)]
    assert not survivors, [_cmdline(p) for p in survivors]
    # a rerun into the same folder is refused without --resume
    again = subprocess.run(_command(out), capture_output=True, text=True, check=False)
    assert again.returncode == 2
    resumed = subprocess.run(
        _command(out, "--resume"),
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "flwr-alie: resuming" in resumed.stdout
    assert _numbers(out) == _numbers(full)
    assert (out / "table.md").read_text() == (full / "table.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_paper_preset_runs_on_a_hugging_face_dataset_with_a_cnn(tmp_path):
    # an MNIST-like dataset laid out as on the Hub, written here: the same
    # FederatedDataset path as --dataset ylecun/mnist, without a network
    from tests.evaluation.test_task import _parquet_dataset

    folder = tmp_path / "mnist-like"
    _parquet_dataset(folder, "image", (28, 28), n_train=120, n_test=30)
    out = tmp_path / "out"
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=str(tmp_path / "hf-cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    argv = [
        sys.executable, "-m", "flwr_alie.evaluation.cli", "--preset", "paper",
        "--dataset", str(folder), "--clients", "6", "--strategies", "fedavg", "krum",
        "--seeds", "0", "1", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [r for r in read_rows(out / "results.jsonl") if r["status"] == "ok"]
    assert {(r["model"], r["steps"], r["server_momentum"]) for r in rows} == {
        ("cnn", 1, 0.9)
    }
    trained = [r for r in rows if r["round"]]
    assert trained
    assert all(r["local-steps"] == pytest.approx(1.0) for r in trained)  # a mean
    # the preset's four attacks on each strategy, each beside its reference (some
    # are invalid at n = 6: z_max needs more clients)
    attacks = {r["attack"] for r in read_rows(out / "results.jsonl")}
    assert attacks == {
        "clean", "z=1.5", "z=max", "z=1.5 byzantine-only", "z=max byzantine-only"
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_leaves_nothing_running(tmp_path):
    # SIGKILL runs no clean-up: the kernel tells what flwr-alie started (its
    # parent-death signal), and those stop what they started
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = out / "results.jsonl"
    children: set[int] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        children |= set(descendants(proc.pid))
        if results.exists() and results.stat().st_size > 0:
            break
        time.sleep(0.5)
    children |= set(descendants(proc.pid))
    names = {p: _cmdline(p) for p in children}
    assert any(b"flwr-simulation" in name for name in names.values())
    proc.kill()
    proc.wait()
    flower = {p for p, name in names.items() if b"flwr" in name or b"flower" in name}
    deadline = time.monotonic() + 180  # Ray's agents notice their raylet is gone
    while time.monotonic() < deadline and any(alive(p) for p in children):
        if time.monotonic() > deadline - 140:  # 40 s: Flower's processes are gone
            assert not [p for p in flower if alive(p)], [names[p] for p in flower]
        time.sleep(1)
    survivors = [p for p in children if alive(p)]
    assert not survivors, [names[p] for p in survivors]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_rebuilds_table_and_plots_from_results_alone(full_run, tmp_path):
    full, _ = full_run
    (tmp_path / "results.jsonl").write_text((full / "results.jsonl").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "flwr_alie.evaluation.cli", "report", str(tmp_path),
         "--last", "2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "table.md").read_text() == (full / "table.md").read_text()
    assert (tmp_path / "effect.png").exists()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sigterm_is_an_orderly_stop_with_status_143(tmp_path, monkeypatch, capsys):
    # the run itself stands in for a Flower run that is interrupted by SIGTERM
    import flwr_alie.evaluation.cli as cli

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(cli, "_run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    status = main(["--out", str(tmp_path), "--rounds", "1", "--last", "1"])
    assert status == 143
    err = capsys.readouterr().err
    assert "flwr-alie: interrupted; 0 rows saved" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_worker_momentum_follows_local_epochs_unless_given():
    args, cells = parse(["--local-steps", "0", "--rounds", "2"])
    assert args.worker_momentum == 0.0
    assert {(c.steps, c.worker_momentum, c.epochs) for c in cells} == {(0, 0.0, 3)}
    args, cells = parse(["--rounds", "2"])  # the default: FedSGD, momentum 0.9
    assert {(c.steps, c.worker_momentum) for c in cells} == {(1, 0.9)}


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has CUDA"
)
def test_gpus_are_refused_where_there_are_none(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit):
        parse(["--gpus-per-client", "0.5"])
    assert "--gpus-per-client: got 0.5 on a machine without CUDA" in (
        capsys.readouterr().err
    )


def test_the_defences_options_reach_the_strategies():
    _, cells = parse(
        ["--strategies", "cc", "bucketing-geomed", "--cc-tau", "0.1",
         "--cc-iterations", "3", "--geomed-iterations", "8", "--rounds", "2"]
    )  # fmt: skip
    by_name = {c.strategy: c.strategy_object() for c in cells}
    assert (by_name["cc"].tau, by_name["cc"].iterations) == (0.1, 3)
    assert by_name["bucketing-geomed"].strategy.iterations == 8
    assert by_name["bucketing-geomed"].s == 2
