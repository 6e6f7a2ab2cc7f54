"""A hostile client cannot break the server: each fault named, set aside, survived.

Hand-built replies through the public API, real Flower strategies inside: the
Message-API wrapper, the legacy one, and the defences; the torch core's own answer to
such rows beside them.
"""

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum

from flwr_alie import ALIEConfig, ALIELegacyStrategy, ALIEStrategy
from flwr_alie.aggregators import (
    bucketing,
    centered_clipping,
    geometric_median,
    nearest_neighbor_mixing,
)
from flwr_alie.config import draw_byzantine
from flwr_alie.defenses import NNM, Bucketing, CenteredClipping, GeometricMedian
from flwr_alie.evaluation.grid import byzantine_ids, count_for
from flwr_alie.params import parameters_from_layers
from tests.flower_helpers import StubGrid, flwr_log, metadata, record, train_reply

pytestmark = pytest.mark.usefixtures("server_identity")

GLOBAL = {"w": np.array([10.0, 10.0], np.float32), "steps": np.array(4, np.int64)}
HONEST = [[11.0, 10.0], [12.0, 12.0], [13.0, 14.0], [11.5, 11.0]]


@pytest.fixture
def warnings():
    with flwr_log(logging.WARNING) as records:
        yield lambda: [r.getMessage() for r in records]


def _layers(w, dtype=np.float32):
    return {"w": np.array(w, dtype), "steps": np.array(5, np.int64)}


def _round(byzantine=1):
    honest = [
        train_reply(100 + i, _layers(w), 10, partition_id=i, byzantine=False)
        for i, w in enumerate(HONEST)
    ]
    attackers = [
        train_reply(
            200 + j,
            _layers([10.0, 10.0]),
            1,
            partition_id=len(HONEST) + j,
            byzantine=True,
            skipped=True,
        )
        for j in range(byzantine)
    ]
    return honest + attackers


def _wrapped(inner=None, **config):
    wrapper = ALIEStrategy(inner or FedAvg(), ALIEConfig(z=1.0, device="cpu", **config))
    list(wrapper.configure_train(1, record(GLOBAL), ConfigRecord(), StubGrid(range(5))))
    return wrapper


def _replace(replies, i, message):
    replies = list(replies)
    replies[i] = message
    return replies


def _with_content(i, content):
    return Message(content=RecordDict(content), metadata=metadata(100 + i))


def _tag(partition, byzantine=False, skipped=False):
    return ConfigRecord({"byzantine": byzantine, "partition-id": partition,
                         "skipped-training": skipped})  # fmt: skip


# ------------------------------------------------ replies no strategy should see


@pytest.mark.parametrize(
    ("content", "named"),
    [
        # no MetricRecord at all: Flower's FedAvg would raise for the whole round
        ({"arrays": record(_layers([11.0, 10.0])), "alie": _tag(1)},
         "holds 0 MetricRecords"),
        # a second MetricRecord
        ({"arrays": record(_layers([11.0, 10.0])), "alie": _tag(1),
          "metrics": MetricRecord({"num-examples": 10, "loss": 0.5}),
          "more": MetricRecord({"num-examples": 10, "loss": 0.5})},
         "holds 2 MetricRecords"),
        # other metric keys than the round's
        ({"arrays": record(_layers([11.0, 10.0])), "alie": _tag(1),
          "metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5})},
         "metric keys ['accuracy', 'num-examples'] differ from the round's"),
        # arrays of another dtype than the global model's
        ({"arrays": record(_layers([11.0, 10.0], np.float64)), "alie": _tag(1),
          "metrics": MetricRecord({"num-examples": 10, "loss": 0.5})},
         "array 'w' has dtype float64, the global model's has dtype float32"),
        # a tag that is not a bool, a partition id that is not a non-negative int
        ({"arrays": record(_layers([11.0, 10.0])),
          "alie": ConfigRecord({"byzantine": "false", "partition-id": 1}),
          "metrics": MetricRecord({"num-examples": 10, "loss": 0.5})},
         "its tag's 'byzantine' is 'false', not a bool"),
        ({"arrays": record(_layers([11.0, 10.0])),
          "alie": ConfigRecord({"byzantine": False, "partition-id": -1}),
          "metrics": MetricRecord({"num-examples": 10, "loss": 0.5})},
         "its tag's 'partition-id' is -1, not an int >= 0"),
    ],
)  # fmt: skip
def test_a_malformed_reply_is_named_set_aside_and_the_round_aggregates_the_rest(
    content, named, warnings
):
    replies = _replace(_round(), 1, _with_content(1, content))
    arrays, metrics = _wrapped(FedMedian()).aggregate_train(1, replies)
    assert metrics["alie.num-rejected"] == 1
    assert metrics["alie.attacked"] == 1
    assert metrics["alie.num-honest"] == 3  # the other honest replies
    assert arrays["w"].numpy().dtype == np.float32  # the model keeps its dtype
    assert np.all(np.isfinite(arrays["w"].numpy()))
    (line,) = [m for m in warnings() if "goes on as a failure" in m]
    assert "node 101" in line
    assert named in line


@pytest.mark.parametrize("count", [math.nan, math.inf, -5, 0])
def test_a_sample_count_that_is_not_a_finite_positive_number_is_set_aside(
    count, warnings
):
    bad = train_reply(101, _layers([900.0, 900.0]), count, partition_id=1,
                      byzantine=False)  # fmt: skip
    replies = _replace(_round(), 1, bad)
    arrays, metrics = _wrapped().aggregate_train(1, replies)
    assert metrics["alie.num-rejected"] == 1
    assert np.all(arrays["w"].numpy() < 20)  # FedAvg's weights not wrecked
    assert any(f"its sample count is {float(count)!r}" in m for m in warnings())


def test_the_legacy_api_sets_the_same_replies_aside(warnings):
    manager = SimpleClientManager()

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    for cid in ("a", "b"):
        manager.register(Proxy(cid))
    wrapper = ALIELegacyStrategy(LegacyFedAvg(), ALIEConfig(z=1.0, device="cpu"))
    wrapper.configure_fit(1, parameters_from_layers({"0": GLOBAL["w"]}), manager)

    def fit(w, n, **metrics):
        parameters = parameters_from_layers({"0": np.array(w, np.float32)})
        return FitRes(Status(Code.OK, ""), parameters, n, {"loss": 0.5, **metrics})

    results = [(Proxy(str(i)), fit(w, 10)) for i, w in enumerate(HONEST)]
    results[1] = (Proxy("1"), fit([900.0, 900.0], -3))  # a negative count
    results[2] = (Proxy("2"), fit(HONEST[2], 10, **{"alie.byzantine": "yes"}))
    results.append((Proxy("9"), fit([10.0, 10.0], 1, **{"alie.byzantine": True})))
    _parameters, metrics = wrapper.aggregate_fit(1, results, [])
    assert metrics["alie.num-rejected"] == 2
    assert metrics["alie.attacked"] == 1
    lines = [m for m in warnings() if "goes on as a failure" in m]
    assert any("client 1" in m and "sample count is -3.0" in m for m in lines)
    assert any("client 2" in m and "'alie.byzantine' is 'yes'" in m for m in lines)


def test_a_second_reply_of_one_partition_is_set_aside(warnings):
    replies = _round()
    twin = train_reply(150, _layers([50.0, 50.0]), 10, partition_id=2, byzantine=False)
    _, metrics = _wrapped().aggregate_train(1, [*replies, twin])
    assert metrics["alie.num-rejected"] == 1
    assert metrics["alie.num-honest"] == 4
    assert any("a second reply of partition 2" in m for m in warnings())


def test_a_byzantine_claim_outside_the_expected_ids_warns_and_is_counted(warnings):
    replies = _round()  # partition 4 claims to be Byzantine
    _, metrics = _wrapped(byzantine_ids=(3,)).aggregate_train(1, replies)
    assert metrics["alie.num-unexpected-byzantine"] == 1
    assert metrics["alie.num-missing-byzantine"] == 1  # 3 never replied
    text = " ".join(warnings())
    assert "partitions 4 claim to be Byzantine but are not among the expected [3]" in (
        text
    )
    assert "no reply from 1 of the 1 Byzantine partitions: 3" in text


def test_fewer_replies_than_the_strategy_needs_warn_and_are_reported(warnings):
    replies = _round()[:2] + _round()[-1:]  # 3 replies reach Krum(f = 1): needs 5
    _, metrics = _wrapped(Krum(num_malicious_nodes=1)).aggregate_train(1, replies)
    assert metrics["alie.below-limit"] == 1
    assert any(
        "3 replies reach Krum: Krum needs n >= 2 * num_malicious_nodes + 3 = 5" in m
        for m in warnings()
    )
    _, metrics = _wrapped(Krum(num_malicious_nodes=1)).aggregate_train(1, _round())
    assert metrics["alie.below-limit"] == 0


# ------------------------------------------------ the attack's own statistics


def test_an_honest_update_that_overflows_the_statistics_stops_the_attack(warnings):
    huge = train_reply(101, _layers([1e38, -1e38]), 10, partition_id=1,
                       byzantine=False)  # fmt: skip
    inner = FedMedian()
    arrays, metrics = _wrapped(inner).aggregate_train(1, _replace(_round(), 1, huge))
    assert metrics["alie.attacked"] == 0
    assert metrics["alie.skip-reason"] == 7
    assert np.all(np.isfinite(arrays["w"].numpy()))  # nothing -inf was crafted
    (line,) = [m for m in warnings() if "overflow" in m]
    assert "partition 1 (node 101) (max |value| 1e+38)" in line
    assert "non-finite values in 0" not in " ".join(warnings())


def test_a_nan_honest_update_is_left_out_of_the_statistics_and_named(warnings):
    nan = train_reply(101, _layers([math.nan, 1.0]), 10, partition_id=1,
                      byzantine=False)  # fmt: skip
    _, metrics = _wrapped().aggregate_train(1, _replace(_round(), 1, nan))
    assert metrics["alie.attacked"] == 1
    assert metrics["alie.num-non-finite"] == 1
    assert math.isfinite(metrics["alie.distance"])
    assert any("non-finite values in 1 honest update(s): partition 1 (node 101) "
               "(1 values)" in m for m in warnings())  # fmt: skip


# ------------------------------------------------------------------ defences

_BAD_ROWS = {
    "nan": [math.nan, 1.0],
    "inf": [math.inf, 1.0],
    "huge": [1e38, 1e38],
}


def _defence_replies(bad):
    # no two distances from one update tie: NNM's neighbours are the same in any
    # order of summation
    updates = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.9], [0.5, 0.4], [0.2, 0.8], bad]
    return [
        train_reply(
            100 + i,
            {
                "w": GLOBAL["w"] + np.asarray(u, np.float32),
                "steps": np.array(5, np.int64),
            },
            10,
        )
        for i, u in enumerate(updates)
    ], np.asarray(updates[:-1], np.float64)


def _configured(strategy):
    list(
        strategy.configure_train(1, record(GLOBAL), ConfigRecord(), StubGrid(range(6)))
    )
    return strategy


@pytest.mark.parametrize("bad", sorted(_BAD_ROWS))
@pytest.mark.parametrize(
    ("make", "prefix", "reference"),
    [
        (lambda: GeometricMedian(min_available_nodes=5), "gm",
         lambda x: geometric_median(torch.tensor(x), nu=1e-6, iterations=100,
                                    tol=1e-6)),
        (lambda: CenteredClipping(tau=1.0, min_available_nodes=5), "cc",
         lambda x: centered_clipping(torch.tensor(x), center=torch.zeros(2,
                                     dtype=torch.float64), tau=1.0)),
        (lambda: NNM(FedAvg(min_available_nodes=5), f=1), "nnm",
         lambda x: nearest_neighbor_mixing(torch.tensor(x), f=1).mean(0)),
    ],
)  # fmt: skip
def test_a_defence_sets_a_broken_update_aside_and_aggregates_the_others(
    make, prefix, reference, bad, warnings
):
    replies, finite = _defence_replies(_BAD_ROWS[bad])
    arrays, metrics = _configured(make()).aggregate_train(1, replies)
    assert metrics[f"{prefix}.num-rejected"] == 1
    expected = GLOBAL["w"].astype(np.float64) + reference(finite).numpy()
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5, atol=1e-5)
    (line,) = [m for m in warnings() if "goes on as a failure" in m]
    assert "node 105" in line
    assert ("overflows float32" if bad == "huge" else "NaN or inf") in line


def test_bucketing_sets_a_broken_update_aside(warnings):
    replies, _ = _defence_replies(_BAD_ROWS["nan"])
    strategy = _configured(Bucketing(FedAvg(min_available_nodes=1), s=2))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["bucketing.num-rejected"] == 1
    assert metrics["bucketing.buckets"] == 3  # ceil(5 / 2)
    assert np.all(np.isfinite(arrays["w"].numpy()))


def test_a_defence_sets_aside_what_validation_refuses(warnings):
    replies, _ = _defence_replies([0.0, 0.0])
    replies[2] = train_reply(102, _layers([11.0, 10.0], np.float64), 10)
    _arrays, metrics = _configured(GeometricMedian()).aggregate_train(1, replies)
    assert metrics["gm.num-rejected"] == 1
    (line,) = [m for m in warnings() if "node 102" in m and "dtype float64" in m]
    assert line.startswith("GeometricMedian round 1: ")  # the defence, not ALIE


@pytest.mark.parametrize("bad", sorted(_BAD_ROWS))
@pytest.mark.parametrize(
    "call",
    [
        lambda x: geometric_median(x),
        lambda x: centered_clipping(x, center=torch.zeros(2), tau=1.0),
        lambda x: nearest_neighbor_mixing(x, f=1),
        lambda x: bucketing(x, s=2, generator=torch.Generator().manual_seed(0)),
    ],
)
def test_the_core_refuses_broken_rows_naming_them(call, bad):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], _BAD_ROWS[bad], [1.0, 1.0]])
    what = "hold values up to 1e\\+38: their squares" if bad == "huge" else "hold NaN"
    with pytest.raises(ValueError, match=rf"rows \[2\] {what}"):
        call(x)


# ------------------------------------------------------ one draw of the ids


def test_the_mod_and_the_evaluation_draw_the_same_byzantine_partitions():
    for n in range(3, 501):
        for fraction in (0.1, 0.2, 0.24, 0.3, 0.45):
            try:
                count = count_for(fraction, n)
            except ValueError:
                continue  # no valid count: nothing to compare
            for seed in (0, 1, 2):
                config = ALIEConfig(fraction=fraction, seed=seed)
                assert config.byzantine_partitions(n) == frozenset(
                    byzantine_ids(seed, n, count)
                ), (n, fraction, seed)
    assert draw_byzantine(200, 20, 0) == byzantine_ids(0, 200, 20)
