"""The audit book: one row per sampled output, its reference's energy and the scores.

An audit's energy is real and metered like any batch; it belongs to no user's output,
so it is booked here (``joules``, ``energy_source``) and reports subtract it from the
savings it proves. ``audit_report`` groups scored rows by (served variant, cause, tier)
and gives each group's mean, 95 % interval and verdict (``policies.audit``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from wattserve.policies.audit import Measure, Tolerance, interval, verdict
from wattserve.telemetry.database import make_engine, migrate, write_transaction

SCORES: tuple[Measure, ...] = ("ssim", "psnr_db", "clip_drop")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditRow(SQLModel, table=True):
    """One audited output: what was served, the reference run, and how they compare."""

    __tablename__ = "audits"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=_utcnow, index=True)
    request_id: str = Field(max_length=64)
    image_index: int
    tenant: str | None = Field(default=None, max_length=64)
    tier: str = Field(max_length=16)
    variant: str = Field(max_length=64)  # what served the output
    cause: str = Field(max_length=32)  # policies.audit.AuditCause
    reference_variant: str = Field(max_length=64)
    steps_skipped: int = 0
    status: str = Field(max_length=16)  # scored | dropped | failed
    detail: str | None = Field(default=None, max_length=1000)
    batch_id: str | None = Field(default=None, max_length=64)
    joules: float = 0.0  # the reference run's share, booked to the audit
    energy_source: str = Field(max_length=16)
    measure: str | None = Field(default=None, max_length=16)  # what the verdict rests on
    ssim: float | None = None
    psnr_db: float | None = None
    clip_served: float | None = None
    clip_reference: float | None = None
    clip_drop: float | None = None
    random_weights: bool = False  # CLIP scores from random weights: meaningless


class AuditStore:
    """Writes and reads of the audit book."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        migrate(self.engine)

    def record(self, row: AuditRow) -> None:
        """Write one audit."""
        with write_transaction(self.engine) as conn:
            conn.execute(sa.insert(AuditRow).values(**row.model_dump(exclude={"id"})))

    def rows(self, since: datetime | None = None, until: datetime | None = None) -> list[AuditRow]:
        """Every audit in ``[since, until)``, oldest first."""
        query = sa.select(AuditRow).order_by(AuditRow.id)  # type: ignore[arg-type]
        if since is not None:
            query = query.where(AuditRow.created_at >= since)  # type: ignore[arg-type]
        if until is not None:
            query = query.where(AuditRow.created_at < until)  # type: ignore[arg-type]
        with self.engine.connect() as conn:
            return [AuditRow.model_validate(r._mapping) for r in conn.execute(query)]


def audit_joules(rows: Iterable[AuditRow]) -> dict[str, float]:
    """The audit's energy by source: what proving the savings cost."""
    by_source: dict[str, float] = defaultdict(float)
    for row in rows:
        by_source[row.energy_source] += row.joules
    return dict(by_source)


def audit_report(
    rows: Sequence[AuditRow], tolerances: Mapping[Measure, Tolerance], min_samples: int
) -> list[dict]:
    """Per (variant, cause, tier): counts, each score's mean and interval, the verdict."""
    groups: dict[tuple[str, str, str], list[AuditRow]] = defaultdict(list)
    for row in rows:
        groups[(row.variant, row.cause, row.tier)].append(row)
    report = []
    for (variant, cause, tier), members in sorted(groups.items()):
        scored = [r for r in members if r.status == "scored"]
        measures = {r.measure for r in scored if r.measure}
        measure = measures.pop() if len(measures) == 1 else None
        values = [v for r in scored if measure and (v := getattr(r, measure)) is not None]
        found = verdict(values, tolerances.get(measure) if measure else None, min_samples)
        scores = {}
        for name in SCORES:
            sample = [getattr(r, name) for r in scored if getattr(r, name) is not None]
            if sample:
                iv = interval(sample)
                scores[name] = {"n": iv.n, "mean": iv.mean, "ci95": [iv.low, iv.high]}
        report.append({
            "variant": variant, "cause": cause, "tier": tier,
            "reference_variants": sorted({r.reference_variant for r in members}),
            "audited": len(scored),
            "dropped": sum(r.status == "dropped" for r in members),
            "failed": sum(r.status == "failed" for r in members),
            "joules": sum(r.joules for r in members),
            "scores": scores,
            "verdict": found.outcome, "measure": found.measure, "tolerance": found.limit,
            "why": found.why,
            "random_weight_scores": any(r.random_weights for r in scored),
        })  # fmt: skip
    return report
