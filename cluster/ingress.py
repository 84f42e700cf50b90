"""The Ray Serve ingress deployment: the HTTP API in front of the scheduler.

A Serve adapter, so it lives with everything Ray-specific: the request path itself
(``scheduler.service.Scheduler``) is plain asyncio, and this class gives it Serve handles
for the workers (``ServeWorkerPool``), the cluster's lease book (``RemoteLeases``) and
the coalescer actors.

Each replica keeps a :class:`ControlSnapshot` (budget, policy, tenants, catalog) and
polls the control plane's revision every ``REFRESH_S``; a change made through the admin
API on any replica therefore applies on every replica within about that interval, and
at once on the replica that made it. Variants are Serve applications of their own
(``variant_app_name``), so adding or retiring one never redeploys this ingress.

No ``from __future__ import annotations`` here: FastAPI must see real annotation
objects on the route methods to recognise ``Request`` and query parameters.
"""

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import ray
import structlog
from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

import wattserve
from wattserve import AdmissionRejected, Forbidden, InvalidRequest, ServiceUnavailable, Unauthorized
from wattserve._admin import QuotaUsage, TenantInfo
from wattserve._schemas import (
    ClusterStatus,
    EnergyReport,
    Health,
    ImageGenerationBody,
    ImageGenerationResponse,
    LedgerPage,
    ModelList,
    ReconciliationInfo,
    TargetInfo,
    VariantInfo,
)
from wattserve.cluster.admin_routes import AdminRoutes, AdminService
from wattserve.cluster.admission import RemoteLeases, node_agents
from wattserve.cluster.audit_routes import AuditRoutes, start_audit
from wattserve.cluster.pool import ServeWorkerPool
from wattserve.cluster.settings import Settings
from wattserve.policies.catalog import Catalog
from wattserve.policies.latent_reuse import ReuseRefusal, reuse_mode
from wattserve.policies.tenancy import (
    AuthError,
    Caller,
    RateLimiter,
    Tenant,
    check_quota,
    day_window,
    identify,
    month_window,
)
from wattserve.scheduler._http import api, bearer_token, parse_body
from wattserve.scheduler.approximate import ApproximateReuse
from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.coalescing import (
    COALESCER_NAMESPACE,
    LEAD_BEAT_S,
    Flights,
    LocalFlights,
    RemoteFlights,
    coalescer_actor_name,
)
from wattserve.scheduler.control_store import ControlSnapshot, ControlStore
from wattserve.scheduler.idempotency import IdempotencyStore, check_key, run_once
from wattserve.scheduler.latents import LatentStore
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.attribution import Reconciliation
from wattserve.telemetry.ledger import ANY_TENANT, HEARTBEAT_S, HOLDER_STALE_AFTER_S, LedgerStore
from wattserve.telemetry.logs import configure_logging
from wattserve.telemetry.metrics import SchedulerMetrics
from wattserve.workers.encoder import PromptEncoders

log = structlog.get_logger(__name__)


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
    admin_token_sha256: str | None  # None: the admin API refuses everyone
    replicas: int = 1
    coalescers: int = 0  # 0: this replica coalesces by itself
    power_hold_s: float = 5.0  # a batch waits this long for a lease, then 429
    # The variants' files, for the prompt encoders of approximate reuse (None: no latents
    # are kept and every request is served exactly).
    models_dir: str | None = None
    # The shadow audit's CLIP model (a local path or ``builtin:tiny-clip``; None: no CLIP).
    audit_clip_model: str | None = None
    # Where the in-cluster control plane gets its settings if no one has started it yet
    # (``serve deploy``, a RayService: no ``wattserve serve`` driver ran first).
    settings: Settings | None = None


REFRESH_S = 0.5
HEALTH_CHECK_PERIOD_S = 2.0
NODES_WATCH_S = 1.0  # which variants an alive node can host (cluster/pool.py)
JOIN_WAIT_S = 600.0  # a repeated Idempotency-Key waits this long for its running twin


async def agent_node_ids() -> list[str]:
    """Ids of the nodes whose telemetry agent answers (what a node cap may name)."""
    agents = await asyncio.to_thread(telemetry_agents)
    statuses = await asyncio.gather(*(a.status.remote() for a in agents))
    return [node.node_id for node, _ in statuses]


def telemetry_agents() -> list:
    """Handles of the telemetry agents of all alive nodes."""
    handles = node_agents()
    if not handles:
        raise ServiceUnavailable("no telemetry agent is running")
    return handles


# Serve lets a replica hold 5 requests by default and queues the rest in front of it; a
# scheduler that batches must see its queue, or no batch can outgrow 5 and requests wait
# where no cap, deadline or ledger reaches them. The batcher's own bound (4,096 queued
# outputs, then 429) is the limit; this leaves room above it for admin and health calls.
MAX_ONGOING_REQUESTS = 8192


@serve.deployment(
    name="scheduler", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS,
    # Serve's default of 10 s leaves a dead replica in the proxy's rotation for up to
    # three periods: every request sent to it meanwhile is a 500. Its check is trivial.
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
)  # fmt: skip
@serve.ingress(api)
class SchedulerIngress(AdminRoutes, AuditRoutes):
    """HTTP API: OpenAI-shaped image generation, models, ledger, status, usage, admin."""

    async def __init__(self, db_url: str, config: ServingConfig) -> None:
        configure_logging(json=True)
        self._config = config
        self.replica_id = uuid.uuid4().hex[:12]
        if config.settings is not None:  # found at once when a driver started it
            from wattserve.cluster.control import ensure_control_plane  # imports this module

            await asyncio.to_thread(ensure_control_plane, config.settings)
        self._ledger = LedgerStore(db_url)  # migrates: a no-op once the service has
        self._control = ControlStore(self._ledger.engine)
        self._snapshot: ControlSnapshot = await asyncio.to_thread(self._control.snapshot)
        policy = self._snapshot.policy
        self._cache = result_cache = ResultCache(
            self._ledger.engine,
            Path(config.cache_dir),
            max_bytes=policy.cache_max_bytes,
            ttl_s=policy.cache_ttl_s,
        )
        self._rates = RateLimiter(time.monotonic)
        self._drained: set[str] = set()
        flights: Flights = LocalFlights()
        if config.coalescers:
            names = [coalescer_actor_name(i) for i in range(config.coalescers)]
            handles = [ray.get_actor(n, namespace=COALESCER_NAMESPACE) for n in names]
            flights = RemoteFlights(names, handles, self.replica_id)
        self._flights = flights
        self._pool = ServeWorkerPool()
        catalog = self._snapshot.catalog()
        self._leases = RemoteLeases(self.replica_id, catalog, self._capped)
        await asyncio.to_thread(self._pool.set_variants, catalog)
        auditor, self.audit = await asyncio.to_thread(
            start_audit, self._ledger.engine, db_url, config.audit_clip_model, config.models_dir,
            lambda: self._snapshot, lambda: self.refresh(force=True),
        )  # fmt: skip
        self._scheduler = Scheduler(
            catalog,
            policy,
            self._pool,
            self._ledger,
            cache=result_cache,
            flights=flights,
            metrics=SchedulerMetrics(),
            budget=lambda: self._snapshot.budget,
            # every replica's batches get their power and replica slot from one lease book
            leases=self._leases,
            holder=self.replica_id,
            max_hold_s=config.power_hold_s,
            approximate=await asyncio.to_thread(self._approximate_reuse, config, catalog),
            auditor=auditor,
        )
        await asyncio.to_thread(self._ledger.heartbeat, self.replica_id)  # before any row
        self._keys = IdempotencyStore(
            self._ledger.engine, self.replica_id, stale_after_s=HOLDER_STALE_AFTER_S
        )
        self.admin = AdminService(
            control=self._control, ledger=self._ledger, scheduler=self._scheduler,
            replica_id=self.replica_id, admin_token_sha256=config.admin_token_sha256,
            snapshot=lambda: self._snapshot, apply_now=lambda: self.refresh(force=True),
            caller=self.caller, tenant_usage=self.tenant_usage, node_ids=agent_node_ids,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_forever())
        self._beater = loop.create_task(self._beat_forever())
        log.info("scheduler_ready", variants=catalog.names, revision=self._snapshot.revision)

    def _approximate_reuse(
        self, config: ServingConfig, catalog: Catalog
    ) -> ApproximateReuse | None:
        """The latent store beside the result cache, found by the variants' own encoders.

        Blocking (the encoders load here, before traffic): run in a thread.
        """
        if config.models_dir is None:
            return None
        store = LatentStore(self._ledger.engine, Path(config.cache_dir) / "latents")
        encoders = PromptEncoders(Path(config.models_dir))
        encoders.warm(catalog.variants)
        return ApproximateReuse(store, encoders.embed)

    # --- control plane ------------------------------------------------------------------

    async def _beat_forever(self) -> None:
        """Say this replica lives: the flights it leads and its pending ledger rows."""
        beat_at = time.monotonic()
        while True:
            await asyncio.sleep(LEAD_BEAT_S)
            try:
                await self._flights.beat()
                if time.monotonic() - beat_at >= HEARTBEAT_S:
                    await asyncio.to_thread(self._ledger.heartbeat, self.replica_id)
                    beat_at = time.monotonic()
            except Exception as exc:  # a blip: the next beat is well inside the stale time
                log.warning("heartbeat_failed", error=repr(exc))

    async def _refresh_forever(self) -> None:
        watched_at = time.monotonic()
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
                await asyncio.to_thread(self._cache.flush_touches)  # the hits' last-used times
                if time.monotonic() - watched_at >= NODES_WATCH_S:  # nodes come and go
                    await asyncio.to_thread(self._pool.watch_nodes)
                    watched_at = time.monotonic()
            except Exception as exc:  # the database may blip; keep the last snapshot
                log.warning("control_refresh_failed", error=repr(exc))

    async def refresh(self, force: bool = False) -> ControlSnapshot:
        """Load the control state if its revision moved, apply it; record drains."""
        revision = await asyncio.to_thread(self._control.revision)
        if force or revision != self._snapshot.revision:
            snapshot = await asyncio.to_thread(self._control.snapshot)
            catalog = snapshot.catalog()
            await asyncio.to_thread(self._pool.set_variants, catalog)
            self._snapshot = snapshot
            self._scheduler.apply(catalog, snapshot.policy)
            if force:  # this replica made the change: the admission service takes it now
                await self._leases.refresh()
            log.info("control_applied", revision=snapshot.revision, variants=catalog.names)
        for name in self._snapshot.in_state("retiring"):
            if name not in self._drained and not self._scheduler.batcher.busy_with(name):
                await asyncio.to_thread(self._control.record_drain, name, self.replica_id)
                self._drained.add(name)
                log.info("variant_drained", variant=name, replica=self.replica_id)
        return self._snapshot

    def _capped(self) -> bool:
        """Whether a power budget is in force (then no lease, no launch)."""
        budget = self._snapshot.budget
        return budget.cluster_cap_w is not None or bool(budget.node_caps_w)

    # --- callers ------------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        """Who sent ``request``; ``Unauthorized`` when its credentials do not hold."""
        snapshot = self._snapshot
        try:
            return identify(
                bearer_token(request),
                snapshot.tenants,
                snapshot.policy.allow_anonymous,
                self._config.admin_token_sha256,
            )
        except AuthError as exc:
            raise Unauthorized(str(exc)) from None

    async def _admit_tenant(self, tenant: Tenant, quality: str) -> None:
        """Tier, rate limit and energy quotas of ``tenant``, checked before any work."""
        if quality not in tenant.qualities:
            raise Forbidden(
                f"tenant {tenant.name!r} may use quality {', '.join(tenant.qualities)}; "
                f"not {quality!r}",
                param="quality",
            )
        wait_s = self._rates.allow(tenant)
        if wait_s is not None:
            raise AdmissionRejected(
                f"rate limit of {tenant.rate_limit_per_min} requests/min reached for "
                f"tenant {tenant.name!r}",
                retry_after_s=wait_s,
            )
        if tenant.daily_kj is None and tenant.monthly_kj is None:
            return
        now = datetime.now(UTC)
        day_j, month_j = await asyncio.to_thread(self._quota_usage_j, tenant.name, now)
        refusal = check_quota(tenant, day_j, month_j, now)
        if refusal is not None:
            raise AdmissionRejected(refusal.message, retry_after_s=refusal.retry_after_s)

    def _quota_usage_j(self, tenant: str, now: datetime) -> tuple[float, float]:
        day = self._ledger.tenant_joules(tenant, day_window(now)[0])
        month = self._ledger.tenant_joules(tenant, month_window(now)[0])
        return day, month

    def tenant_usage(self, info: TenantInfo) -> TenantInfo:
        """``info`` with its energy use in the current day and month (blocking)."""
        now = datetime.now(UTC)
        day_j, month_j = self._quota_usage_j(info.name, now)
        usage = [
            QuotaUsage(window="day", used_kj=day_j / 1000, quota_kj=info.daily_kj,
                       resets_at=day_window(now)[1]),
            QuotaUsage(window="month", used_kj=month_j / 1000, quota_kj=info.monthly_kj,
                       resets_at=month_window(now)[1]),
        ]  # fmt: skip
        return info.model_copy(update={"usage": usage})

    # --- public API ---------------------------------------------------------------------

    @api.post("/v1/images/generations")
    async def generate(self, request: Request) -> Any:
        """OpenAI Images API ``generations`` with wattserve receipts.

        With an ``Idempotency-Key`` header a repeat returns the first answer instead of
        generating again (``scheduler.idempotency``).
        """
        caller = self.caller(request)
        body = await parse_body(request, ImageGenerationBody)
        policy = self._snapshot.policy
        generation = body.to_request(
            default_quality=policy.default_quality,
            default_deadline_s=policy.default_deadline_s,
            tenant=caller.name,
        )
        allowed = caller.tenant is None or caller.tenant.approximate_reuse
        mode = reuse_mode(generation.reuse, generation.seed is not None, policy.default_reuse,
                          allowed)  # fmt: skip
        if isinstance(mode, ReuseRefusal):
            raise Forbidden(mode.message, param="reuse")
        generation = generation.model_copy(update={"reuse": mode})

        async def produce() -> ImageGenerationResponse:
            if caller.tenant is not None:
                await self._admit_tenant(caller.tenant, generation.quality)
            model = generation.model
            if model is not None and self._scheduler.catalog.get(model) is None:
                # added (or made active) through another replica since this one's last
                # refresh: read the revision before calling the model unknown
                await self.refresh()
            return await self._scheduler.generate(generation)

        key = request.headers.get("idempotency-key")
        if key is None:  # pydantic's encoder, once: no dict of the body for FastAPI to walk
            response = await produce()
            return Response(response.model_dump_json(), media_type="application/json")

        async def produce_stored() -> dict:
            return (await produce()).model_dump(mode="json")

        status, answer = await run_once(
            self._keys, caller.name or f"({caller.kind})", check_key(key),
            body.model_dump(mode="json"), policy.idempotency_ttl_s, produce_stored,
            wait_s=JOIN_WAIT_S,
        )  # fmt: skip
        return answer if status == 200 else JSONResponse(answer, status_code=status)

    @api.get("/v1/models")
    async def models(self) -> dict:
        """The variants this service routes to now."""
        return ModelList(data=variant_info(self._scheduler.catalog)).model_dump(mode="json")

    @api.get("/v1/ledger")
    async def ledger(
        self, request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50
    ) -> dict:
        """The caller's newest ledger rows, newest first (all rows for the admin)."""
        caller = self.caller(request)
        owner = ANY_TENANT if caller.kind == "admin" else caller.name
        rows = await asyncio.to_thread(self._ledger.recent, limit, tenant=owner)
        return LedgerPage(data=[row.to_entry() for row in rows]).model_dump(mode="json")

    @api.get("/v1/usage")
    async def usage(self, request: Request) -> dict:
        """The calling tenant's limits and energy used against its quotas."""
        caller = self.caller(request)
        if caller.tenant is None:
            raise InvalidRequest("usage is per tenant: call with a tenant's API key")
        info = await asyncio.to_thread(self._control.tenant, caller.tenant.name)
        return (await asyncio.to_thread(self.tenant_usage, info)).model_dump(mode="json")

    @api.get("/v1/status")
    async def status(self) -> dict:
        """Live power per device and node, and the budget in force."""
        agents = await asyncio.to_thread(telemetry_agents)  # GCS lookups: off the event loop
        snapshots = await asyncio.gather(*(a.status.remote() for a in agents))
        nodes = [node for node, _ in snapshots]
        devices = [device for _, node_devices in snapshots for device in node_devices]
        return ClusterStatus(
            cluster_power_w=sum(n.power_w for n in nodes),
            power_cap_w=self._snapshot.budget.cluster_cap_w,
            budget=self._snapshot.budget_info(),
            nodes=nodes,
            devices=devices,
            admission=await self._leases.info(),
            demotions=[d for d in self._snapshot.demotions if d.restored_at is None],
        ).model_dump(mode="json")

    @api.get("/v1/report")
    async def report(self, request: Request) -> dict:
        """Energy books: reconciliation across the agents and ledger totals per variant."""
        if self.caller(request).tenant is not None:
            raise Forbidden("the energy books cover every tenant; a tenant's own: GET /v1/usage")
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
        return Health(
            variants=available,
            version=wattserve.__version__,
            replica=self.replica_id,
            revision=self._snapshot.revision,
        ).model_dump(mode="json")
