"""The task of this app: flwr-alie's digits data and MLP, and one client's training."""

import zlib

from flwr_alie.evaluation.task import TaskData, load_data, make_model, train

__all__ = ["load_data", "local_seed", "make_model", "task_data", "train"]


def task_data(num_partitions: int, seed: int) -> TaskData:
    """IID partitions of the digits training split, one per node."""
    return load_data("digits", num_partitions, "iid", 0.5, seed)


def local_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one node's minibatch order in one round."""
    return zlib.crc32(f"{seed}/{server_round}/{partition_id}".encode())
