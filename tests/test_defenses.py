"""The defences as Flower strategies, on hand-built replies, real strategies inside."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum

from flwr_alie import ALIEConfig, ALIEStrategy, check_setup
from flwr_alie.aggregators import geometric_median
from flwr_alie.defenses import NNM, Bucketing, CenteredClipping, GeometricMedian
from tests.flower_helpers import (
    RecordingFedAvg,
    StubGrid,
    error_reply,
    flwr_log,
    layers_of,
    record,
    train_reply,
)

pytestmark = pytest.mark.usefixtures("server_identity")

GLOBAL = {"w": np.array([10.0, 10.0], np.float32), "steps": np.array(4, np.int64)}


def configured(strategy, server_round=1, global_layers=GLOBAL, nodes=3):
    list(
        strategy.configure_train(
            server_round, record(global_layers), ConfigRecord(), StubGrid(range(nodes))
        )
    )
    return strategy


def replies(updates, counts=None, steps=None, global_layers=GLOBAL):
    counts = counts or [10] * len(updates)
    return [
        train_reply(
            100 + i,
            {
                "w": (global_layers["w"] + np.asarray(u, np.float32)),
                "steps": np.array((steps or [5] * len(updates))[i], np.int64),
            },
            counts[i],
        )
        for i, u in enumerate(updates)
    ]


def test_centered_clipping_golden_and_its_centre_across_rounds():
    cc = configured(CenteredClipping(tau=1.0, min_available_nodes=3))
    msgs = replies([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]], steps=[5, 6, 7])
    arrays, metrics = cc.aggregate_train(1, msgs)
    # v = 0 + (1/3)([1,0] + [0,1] + (1/100)[100,0]) = [2/3, 1/3]
    np.testing.assert_allclose(arrays["w"].numpy(), [10 + 2 / 3, 10 + 1 / 3], rtol=1e-6)
    assert int(arrays["steps"].numpy()) == int(
        FedAvg().aggregate_train(1, msgs)[0]["steps"].numpy()
    )
    assert metrics["cc.clipped"] == 1
    assert metrics["cc.update-norm"] == pytest.approx(
        math.hypot(2 / 3, 1 / 3), rel=1e-6
    )
    # round 2: the centre is round 1's aggregate update, kept as state
    configured(cc, server_round=2)
    v = np.array([2 / 3, 1 / 3])
    updates = np.array([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]])
    step = np.zeros(2)
    for u in updates:
        r = np.linalg.norm(u - v)
        step += (u - v) * min(1.0, 1.0 / r)
    expected = v + step / 3
    arrays, _ = cc.aggregate_train(2, replies(updates.tolist()))
    np.testing.assert_allclose(arrays["w"].numpy(), 10 + expected, rtol=1e-6)


def test_geometric_median_ignores_counts_unless_weighted():
    updates = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]
    x = torch.tensor(updates)
    gm = configured(GeometricMedian(min_available_nodes=4), nodes=4)
    arrays, metrics = gm.aggregate_train(1, replies(updates, counts=[1, 1, 1, 50]))
    np.testing.assert_allclose(
        arrays["w"].numpy(), 10 + geometric_median(x).numpy(), rtol=1e-5
    )
    weighted = configured(
        GeometricMedian(weighted=True, min_available_nodes=4), nodes=4
    )
    arrays, _ = weighted.aggregate_train(1, replies(updates, counts=[1, 1, 1, 50]))
    expected = geometric_median(x, weights=torch.tensor([1.0, 1, 1, 50]))
    np.testing.assert_allclose(arrays["w"].numpy(), 10 + expected.numpy(), rtol=1e-5)
    assert "gm.update-norm" in metrics


def test_nnm_mixes_then_delegates_and_leaves_the_callers_messages_alone():
    inner = RecordingFedAvg()
    nnm = configured(NNM(inner, f=1))
    updates = [[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]
    msgs = [*replies(updates, steps=[5, 6, 7]), error_reply(999)]
    before = [layers_of(m) for m in msgs[:3]]
    _arrays, metrics = nnm.aggregate_train(1, msgs)
    # each row: mean of its n - f = 2 nearest (itself included)
    mixed = [[0.5, 0.0], [0.5, 0.0], [5.5, 0.0]]
    got = [r for r in inner.received if not r["error"]]
    assert len(inner.received) == 4  # the error reply passes through
    for received, expected, steps in zip(got, mixed, [5, 6, 7], strict=True):
        np.testing.assert_allclose(received["layers"]["w"], 10 + np.array(expected))
        assert int(received["layers"]["steps"]) == steps  # non-floating: as sent
    for m, layers in zip(msgs[:3], before, strict=True):
        np.testing.assert_array_equal(layers_of(m)["w"], layers["w"])
    assert metrics["nnm.f"] == 1


def test_nnm_then_median_against_a_float64_reference():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(7, 2)) * 1e-3
    updates[6] += 0.5
    nnm = configured(NNM(FedMedian(), f=2), nodes=7)
    arrays, _ = nnm.aggregate_train(1, replies(updates.tolist()))
    deltas = np.asarray(updates, np.float32).astype(np.float64)
    mixed = []
    for i in range(7):
        order = sorted(
            range(7), key=lambda j: (np.linalg.norm(deltas[j] - deltas[i]), j)
        )
        mixed.append(deltas[order[:5]].mean(0))
    expected = np.median(10 + np.array(mixed), axis=0)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)


def test_bucketing_hands_inner_one_reply_per_bucket():
    inner = RecordingFedAvg()
    bucket = configured(Bucketing(inner, s=2, seed=3), nodes=5)
    updates = [[float(i), 0.0] for i in range(5)]
    counts = [10, 20, 30, 40, 50]
    _, metrics = bucket.aggregate_train(1, replies(updates, counts=counts))
    perm = torch.randperm(
        5, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)
    ).tolist()
    assert metrics["bucketing.buckets"] == 3 == len(inner.received)
    for k, received in enumerate(inner.received):
        members = perm[2 * k : 2 * k + 2]
        mean = np.mean([updates[i] for i in members], axis=0)
        np.testing.assert_allclose(received["layers"]["w"], 10 + mean)
        assert received["metrics"]["num-examples"] == sum(counts[i] for i in members)


def test_composition_with_the_attack_and_the_setup_checks():
    f, n = 1, 5
    wrapper = ALIEStrategy(
        NNM(Krum(num_malicious_nodes=f), f=f), ALIEConfig(z=1.0, device="cpu")
    )
    assert check_setup(wrapper, num_nodes=n, num_byzantine=f, z=1.0) == []
    assert check_setup(NNM(FedAvg(), f=5), num_nodes=5, num_byzantine=1, z=1.0) == [
        "NNM needs f < n, got f = 5 with n = 5"
    ]
    # Krum configured for 4 sees ceil(20 / 2) = 10 bucket means: too few
    assert check_setup(
        Bucketing(Krum(num_malicious_nodes=4), s=2),
        num_nodes=20,
        num_byzantine=4,
        z=1.0,
    ) == ["Krum needs n >= 2 * num_malicious_nodes + 3 = 11 nodes, got n = 10"]
    assert repr(wrapper).startswith("ALIEStrategy(NNM(")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: CenteredClipping(tau=0), ValueError, "finite `tau` > 0, got 0.0"),
        (
            lambda: CenteredClipping(tau=1, iterations=0),
            ValueError,
            "`iterations` >= 1, got 0",
        ),
        (lambda: GeometricMedian(nu=-1), ValueError, "finite `nu` > 0, got -1.0"),
        (
            lambda: GeometricMedian(weighted=1),
            TypeError,
            "`weighted` to be a bool, got 1",
        ),
        (lambda: NNM(FedAvg(), f=-1), ValueError, "`f` >= 0, got -1"),
        (lambda: NNM("krum", f=1), TypeError, "`strategy` to be a flwr.*got str"),
        (lambda: Bucketing(FedAvg(), s=0), ValueError, "`s` >= 1, got 0"),
    ],
)
def test_bad_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: CenteredClipping(tau=1.0), "CenteredClipping(tau=1.0, iterations=1)"),
        (lambda: GeometricMedian(), "GeometricMedian(nu=1e-06, iterations=100"),
        (lambda: NNM(FedAvg(), f=1), "NNM(FedAvg(...), f=1)"),
        (
            lambda: Bucketing(Krum(num_malicious_nodes=1), s=2),
            "Bucketing(Krum(...), s=2",
        ),
    ],
)
def test_every_defence_has_a_summary_naming_its_settings(make, named):
    with flwr_log() as records:
        make().summary()
    text = "\n".join(r.getMessage() for r in records)
    assert named in text
    assert text.index(named) < text.index("Sampling:")  # then FedAvg's own summary
