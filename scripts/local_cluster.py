"""Run a three-node local Ray cluster (a head, an H100 node, an H200 node) until Ctrl-C.

    python scripts/local_cluster.py            # prints the address, then blocks
    WATTSERVE_SCHEDULER_REPLICAS=2 wattserve serve --address <printed address>

The typed nodes are fakes with the resource and label Ray gives real GPU nodes, so
variants are placed by device type and each node's agent simulates devices of its type.
Ctrl-C (or SIGTERM) stops exactly this cluster's processes.
"""

from __future__ import annotations

import argparse
import signal
import sys

from wattserve.cluster.local import TypedCluster


def main() -> None:
    """Start the cluster, print its address, block until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="H100,H200", help="one node per device type")
    parser.add_argument("--head-cpus", type=int, default=2)
    parser.add_argument("--node-cpus", type=int, default=1)
    args = parser.parse_args()
    cluster = TypedCluster(args.types.split(","), head_cpus=args.head_cpus,
                           node_cpus=args.node_cpus)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        cluster.start()
        print(f"ray cluster at {cluster.address}", flush=True)
        for node_id, kind in cluster.nodes.items():
            print(f"  node {node_id[:12]} device type {kind or '(head, none)'}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
