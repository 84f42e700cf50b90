"""The Ray Serve ingress deployment: the HTTP API in front of the scheduler.

No ``from __future__ import annotations`` here: FastAPI must see real annotation
objects on the route methods to recognise ``Request`` and query parameters.
"""

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import ray
import structlog
from fastapi import FastAPI, Query, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

import wattserve
from policies.catalog import Catalog
from policies.plans import BatchOutput, BatchPlan
from policies.policy import Budget, Policy
from scheduler._http import install_error_handlers, parse_body
from scheduler.cache import ResultCache
from scheduler.coalescing import (
    COALESCER_NAMESPACE,
    Flights,
    LocalFlights,
    RemoteFlights,
    coalescer_actor_name,
)
from scheduler.service import Scheduler
from telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from telemetry.attribution import Reconciliation
from telemetry.ledger import LedgerStore
from telemetry.logs import configure_logging
from telemetry.metrics import SchedulerMetrics
from wattserve import ServiceUnavailable
from wattserve._schemas import (
    ClusterStatus,
    EnergyReport,
    Health,
    ImageGenerationBody,
    LedgerPage,
    ModelList,
    ReconciliationInfo,
    TargetInfo,
    VariantInfo,
)

log = structlog.get_logger(__name__)

api = FastAPI(title="wattserve", version=wattserve.__version__)
install_error_handlers(api)


class ServeWorkerPool:
    """``WorkerPool`` over one Serve deployment handle per variant."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self._handles = handles

    def available(self) -> frozenset[str]:
        """Variants with a deployment; Serve itself routes around unhealthy replicas."""
        return frozenset(self._handles)

    async def run(self, plan: BatchPlan) -> BatchOutput:
        """Run ``plan`` on a replica of its variant, waiting in Serve's queue if all are busy."""
        return await self._handles[plan.variant].run.remote(plan)


def variant_info(catalog: Catalog) -> list[VariantInfo]:
    """The catalog as ``GET /v1/models`` lists it."""
    return [
        VariantInfo(
            id=v.name,
            task=v.task,
            steps=v.steps,
            guidance_scale=v.guidance_scale,
            max_size_px=v.max_size_px,
            quality_score=v.quality_score,
            quality_provenance=v.quality_provenance,
            power_w=v.power_w,
            joules_per_image_prior=v.energy_prior.at_batch_size(1),
            energy_prior_provenance=v.energy_prior.provenance,
        )
        for v in catalog.variants
    ]


@dataclass(frozen=True)
class ServingConfig:
    """Knobs of the scheduler replica that come from the deployment's settings."""

    cache_dir: str
    cache_max_bytes: int
    cache_ttl_s: float | None
    power_cap_w: float | None = None
    joules_per_output_target: float | None = None
    coalescers: int = 0  # 0: this replica coalesces by itself


POWER_POLL_S = 0.1


def telemetry_agents() -> list:
    """Handles of the telemetry agents of all alive nodes."""
    handles = []
    for node in ray.nodes():
        if node.get("Alive"):
            try:
                name = agent_actor_name(node["NodeID"])
                handles.append(ray.get_actor(name, namespace=AGENT_NAMESPACE))
            except ValueError:
                log.warning("node_without_telemetry_agent", node_id=node["NodeID"])
    if not handles:
        raise ServiceUnavailable("no telemetry agent is running")
    return handles


@serve.deployment(name="scheduler", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class SchedulerIngress:
    """HTTP API: OpenAI-shaped image generation, model list, ledger, health."""

    def __init__(
        self,
        workers: dict[str, DeploymentHandle],
        catalog: Catalog,
        db_url: str,
        config: ServingConfig,
    ) -> None:
        configure_logging(json=True)
        self._catalog = catalog
        self._ledger = LedgerStore(db_url)
        result_cache = ResultCache(
            self._ledger.engine,
            Path(config.cache_dir),
            max_bytes=config.cache_max_bytes,
            ttl_s=config.cache_ttl_s,
        )
        # Static until the control plane feeds budgets live through this same callable.
        budget = Budget(config.power_cap_w, config.joules_per_output_target)
        self._cluster_power_w: float | None = None
        self._power_poller: asyncio.Task[None] | None = None
        flights: Flights = LocalFlights()
        if config.coalescers:
            names = [coalescer_actor_name(i) for i in range(config.coalescers)]
            handles = [ray.get_actor(n, namespace=COALESCER_NAMESPACE) for n in names]
            flights = RemoteFlights(names, handles)
        self._scheduler = Scheduler(
            catalog,
            Policy(),
            ServeWorkerPool(workers),
            self._ledger,
            cache=result_cache,
            flights=flights,
            metrics=SchedulerMetrics(),
            budget=lambda: budget,
            cluster_power_w=lambda: self._cluster_power_w,
        )
        log.info("scheduler_ready", variants=catalog.names)

    async def _poll_cluster_power(self) -> None:
        """Keep the live cluster power fresh for admission; None (admit nothing) on failure."""
        while True:
            try:
                agents = await asyncio.to_thread(telemetry_agents)
                snapshots = await asyncio.gather(*(a.status.remote() for a in agents))
                self._cluster_power_w = sum(node.power_w for node, _ in snapshots)
            except Exception as exc:  # keep polling; admission holds work meanwhile
                self._cluster_power_w = None
                log.warning("cluster_power_unavailable", error=repr(exc))
            await asyncio.sleep(POWER_POLL_S)

    @api.post("/v1/images/generations")
    async def generate(self, request: Request) -> dict:
        """OpenAI Images API ``generations`` with wattserve receipts."""
        body = await parse_body(request, ImageGenerationBody)
        if self._scheduler.budget().cluster_cap_w is not None and self._power_poller is None:
            self._power_poller = asyncio.create_task(self._poll_cluster_power())
        response = await self._scheduler.generate(body.to_request())
        return response.model_dump(mode="json")

    @api.get("/v1/models")
    async def models(self) -> dict:
        """The variants this service routes to."""
        return ModelList(data=variant_info(self._catalog)).model_dump(mode="json")

    @api.get("/v1/ledger")
    async def ledger(self, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict:
        """The newest ledger rows, newest first."""
        rows = await asyncio.to_thread(self._ledger.recent, limit)
        return LedgerPage(data=[row.to_entry() for row in rows]).model_dump(mode="json")

    @api.get("/v1/status")
    async def status(self) -> dict:
        """Live power per device and node, from the telemetry agents."""
        agents = await asyncio.to_thread(telemetry_agents)  # GCS lookups: off the event loop
        snapshots = await asyncio.gather(*(a.status.remote() for a in agents))
        nodes = [node for node, _ in snapshots]
        devices = [device for _, node_devices in snapshots for device in node_devices]
        return ClusterStatus(
            cluster_power_w=sum(n.power_w for n in nodes),
            power_cap_w=self._scheduler.budget().cluster_cap_w,
            nodes=nodes,
            devices=devices,
        ).model_dump(mode="json")

    @api.get("/v1/report")
    async def report(self) -> dict:
        """Energy books: reconciliation across the agents and ledger totals per variant."""
        agents = await asyncio.to_thread(telemetry_agents)
        books = await asyncio.gather(*(a.reconciliation.remote() for a in agents))
        total = sum(books, Reconciliation.zero())
        usage = await asyncio.to_thread(self._ledger.usage_by_variant)
        scheduler = self._scheduler
        return EnergyReport(
            reconciliation=ReconciliationInfo(**asdict(total), error_pct=total.error_pct),
            target=TargetInfo(
                joules_per_output_target=scheduler.budget().joules_per_output_target,
                rolling_joules_per_output=scheduler.rolling_joules_per_output,
                over_target=scheduler.over_target,
            ),
            variants=usage,
        ).model_dump(mode="json")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness and the variants this replica can route to."""
        available = sorted(self._scheduler.pool.available())
        return Health(variants=available, version=wattserve.__version__).model_dump(mode="json")
