"""The energy ledger: one row per output, written once, kept forever.

Every output a request asks for gets exactly one row keyed by ``(request_id,
image_index)``: what variant made it, in which batch, the joules charged to it and the
method that measured them, its cache status and outcome. Writes are idempotent (a
replayed write of the same key is ignored), so a retry can never double-count.

The schema is created and upgraded by ``telemetry.database.migrate``; opening a store
migrates its database first, so an old database upgrades rather than breaks.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, Session, SQLModel, col, select

from wattserve._schemas import LedgerEntry, VariantUsage
from wattserve.telemetry.database import make_engine, migrate, write_transaction

ANY_TENANT = "*"  # ``recent(tenant=ANY_TENANT)``: every row; ``tenant=None``: anonymous rows


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LedgerRow(SQLModel, table=True):
    """One output of one request."""

    __tablename__ = "ledger"
    __table_args__ = (
        sa.UniqueConstraint("request_id", "image_index", name="uq_ledger_output"),
        sa.Index("ix_ledger_tenant", "tenant", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True, max_length=64)
    image_index: int
    created_at: datetime = Field(default_factory=_utcnow, index=True)
    finished_at: datetime = Field(default_factory=_utcnow)
    user: str | None = Field(default=None, index=True, max_length=256)
    tenant: str | None = Field(default=None, max_length=64)  # indexed with created_at
    variant: str = Field(index=True, max_length=64)
    quality: str = Field(max_length=16)
    route_reason: str = Field(max_length=64)
    batch_id: str = Field(max_length=64)
    batch_size: int
    joules: float
    energy_source: str = Field(max_length=16)
    cache: str = Field(max_length=16)
    status: str = Field(index=True, max_length=16)
    error: str | None = Field(default=None, max_length=1000)
    latency_ms: float
    seed: int = Field(sa_type=sa.BigInteger)
    width_px: int
    height_px: int

    def to_entry(self) -> LedgerEntry:
        """The wire form of this row."""
        return LedgerEntry.model_validate(self, from_attributes=True)


class LedgerStore:
    """Reads and idempotent writes of ledger rows."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        migrate(self.engine)

    def record(self, rows: Iterable[LedgerRow]) -> int:
        """Insert rows in one transaction, skipping keys already written; return rows added."""
        values = [row.model_dump(exclude={"id"}) for row in rows]
        if not values:
            return 0
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            stmt = sqlite_insert(LedgerRow).on_conflict_do_nothing(
                index_elements=["request_id", "image_index"]
            )
        elif dialect == "postgresql":
            stmt = pg_insert(LedgerRow).on_conflict_do_nothing(constraint="uq_ledger_output")
        else:
            raise NotImplementedError(f"idempotent ledger writes not implemented for {dialect}")
        with write_transaction(self.engine) as conn:
            # SQLAlchemy keeps an INSERT's rowcount only when asked (psycopg reports -1 else)
            result = conn.execute(stmt, values, execution_options={"preserve_rowcount": True})
        return max(result.rowcount, 0)

    def recent(
        self,
        limit: int,
        *,
        tenant: str | None = ANY_TENANT,
        variant: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
    ) -> list[LedgerRow]:
        """The newest ``limit`` rows matching every filter given, newest first.

        ``tenant`` is a tenant's name, None for rows of anonymous requests, or
        ``ANY_TENANT`` for all rows.
        """
        query = select(LedgerRow)
        if tenant != ANY_TENANT:
            query = query.where(
                LedgerRow.tenant == tenant if tenant else LedgerRow.tenant.is_(None)
            )  # type: ignore[union-attr]
        for column, value in ((LedgerRow.variant, variant), (LedgerRow.status, status)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(LedgerRow.created_at >= since)
        with Session(self.engine) as session:
            return list(session.exec(query.order_by(col(LedgerRow.id).desc()).limit(limit)))

    def tenant_joules(self, tenant: str, since: datetime) -> float:
        """Joules charged to ``tenant``'s outputs since ``since``: what its quotas count."""
        query = sa.select(sa.func.coalesce(sa.func.sum(LedgerRow.joules), 0.0)).where(
            LedgerRow.tenant == tenant, LedgerRow.created_at >= since
        )
        with self.engine.connect() as conn:
            return float(conn.execute(query).scalar_one())

    def window(
        self, since: datetime | None, until: datetime | None, tenant: str | None = None
    ) -> list[LedgerRow]:
        """Every row in ``[since, until)`` (optionally one tenant's), oldest first."""
        query = select(LedgerRow)
        if since is not None:
            query = query.where(LedgerRow.created_at >= since)
        if until is not None:
            query = query.where(LedgerRow.created_at < until)
        if tenant is not None:
            query = query.where(LedgerRow.tenant == tenant)
        with Session(self.engine) as session:
            return list(session.exec(query.order_by(col(LedgerRow.id))))

    def for_request(self, request_id: str) -> list[LedgerRow]:
        """Every row of one request, by image index."""
        with Session(self.engine) as session:
            query = (
                select(LedgerRow)
                .where(LedgerRow.request_id == request_id)
                .order_by(col(LedgerRow.image_index))
            )
            return list(session.exec(query))

    def usage_by_variant(self) -> list[VariantUsage]:
        """Requests, outputs and joules per variant, split by energy source."""
        ok = sa.case((LedgerRow.status == "ok", 1), else_=0)
        query = (
            sa.select(
                LedgerRow.variant,
                LedgerRow.energy_source,
                sa.func.count(sa.distinct(LedgerRow.request_id)),
                sa.func.sum(ok),
                sa.func.count(),
                sa.func.sum(LedgerRow.joules),
            )
            .group_by(LedgerRow.variant, LedgerRow.energy_source)
            .order_by(LedgerRow.variant)
        )
        with self.engine.connect() as conn:
            groups = conn.execute(query).all()
        usage: dict[str, dict] = {}
        for variant, source, requests, outputs, rows, joules in groups:
            entry = usage.setdefault(
                variant, {"requests": 0, "outputs": 0, "rows": 0, "by_source": {}}
            )
            entry["requests"] += requests  # a request has one variant, so no double count
            entry["outputs"] += outputs or 0
            entry["rows"] += rows
            entry["by_source"][source] = float(joules or 0.0)
        result = []
        for variant, entry in usage.items():
            joules = sum(entry["by_source"].values())
            sources = list(entry["by_source"])
            result.append(
                VariantUsage(
                    variant=variant,
                    requests=entry["requests"],
                    outputs=entry["outputs"],
                    failed_outputs=entry["rows"] - entry["outputs"],
                    joules=joules,
                    joules_per_output=joules / entry["outputs"] if entry["outputs"] else None,
                    energy_source=sources[0] if len(sources) == 1 else "mixed",
                    joules_by_source=entry["by_source"],
                )
            )
        return result

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()
