"""The shadow audit in the cluster: its auditor, its admin routes, its demotions.

Each scheduler replica runs one ``Auditor`` (``scheduler.audit``) over the shared audit
book (the ledger's database). Every recorded audit is counted in Prometheus and judged:
a group that fails with confidence becomes a demotion row, a control-plane change every
replica applies on its next refresh. ``GET /admin/audit`` reports the book per (variant,
cause, tier) with intervals and verdicts; ``POST /admin/demotions/restore`` undoes one.
No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
import structlog
from fastapi import Request

from wattserve._admin import AuditGroup, AuditReport, DemotionRestore
from wattserve.policies.audit import MIN_SAMPLES, tolerances
from wattserve.scheduler._http import api, parse_body
from wattserve.scheduler.audit import Auditor
from wattserve.scheduler.control_store import ControlSnapshot
from wattserve.scheduler.demotions import Demotions
from wattserve.telemetry.audits import AuditRow, AuditStore, audit_joules, audit_report
from wattserve.telemetry.metrics import AuditMetrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AuditService:
    """What the audit routes act on: the audit book, the demotions, the policy in force."""

    store: AuditStore
    demotions: Demotions
    clip_model: str | None  # as configured (None: no CLIP scores)
    snapshot: Callable[[], ControlSnapshot]
    apply_now: Callable[[], Awaitable[ControlSnapshot]]
    auditor: Auditor

    def report(self, since: datetime | None) -> AuditReport:
        """The audit book (since ``since``) against the policy's tolerances. Blocking."""
        policy = self.snapshot().policy
        limits = tolerances(policy.audit_clip_drop_max, policy.audit_ssim_min)
        rows = self.store.rows(since=since)
        return AuditReport(
            audit_rate=policy.audit_rate,
            tolerances={name: t.limit for name, t in limits.items()},
            clip_model=self.clip_model,
            audit_joules={k: round(v, 3) for k, v in audit_joules(rows).items()},
            groups=[AuditGroup(**g) for g in audit_report(rows, limits, MIN_SAMPLES)],
            demotions=self.demotions.all(),
            pending=self.auditor.pending,
            overflowed=self.auditor.overflowed,
        )

    def joules(self, since: datetime | None, until: datetime | None) -> dict[str, float]:
        """The audit's energy by source in a window (blocking)."""
        return audit_joules(self.store.rows(since=since, until=until))

    def after_audit(self, row: AuditRow, metrics: AuditMetrics | None) -> None:
        """Count a recorded audit and judge its group (blocking: the auditor's thread)."""
        if metrics is not None:
            metrics.record(row)
        if row.status == "scored":
            self.demotions.judge(row, self.snapshot().policy)


def start_audit(
    engine: sa.Engine,
    db_url: str,
    clip_model: str | None,
    models_dir: str | None,
    snapshot: Callable[[], ControlSnapshot],
    apply_now: Callable[[], Awaitable[ControlSnapshot]],
) -> tuple[Auditor, AuditService]:
    """This replica's auditor and audit service. Blocking (a CLIP model may load)."""
    from wattserve.telemetry.quality import ClipScorer
    from wattserve.workers.pipelines import resolve_clip_model

    store = AuditStore(db_url)
    clip = None
    if clip_model is not None:
        where = Path(models_dir) if models_dir else Path.home() / ".wattserve" / "models"
        clip = ClipScorer(resolve_clip_model(clip_model, where))
    metrics = AuditMetrics()
    auditor = Auditor(store, clip=clip, after=lambda row: service.after_audit(row, metrics))
    service = AuditService(
        store, Demotions(engine, store), clip_model, snapshot, apply_now, auditor
    )
    log.info("audit_ready", clip_model=clip_model,
             random_weights=clip.random_weights if clip else None)  # fmt: skip
    return auditor, service


class AuditRoutes:
    """``/admin/audit`` and ``/admin/demotions/*`` over ``self.audit`` (set at start)."""

    audit: AuditService

    @api.get("/admin/audit")
    async def admin_audit(self, request: Request, since: datetime | None = None) -> dict:
        """Audited outputs per (variant, cause, tier): scores, intervals, verdicts."""
        self.admin.require_admin(request)  # type: ignore[attr-defined]
        report = await asyncio.to_thread(self.audit.report, since)
        return report.model_dump(mode="json")

    @api.post("/admin/demotions/restore")
    async def admin_restore_demotion(self, request: Request) -> dict:
        """Undo a demotion: routing uses the pair again, the audit judges it afresh."""
        self.admin.require_admin(request)  # type: ignore[attr-defined]
        body = await parse_body(request, DemotionRestore)
        restored = await asyncio.to_thread(
            self.audit.demotions.restore, body.variant, body.tier, body.kind
        )
        await self.audit.apply_now()
        return restored.model_dump(mode="json")
