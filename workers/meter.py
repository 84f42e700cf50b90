"""A worker's Ray-side helpers: its node agent's meter, and lease start confirmation."""

from __future__ import annotations

from typing import Any

import ray

from wattserve.telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from wattserve.telemetry.energy import EnergyMeasurement

# The cluster's admission service (``cluster.admission``), found by name.
ADMISSION_NAME = "wattserve-admission"
CONFIRM_TIMEOUT_S = 5.0


def confirm_lease(lease_id: str) -> bool:
    """Confirm a batch start with the admission service (blocking); False: do not start."""
    service = ray.get_actor(ADMISSION_NAME, namespace=AGENT_NAMESPACE)
    return bool(ray.get(service.start.remote(lease_id), timeout=CONFIRM_TIMEOUT_S))


def cuda_device_uuid(device: Any) -> str | None:
    """NVML-style UUID (``GPU-...``) of a torch CUDA device, None for CPU."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(device)
    return f"GPU-{props.uuid}"


class AgentMeter:
    """Reports batch start/end to the node's agent and returns its measurement.

    Both calls wait for the agent (about a millisecond each on one node) so the agent's
    readings bracket the batch's device work.
    """

    def __init__(self, agent: Any, device_uuid: str | None) -> None:
        self._agent = agent
        self._device_uuid = device_uuid

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
        return cls(agent, uuid)

    def begin(self, batch_id: str, power_w: float) -> None:
        """Report a batch start."""
        ray.get(self._agent.batch_started.remote(batch_id, power_w, self._device_uuid))

    def end(self, batch_id: str) -> EnergyMeasurement:
        """Report a batch end and get its energy."""
        return ray.get(self._agent.batch_finished.remote(batch_id))
