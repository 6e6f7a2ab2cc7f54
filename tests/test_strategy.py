"""The server-side wrappers on hand-built replies, real Flower strategies inside."""

import logging
import math
import random

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common import Code, FitRes, Status
from flwr.server import strategy as legacy
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from flwr_alie import (
    ALIEConfig,
    ALIELegacyStrategy,
    ALIEStrategy,
    Direction,
    check_setup,
)
from flwr_alie.params import parameters_from_layers
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

GLOBAL = {"w": np.array([10.0, 10.0], np.float32), "steps": np.array(5, np.int64)}
HONEST = [[11.0, 10.0], [12.0, 12.0], [13.0, 14.0]]
# deltas [1,0] [2,2] [3,4]: mu = [2, 2], population sigma = [sqrt(2/3), sqrt(8/3)]
CRAFTED_Z1 = np.array([12 - math.sqrt(2 / 3), 12 - math.sqrt(8 / 3)], np.float32)


@pytest.fixture
def flwr_warnings():
    """Collect what flwr-alie logs through Flower's logger."""
    with flwr_log(logging.WARNING) as records:
        yield records


def layers(w, steps=5):
    return {"w": np.array(w, np.float32), "steps": np.array(steps, np.int64)}


def golden_round(weights=(10, 20, 30)):
    honest = [
        train_reply(100 + i, layers(w, steps=6 + i), n, partition_id=i, byzantine=False)
        for i, (w, n) in enumerate(zip(HONEST, weights, strict=True))
    ]
    byzantine = [
        train_reply(
            200 + j,
            layers([10.0, 10.0], steps=9),
            1,
            partition_id=3 + j,
            byzantine=True,
            skipped=True,
            loss=9.0,
        )
        for j in range(2)
    ]
    return honest, byzantine


def configured(wrapper, server_round=1):
    messages = list(
        wrapper.configure_train(
            server_round, record(GLOBAL), ConfigRecord(), StubGrid(range(5))
        )
    )
    assert len(messages) == 5
    return wrapper


def test_golden_round_with_fedavg():
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    arrays, metrics = wrapper.aggregate_train(1, honest + byzantine)

    received = inner.received
    assert [r["node"] for r in received] == [100, 101, 102, 200, 201]
    assert all(r["records"] == ["arrays", "metrics"] for r in received)  # tags gone
    for r, w in zip(received[:3], HONEST, strict=True):
        np.testing.assert_array_equal(r["layers"]["w"], np.array(w, np.float32))
    for r in received[3:]:
        np.testing.assert_allclose(r["layers"]["w"], CRAFTED_Z1, rtol=1e-6)
        assert r["layers"]["w"].dtype == np.float32
        assert r["layers"]["steps"] == 9  # non-floating: as the node sent it
        # a skipper claims the metrics of the honest reply with the median weight
        assert r["metrics"] == {"num-examples": 20, "loss": 0.5}

    weights = np.array([10, 20, 30, 20, 20], np.float64)
    rows = np.array([*HONEST, CRAFTED_Z1, CRAFTED_Z1], np.float64)
    expected = (weights[:, None] * rows).sum(0) / weights.sum()
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["alie.attacked"] == 1
    assert metrics["alie.z"] == 1.0
    assert metrics["alie.num-honest"] == 3
    assert metrics["alie.num-byzantine"] == 2
    assert metrics["alie.distance-sigma"] == pytest.approx(1.0, rel=1e-6)
    assert metrics["alie.distance"] == pytest.approx(math.sqrt(2 / 3 + 8 / 3), rel=1e-6)
    # the FedAvg aggregate, as a delta, against the crafted delta and the honest mean
    spread = math.sqrt(2 / 3 + 8 / 3)
    aggregate = expected - 10.0
    crafted = CRAFTED_Z1.astype(np.float64) - 10.0
    assert metrics["alie.aggregate-to-crafted"] == pytest.approx(
        np.linalg.norm(aggregate - crafted) / spread, rel=1e-5
    )
    assert metrics["alie.aggregate-to-mean"] == pytest.approx(
        np.linalg.norm(aggregate - 2.0) / spread, rel=1e-5
    )
    assert metrics["alie.seconds"] > 0


@pytest.mark.parametrize("direction", list(Direction))
def test_z_max_and_directions(direction):
    inner = RecordingFedAvg()
    wrapper = configured(
        ALIEStrategy(inner, ALIEConfig(z="max", direction=direction, device="cpu"))
    )
    honest, byzantine = golden_round()
    _, metrics = wrapper.aggregate_train(1, honest + byzantine)
    # n = 5, f = 2, h = 3: s = 1, z_max = Phi^{-1}(2/3)
    z = 0.4307272992954576
    assert metrics["alie.z"] == pytest.approx(z, abs=1e-12)
    sign = 1.0 if direction is Direction.POSITIVE else -1.0
    expected = 12 + sign * z * np.array([math.sqrt(2 / 3), math.sqrt(8 / 3)])
    np.testing.assert_allclose(inner.received[3]["layers"]["w"], expected, rtol=1e-6)


def test_reply_order_does_not_change_the_result():
    results = []
    for seed in range(4):
        inner = RecordingFedAvg()
        wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.5, device="cpu")))
        honest, byzantine = golden_round()
        replies = honest + byzantine
        random.Random(seed).shuffle(replies)
        arrays, _ = wrapper.aggregate_train(1, replies)
        results.append(
            ([r["node"] for r in inner.received], arrays["w"].numpy().tobytes())
        )
    assert all(r == results[0] for r in results)


def test_honest_replies_are_not_modified():
    wrapper = configured(ALIEStrategy(FedAvg(), ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    before = [(sorted(m.content.keys()), layers_of(m)) for m in honest + byzantine]
    wrapper.aggregate_train(1, honest + byzantine)
    after = [(sorted(m.content.keys()), layers_of(m)) for m in honest + byzantine]
    for (k0, l0), (k1, l1) in zip(before, after, strict=True):
        assert k0 == k1
        assert all(np.array_equal(l0[k], l1[k]) for k in l0)


def test_error_replies_pass_through_and_the_rest_are_attacked():
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    failed = error_reply(999)
    arrays, metrics = wrapper.aggregate_train(1, [failed, *honest, *byzantine])
    assert inner.received[-1]["error"]
    assert inner.received[-1]["node"] == 999
    assert metrics["alie.num-honest"] == 3
    np.testing.assert_allclose(inner.received[3]["layers"]["w"], CRAFTED_Z1, rtol=1e-6)
    assert arrays is not None


def test_round_without_honest_replies_is_logged_and_survived(flwr_warnings):
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    _, byzantine = golden_round()
    arrays, metrics = wrapper.aggregate_train(1, byzantine)
    assert metrics["alie.attacked"] == 0
    assert metrics["alie.skip-reason"] == 3
    assert any("no honest reply" in r.getMessage() for r in flwr_warnings)
    # they skipped training: the global model, no update; not fed to the strategy
    # at a typical weight but handed on as failures
    assert [r["error"] for r in inner.received] == [True, True]
    assert arrays is None


def test_expected_byzantine_partitions_that_do_not_reply_are_named(flwr_warnings):
    inner = RecordingFedAvg()
    wrapper = configured(
        ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu", byzantine_ids=(3, 4, 7)))
    )
    honest, byzantine = golden_round()  # Byzantine partitions 3 and 4 reply
    _, metrics = wrapper.aggregate_train(1, honest + byzantine)
    assert metrics["alie.num-missing-byzantine"] == 1
    assert metrics["alie.attacked"] == 1
    assert any(
        "no reply from 1 of the 3 Byzantine partitions: 7" in r.getMessage()
        for r in flwr_warnings
    )


def test_z_max_without_a_valid_factor_is_logged_and_survived(flwr_warnings):
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z="max", device="cpu")))
    honest, byzantine = golden_round()
    more_honest = [
        train_reply(
            300 + i, layers([11.0, 11.0]), 10, partition_id=10 + i, byzantine=False
        )
        for i in range(6)
    ]
    # n = 10, f = 1: (h - s) / h = 4/9 < 1/2
    _, metrics = wrapper.aggregate_train(1, honest + more_honest + byzantine[:1])
    assert metrics["alie.attacked"] == 0
    messages = [r.getMessage() for r in flwr_warnings]
    assert any("h = 9 honest, f = 1" in m and "0.4444" in m for m in messages)


def test_mismatched_arrays_name_the_node_and_key(flwr_warnings):
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    honest[1] = train_reply(
        101,
        {"w": np.zeros(3, np.float32), "steps": np.array(1)},
        10,
        partition_id=1,
        byzantine=False,
    )
    # the malformed reply reaches FedAvg as a failure; the round goes on, attacked
    # with the statistics of the two other honest replies
    arrays, metrics = wrapper.aggregate_train(1, honest + byzantine)
    messages = [r.getMessage() for r in flwr_warnings]
    assert any(
        "partition 1 (node 101): array 'w' has shape (3,)" in m for m in messages
    )
    assert metrics["alie.attacked"] == 1
    assert metrics["alie.num-honest"] == 2
    failed = [r for r in inner.received if r["error"]]
    assert [r["node"] for r in failed] == [101]
    assert np.all(np.isfinite(arrays["w"].numpy()))


def test_non_finite_honest_updates_are_named_and_left_out_of_the_statistics(
    flwr_warnings,
):
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    honest[2] = train_reply(
        102,
        {"w": np.array([np.nan, np.inf], np.float32), "steps": np.array(1)},
        10,
        partition_id=2,
        byzantine=False,
    )
    _, metrics = wrapper.aggregate_train(1, honest + byzantine)
    messages = [r.getMessage() for r in flwr_warnings]
    assert any(
        "non-finite values in 1 honest update(s): partition 2 (node 102) (2 values)"
        in m
        for m in messages
    )
    assert metrics["alie.attacked"] == 1
    assert metrics["alie.num-non-finite"] == 1
    # statistics of the finite deltas [1, 0] and [2, 2]: mu [1.5, 1], sigma [.5, 1]
    crafted = [r for r in inner.received if r["node"] >= 200]
    for r in crafted:
        np.testing.assert_allclose(r["layers"]["w"], [10 + 1.5 - 0.5, 10 + 1 - 1])


def test_a_round_without_finite_statistics_goes_on_unattacked(flwr_warnings):
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    honest = [
        train_reply(
            100 + i,
            {"w": np.array([np.nan, 1.0], np.float32), "steps": np.array(1)},
            10,
            partition_id=i,
            byzantine=False,
        )
        for i in range(3)
    ]
    _, metrics = wrapper.aggregate_train(1, honest + byzantine)
    assert metrics["alie.attacked"] == 0
    assert metrics["alie.skip-reason"] == 7
    assert any("no honest update is finite" in r.getMessage() for r in flwr_warnings)


def test_every_round_says_why_it_was_or_was_not_attacked():
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    assert wrapper.aggregate_train(1, honest + byzantine)[1]["alie.skip-reason"] == 0
    configured(wrapper, server_round=2)
    assert wrapper.aggregate_train(2, honest)[1]["alie.skip-reason"] == 1
    configured(wrapper, server_round=3)
    assert wrapper.aggregate_train(3, byzantine)[1]["alie.skip-reason"] == 3
    # a round whose global model was never seen
    assert wrapper.aggregate_train(9, honest + byzantine)[1]["alie.skip-reason"] == 2


def test_untagged_round_is_passed_through_unchanged():
    inner = RecordingFedAvg()
    wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
    replies = [train_reply(i, layers(w), 10) for i, w in enumerate(HONEST)]
    arrays, metrics = wrapper.aggregate_train(1, replies)
    assert metrics["alie.num-byzantine"] == 0
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(HONEST, axis=0), rtol=1e-6)


def test_attack_needs_the_global_model_of_the_round(flwr_warnings):
    wrapper = configured(
        ALIEStrategy(RecordingFedAvg(), ALIEConfig(z=1.0, device="cpu")), 1
    )
    honest, byzantine = golden_round()
    _, metrics = wrapper.aggregate_train(2, honest + byzantine)
    assert metrics["alie.attacked"] == 0
    assert any("configure_train" in r.getMessage() for r in flwr_warnings)


def test_krum_selects_the_crafted_update():
    rng = np.random.default_rng(0)
    global_w = rng.normal(size=50).astype(np.float32)
    honest_w = global_w + rng.normal(0.0, 0.1, size=(8, 50)).astype(np.float32)
    replies = [
        train_reply(i, {"w": honest_w[i]}, 10, partition_id=i, byzantine=False)
        for i in range(8)
    ] + [
        train_reply(
            8 + j, {"w": global_w}, 10, partition_id=8 + j, byzantine=True, skipped=True
        )
        for j in range(2)
    ]
    wrapper = ALIEStrategy(Krum(num_malicious_nodes=2), ALIEConfig(z=0.5, device="cpu"))
    wrapper.configure_train(
        1, record({"w": global_w}), ConfigRecord(), StubGrid(range(10))
    )
    arrays, metrics = wrapper.aggregate_train(1, replies)
    assert metrics["alie.aggregate-to-crafted"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["alie.aggregate-to-mean"] == pytest.approx(0.5, rel=1e-5)
    deltas = honest_w.astype(np.float64) - global_w
    crafted = global_w + deltas.mean(0) - 0.5 * deltas.std(0)
    np.testing.assert_allclose(arrays["w"].numpy(), crafted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        FedMedian,
        lambda: FedTrimmedAvg(beta=0.2),
        lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
        lambda: Bulyan(num_malicious_nodes=0),
    ],
)
def test_robust_strategies_that_consume_replies_still_aggregate(make):
    wrapper = configured(ALIEStrategy(make(), ALIEConfig(z=1.0, device="cpu")))
    honest, byzantine = golden_round()
    arrays, metrics = wrapper.aggregate_train(1, honest + byzantine)
    assert arrays is not None
    assert metrics["alie.attacked"] == 1
    if isinstance(wrapper.strategy, FedMedian):
        # first coordinate: the median of 11, 12, 13, c, c
        w = sorted([11.0, 12.0, 13.0, CRAFTED_Z1[0], CRAFTED_Z1[0]])[2]
        assert arrays["w"].numpy()[0] == pytest.approx(w, rel=1e-6)


def test_summary_logs_settings_then_the_inner_summary(caplog):
    with flwr_log() as records:
        ALIEStrategy(
            Krum(num_malicious_nodes=2), ALIEConfig(z=1.5, device="cpu")
        ).summary()
    text = [r.getMessage() for r in records]
    alie_line = next(i for i, t in enumerate(text) if "ALIE attack" in t)
    krum_line = next(i for i, t in enumerate(text) if "Krum settings" in t)
    assert alie_line < krum_line
    assert any("z: 1.5" in t for t in text)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"z": -1.0}, ValueError, r"Expected `z` >= 0, got -1.0"),
        ({"z": "min"}, TypeError, r"got 'min'"),
        ({"direction": "negative"}, TypeError, r"`direction` to be a Direction"),
        ({"knowledge": "all"}, ValueError, r"`knowledge` in .*'all'"),
        ({"device": "nodevice"}, ValueError, r"`device` .*'nodevice'"),
    ],
)
def test_bad_wrapper_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        ALIEStrategy(FedAvg(), ALIEConfig(**kwargs))


def test_the_options_are_one_object():
    with pytest.raises(TypeError, match=r"`config` to be an ALIEConfig, got dict"):
        ALIEStrategy(FedAvg(), {"z": 1.0})


def test_wrappers_refuse_the_other_api():
    with pytest.raises(TypeError, match="wrap legacy strategies in ALIELegacyStrategy"):
        ALIEStrategy(LegacyFedAvg())
    with pytest.raises(TypeError, match="wrap Message-API strategies in ALIEStrategy"):
        ALIELegacyStrategy(FedAvg())


# ------------------------------------------------------------------ legacy API


class _Proxy(ClientProxy):
    def get_properties(self, *args, **kwargs):
        raise NotImplementedError

    def get_parameters(self, *args, **kwargs):
        raise NotImplementedError

    def fit(self, *args, **kwargs):
        raise NotImplementedError

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError

    def reconnect(self, *args, **kwargs):
        raise NotImplementedError


class _RecordingLegacyFedAvg(LegacyFedAvg):
    def aggregate_fit(self, server_round, results, failures):
        self.received = [(p.cid, r) for p, r in results]
        return super().aggregate_fit(server_round, results, failures)


def fitres(w, n, **tags):
    metrics = {"loss": 0.5, **{f"alie.{k}": v for k, v in tags.items()}}
    return FitRes(Status(Code.OK, ""), parameters_from_layers(layers(w)), n, metrics)


def test_legacy_golden_round():
    inner = _RecordingLegacyFedAvg()
    wrapper = ALIELegacyStrategy(inner, ALIEConfig(z=1.0, device="cpu"))
    _remembered(wrapper, 1, {"0": GLOBAL["w"], "1": GLOBAL["steps"]})
    results = [(_Proxy(str(i)), fitres(w, 10)) for i, w in enumerate(HONEST)]
    results += [
        (
            _Proxy(str(10 + j)),
            FitRes(
                Status(Code.OK, ""),
                parameters_from_layers(layers([10, 10], 9)),
                1,
                {
                    "alie.byzantine": True,
                    "alie.skipped-training": True,
                    "alie.partition-id": j,
                },
            ),
        )
        for j in range(2)
    ]
    random.Random(1).shuffle(results)
    parameters, metrics = wrapper.aggregate_fit(1, results, [])
    from flwr.common import parameters_to_ndarrays

    # tagged (Byzantine) replies first in partition order, then the others by cid
    assert [cid for cid, _ in inner.received] == ["10", "11", "0", "1", "2"]
    for _, res in inner.received[:2]:
        w, steps = parameters_to_ndarrays(res.parameters)
        np.testing.assert_allclose(w, CRAFTED_Z1, rtol=1e-6)
        assert steps == 9
        assert res.num_examples == 10
        assert res.metrics == {"loss": 0.5}
    expected = np.mean([*HONEST, CRAFTED_Z1, CRAFTED_Z1], axis=0)
    np.testing.assert_allclose(
        parameters_to_ndarrays(parameters)[0], expected, rtol=1e-6
    )
    assert metrics["alie.attacked"] == 1
    assert metrics["alie.distance-sigma"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        # median of the first coordinate: 11, 12, 13, c, c with c < 12
        (legacy.FedMedian, lambda c: sorted([11.0, 12.0, 13.0, c, c])[2]),
        # trim one from each end of 11, 12, 13, c, c, then average
        (lambda: legacy.FedTrimmedAvg(beta=0.2), lambda c: (c + c + 12.0) / 3),
        # Krum: the two identical crafted updates are each other's nearest neighbour
        (lambda: legacy.Krum(num_malicious_clients=1), lambda c: c),
        # legacy Bulyan passes its extra keywords to its first rule, Krum
        (lambda: legacy.Bulyan(num_malicious_clients=0, to_keep=0), None),
    ],
)
def test_legacy_robust_strategies_aggregate_the_crafted_updates(make, expected):
    from flwr.common import parameters_to_ndarrays

    wrapper = ALIELegacyStrategy(make(), ALIEConfig(z=1.0, device="cpu"))
    _remembered(wrapper, 1, {"0": GLOBAL["w"], "1": GLOBAL["steps"]})
    results = [(_Proxy(str(i)), fitres(w, 10)) for i, w in enumerate(HONEST)]
    results += [
        (
            _Proxy(str(10 + j)),
            fitres([10.0, 10.0], 1, byzantine=True, **{"skipped-training": True}),
        )
        for j in range(2)
    ]
    parameters, metrics = wrapper.aggregate_fit(1, results, [])
    assert metrics["alie.attacked"] == 1
    w = parameters_to_ndarrays(parameters)[0]
    if expected is not None:
        c = float(CRAFTED_Z1[0])
        assert w[0] == pytest.approx(expected(c), rel=1e-6)


def _remembered(wrapper, server_round, global_layers):
    """Let `wrapper` see the round's global model, as configure_fit shows it."""
    from flwr.server.client_manager import SimpleClientManager

    manager = SimpleClientManager()
    for cid in ("a", "b"):
        manager.register(_Proxy(cid))
    parameters = parameters_from_layers(global_layers)
    return wrapper.configure_fit(server_round, parameters, manager)


def test_legacy_configure_fit_remembers_the_global_model():
    wrapper = ALIELegacyStrategy(LegacyFedAvg(), ALIEConfig(z=1.0, device="cpu"))
    instructions = _remembered(wrapper, 3, {"0": GLOBAL["w"], "1": GLOBAL["steps"]})
    assert sorted(proxy.cid for proxy, _ in instructions) == ["a", "b"]
    results = [(_Proxy(str(i)), fitres(w, 10)) for i, w in enumerate(HONEST)]
    byzantine = fitres(HONEST[0], 10, byzantine=True, **{"partition-id": 9})
    results.append((_Proxy("9"), byzantine))
    _, other_round = wrapper.aggregate_fit(2, results, [])
    assert other_round["alie.skip-reason"] == 2  # no global model of round 2
    _, this_round = wrapper.aggregate_fit(3, results, [])
    assert this_round["alie.attacked"] == 1


# ------------------------------------------------------------------ setup checks


@pytest.mark.parametrize(
    ("strategy", "n", "f", "expected"),
    [
        (
            Bulyan(num_malicious_nodes=2),
            10,
            2,
            ["Bulyan needs n >= 4 * num_malicious_nodes + 3 = 11"],
        ),
        (Bulyan(num_malicious_nodes=2), 11, 2, []),
        (
            Krum(num_malicious_nodes=4),
            10,
            4,
            ["Krum needs n >= 2 * num_malicious_nodes + 3 = 11"],
        ),
        (Krum(num_malicious_nodes=2), 10, 2, []),
        (
            FedAvg(),
            10,
            1,
            ["No non-negative ALIE factor for n = 10 workers with f = 1"],
        ),
        (ALIEStrategy(FedAvg()), 10, 3, []),
    ],
)
def test_check_setup(strategy, n, f, expected):
    problems = check_setup(strategy, num_nodes=n, num_byzantine=f)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start)


def test_a_round_leaves_torchs_threads_as_the_caller_set_them():
    # a library call changes no process-wide setting: a ServerApp that shares its
    # cores with clients sets torch.set_num_threads(1) itself (the evaluation does)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inner = RecordingFedAvg()
        wrapper = configured(ALIEStrategy(inner, ALIEConfig(z=1.0, device="cpu")))
        honest, byzantine = golden_round()
        _, metrics = wrapper.aggregate_train(1, honest + byzantine)
        assert metrics["alie.attacked"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
