"""The ClientApp mod that marks a node Byzantine for ALIE.

Baruch, Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019. The crafted update
needs the statistics of the round's honest updates, which the server-side wrapper
(:class:`flwr_alie.ALIEStrategy`) computes; the client side only tags a Byzantine
node's train reply (and may skip its local training when its own update is not
needed). The mod decides from the node's ``partition-id`` whether the node is
Byzantine.
"""

from __future__ import annotations

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from flwr_alie.config import (
    RUN_CONFIG_PREFIX,
    SKIPPED_WEIGHT,
    TAG_BYZANTINE,
    TAG_PARTITION_ID,
    TAG_RECORD_KEY,
    TAG_SKIPPED_TRAINING,
    ALIEConfig,
)
from flwr_alie.params import record_from_layers

__all__ = ["alie_mod", "make_alie_mod"]


def make_alie_mod(config: ALIEConfig | None = None) -> Mod:
    """Build a ClientApp mod that makes the chosen nodes Byzantine.

    Use as ``ClientApp(mods=[make_alie_mod()])``. On a train message, the mod reads
    the node's ``partition-id`` (and ``num-partitions`` when the Byzantine nodes
    are drawn by fraction) from ``node_config``, decides with
    :meth:`ALIEConfig.byzantine_partitions` whether the node is Byzantine, and adds
    a ``ConfigRecord`` under ``"alie"`` to the reply: ``byzantine``,
    ``partition-id`` (the order of replies on the server) and
    ``skipped-training``. A Byzantine node that skips training replies with the
    global arrays at once. Other messages pass through untouched.

    Parameters
    ----------
    config : ALIEConfig, optional
        The options; ``None`` parses the ``alie.*`` keys of the run config, over
        which ``alie.*`` keys in the train message's ConfigRecords take precedence
        (so that a ServerApp can change the attack from round to round, as the
        evaluation does for each cell of its grid).

    Returns
    -------
    Mod
        ``(message, context, call_next) -> Message``. It never raises into
        Flower's pipeline: a setup problem comes back as an error Message whose
        reason says how to fix it.
    """

    def alie_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        try:
            options = config if config is not None else _options(msg, ctxt)
            partition_id, num_partitions = _partition(ctxt, options)
        except (TypeError, ValueError) as err:
            return _error_reply(msg, f"alie_mod: {err}")
        byzantine = partition_id in options.byzantine_partitions(num_partitions)
        skipped = byzantine and options.skips_training
        tag = ConfigRecord(
            {
                TAG_BYZANTINE: byzantine,
                TAG_PARTITION_ID: partition_id,
                TAG_SKIPPED_TRAINING: skipped,
            }
        )
        if skipped:
            arrays = list(msg.content.array_records.items())
            if len(arrays) != 1:
                return _error_reply(
                    msg,
                    "alie_mod: expected one ArrayRecord in the train message, got "
                    f"{len(arrays)}",
                )
            key, record = arrays[0]
            content = RecordDict(
                {
                    key: record_from_layers({}, base=record),
                    "metrics": MetricRecord({"num-examples": SKIPPED_WEIGHT}),
                    TAG_RECORD_KEY: tag,
                }
            )
            return Message(content, reply_to=msg)
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        if TAG_RECORD_KEY in reply.content:
            return _error_reply(
                msg,
                f"alie_mod: the train reply already holds a record {TAG_RECORD_KEY!r}; "
                "use the ALIE mod once, and do not name a record of your own so",
            )
        reply.content[TAG_RECORD_KEY] = tag
        return reply

    return alie_mod


alie_mod: Mod = make_alie_mod()
"""The ALIE mod with options parsed from each run's ``alie.*`` run-config keys."""


def _options(msg: Message, ctxt: Context) -> ALIEConfig:
    """Parse the run config's ``alie.*`` keys, overridden by the message's own.

    Parsed options are kept (the last 64 sets at most) by their keys and values:
    a node that plays many partitions of one cell (the evaluation's blocks) parses
    them once.
    """
    merged: dict[str, object] = {
        k: v for k, v in ctxt.run_config.items() if k.startswith(RUN_CONFIG_PREFIX)
    }
    for record in msg.content.values():  # not .config_records: it copies
        if isinstance(record, ConfigRecord):
            merged.update(
                {k: v for k, v in record.items() if k.startswith(RUN_CONFIG_PREFIX)}
            )
    key = tuple(sorted((k, repr(v)) for k, v in merged.items()))
    options = _parsed.get(key)
    if options is None:
        options = ALIEConfig.from_run_config(merged)  # raises for bad options
        if len(_parsed) >= _PARSED_KEPT:
            _parsed.clear()
        _parsed[key] = options
    return options


_PARSED_KEPT = 64
_parsed: dict[tuple[tuple[str, str], ...], ALIEConfig] = {}


def _partition(ctxt: Context, options: ALIEConfig) -> tuple[int, int]:
    """Read ``partition-id`` and ``num-partitions`` from the node config."""
    config = ctxt.node_config
    partition_id = config.get("partition-id")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise ValueError(
            "the node has no integer `partition-id` in its node config "
            f"(got {partition_id!r}); start SuperNodes with --node-config "
            '"partition-id=<i> num-partitions=<n>" (the Simulation Engine sets it)'
        )
    num_partitions = config.get("num-partitions")
    if options.byzantine_ids is not None:
        return partition_id, 0
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        raise ValueError(
            "the node has no integer `num-partitions` in its node config (got "
            f"{num_partitions!r}), which alie.fraction needs; set it with "
            '--node-config "partition-id=<i> num-partitions=<n>" or list the '
            "Byzantine partitions in alie.byzantine-ids"
        )
    return partition_id, num_partitions


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
    )
