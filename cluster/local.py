"""A multi-node Ray cluster on one machine, with nodes of fake device types.

For trying wattserve's distributed behaviour without a GPU cluster (``python
scripts/local_cluster.py``), for the multi-node tests and for the cluster benchmark: a
head plus one node per device type, each typed node carrying what Ray puts on a real GPU
node of that type — the ``accelerator_type:<T>`` resource and the
``ray.io/accelerator-type`` label (``ray start --labels`` refuses ``ray.io/`` keys, so
``ray.cluster_utils.Cluster`` it is). Health checks are fast so that a removed node is
noticed within seconds. ``shutdown`` stops exactly the processes this object started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wattserve.cluster.agents import ACCELERATOR_TYPE_LABEL
from wattserve.cluster.runtime import _PROCESS_ENV

FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 5,
}

# The test bed's one proxy sits on the head (``start_serve``); Serve's proxy prefers
# replicas on its own node, which would send every request to the head's scheduler
# replica and starve the others. A real cluster has a proxy on every node.
_ONE_PROXY_ROUTING = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}


class TypedCluster:
    """A head (no device type) and one node per entry of ``types``."""

    def __init__(
        self,
        types: Sequence[str] = ("H100", "H200"),
        *,
        head_cpus: int = 2,
        node_cpus: int = 1,
    ) -> None:
        self.types = tuple(types)
        self.head_cpus = head_cpus
        self.node_cpus = node_cpus
        self.nodes: dict[str, str | None] = {}  # node id -> device type (None: the head)
        self._cluster: Any = None
        self._root: Path | None = None
        self._env_before: dict[str, str | None] = {}

    @property
    def address(self) -> str:
        """The GCS address, for ``ray.init(address=...)`` and ``wattserve serve --address``."""
        assert self._cluster is not None, "start() first"
        return str(self._cluster.address)

    def start(self) -> TypedCluster:
        """Start the head and the typed nodes (10-20 s on two cores)."""
        from ray.cluster_utils import Cluster

        # Short: Ray's unix socket paths must stay below ~107 characters. RAY_TMPDIR keeps
        # Ray's "current cluster" file in it, not in the /tmp/ray others may read.
        self._root = Path(tempfile.mkdtemp(prefix="wsc", dir="/tmp"))
        env = {**_PROCESS_ENV, "RAY_TMPDIR": str(self._root), **_ONE_PROXY_ROUTING}
        self._env_before = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": self.head_cpus,
                "include_dashboard": False,
                "temp_dir": str(self._root / "ray"),
                "_system_config": FAST_HEALTH_CHECKS,
            },
        )
        self.nodes = {self._cluster.head_node.node_id: None}
        for kind in self.types:
            self.add_node(kind)
        return self

    def add_node(self, kind: str) -> str:
        """One more node of device type ``kind``; returns its node id."""
        node = self._cluster.add_node(
            num_cpus=self.node_cpus,
            resources={f"accelerator_type:{kind}": 1},
            labels={ACCELERATOR_TYPE_LABEL: kind},
        )
        self.nodes[node.node_id] = kind
        return str(node.node_id)

    def remove_node(self, node_id: str) -> None:
        """Kill one typed node's processes at once, as a lost machine (not the head)."""
        (node,) = [n for n in self._cluster.worker_nodes if n.node_id == node_id]
        self._cluster.remove_node(node, allow_graceful=False)
        del self.nodes[node_id]

    def start_serve(self, port: int) -> None:
        """Start Serve with its one HTTP proxy on the head, listening on ``port``.

        Every node of this cluster shares one host, and proxies on every node (Serve's
        default) would share one port through ``SO_REUSEPORT``: the kernel would hand some
        connections to a typed node's proxy, and removing that node would drop them —
        a fault of the test bed, not one a real cluster has. Needs ``ray.init`` first.
        """
        from ray import serve

        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})

    def shutdown(self) -> None:
        """Stop every process of this cluster and remove its files."""
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
        for key, value in self._env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> TypedCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
