"""A worker's Ray-side helpers: its node agent's meter, and lease start confirmation."""

from __future__ import annotations

from typing import Any

import ray

from wattserve.telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from wattserve.telemetry.energy import EnergyMeasurement

# The cluster's admission service (``cluster.admission``), found by name.
ADMISSION_NAME = "wattserve-admission"
CONFIRM_TIMEOUT_S = 5.0
SERVE_NAMESPACE = "serve"
SERVE_REPLICA_PREFIX = "SERVE_REPLICA::"


def confirm_lease(lease_id: str) -> bool:
    """Confirm a batch start with the admission service (blocking); False: do not start."""
    service = ray.get_actor(ADMISSION_NAME, namespace=AGENT_NAMESPACE)
    return bool(ray.get(service.start.remote(lease_id), timeout=CONFIRM_TIMEOUT_S))


def release_lease(lease_id: str) -> None:
    """The batch ended here: give its lease back (fire and forget; releases are idempotent).

    The scheduler that asked for the lease releases it too, but it may have died while
    the batch ran; without this the replica's slot would stay leased for ``max_run_s``.
    """
    try:
        ray.get_actor(ADMISSION_NAME, namespace=AGENT_NAMESPACE).release.remote([lease_id])
    except ValueError:  # no admission service: nothing holds the lease
        pass


def cuda_device_uuid(device: Any) -> str | None:
    """NVML-style UUID (``GPU-...``) of a torch CUDA device, None for CPU."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(device)
    return f"GPU-{props.uuid}"


def _owner_name(context: Any) -> str | None:
    """``namespace/name`` under which this worker's actor can be looked up, if named.

    Serve names its replicas ``SERVE_REPLICA::...`` in its own namespace, not the job's
    (``../shared/RAY-FACTS.md``).
    """
    name = context.get_actor_name()
    if not name:
        return None
    namespace = SERVE_NAMESPACE if name.startswith(SERVE_REPLICA_PREFIX) else context.namespace
    return f"{namespace}/{name}"


class AgentMeter:
    """Reports batch start/end to the node's agent and returns its measurement.

    Both calls wait for the agent (about a millisecond each on one node) so the agent's
    readings bracket the batch's device work.
    """

    def __init__(self, agent: Any, device_uuid: str | None, owner: str | None = None) -> None:
        self._agent = agent
        self._device_uuid = device_uuid
        self._owner = owner  # "namespace/name" of this worker's actor: the agent watches it

    @classmethod
    def for_this_node(cls, device: Any) -> AgentMeter:
        """Find the agent of the node this process runs on, and this worker's device.

        A worker on a GPU is metered on that GPU; one without (CPU, simulation) asks the
        agent for a simulated device of its own, keyed by this actor's id.
        """
        context = ray.get_runtime_context()
        agent = ray.get_actor(agent_actor_name(context.get_node_id()), namespace=AGENT_NAMESPACE)
        uuid = cuda_device_uuid(device)
        if uuid is None:
            uuid = ray.get(agent.assign_device.remote(context.get_actor_id() or "driver"))
        return cls(agent, uuid, _owner_name(context))

    def begin(self, batch_id: str, power_w: float) -> None:
        """Report a batch start."""
        call = self._agent.batch_started.remote(batch_id, power_w, self._device_uuid, self._owner)
        ray.get(call)

    def end(self, batch_id: str) -> EnergyMeasurement:
        """Report a batch end and get its energy."""
        return ray.get(self._agent.batch_finished.remote(batch_id))

    def abandon(self, batch_id: str) -> None:
        """Report a failed batch."""
        ray.get(self._agent.batch_abandoned.remote(batch_id))
