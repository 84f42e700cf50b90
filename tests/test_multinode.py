"""Placement by device type on a three-node cluster: a CPU head, an H100 node, an H200 node.

The typed nodes are fakes (a custom resource and the ``ray.io/accelerator-type`` label,
as Ray sets them on real GPU nodes); everything runs on CPU with simulated power.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import serve

from tests._wait import poll as _poll
from wattserve.cluster.agents import ACCELERATOR_TYPE_LABEL, start_agents
from wattserve.cluster.app import worker_app
from wattserve.cluster.local import TypedCluster
from wattserve.cluster.names import variant_app_name
from wattserve.cluster.settings import Settings
from wattserve.policies.catalog import VariantSpec, load_catalog
from wattserve.policies.plans import BatchPlan, WorkItem

pytestmark = pytest.mark.multinode

DEPLOY_TIMEOUT_S = 150.0  # two replicas import torch and build a tiny pipeline on 2 cores
CALL_TIMEOUT_S = 60.0
# Variant -> (node types it may run on, replicas). Two turbo replicas fill the H200 node
# (0.5 CPU each), where Serve's default spread would put them on two nodes; medium names
# a set of which the cluster has only H100 (Ray's label selector "in(H100,A100)").
PLACEMENT = {"tiny-sd-turbo": (("H200",), 2), "tiny-sd-medium": (("H100", "A100"), 1)}
NODE_ID_CALLS = 16  # at once: Serve's router spreads them over the replicas


@pytest.fixture(scope="module")
def node_types() -> Iterator[dict[str, str | None]]:
    """A head (2 CPUs) and two typed nodes (1 CPU each); node id -> device type."""
    with TypedCluster(("H100", "H200"), head_cpus=2, node_cpus=1) as cluster:
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            serve.start(proxy_location="Disabled")  # handles only: no HTTP port to take
            yield dict(cluster.nodes)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


@pytest.fixture(scope="module")
def agents(node_types: dict[str, str | None]) -> list[Any]:
    """One simulated telemetry agent per node; the handles keep them alive."""
    return start_agents(power_source="simulated", sim_devices=1)


def _labelled_nodes() -> dict[str, str | None]:
    """Alive node id -> its ``ray.io/accelerator-type`` label, as ``ray.nodes()`` says."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    return {n["NodeID"]: n["Labels"].get(ACCELERATOR_TYPE_LABEL) for n in alive}


def test_ray_reports_each_node_device_type_label(node_types):
    assert _labelled_nodes() == node_types


def test_each_node_agent_simulates_devices_of_its_node_type(node_types, agents):
    statuses = ray.get([a.status.remote() for a in agents], timeout=CALL_TIMEOUT_S)
    by_node = {node.node_id: (node, devices) for node, devices in statuses}
    assert set(by_node) == set(node_types)  # one agent per node
    for node_id, (node, devices) in by_node.items():
        kind = node_types[node_id]
        assert (node.source_kind, node.device_type) == ("simulated", kind)
        assert [d.name for d in devices] == [f"simulated {kind}" if kind else "simulated GPU"]
        assert devices[0].power_limit_w == 700  # H100 SXM, H200 SXM and the default alike


def _typed(spec: VariantSpec, types: tuple[str, ...], replicas: int) -> VariantSpec:
    resources = spec.resources.model_copy(
        update={"accelerator_types": types, "num_cpus": 0.5, "replicas": replicas}
    )
    return spec.model_copy(update={"resources": resources})


def _app_running(name: str) -> bool | None:
    app = serve.status().applications.get(name)
    if app is not None and app.status == "DEPLOY_FAILED":
        raise AssertionError(f"{name}: {app.message}")
    return True if app is not None and app.status == "RUNNING" else None


def test_variants_run_only_on_nodes_of_their_types(node_types, agents, state_home):
    catalog = load_catalog()
    settings = Settings.from_env(state_home)
    specs = [_typed(catalog.get(name), *placement) for name, placement in PLACEMENT.items()]
    # Both at once, so their replicas start together; serve.run would wait without limit.
    handles = serve.run_many(
        [
            serve.RunTarget(worker_app(s, settings), variant_app_name(s.name), route_prefix=None)
            for s in specs
        ],
        wait_for_applications_running=False,
    )
    for spec in specs:
        name = variant_app_name(spec.name)
        _poll(f"{name} running", lambda name=name: _app_running(name), DEPLOY_TIMEOUT_S)
    labelled = _labelled_nodes()
    for spec, handle in zip(specs, handles, strict=True):
        answers = [handle.node_id.remote() for _ in range(NODE_ID_CALLS)]
        nodes = {answer.result(timeout_s=CALL_TIMEOUT_S) for answer in answers}
        types = {labelled[n] for n in nodes}
        assert types <= set(spec.resources.accelerator_types), (spec.name, types)
        plan = BatchPlan(f"b-{spec.name}", spec.name, 64, 64, (WorkItem("a cat", None, 1),))
        output = handle.run.remote(plan).result(timeout_s=CALL_TIMEOUT_S)
        assert len(output.png_images) == 1 and output.joules > 0
        assert output.energy_source == "simulated"
