"""The results folder and the command's early refusals, through the real CLI."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from flwr_alie.evaluation.cli import main
from flwr_alie.evaluation.folder import (
    FolderError,
    FolderLock,
    claim_temporary,
    remove_stale_temporaries,
)
from flwr_alie.evaluation.grid import build_grid, save_cells

QUICK = ["--strategies", "fedavg", "--rounds", "2", "--seeds", "0", "1"]


def _rows(cells, rounds, *, finished=True):
    """Rows of finished (or one round short) cells, given by key or as Cells."""
    from flwr_alie.evaluation.grid import Cell
    from flwr_alie.evaluation.wire import row_columns

    rows = []
    for cell in cells:
        if isinstance(cell, str):  # a clean FedAvg cell of that key's seed
            seed = int(cell.rsplit("seed", 1)[1])
            cell = Cell(strategy="fedavg", split="iid", seed=seed, declared=0)
        cell = dataclasses.replace(cell, rounds=rounds)
        done = rounds if finished else rounds - 1
        for r in range(done + 1):
            rows.append({**row_columns(cell), "round": r, "status": "ok",
                         "accuracy": 0.5 + 0.01 * r})  # fmt: skip
    return "".join(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------ the lock

_HOLDER = """
import sys, time
from pathlib import Path
from flwr_alie.evaluation.folder import FolderLock
with FolderLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "flwr_alie.evaluation.cli", *QUICK, "--out",
             str(out)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert second.returncode == 2
        assert time.monotonic() - started < 20  # before anything starts
        lines = second.stderr.strip().splitlines()
        assert lines == [
            (
                f"flwr-alie: {out} is in use by another flwr-alie run (pid "
                f"{holder.pid}); wait for it to end, or choose another --out"
            )
        ]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the lock of a killed process: the folder is free again
    with FolderLock(out):
        pass


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with FolderLock(tmp_path), pytest.raises(FolderError, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path).__enter__()


# ------------------------------------------------------------ refusals at once


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--resume"], r"argument --resume: needs --out DIR"),
        (["--z", "abc"], r"argument --z: expected a number >= 0 or 'max'"),
        (
            ["--dataset", "no-such-name"],
            (
                r"argument --dataset: expected one of digits, mnist1d, mnist-5k, an "
                r"existing folder, or a Hugging Face Hub id"
            ),
        ),
        (["--dataset", "./missing/folder"], r"argument --dataset: expected one of"),
        (
            ["--strategies", "bulyan", "--fractions", "0.4"],
            r"no attacked cell of this grid can run.*Bulyan needs n >= 4",
        ),
    ],
)
def test_refused_before_anything_starts(argv, match, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        main([*QUICK, *argv])
    assert stop.value.code == 2
    assert time.perf_counter() - started < 5
    import re

    assert re.search(match, capsys.readouterr().err)


def test_a_dataset_folder_must_hold_parquet_files_and_a_hub_id_a_network(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    for value, match in [
        (tmp_path / "empty", "holds no Parquet files"),
        (tmp_path / "a-file", "is a file; expected a folder of Parquet files"),
    ]:
        with pytest.raises(SystemExit):
            main([*QUICK, "--dataset", str(value)])
        assert match in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        main([*QUICK, "--dataset", "ylecun/mnist"])
    assert "the Hub is off (HF_HUB_OFFLINE)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_out_that_cannot_hold_results_is_one_line(kind, tmp_path, capsys):
    if kind == "file":
        out = tmp_path / "results.txt"
        out.write_text("")
        expected = f"flwr-alie: --out {out} is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "run"
        expected = f"flwr-alie: --out {out}: {parent} is not writable"
    assert main([*QUICK, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == expected


def test_resume_names_the_options_that_differ(tmp_path, capsys):
    cells = build_grid(strategies=["fedavg"], seeds=[0, 1], rounds=2, clients=20)
    save_cells(cells, tmp_path / "grid.json")
    (tmp_path / "results.jsonl").write_text(_rows([cells[0]], 2))
    assert main([*QUICK, "--rounds", "3", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flwr-alie: --resume: the options differ from the run in")
    assert "rounds was 2, now 3" in err
    assert err.count("\n") == 0
    # nothing of the first run was touched
    assert (tmp_path / "results.jsonl").read_text() == _rows([cells[0]], 2)


# ------------------------------------------------------------------ report


def test_report_refuses_a_last_beyond_the_runs_rounds(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(
        _rows(["fedavg@f0/clean/byz0/iid/seed0"], 15)
    )
    assert main(["report", str(tmp_path), "--last", "99"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"flwr-alie report: --last 99 exceeds the rounds of the run in {tmp_path} "
        "(15); pass --last between 1 and 15"
    )


def test_report_names_unfinished_cells_and_says_so_in_its_status(tmp_path, capsys):
    done, partial = "fedavg@f0/clean/byz0/iid/seed0", "fedavg@f0/clean/byz0/iid/seed1"
    (tmp_path / "results.jsonl").write_text(
        _rows([done], 4) + _rows([partial], 4, finished=False)
    )
    (tmp_path / "run.json").write_text(json.dumps({"last": 2}))
    assert main(["report", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "Test accuracy, mean of the last 2 rounds" in captured.out  # run.json's
    assert f"1 cells are unfinished, so the table has blanks: {partial}" in (
        captured.err
    )
    (tmp_path / "results.jsonl").write_text(_rows([done, partial], 4))
    assert main(["report", str(tmp_path)]) == 0


# ------------------------------------------------------- what a killed run left


def test_the_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / "flwr-alie-stale"
    ray = tmp_path / "ray-stale"
    stale.mkdir()
    ray.mkdir()
    (stale / "owner").write_text(dead.stdout.strip())
    (stale / "ray-tmpdir").write_text(str(ray))
    live = tmp_path / "flwr-alie-live"
    live.mkdir()
    claim_temporary(live)  # this process: alive
    other = tmp_path / "flwr-alie-not-ours"
    other.mkdir()  # no owner file: left alone
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists()
    assert not ray.exists()
    assert live.exists()
    assert other.exists()


# ------------------------------------------------------------------ a hung run

_TALKER = """#!{python}
import sys, time
for i in range(4):  # a line every 0.3 s, then silence: a hang
    print("rounds", i, flush=True)
    time.sleep(0.3)
time.sleep(60)
"""


def _stand_in_flwr(script, tmp_path, monkeypatch):
    """Put `script` where the runtime looks for Flower's `flwr`; return the runtime."""
    from flwr_alie.evaluation import runtime

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flwr").write_text(script.format(python=sys.executable))
    (fake / "flwr").chmod(0o755)
    monkeypatch.setattr(runtime, "BIN", fake)
    return runtime


@pytest.mark.parametrize("idle", [True, False])
def test_a_run_is_stopped_after_its_timeout_of_silence_or_in_all(
    idle, tmp_path, monkeypatch
):
    runtime = _stand_in_flwr(_TALKER, tmp_path, monkeypatch)
    started = time.monotonic()
    result = runtime.flwr_run(tmp_path, tmp_path, "", timeout=0.8, idle=idle)
    seconds = time.monotonic() - started
    printed = result.stdout.count("rounds")
    if idle:  # every line restarts the clock: the run lives until the silence
        assert printed == 4
        assert 1.7 < seconds < 10
        assert "stopped after 0.8 s without a line of output" in result.stdout
    else:
        assert printed < 4
        assert seconds < 1.7
        assert "stopped after 0.8 s in all" in result.stdout
    assert result.returncode != 0


_ENV_PRINTER = """#!{python}
import os
for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
    print(name, os.environ.get(name), flush=True)
"""


@pytest.mark.parametrize("users", [None, "131072"])
def test_flowers_processes_keep_freed_heap_unless_the_user_says_otherwise(
    users, tmp_path, monkeypatch
):
    runtime = _stand_in_flwr(_ENV_PRINTER, tmp_path, monkeypatch)
    if users is None:
        monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", users)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    result = runtime.flwr_run(tmp_path, tmp_path, "", timeout=20, idle=True)
    assert f"MALLOC_MMAP_THRESHOLD_ {64 << 20}" in result.stdout
    trim = users if users is not None else str(256 << 20)
    assert f"MALLOC_TRIM_THRESHOLD_ {trim}" in result.stdout


_FINISHER = """#!{python}
import pathlib, sys, time
print("rounds 1", flush=True)
time.sleep(0.3)
pathlib.Path(sys.argv[2]).parent.joinpath("done").touch()  # APP/done: the app's end
print("a last line", flush=True)  # within the grace: still read
time.sleep(60)  # Flower's own wind-down, which is not waited for
"""


def test_a_run_whose_app_says_it_is_done_is_stopped_after_a_grace(
    tmp_path, monkeypatch
):
    runtime = _stand_in_flwr(_FINISHER, tmp_path, monkeypatch)
    app = tmp_path / "app"
    app.mkdir()
    started = time.monotonic()
    result = runtime.flwr_run(
        tmp_path, app / "x", "", timeout=30, finished=app / "done", grace=0.5
    )
    seconds = time.monotonic() - started
    assert 0.8 < seconds < 10  # not the 60 s of the stand-in's wind-down
    assert "a last line" in result.stdout
    assert "ERROR" not in result.stdout
    assert result.returncode == 0


def test_a_run_that_never_says_it_is_done_keeps_its_exit_status(tmp_path, monkeypatch):
    runtime = _stand_in_flwr(
        "#!{python}\nimport sys\nprint('failed', flush=True)\nsys.exit(3)\n",
        tmp_path,
        monkeypatch,
    )
    result = runtime.flwr_run(
        tmp_path, tmp_path / "x", "", timeout=30, finished=tmp_path / "done"
    )
    assert result.returncode == 3


@pytest.mark.parametrize("patience", [1.0, 3.0])
def test_a_process_that_ignores_sigterm_is_killed_after_the_patience(patience):
    import subprocess

    from flwr_alie.evaluation import runtime

    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    stubborn = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"
    started = time.monotonic()
    runtime._stop([stubborn], patience=patience)
    seconds = time.monotonic() - started
    assert stubborn.poll() is not None  # killed
    assert patience - 0.2 < seconds < patience + 2


_RAY_ENV_PRINTER = """#!{python}
import os
for name in sorted(os.environ):
    if name.startswith("RAY_"):
        print(name, os.environ[name], flush=True)
"""


def test_rays_settings_reach_flowers_processes_unless_the_user_set_them(
    tmp_path, monkeypatch
):
    runtime = _stand_in_flwr(_RAY_ENV_PRINTER, tmp_path, monkeypatch)
    for name in runtime.RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_enable_worker_prestart", "1")  # the user's own
    result = runtime.flwr_run(tmp_path, tmp_path, "", timeout=20, idle=True)
    assert f"RAY_max_direct_call_object_size {16 << 20}" in result.stdout
    assert "RAY_prestart_worker_first_driver 0" in result.stdout
    assert "RAY_enable_worker_prestart 1" in result.stdout
