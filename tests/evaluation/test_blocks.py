"""A block of partitions per Flower message gives the numbers of one per partition.

Real runs of ``flwr-alie`` on Flower's Simulation Engine: the same grid with one
partition per message (``--block-size 1``, a message per client) and with a cell's
partitions in one or a few messages, compared row by row.
"""

import json
import subprocess
import sys

import pytest

from flwr_alie.evaluation.results import read_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# FedAvg, Krum and bucketing (which shuffles the replies by node id), n = 6 of which
# 1 is Byzantine; FedSGD with worker momentum carried in the nodes' Context.state
FEDSGD = [
    "--strategies", "fedavg", "krum", "bucketing-median",
    "--fractions", "0.2", "--z", "1", "--splits", "iid", "dirichlet",
    "--clients", "6", "--rounds", "3", "--last", "2", "--seeds", "0", "1",
    "--model", "cnn", "--local-steps", "2", "--worker-momentum", "0.9",
    "--batch-size", "8", "--lr", "0.1", "--parallel", "6",
]  # fmt: skip
EPOCHS = [
    "--strategies", "fedmedian", "--fractions", "0.2", "--z", "1",
    "--splits", "dirichlet", "--clients", "6", "--rounds", "2", "--last", "2",
    "--seeds", "0", "1", "--epochs", "1",
]  # fmt: skip
TIMING = {"cell_seconds", "alie.seconds", "train-seconds", "block_size"}


def _rows(tmp_path, name, argv):
    out = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "flwr_alie.evaluation.cli", *argv, "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {}
    for row in read_rows(out / "results.jsonl"):
        assert row["status"] == "ok", row
        rows[(row["cell"], row["round"])] = {
            k: v for k, v in row.items() if k not in TIMING
        }
    return rows


def _same(a, b):
    assert a.keys() == b.keys()
    differing = {key: (a[key], b[key]) for key in a if a[key] != b[key]}
    assert not differing, json.dumps(next(iter(differing.items())), default=str)


def test_fedsgd_rows_are_identical_for_one_partition_and_a_cell_per_message(
    tmp_path,
):
    one = _rows(tmp_path, "k1", [*FEDSGD, "--vectorise", "off", "--block-size", "1"])
    whole = _rows(tmp_path, "kn", [*FEDSGD, "--vectorise", "off"])
    _same(one, whole)
    attacked = [r for r in whole.values() if r["attack"] != "clean" and r["round"]]
    assert attacked
    assert all(r["alie.attacked"] == 1 for r in attacked)
    # the vectorised pass: the same cells within its tolerance (grouped
    # convolutions sum in another order; the losses move by rounding only)
    vectorised = _rows(tmp_path, "kv", [*FEDSGD, "--vectorise", "on"])
    assert vectorised.keys() == whole.keys()
    for key, row in whole.items():
        other = vectorised[key]
        assert other["vectorised"]
        assert not row["vectorised"]
        assert other["loss"] == pytest.approx(row["loss"], rel=1e-3), key
        assert other["accuracy"] == pytest.approx(row["accuracy"], abs=0.02), key


def test_local_epoch_rows_are_identical_for_any_block_size(tmp_path):
    one = _rows(tmp_path, "k1", [*EPOCHS, "--block-size", "1"])
    four = _rows(tmp_path, "k4", [*EPOCHS, "--block-size", "4"])  # blocks of 4 and 2
    _same(one, four)
