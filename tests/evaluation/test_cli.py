"""The evaluation end to end: a small grid through the flwr-alie command, twice."""

import json
import re
import subprocess
import sys

import pytest

from flwr_alie.evaluation.cli import build_parser
from flwr_alie.evaluation.results import read_rows

pytestmark = pytest.mark.timeout(600)

# 3 strategies x (no attack + 2 fractions x 2 z) = 15 cells, 10 clients, 2 rounds.
# Bulyan's n >= 4f + 3 makes some cells invalid, and so does z = max with f = 1 of
# n = 10 (no non-negative z_max).
ARGS = [
    "--strategies", "krum", "fedmedian", "bulyan",
    "--fractions", "0.1", "0.2",
    "--z", "0.5", "max",
    "--splits", "iid",
    "--clients", "10",
    "--rounds", "2",
]  # fmt: skip
TIMING = {"cell_seconds", "alie.seconds"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"run{i}")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "flwr_alie.evaluation.cli",
                *ARGS,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=500,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outs.append((out, result.stdout))
    return outs


def final(rows, key):
    ok = [r for r in rows if r["cell"] == key and r["status"] == "ok"]
    return max(ok, key=lambda r: r["round"])


def test_files_table_and_progress(two_runs):
    out, stdout = two_runs[0]
    for name in ("results.jsonl", "table.md", "accuracy.png", "heatmap.png"):
        assert (out / name).exists(), name
    for name in ("accuracy.png", "heatmap.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "cell 15/15" in stdout
    assert "ETA" in stdout
    assert "INFO" not in stdout  # Flower's own logs stay out of the way
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == (
        "| strategy | no attack | f=0.1 z=0.5 | f=0.1 z=max "
        "| f=0.2 z=0.5 | f=0.2 z=max |"
    )
    assert [line.split(" | ")[0] for line in table[2:5]] == [
        "| fedmedian",
        "| krum",
        "| bulyan",
    ]
    assert table[2:5] == stdout.split("\n\n")[2].splitlines()[2:5]


def test_invalid_configurations_are_reported(two_runs):
    rows = read_rows(two_runs[0][0] / "results.jsonl")
    invalid = {r["cell"]: r["reason"] for r in rows if r["status"] == "invalid"}
    assert len({r["cell"] for r in rows}) == 15
    # z = max with f = 1 of 10 has no non-negative factor, for every strategy
    for strategy in ("krum", "fedmedian", "bulyan"):
        key = f"{strategy}/f0.1-zmax-negative-oracle/iid/seed0"
        assert "No non-negative ALIE factor" in invalid[key]
    # Bulyan needs n >= 4 f + 3: f = 2 of 10 is too many
    for z in ("0.5", "max"):
        key = f"bulyan/f0.2-z{z}-negative-oracle/iid/seed0"
        assert "Bulyan needs n >= 4 * num_malicious_nodes + 3 = 11" in invalid[key]
    table = (two_runs[0][0] / "table.md").read_text()
    assert "invalid (" in table
    assert "Bulyan needs n >= 4" in table


def test_krum_selects_the_crafted_update_and_the_attack_changes_the_model(two_runs):
    rows = read_rows(two_runs[0][0] / "results.jsonl")
    attacked = [
        r
        for r in rows
        if r["cell"] == "krum/f0.2-z0.5-negative-oracle/iid/seed0" and r["round"]
    ]
    assert len(attacked) == 2
    for r in attacked:
        assert r["alie.num-byzantine"] == 2
        assert r["alie.aggregate-to-crafted"] == pytest.approx(0.0, abs=1e-4)
        assert r["alie.distance-sigma"] == pytest.approx(0.5, rel=1e-4)
    clean = final(rows, "krum/no-attack/iid/seed0")
    assert "alie.aggregate-to-crafted" not in clean
    assert final(rows, attacked[0]["cell"])["loss"] != clean["loss"]


def test_same_configuration_and_seed_give_the_same_numbers(two_runs):
    def numbers(out):
        rows = read_rows(out / "results.jsonl")
        return sorted(
            (
                json.dumps(
                    {k: v for k, v in r.items() if k not in TIMING}, sort_keys=True
                )
            )
            for r in rows
        )

    assert numbers(two_runs[0][0]) == numbers(two_runs[1][0])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--z", "-1"], "expected z >= 0"),
        (["--fractions", "0.6"], r"expected a fraction in \[0, 0.5\)"),
        (["--strategies", "fedprox"], "invalid choice: 'fedprox'"),
    ],
)
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert re.search(match, capsys.readouterr().err)
