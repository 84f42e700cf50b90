"""Names of everything wattserve puts into a Ray cluster, in one place.

Control actors are named and detached in one namespace, so any driver or replica finds
the same ones (``get_if_exists``); Serve applications are named per variant so the
control plane can add or retire one without redeploying the ingress.
"""

from __future__ import annotations

import ray

from wattserve.scheduler.coalescing import COALESCER_NAMESPACE, coalescer_actor_name
from wattserve.telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from wattserve.workers.meter import ADMISSION_NAME

CONTROL_NAMESPACE = AGENT_NAMESPACE
CONTROL_NAME = "wattserve-control"
WORKER_DEPLOYMENT = "worker"
VARIANT_APP_PREFIX = "wattserve-variant-"
MAX_COALESCERS = 64  # a bound for finding them by name, far above what is started

assert COALESCER_NAMESPACE == CONTROL_NAMESPACE  # one namespace for every control actor


def variant_app_name(variant: str) -> str:
    """The Serve application that runs ``variant``'s workers."""
    return f"{VARIANT_APP_PREFIX}{variant}"


def control_actor_names() -> list[str]:
    """Every control actor wattserve may have started in this cluster, by name."""
    names = [CONTROL_NAME, ADMISSION_NAME]
    names += [coalescer_actor_name(i) for i in range(MAX_COALESCERS)]
    names += [agent_actor_name(node["NodeID"]) for node in ray.nodes()]
    return names
