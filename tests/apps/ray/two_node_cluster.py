"""A Ray cluster of two nodes on this machine's loopback, for the scale-out test.

Usage: ``python two_node_cluster.py``. Prints one JSON line (the cluster's address
and its node ids), then holds the cluster: each ``actors`` line on its standard
input is answered with one JSON line, the actors of Ray's actor table (class, node,
state); when its standard input closes, it stops both nodes.

Ray turns ``127.0.0.1`` into the machine's interface address, unless cluster mode is
off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, as Ray's own tests do on macOS): then
the nodes, and every driver started with the same variable, stay on loopback.
"""

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported

from ray.cluster_utils import Cluster


def _actors(address: str) -> list[dict[str, str]]:
    """Every actor the cluster's GCS knows, live or dead: class, node, state."""
    import ray

    ray.init(address=address, logging_level="ERROR")
    try:
        table = ray._private.state.actors()  # GCS actor table
    finally:
        ray.shutdown()
    return [
        {
            "class_name": actor["ActorClassName"],
            "node_id": actor["Address"]["NodeID"],
            "state": actor["State"],
        }
        for actor in table.values()
    ]


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        info = {
            "address": cluster.address,
            "nodes": [node.node_id for node in cluster.list_all_nodes()],
        }
        print(json.dumps(info), flush=True)
        for line in sys.stdin:  # until the test closes it
            if line.strip() == "actors":
                print(json.dumps(_actors(cluster.address)), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
