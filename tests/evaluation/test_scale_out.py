"""Scale-out: the evaluation joins a running Ray cluster named by RAY_ADDRESS.

A cluster of two Ray nodes (Ray's own ``ray.cluster_utils.Cluster``, on loopback)
runs a small grid; Ray's actor table (the GCS's state) must show Flower's
ClientAppActors on both nodes, and the numbers must be those of the same grid run
locally.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flwr_alie.evaluation.results import read_rows
from flwr_alie.evaluation.runtime import alive, descendants

HELPER = Path(__file__).resolve().parents[1] / "apps" / "ray" / "two_node_cluster.py"
ARGS = [
    "--strategies", "fedavg", "krum",
    "--clients", "6",
    "--fractions", "0.2",
    "--rounds", "2",
    "--last", "1",
    "--seeds", "0", "1",
    "--splits", "iid",
]  # fmt: skip
TIMING = {"cell_seconds", "alie.seconds", "train-seconds"}


def _run(out: Path, env: dict[str, str]) -> None:
    command = [
        sys.executable,
        "-m",
        "flwr_alie.evaluation.cli",
        *ARGS,
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _rows(out: Path) -> dict[tuple[str, object], dict]:
    return {
        (r["cell"], r["round"]): {k: v for k, v in r.items() if k not in TIMING}
        for r in read_rows(out / "results.jsonl")
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_two_node_ray_cluster_runs_the_grid_on_both_nodes_with_local_numbers(
    tmp_path,
):
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.pop("RAY_ADDRESS", None)
    cluster_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    helper = subprocess.Popen(
        [sys.executable, str(HELPER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=cluster_env,
    )
    ray_processes: list[int] = []
    try:
        assert helper.stdout is not None
        info = json.loads(helper.stdout.readline())
        ray_processes = descendants(helper.pid)
        assert len(info["nodes"]) == 2
        _run(tmp_path / "cluster", dict(cluster_env, RAY_ADDRESS=info["address"]))
        assert helper.stdin is not None
        helper.stdin.write("actors\n")
        helper.stdin.flush()
        actors = json.loads(helper.stdout.readline())
        clients = [a for a in actors if a["class_name"] == "ClientAppActor"]
        assert {a["node_id"] for a in clients} == set(info["nodes"]), actors
    finally:
        assert helper.stdin is not None
        helper.stdin.close()
        helper.wait(timeout=120)
    assert ray_processes
    assert not [pid for pid in ray_processes if alive(pid)]  # both nodes stopped

    _run(tmp_path / "local", env)
    cluster, local = _rows(tmp_path / "cluster"), _rows(tmp_path / "local")
    assert cluster.keys() == local.keys()
    assert len(cluster) == 8 * 3  # krum and fedavg, clean and attacked, 2 seeds
    for key, row in local.items():
        other = cluster[key]
        assert row.keys() == other.keys()
        assert all(_same(row[k], other[k]) for k in row), key
