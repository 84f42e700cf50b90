"""Per-node telemetry agents: one Ray actor pinned to each alive node.

Each agent learns its node's device type (``H100``, ...) from Ray's node table, so a
node without NVML simulates devices of that type (see ``telemetry.devices``).

Each agent also watches the workers that have a batch open on it: a worker that dies
mid-batch (SIGKILL, OOM, its node's Serve replica torn down) never reports the end, so
its draw would stay on the device's books, and on a simulated device in its power, for
good. Workers are named Serve replica actors; once the name no longer resolves the
worker is gone, and its batches are closed as failed attempts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import ray
import structlog
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from wattserve._schemas import DeviceInfo, NodeInfo
from wattserve.telemetry.agent import AGENT_NAMESPACE, TelemetryAgent, agent_actor_name
from wattserve.telemetry.attribution import Reconciliation
from wattserve.telemetry.devices import open_power_sources
from wattserve.telemetry.energy import EnergyMeasurement
from wattserve.telemetry.logs import configure_logging
from wattserve.telemetry.metrics import AgentMetrics

log = structlog.get_logger(__name__)

# The node label Ray sets from the detected accelerator (ray._raylet's
# RAY_NODE_ACCELERATOR_TYPE_KEY); test clusters set it with Cluster.add_node(labels=...).
ACCELERATOR_TYPE_LABEL = "ray.io/accelerator-type"
_ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
OWNER_WATCH_S = 1.0  # how often an agent checks that the workers of open batches live


def worker_alive(owner: str) -> bool:
    """Whether the named actor ``namespace/name`` still exists (blocking GCS lookup)."""
    namespace, _, name = owner.partition("/")
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def node_device_type(node: Mapping[str, Any]) -> str | None:
    """A ``ray.nodes()`` entry's device type: its label, else its ``accelerator_type:T``.

    None when the node declares neither (a CPU node, or a cluster set up by hand).
    """
    label = (node.get("Labels") or {}).get(ACCELERATOR_TYPE_LABEL)
    if label:
        return str(label)
    types = sorted(
        name.removeprefix(_ACCELERATOR_RESOURCE_PREFIX)
        for name in node.get("Resources") or {}
        if name.startswith(_ACCELERATOR_RESOURCE_PREFIX)
    )
    return types[0] if types else None


@ray.remote(num_cpus=0, max_restarts=3)
class TelemetryAgentActor:
    """Hosts a ``TelemetryAgent`` for the node it is pinned to."""

    def __init__(
        self,
        node_id: str,
        power_source: str,
        sample_hz: float,
        sim_devices: int,
        device_type: str | None = None,
    ):
        configure_logging(json=True)
        devices = open_power_sources(
            power_source, simulated_count=sim_devices, node=node_id[:8], device_type=device_type
        )
        self._agent = TelemetryAgent(devices, node_id=node_id, sample_hz=sample_hz)
        self._device_type = device_type
        self._metrics = AgentMetrics(node_id)
        self._agent.start()
        self._watcher = threading.Thread(target=self._watch_owners, daemon=True,
                                         name="wattserve-owners")  # fmt: skip
        self._watcher.start()
        log.info(
            "telemetry_agent_ready",
            node_id=node_id,
            device_type=device_type,
            kind=devices.kind,
            reason=devices.reason,
        )

    def assign_device(self, worker_key: str) -> str | None:
        """See ``TelemetryAgent.assign_device``."""
        return self._agent.assign_device(worker_key)

    def _watch_owners(self) -> None:
        while True:
            threading.Event().wait(OWNER_WATCH_S)
            for owner in self._agent.open_owners():
                try:
                    alive = worker_alive(owner)
                except Exception as exc:  # GCS blip: ask again next pass
                    log.warning("owner_check_failed", owner=owner, error=repr(exc))
                    continue
                if not alive:
                    closed = self._agent.abandon_owner(owner)
                    log.warning("worker_gone_batches_closed", owner=owner, batches=closed)

    def batch_started(
        self, batch_id: str, power_w: float, device_uuid: str | None, owner: str | None = None
    ) -> None:
        """See ``TelemetryAgent.batch_started``."""
        self._agent.batch_started(batch_id, power_w, device_uuid, owner)

    def batch_abandoned(self, batch_id: str) -> bool:
        """See ``TelemetryAgent.batch_abandoned``."""
        return self._agent.batch_abandoned(batch_id)

    def batch_finished(self, batch_id: str) -> EnergyMeasurement:
        """See ``TelemetryAgent.batch_finished``."""
        return self._agent.batch_finished(batch_id)

    def power_w(self) -> tuple[str, float]:
        """(node id, the node's power now in W): the admission service's reading."""
        return self._agent.node_id, self._agent.power_w()

    def status(self) -> tuple[NodeInfo, list[DeviceInfo]]:
        """Node totals and devices; also refreshes the Prometheus gauges."""
        node, devices = self._agent.status()
        self._metrics.record_devices(devices)
        return node.model_copy(update={"device_type": self._device_type}), devices

    def reconciliation(self) -> Reconciliation:
        """The node's energy books since the agent started."""
        return self._agent.reconciliation()


def start_agents(
    power_source: str = "auto", sample_hz: float = 10.0, sim_devices: int = 1
) -> list[Any]:
    """Start (or find) one agent per alive node; return their handles.

    Each agent is told its node's device type (:func:`node_device_type`), which shapes
    the simulated devices it opens where NVML is unusable.
    """
    handles = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        handles.append(
            TelemetryAgentActor.options(
                name=agent_actor_name(node_id),
                namespace=AGENT_NAMESPACE,
                lifetime="detached",  # the cluster's, not the driver's that asked for it
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(node_id, power_source, sample_hz, sim_devices, node_device_type(node))
        )
    ray.get([h.status.remote() for h in handles])  # wait until every agent samples
    return handles
