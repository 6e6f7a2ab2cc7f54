"""Real Flower runs of the example app: the Simulation Engine and the Deployment Engine.

Each test runs ``flwr run`` against a SuperLink it starts itself on loopback, then
replays the honest clients' training in this process (the training is deterministic
given the seed) to compute, independently and in float64, what the aggregate of
each round must be.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from digits_alie.task import local_seed, make_model, task_data, train

from flwr_alie import ALIEConfig
from flwr_alie.evaluation.runtime import flwr_run, superlink

EXAMPLE_APP = Path(__file__).resolve().parent.parent / "examples" / "digits"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def flat(weights: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in weights.values()])


def honest_update(global_weights, partition, num_partitions, server_round, seed=0):
    """Train one honest client of the example app, here, from the same inputs."""
    import torch

    model = make_model(seed=seed)
    model.load_state_dict({k: torch.tensor(v) for k, v in global_weights.items()})
    data = task_data(num_partitions, seed).partitions[partition]
    train(model, data, epochs=1, lr=0.5, seed=local_seed(seed, server_round, partition))
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return flat(params) - flat(global_weights), len(data)


def alie_reference(deltas: np.ndarray, z: float) -> np.ndarray:
    mu = deltas.mean(0)
    sigma = np.sqrt(((deltas - mu) ** 2).mean(0))
    return mu - z * sigma


def run_example(tmp_path, run_config, *, simulation, supernodes=0, extra=()):
    history_path = tmp_path / "history.json"
    config = f"save-path='{history_path}' {run_config}"
    with superlink(tmp_path, simulation=simulation, supernodes=supernodes):
        result = flwr_run(tmp_path, EXAMPLE_APP, config, extra=extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert history_path.exists(), result.stdout[-3000:]
    return {int(k): v for k, v in json.loads(history_path.read_text()).items()}


def test_simulation_krum_selects_the_crafted_update(tmp_path):
    n, rounds, z = 10, 2, 0.5
    history = run_example(
        tmp_path,
        f"strategy='krum' num-server-rounds={rounds} num-nodes={n} alie.z={z} "
        "alie.fraction=0.2 alie.seed=0",
        simulation=True,
        extra=["--federation-config", f"num-supernodes={n}"],
    )
    byzantine = ALIEConfig(fraction=0.2, seed=0).byzantine_partitions(n)
    for r in range(1, rounds + 1):
        before = history[r - 1]["weights"]
        deltas = np.stack(
            [honest_update(before, p, n, r)[0] for p in range(n) if p not in byzantine]
        )
        crafted = flat(before) + alie_reference(deltas, z)
        np.testing.assert_allclose(
            flat(history[r]["weights"]), crafted, rtol=1e-4, atol=1e-5
        )
        train_metrics = history[r]["train"]
        assert train_metrics["alie.num-byzantine"] == 2
        assert train_metrics["alie.distance-sigma"] == pytest.approx(z, rel=1e-4)


def test_simulation_nnm_then_median_of_honest_and_crafted_updates(tmp_path):
    n, z = 10, 1.0
    history = run_example(
        tmp_path,
        f"strategy='nnm-median' num-server-rounds=1 num-nodes={n} alie.z={z} "
        "alie.fraction=0.2 alie.seed=0",
        simulation=True,
        extra=["--federation-config", f"num-supernodes={n}"],
    )
    byzantine = ALIEConfig(fraction=0.2, seed=0).byzantine_partitions(n)
    before = history[0]["weights"]
    honest = np.stack(
        [honest_update(before, p, n, 1)[0] for p in range(n) if p not in byzantine]
    )
    crafted = alie_reference(honest, z)
    rows = np.concatenate([honest, np.stack([crafted] * len(byzantine))])
    f = len(byzantine)
    mixed = []
    for row in rows:  # mean of the n - f rows nearest to it, itself included
        distances = np.linalg.norm(rows - row, axis=1)
        mixed.append(rows[np.argsort(distances, kind="stable")[: n - f]].mean(0))
    expected = flat(before) + np.median(np.stack(mixed), axis=0)
    np.testing.assert_allclose(
        flat(history[1]["weights"]), expected, rtol=1e-4, atol=1e-5
    )
    assert history[1]["train"]["alie.attacked"] == 1
    assert history[1]["train"]["nnm.f"] == f


def test_deployment_fedavg_averages_honest_and_crafted_updates(tmp_path):
    n, z = 4, 1.0
    history = run_example(
        tmp_path,
        f"strategy='fedavg' num-server-rounds=1 num-nodes={n} alie.z={z} "
        "alie.byzantine-ids='1'",
        simulation=False,
        supernodes=n,
    )
    before = history[0]["weights"]
    honest = [honest_update(before, p, n, 1) for p in (0, 2, 3)]
    deltas = np.stack([d for d, _ in honest])
    weights = np.array([w for _, w in honest], np.float64)
    crafted = alie_reference(deltas, z)
    # the Byzantine node skipped training and claims the median honest weight
    byz_weight = np.sort(weights)[1]
    expected = (weights @ deltas + byz_weight * crafted) / (weights.sum() + byz_weight)
    np.testing.assert_allclose(
        flat(history[1]["weights"]), flat(before) + expected, rtol=1e-4, atol=1e-5
    )
    assert history[1]["train"]["alie.attacked"] == 1
