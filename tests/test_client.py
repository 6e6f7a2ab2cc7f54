"""ALIEClient and the ClientApp mod on hand-built instructions."""

import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    EvaluateIns,
    FitIns,
    GetParametersIns,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from flwr_alie import ALIEClient, ALIEConfig, alie_mod, make_alie_mod
from flwr_alie.config import TAG_RECORD_KEY
from tests.flower_helpers import layers_of, metadata, record

GLOBAL = [np.array([1.0, 2.0], np.float32)]


class HonestClient(NumPyClient):
    """A user's client: adds 1 to every weight when it trains."""

    def __init__(self) -> None:
        self.fit_calls = 0

    def get_parameters(self, config):
        return GLOBAL

    def fit(self, parameters, config):
        self.fit_calls += 1
        return [p + 1 for p in parameters], 42, {"loss": 0.25}

    def evaluate(self, parameters, config):
        return 0.5, 42, {"accuracy": 0.9}


def fit_ins():
    return FitIns(ndarrays_to_parameters(GLOBAL), {"server-round": 1})


def test_fit_is_delegated_and_tagged():
    honest = HonestClient()
    client = ALIEClient(honest, partition_id=3).to_client()
    res = client.fit(fit_ins())
    assert honest.fit_calls == 1
    assert res.num_examples == 42
    np.testing.assert_array_equal(parameters_to_ndarrays(res.parameters)[0], [2.0, 3.0])
    assert res.metrics == {
        "loss": 0.25,
        "alie.byzantine": True,
        "alie.skipped-training": False,
        "alie.partition-id": 3,
    }
    assert client.client is honest


def test_skip_training_does_not_train():
    honest = HonestClient()
    res = ALIEClient(honest, skip_training=True).fit(fit_ins())
    assert honest.fit_calls == 0
    assert res.status.code == Code.OK
    np.testing.assert_array_equal(parameters_to_ndarrays(res.parameters)[0], GLOBAL[0])
    assert res.metrics["alie.skipped-training"] is True


def test_everything_else_is_delegated_unchanged():
    client = ALIEClient(HonestClient())
    evaluated = client.evaluate(EvaluateIns(ndarrays_to_parameters(GLOBAL), {}))
    assert (evaluated.loss, evaluated.num_examples) == (0.5, 42)
    assert evaluated.metrics == {"accuracy": 0.9}
    params = client.get_parameters(GetParametersIns({}))
    np.testing.assert_array_equal(
        parameters_to_ndarrays(params.parameters)[0], GLOBAL[0]
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"client": object()}, TypeError, "Client or NumPyClient, got object"),
        ({"partition_id": -1}, ValueError, r"`partition_id` .* got -1"),
        ({"partition_id": True}, ValueError, r"`partition_id` .* got True"),
    ],
)
def test_bad_client_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ALIEClient(kwargs.pop("client", HonestClient()), **kwargs)


# ------------------------------------------------------------------ the mod


def instruction(message_type="train"):
    content = RecordDict(
        {"arrays": record({"w": GLOBAL[0]}), "config": ConfigRecord({"lr": 0.1})}
    )
    return Message(content=content, metadata=metadata(7, message_type))


def context(node_config, run_config=None):
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config or {},
    )


class Trainer:
    """call_next: the ClientApp's train function, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, msg, ctxt):
        self.calls += 1
        trained = {k: v + 1 for k, v in layers_of(msg).items()}
        content = RecordDict(
            {"arrays": record(trained), "metrics": MetricRecord({"num-examples": 42})}
        )
        return Message(content, reply_to=msg)


def test_mod_tags_honest_and_byzantine_nodes():
    mod = make_alie_mod(ALIEConfig(byzantine_ids=(1,), skip_training=False))
    for pid, byzantine in [(0, False), (1, True)]:
        trainer = Trainer()
        reply = mod(instruction(), context({"partition-id": pid}), trainer)
        assert trainer.calls == 1
        assert dict(reply.content[TAG_RECORD_KEY]) == {
            "byzantine": byzantine,
            "partition-id": pid,
            "skipped-training": False,
        }
        np.testing.assert_array_equal(layers_of(reply)["w"], GLOBAL[0] + 1)


def test_mod_skips_training_of_byzantine_nodes_in_oracle_mode():
    trainer = Trainer()
    run_config = {"alie.fraction": 0.5, "alie.seed": 0}
    byzantine = sorted(ALIEConfig(fraction=0.5, seed=0).byzantine_partitions(4))
    ctxt = context({"partition-id": byzantine[0], "num-partitions": 4}, run_config)
    reply = alie_mod(instruction(), ctxt, trainer)
    assert trainer.calls == 0
    assert reply.content[TAG_RECORD_KEY]["skipped-training"] is True
    np.testing.assert_array_equal(layers_of(reply)["w"], GLOBAL[0])
    assert reply.metadata.reply_to_message_id == "msg-7"


def test_mod_passes_other_messages_through():
    trainer = Trainer()
    mod = make_alie_mod(ALIEConfig(byzantine_ids=(0,)))
    reply = mod(instruction("evaluate"), context({"partition-id": 0}), trainer)
    assert trainer.calls == 1
    assert TAG_RECORD_KEY not in reply.content


@pytest.mark.parametrize(
    ("node_config", "run_config", "match"),
    [
        ({}, {"alie.byzantine-ids": "0"}, "no integer `partition-id`.*--node-config"),
        ({"partition-id": 0}, {"alie.fraction": 0.2}, "no integer `num-partitions`"),
        ({"partition-id": 0}, {"alie.zz": 1}, "Unknown run-config key 'alie.zz'"),
    ],
)
def test_mod_returns_an_error_message_instead_of_raising(
    node_config, run_config, match
):
    trainer = Trainer()
    reply = alie_mod(instruction(), context(node_config, run_config), trainer)
    assert reply.has_error()
    assert trainer.calls == 0
    assert re.search(match, reply.error.reason)


def test_mod_takes_alie_keys_of_the_message_over_the_run_config():
    msg = instruction()
    msg.content["config"]["alie.byzantine-ids"] = "7"
    ctxt = context({"partition-id": 7}, {"alie.byzantine-ids": "1"})
    reply = alie_mod(msg, ctxt, Trainer())
    assert reply.content[TAG_RECORD_KEY]["byzantine"] is True


def test_mod_reads_each_messages_own_options_also_when_it_parsed_them_before():
    # the mod keeps the options it parsed by their keys and values: a changed
    # value in the same record is a new parse, and a bad one is an error each time
    ctxt = context({"partition-id": 3}, {"alie.byzantine-ids": "1"})
    msg = instruction()
    seen = []
    for ids in ["3", "1", "3", "1,3", "x", "3"]:
        msg.content["config"]["alie.byzantine-ids"] = ids
        reply = alie_mod(msg, ctxt, Trainer())
        seen.append(
            "error" if reply.has_error() else reply.content[TAG_RECORD_KEY]["byzantine"]
        )
    assert seen == [True, False, True, True, "error", True]
    # the run config's keys count too, and 1 and 1.0 and True are told apart
    for z, expected in [(1, 1.0), (True, "error"), (1.5, 1.5)]:
        assert mod_options(z) == expected


def mod_options(z):
    from flwr_alie.mod import _options

    try:
        return _options(instruction(), context({}, {"alie.z": z})).z
    except (TypeError, ValueError):
        return "error"
