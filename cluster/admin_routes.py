"""The admin API: budgets, policies, tenants, variants, ledger and reports.

A mixin of the ingress deployment (Serve's class-based views follow the MRO), so the
admin API is served by the same replicas and the same FastAPI app as generation. Every
route first checks the admin bearer token (constant-time, against its SHA-256) and
answers 401 before reading anything else; tokens and API keys are never logged.

Every change is written through ``ControlStore`` (one transaction, one new revision),
then this replica refreshes at once; the other replicas pick it up on their next poll.
No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
"""

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

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
    TenantList,
    TenantUpdate,
    VariantAdd,
    VariantList,
)
from wattserve.policies.routing import reference_variant
from wattserve.scheduler._http import api, parse_body
from wattserve.scheduler.control_store import ControlSnapshot, parse_variant_entry, policy_values
from wattserve.telemetry.ledger import ANY_TENANT
from wattserve.telemetry.reporting import window_report

if TYPE_CHECKING:
    from wattserve.cluster.ingress import SchedulerIngress

log = structlog.get_logger(__name__)

NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
MAX_LEDGER_ROWS = 10_000


class AdminRoutes:
    """``/admin/*`` routes; ``self`` is the ``SchedulerIngress`` replica."""

    def _require_admin(self: "SchedulerIngress", request: Request) -> None:
        if self._config.admin_token_sha256 is None:
            raise Unauthorized("the admin API is disabled: no admin token is configured")
        if self.caller(request).kind != "admin":
            raise Unauthorized("the admin API needs the admin token as 'Authorization: Bearer'")

    async def _changed(self: "SchedulerIngress") -> ControlSnapshot:
        return await self.refresh(force=True)

    # --- budgets ------------------------------------------------------------------------

    @api.get("/admin/budgets")
    async def admin_budget(self: "SchedulerIngress", request: Request) -> dict:
        """The budget in force."""
        self._require_admin(request)
        return self._snapshot.budget_info().model_dump(mode="json")

    @api.put("/admin/budgets")
    async def admin_set_budget(self: "SchedulerIngress", request: Request) -> dict:
        """Set the cluster cap, one node's cap or the J/output target."""
        self._require_admin(request)
        update = await parse_body(request, BudgetUpdate)
        if update.node is not None:
            await self._check_node(update.node)
        await asyncio.to_thread(self._control.set_budget, update)
        snapshot = await self._changed()
        log.info("budget_changed", **snapshot.budget_info().model_dump(mode="json"))
        return snapshot.budget_info().model_dump(mode="json")

    async def _check_node(self: "SchedulerIngress", node: str) -> None:
        from wattserve.cluster.ingress import telemetry_agents  # the ingress imports this

        agents = await asyncio.to_thread(telemetry_agents)
        statuses = await asyncio.gather(*(a.status.remote() for a in agents))
        ids = [status.node_id for status, _ in statuses]
        matches = [i for i in ids if i.startswith(node)]
        if len(matches) != 1:
            known = ", ".join(i[:12] for i in ids)
            why = "no node" if not matches else f"{len(matches)} nodes"
            raise InvalidRequest(
                f"{why} with an id starting {node!r} (nodes: {known})", param="node"
            )

    # --- policies -----------------------------------------------------------------------

    def _policy_info(self: "SchedulerIngress", snapshot: ControlSnapshot) -> dict:
        info = PolicyInfo(
            **policy_values(snapshot.policy),
            updated_at=snapshot.policy_updated_at,
            revision=snapshot.revision,
        )
        return info.model_dump(mode="json")

    @api.get("/admin/policies")
    async def admin_policy(self: "SchedulerIngress", request: Request) -> dict:
        """The serving policy in force."""
        self._require_admin(request)
        return self._policy_info(self._snapshot)

    @api.put("/admin/policies")
    async def admin_set_policy(self: "SchedulerIngress", request: Request) -> dict:
        """Change serving-policy fields."""
        self._require_admin(request)
        update = await parse_body(request, PolicyUpdate)
        await asyncio.to_thread(self._control.set_policy, update)
        snapshot = await self._changed()
        log.info("policy_changed", fields=sorted(update.model_fields_set))
        return self._policy_info(snapshot)

    # --- tenants ------------------------------------------------------------------------

    @api.get("/admin/tenants")
    async def admin_tenants(self: "SchedulerIngress", request: Request) -> dict:
        """Every tenant (revoked ones too)."""
        self._require_admin(request)
        tenants = await asyncio.to_thread(self._control.tenants)
        return TenantList(data=tenants).model_dump(mode="json")

    @api.post("/admin/tenants")
    async def admin_create_tenant(self: "SchedulerIngress", request: Request) -> JSONResponse:
        """Create a tenant; its API key is in this response and nowhere else, ever."""
        self._require_admin(request)
        create = await parse_body(request, TenantCreate)
        info, api_key = await asyncio.to_thread(self._control.create_tenant, create)
        await self._changed()
        log.info("tenant_created", tenant=info.name)
        body = TenantCreated(tenant=info, api_key=api_key).model_dump(mode="json")
        return JSONResponse(body, status_code=201)

    @api.get("/admin/tenants/{name}")
    async def admin_tenant(self: "SchedulerIngress", request: Request, name: NamePath) -> dict:
        """One tenant, with its energy use against its quotas."""
        self._require_admin(request)
        info = await asyncio.to_thread(self._control.tenant, name)
        return (await asyncio.to_thread(self.tenant_usage, info)).model_dump(mode="json")

    @api.put("/admin/tenants/{name}")
    async def admin_set_tenant(self: "SchedulerIngress", request: Request, name: NamePath) -> dict:
        """Change a tenant's quotas, tiers or rate limit."""
        self._require_admin(request)
        update = await parse_body(request, TenantUpdate)
        info = await asyncio.to_thread(self._control.update_tenant, name, update)
        await self._changed()
        log.info("tenant_changed", tenant=name, fields=sorted(update.model_fields_set))
        return info.model_dump(mode="json")

    @api.delete("/admin/tenants/{name}")
    async def admin_revoke_tenant(
        self: "SchedulerIngress", request: Request, name: NamePath
    ) -> dict:
        """Revoke a tenant's API key (its ledger rows stay)."""
        self._require_admin(request)
        info = await asyncio.to_thread(self._control.revoke_tenant, name)
        await self._changed()
        log.info("tenant_revoked", tenant=name)
        return info.model_dump(mode="json")

    # --- variants -----------------------------------------------------------------------

    @api.get("/admin/variants")
    async def admin_variants(self: "SchedulerIngress", request: Request) -> dict:
        """Every variant and its lifecycle state."""
        self._require_admin(request)
        variants = await asyncio.to_thread(self._control.variants)
        return VariantList(data=variants).model_dump(mode="json")

    @api.get("/admin/variants/{name}")
    async def admin_variant(self: "SchedulerIngress", request: Request, name: NamePath) -> dict:
        """One variant and its lifecycle state."""
        self._require_admin(request)
        return (await asyncio.to_thread(self._control.variant, name)).model_dump(mode="json")

    @api.post("/admin/variants")
    async def admin_add_variant(self: "SchedulerIngress", request: Request) -> JSONResponse:
        """Add a variant from one catalog entry; the cluster deploys it, then routes to it."""
        self._require_admin(request)
        body = await parse_body(request, VariantAdd)
        spec = parse_variant_entry(body.toml)
        record = await asyncio.to_thread(self._control.add_variant, spec)
        await self._changed()
        log.info("variant_added", variant=spec.name)
        return JSONResponse(record.model_dump(mode="json"), status_code=202)

    @api.delete("/admin/variants/{name}")
    async def admin_retire_variant(
        self: "SchedulerIngress", request: Request, name: NamePath
    ) -> dict:
        """Stop routing to a variant; it is removed once its in-flight work has drained."""
        self._require_admin(request)
        record = await asyncio.to_thread(self._control.retire_variant, name)
        await self._changed()
        log.info("variant_retiring", variant=name)
        return record.model_dump(mode="json")

    # --- ledger and reports -------------------------------------------------------------

    @api.get("/admin/profiles")
    async def admin_profiles(self: "SchedulerIngress", request: Request) -> dict:
        """This replica's learned energy profile: what ``wattserve simulate`` can replay."""
        self._require_admin(request)
        usage = await asyncio.to_thread(self._ledger.usage_by_variant)
        sources = sorted({s for u in usage for s in u.joules_by_source})
        points = [ProfilePoint(**row._asdict()) for row in self._scheduler.profile.measured()]
        return ProfileList(
            replica=self.replica_id, energy_sources=sources, data=points,
            overhead_s=self._scheduler.profile.overhead_s(),
        ).model_dump(mode="json")  # fmt: skip

    @api.get("/admin/ledger")
    async def admin_ledger(
        self: "SchedulerIngress",
        request: Request,
        tenant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        variant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        status: Literal["ok", "failed"] | None = None,
        since: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LEDGER_ROWS)] = 100,
    ) -> dict:
        """Ledger rows across tenants, newest first, filtered."""
        self._require_admin(request)
        rows = await asyncio.to_thread(
            self._ledger.recent, limit, tenant=tenant or ANY_TENANT, variant=variant,
            status=status, since=since,
        )  # fmt: skip
        return AdminLedgerPage(data=[r.to_entry() for r in rows]).model_dump(mode="json")

    @api.get("/admin/report")
    async def admin_report(
        self: "SchedulerIngress",
        request: Request,
        since: datetime | None = None,
        until: datetime | None = None,
        tenant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    ) -> dict:
        """Outputs, joules and savings by cause per variant and tenant in a time window."""
        self._require_admin(request)
        if since is not None and until is not None and since >= until:
            raise InvalidRequest("since must be before until", param="since")
        rows = await asyncio.to_thread(self._ledger.window, since, until, tenant)
        catalog = self._scheduler.catalog
        reference = reference_variant(catalog)
        report = window_report(
            rows,
            since=since,
            until=until,
            tenant=tenant,
            target=self._snapshot.budget.joules_per_output_target,
            reference=reference.name,
            reference_prior_j=reference.energy_prior.at_batch_size(1),
        )
        return report.model_dump(mode="json")
