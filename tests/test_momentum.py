import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedMedian

from flwr_alie import ALIEConfig, ALIEStrategy
from flwr_alie.momentum import ServerMomentum
from tests.flower_helpers import StubGrid, flwr_log, record, train_reply

pytestmark = pytest.mark.usefixtures("server_identity")


def round_of(strategy, server_round, global_w, deltas, steps=3):
    global_layers = {"w": np.asarray(global_w, np.float32), "steps": np.array(steps)}
    list(
        strategy.configure_train(
            server_round, record(global_layers), ConfigRecord(), StubGrid(range(2))
        )
    )
    replies = [
        train_reply(
            10 + i,
            {"w": global_layers["w"] + np.asarray(d, np.float32), "steps": np.array(7)},
            10,
        )
        for i, d in enumerate(deltas)
    ]
    return strategy.aggregate_train(server_round, replies)


def test_two_rounds_by_hand_with_the_momentum_buffer():
    opt = ServerMomentum(FedAvg(min_available_nodes=2), lr=0.1, momentum=0.9)
    # round 1: u1 = mean([2, 0], [0, 2]) = [1, 1]; m1 = [1, 1]; w = 0 + 0.1 m1
    arrays, metrics = round_of(opt, 1, [0.0, 0.0], [[2.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(arrays["w"].numpy(), [0.1, 0.1], rtol=1e-6)
    assert int(arrays["steps"].numpy()) == 7  # non-floating: the inner aggregate's
    assert metrics["server.update-norm"] == pytest.approx(np.sqrt(2), rel=1e-6)
    # round 2: u2 = mean([1, 0], [3, 2]) = [2, 1]; m2 = 0.9 [1, 1] + [2, 1]
    arrays, _ = round_of(opt, 2, [0.1, 0.1], [[1.0, 0.0], [3.0, 2.0]])
    np.testing.assert_allclose(arrays["w"].numpy(), [0.1 + 0.29, 0.1 + 0.19], rtol=1e-6)


def test_unit_rate_without_momentum_is_the_inner_aggregate():
    opt = ServerMomentum(FedMedian(min_available_nodes=2))
    arrays, _ = round_of(opt, 1, [5.0, 5.0], [[1.0, -1.0], [3.0, 1.0]])
    np.testing.assert_allclose(arrays["w"].numpy(), [7.0, 5.0])


def test_composes_under_the_attack():
    wrapper = ALIEStrategy(
        ServerMomentum(FedAvg(), lr=0.5), ALIEConfig(z=1.0, device="cpu")
    )
    assert repr(wrapper).startswith("ALIEStrategy(ServerMomentum(FedAvg(...)")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0}, ValueError, "finite `lr` > 0, got 0.0"),
        ({"momentum": -0.1}, ValueError, "finite `momentum` >= 0, got -0.1"),
        ({"lr": True}, TypeError, "`lr` to be a real number, got True"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        ServerMomentum(FedAvg(), **kwargs)


def test_server_momentum_has_a_summary_naming_its_settings():
    with flwr_log() as records:
        ServerMomentum(FedAvg(), lr=0.1, momentum=0.9).summary()
    text = "\n".join(r.getMessage() for r in records)
    assert "ServerMomentum(FedAvg(...), lr=0.1, momentum=0.9)" in text
    assert "Sampling:" in text
