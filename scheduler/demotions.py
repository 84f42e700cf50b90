"""Demotions: the shadow audit's verdicts fed back into routing, as control-plane changes.

When an audit group's interval shows with confidence that a served variant (or its
approximate reuse) falls below tolerance for a tier, ``judge`` writes a ``demotions``
row with the group's verdict and scores as its evidence, in one revision-bumping
transaction like every control-plane change; every replica's next snapshot carries it in
``Policy.demoted`` / ``Policy.approximate_demoted``, and routing acts on it. The admin
restores a demotion (``restore``); the audit then judges that pair afresh, from the
audits recorded after the restore only, so old evidence cannot demote it again at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import structlog

from wattserve import NotFound
from wattserve._admin import DemotionInfo, DemotionKind
from wattserve.policies.audit import MIN_SAMPLES, demotion_kind, tolerances
from wattserve.policies.policy import Policy
from wattserve.scheduler.control_tables import DemotionRow, bump_revision
from wattserve.telemetry.audits import AuditRow, AuditStore, audit_report
from wattserve.telemetry.database import write_transaction

log = structlog.get_logger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def demotion_info(row: DemotionRow) -> DemotionInfo:
    """A demotion as the wire shows it."""
    assert row.id is not None
    return DemotionInfo(
        id=row.id, variant=row.variant, tier=row.tier,  # type: ignore[arg-type]
        kind=row.kind,  # type: ignore[arg-type]
        evidence=json.loads(row.evidence_json), demoted_at=row.demoted_at,
        restored_at=row.restored_at, revision=row.revision,
    )  # fmt: skip


def read_demotions(conn: sa.Connection) -> list[DemotionInfo]:
    """Every demotion, in force and restored, newest first (inside a read transaction)."""
    query = sa.select(DemotionRow).order_by(DemotionRow.id.desc())  # type: ignore[union-attr]
    return [demotion_info(DemotionRow.model_validate(r._mapping)) for r in conn.execute(query)]


def in_force(demotions: Sequence[DemotionInfo], kind: DemotionKind) -> frozenset[tuple[str, str]]:
    """The (variant, tier) pairs of ``kind`` that no admin has restored."""
    return frozenset((d.variant, d.tier) for d in demotions
                     if d.kind == kind and d.restored_at is None)  # fmt: skip


class Demotions:
    """Writes of the demotions table and the audit's judgement that leads to them."""

    def __init__(self, engine: sa.Engine, audits: AuditStore) -> None:
        self.engine, self.audits = engine, audits

    def all(self) -> list[DemotionInfo]:
        """Every demotion, newest first."""
        with self.engine.connect() as conn:
            return read_demotions(conn)

    def judge(self, row: AuditRow, policy: Policy) -> DemotionInfo | None:
        """Demote ``row``'s (variant, tier) if its group now fails with confidence.

        Blocking (database reads and a write): run on a thread.
        """
        kind = demotion_kind(row.cause)  # type: ignore[arg-type]
        mine = self.all()
        if (row.variant, row.tier) in in_force(mine, kind):
            return None
        restored = [d.restored_at for d in mine if (d.variant, d.tier, d.kind)
                    == (row.variant, row.tier, kind) and d.restored_at]  # fmt: skip
        since = max(restored, default=None)
        group = [r for r in self.audits.rows(since=since)
                 if (r.variant, r.cause, r.tier) == (row.variant, row.cause, row.tier)]  # fmt: skip
        limits = tolerances(policy.audit_clip_drop_max, policy.audit_ssim_min)
        found = audit_report(group, limits, MIN_SAMPLES)
        if not found or found[0]["verdict"] != "fail":
            return None
        return self.demote(row.variant, row.tier, kind, found[0])

    def demote(self, variant: str, tier: str, kind: DemotionKind, evidence: dict) -> DemotionInfo:
        """Record a demotion with its evidence: one new control revision."""
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            revision = bump_revision(conn, now)
            made = conn.execute(sa.insert(DemotionRow).values(
                variant=variant, tier=tier, kind=kind, demoted_at=now, revision=revision,
                evidence_json=json.dumps(evidence, default=str),
            ))  # fmt: skip
            (key,) = made.inserted_primary_key  # type: ignore[misc]
            row = conn.execute(sa.select(DemotionRow).where(DemotionRow.id == key)).one()
        info = demotion_info(DemotionRow.model_validate(row._mapping))
        log.warning("variant_demoted", variant=variant, tier=tier, kind=kind,
                    why=evidence.get("why"), revision=revision)  # fmt: skip
        return info

    def restore(self, variant: str, tier: str, kind: DemotionKind) -> DemotionInfo:
        """Undo the demotion in force of (variant, tier, kind); 404 if there is none."""
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            found = conn.execute(sa.select(DemotionRow).where(
                DemotionRow.variant == variant, DemotionRow.tier == tier,
                DemotionRow.kind == kind, DemotionRow.restored_at.is_(None),  # type: ignore[union-attr]
            )).first()  # fmt: skip
            if found is None:
                raise NotFound(f"no {kind} demotion of {variant!r} for {tier!r} is in force")
            revision = bump_revision(conn, now)
            conn.execute(sa.update(DemotionRow).where(DemotionRow.id == found.id)
                         .values(restored_at=now))  # fmt: skip
        log.info("demotion_restored", variant=variant, tier=tier, kind=kind, revision=revision)
        restored = DemotionRow.model_validate({**found._mapping, "restored_at": now})
        return demotion_info(restored)
