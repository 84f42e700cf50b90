"""The admin API: budgets, policies, tenants, variants, ledger and reports.

The routes are a mixin of the ingress deployment (Serve's class-based views follow the
MRO), so the admin API is served by the same replicas and the same FastAPI app as
generation; what they act on is one explicit ``AdminService`` (``self.admin``), built by
the ingress from its control store, ledger and scheduler — the routes never reach into
the ingress's own state. Every route first checks the admin bearer token (constant-time,
against its SHA-256) and answers 401 before reading anything else; tokens and API keys
are never logged.

Every change is written through ``ControlStore`` (one transaction, one new revision),
then this replica refreshes at once; the other replicas pick it up on their next poll.
No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

import structlog
from fastapi import Path, Query, Request
from fastapi.responses import JSONResponse

from wattserve import InvalidRequest, Unauthorized
from wattserve._admin import (
    NAME_PATTERN,
    AdminLedgerPage,
    BudgetUpdate,
    PolicyInfo,
    PolicyUpdate,
    ProfileList,
    ProfilePoint,
    TenantCreate,
    TenantCreated,
    TenantInfo,
    TenantList,
    TenantUpdate,
    VariantAdd,
    VariantList,
)
from wattserve.cluster.audit_routes import AuditService
from wattserve.policies.catalog import parse_variant_entry
from wattserve.policies.routing import reference_variant
from wattserve.policies.tenancy import Caller
from wattserve.scheduler._http import api, parse_body
from wattserve.scheduler.control_store import (
    ControlSnapshot,
    ControlStore,
    policy_values,
)
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import ANY_TENANT, LedgerStore
from wattserve.telemetry.reporting import window_report

log = structlog.get_logger(__name__)

NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
MAX_LEDGER_ROWS = 10_000


@dataclass(frozen=True)
class AdminService:
    """What the admin routes act on: this replica's control plane, ledger and scheduler."""

    control: ControlStore
    ledger: LedgerStore
    scheduler: Scheduler
    replica_id: str
    admin_token_sha256: str | None  # None: the admin API refuses everyone
    snapshot: Callable[[], ControlSnapshot]  # the control state in force on this replica
    apply_now: Callable[[], Awaitable[ControlSnapshot]]  # reload and apply it here, now
    caller: Callable[[Request], Caller]
    tenant_usage: Callable[[TenantInfo], TenantInfo]  # blocking: reads the ledger
    node_ids: Callable[[], Awaitable[list[str]]]  # ids of the nodes with a telemetry agent

    def require_admin(self, request: Request) -> None:
        """401 unless ``request`` carries the admin token."""
        if self.admin_token_sha256 is None:
            raise Unauthorized("the admin API is disabled: no admin token is configured")
        if self.caller(request).kind != "admin":
            raise Unauthorized("the admin API needs the admin token as 'Authorization: Bearer'")


class AdminRoutes:
    """``/admin/*`` routes over ``self.admin`` (the ingress sets it at start)."""

    admin: AdminService
    audit: AuditService  # the audit routes' service (a sibling mixin's)

    # --- budgets ------------------------------------------------------------------------

    @api.get("/admin/budgets")
    async def admin_budget(self, request: Request) -> dict:
        """The budget in force."""
        self.admin.require_admin(request)
        return self.admin.snapshot().budget_info().model_dump(mode="json")

    @api.put("/admin/budgets")
    async def admin_set_budget(self, request: Request) -> dict:
        """Set the cluster cap, one node's cap or the J/output target."""
        self.admin.require_admin(request)
        update = await parse_body(request, BudgetUpdate)
        if update.node is not None:
            await self._check_node(update.node)
        await asyncio.to_thread(self.admin.control.set_budget, update)
        snapshot = await self.admin.apply_now()
        log.info("budget_changed", **snapshot.budget_info().model_dump(mode="json"))
        return snapshot.budget_info().model_dump(mode="json")

    async def _check_node(self, node: str) -> None:
        ids = await self.admin.node_ids()
        matches = [i for i in ids if i.startswith(node)]
        if len(matches) != 1:
            known = ", ".join(i[:12] for i in ids)
            why = "no node" if not matches else f"{len(matches)} nodes"
            raise InvalidRequest(
                f"{why} with an id starting {node!r} (nodes: {known})", param="node"
            )

    # --- policies -----------------------------------------------------------------------

    def _policy_info(self, snapshot: ControlSnapshot) -> dict:
        info = PolicyInfo(
            **policy_values(snapshot.policy),
            updated_at=snapshot.policy_updated_at,
            revision=snapshot.revision,
        )
        return info.model_dump(mode="json")

    @api.get("/admin/policies")
    async def admin_policy(self, request: Request) -> dict:
        """The serving policy in force."""
        self.admin.require_admin(request)
        return self._policy_info(self.admin.snapshot())

    @api.put("/admin/policies")
    async def admin_set_policy(self, request: Request) -> dict:
        """Change serving-policy fields."""
        self.admin.require_admin(request)
        update = await parse_body(request, PolicyUpdate)
        await asyncio.to_thread(self.admin.control.set_policy, update)
        snapshot = await self.admin.apply_now()
        log.info("policy_changed", fields=sorted(update.model_fields_set))
        return self._policy_info(snapshot)

    # --- tenants ------------------------------------------------------------------------

    @api.get("/admin/tenants")
    async def admin_tenants(self, request: Request) -> dict:
        """Every tenant (revoked ones too)."""
        self.admin.require_admin(request)
        tenants = await asyncio.to_thread(self.admin.control.tenants)
        return TenantList(data=tenants).model_dump(mode="json")

    @api.post("/admin/tenants")
    async def admin_create_tenant(self, request: Request) -> JSONResponse:
        """Create a tenant; its API key is in this response and nowhere else, ever."""
        self.admin.require_admin(request)
        create = await parse_body(request, TenantCreate)
        info, api_key = await asyncio.to_thread(self.admin.control.create_tenant, create)
        await self.admin.apply_now()
        log.info("tenant_created", tenant=info.name)
        body = TenantCreated(tenant=info, api_key=api_key).model_dump(mode="json")
        return JSONResponse(body, status_code=201)

    @api.get("/admin/tenants/{name}")
    async def admin_tenant(self, request: Request, name: NamePath) -> dict:
        """One tenant, with its energy use against its quotas."""
        self.admin.require_admin(request)
        info = await asyncio.to_thread(self.admin.control.tenant, name)
        return (await asyncio.to_thread(self.admin.tenant_usage, info)).model_dump(mode="json")

    @api.put("/admin/tenants/{name}")
    async def admin_set_tenant(self, request: Request, name: NamePath) -> dict:
        """Change a tenant's quotas, tiers or rate limit."""
        self.admin.require_admin(request)
        update = await parse_body(request, TenantUpdate)
        info = await asyncio.to_thread(self.admin.control.update_tenant, name, update)
        await self.admin.apply_now()
        log.info("tenant_changed", tenant=name, fields=sorted(update.model_fields_set))
        return info.model_dump(mode="json")

    @api.delete("/admin/tenants/{name}")
    async def admin_revoke_tenant(self, request: Request, name: NamePath) -> dict:
        """Revoke a tenant's API key (its ledger rows stay)."""
        self.admin.require_admin(request)
        info = await asyncio.to_thread(self.admin.control.revoke_tenant, name)
        await self.admin.apply_now()
        log.info("tenant_revoked", tenant=name)
        return info.model_dump(mode="json")

    # --- variants -----------------------------------------------------------------------

    @api.get("/admin/variants")
    async def admin_variants(self, request: Request) -> dict:
        """Every variant and its lifecycle state."""
        self.admin.require_admin(request)
        variants = await asyncio.to_thread(self.admin.control.variants)
        return VariantList(data=variants).model_dump(mode="json")

    @api.get("/admin/variants/{name}")
    async def admin_variant(self, request: Request, name: NamePath) -> dict:
        """One variant and its lifecycle state."""
        self.admin.require_admin(request)
        return (await asyncio.to_thread(self.admin.control.variant, name)).model_dump(mode="json")

    @api.post("/admin/variants")
    async def admin_add_variant(self, request: Request) -> JSONResponse:
        """Add a variant from one catalog entry; the cluster deploys it, then routes to it."""
        self.admin.require_admin(request)
        body = await parse_body(request, VariantAdd)
        spec = parse_variant_entry(body.toml)
        record = await asyncio.to_thread(self.admin.control.add_variant, spec)
        await self.admin.apply_now()
        log.info("variant_added", variant=spec.name)
        return JSONResponse(record.model_dump(mode="json"), status_code=202)

    @api.delete("/admin/variants/{name}")
    async def admin_retire_variant(self, request: Request, name: NamePath) -> dict:
        """Stop routing to a variant; it is removed once its in-flight work has drained."""
        self.admin.require_admin(request)
        record = await asyncio.to_thread(self.admin.control.retire_variant, name)
        await self.admin.apply_now()
        log.info("variant_retiring", variant=name)
        return record.model_dump(mode="json")

    # --- ledger and reports -------------------------------------------------------------

    @api.get("/admin/profiles")
    async def admin_profiles(self, request: Request) -> dict:
        """This replica's learned energy profile: what ``wattserve simulate`` can replay."""
        self.admin.require_admin(request)
        usage = await asyncio.to_thread(self.admin.ledger.usage_by_variant)
        sources = sorted({s for u in usage for s in u.joules_by_source})
        points = [ProfilePoint(**row._asdict()) for row in self.admin.scheduler.profile.measured()]
        return ProfileList(
            replica=self.admin.replica_id, energy_sources=sources, data=points,
            overhead_s=self.admin.scheduler.profile.overhead_s(),
        ).model_dump(mode="json")  # fmt: skip

    @api.get("/admin/ledger")
    async def admin_ledger(
        self,
        request: Request,
        tenant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        variant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        status: Literal["ok", "failed"] | None = None,
        since: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LEDGER_ROWS)] = 100,
    ) -> dict:
        """Ledger rows across tenants, newest first, filtered."""
        self.admin.require_admin(request)
        rows = await asyncio.to_thread(
            self.admin.ledger.recent, limit, tenant=tenant or ANY_TENANT, variant=variant,
            status=status, since=since,
        )  # fmt: skip
        return AdminLedgerPage(data=[r.to_entry() for r in rows]).model_dump(mode="json")

    @api.get("/admin/report")
    async def admin_report(
        self,
        request: Request,
        since: datetime | None = None,
        until: datetime | None = None,
        tenant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    ) -> dict:
        """Outputs, joules and savings by cause per variant and tenant in a time window."""
        self.admin.require_admin(request)
        if since is not None and until is not None and since >= until:
            raise InvalidRequest("since must be before until", param="since")
        rows = await asyncio.to_thread(self.admin.ledger.window, since, until, tenant)
        audit = await asyncio.to_thread(self.audit.joules, since, until) if tenant is None else {}
        catalog = self.admin.scheduler.catalog
        reference = reference_variant(catalog)
        report = window_report(
            rows,
            since=since,
            until=until,
            tenant=tenant,
            target=self.admin.snapshot().budget.joules_per_output_target,
            reference=reference.name,
            reference_prior_j=reference.energy_prior.at_batch_size(1),
            audit_joules=audit,
        )
        return report.model_dump(mode="json")
