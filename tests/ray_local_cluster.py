"""A multi-node Ray cluster on this machine for the tests, run as its own process: Ray's own
`ray.cluster_utils.Cluster` (a head without CPUs and N one-CPU nodes, every one on 127.0.0.1,
token authentication from the environment), controlled over stdin.

Prints one JSON line {"address", "session_dir", "nodes": {node_id: raylet_pid}, "addresses":
[every node's NodeManagerAddress], "auth": "token"|"disabled"}, then reads commands:
`remove NODE_ID` (kills that node's processes: a lost machine) answers `removed NODE_ID`;
`stop` or end of input shuts the cluster down. Its own process so that the test process need
not import Ray with the loopback switch (qlorax.settings.confine_ray_to_loopback) set.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node, the head's GCS included, on 127.0.0.1


def main(worker_nodes: int) -> None:
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    nodes = {}
    for _ in range(worker_nodes):
        node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        nodes[node.node_id] = node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    addresses = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))
    auth = "token" if is_token_auth_enabled() else "disabled"
    ray.shutdown()
    print(json.dumps({"address": cluster.address, "session_dir": cluster.head_node.get_session_dir_path(),
                      "nodes": {nid: node.all_processes["raylet"][0].process.pid for nid, node in nodes.items()},
                      "addresses": addresses, "auth": auth}), flush=True)
    try:
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "remove":
                cluster.remove_node(nodes.pop(argument))
                print(f"removed {argument}", flush=True)
            elif command == "stop":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
