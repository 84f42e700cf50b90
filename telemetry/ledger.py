"""The energy ledger: one row per output, from acceptance, settled once, kept forever.

Every output a request asks for gets exactly one row keyed by ``(request_id,
image_index)``: what variant made it, in which batch, the joules charged to it and the
method that measured them, its cache status and outcome. The row is written ``pending``
when the request is accepted, with the scheduler replica that holds it (``holder``), and
settled (``ok``, ``failed``, ``cancelled``) by one conditional update, so an output is
on record even if its replica dies mid-request, and can never get two final rows: a
settle that finds its row already final changes nothing.

Replicas heartbeat (``heartbeat``); ``fail_orphans`` (run by the cluster's janitor)
fails the pending rows of replicas that stopped.

The schema is created and upgraded by ``telemetry.database.migrate``; opening a store
migrates its database first, so an old database upgrades rather than breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, Session, SQLModel, col, select

from wattserve._schemas import LedgerEntry, VariantUsage
from wattserve.telemetry.database import make_engine, migrate, write_transaction

HEARTBEAT_S = 2.0  # how often a scheduler replica says its pending rows are live
HOLDER_STALE_AFTER_S = 10.0  # no heartbeat for this long: the replica is gone
SETTLED = ("ok", "failed", "cancelled")
ORPHANED = "its scheduler replica stopped before the output was settled"
ANY_TENANT = "*"  # ``recent(tenant=ANY_TENANT)``: every row; ``tenant=None``: anonymous rows


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LedgerValues(SQLModel):
    """One output of one request, as the request path builds it: a row's values.

    A plain model (validated by pydantic alone): a table model's ``__init__`` routes
    every field through SQLAlchemy's instrumentation, about a tenth of a cache hit's whole
    time in the replica, and these values only feed INSERT and UPDATE statements.
    """

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
    launch_ms: float | None = None  # arrival to its batch's launch (schema 8)
    seed: int = Field(sa_type=sa.BigInteger)
    width_px: int
    height_px: int
    holder: str | None = Field(default=None, max_length=64)  # replica that settles it
    # approximate reuse (schema 5): the schedule's steps, steps skipped, similarity, source
    steps: int | None = None
    steps_skipped: int = 0
    similarity: float | None = None
    reuse_source: str | None = Field(default=None, max_length=80)


class LedgerRow(LedgerValues, table=True):
    """One output of one request: the ``ledger`` table."""

    __tablename__ = "ledger"
    __table_args__ = (
        sa.UniqueConstraint("request_id", "image_index", name="uq_ledger_output"),
        sa.Index("ix_ledger_tenant", "tenant", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)

    def to_entry(self) -> LedgerEntry:
        """The wire form of this row."""
        return LedgerEntry.model_validate(self, from_attributes=True)


class LedgerHolder(SQLModel, table=True):
    """A scheduler replica's last heartbeat: its pending rows are live while it beats."""

    __tablename__ = "ledger_holders"

    holder: str = Field(primary_key=True, max_length=64)
    seen_at: datetime = Field(default_factory=_utcnow, index=True)


_SETTLE_FIELDS = (
    "finished_at", "variant", "route_reason", "batch_id", "batch_size", "joules",
    "energy_source", "cache", "status", "error", "latency_ms", "launch_ms",
    "steps", "steps_skipped", "similarity", "reuse_source",
)  # fmt: skip


class LedgerStore:
    """Reads and idempotent writes of ledger rows."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        migrate(self.engine)

    def record(self, rows: Iterable[LedgerValues]) -> int:
        """Insert rows in one transaction, skipping keys already written; return rows added."""
        with write_transaction(self.engine) as conn:
            return self._insert(conn, list(rows))

    def settle(self, rows: Sequence[LedgerValues]) -> int:
        """Finalise outputs: update each pending row, write rows never accepted.

        Returns how many rows this call settled; a row settled first by someone else
        (the janitor) is left as it is, so no output ever gets two final rows.
        """
        with write_transaction(self.engine) as conn:
            return self._settle(conn, rows)

    def write(self, accepted: Sequence[LedgerValues], final: Sequence[LedgerValues]) -> None:
        """``record(accepted)`` and ``settle(final)`` of many requests in one transaction.

        The group commit of ``scheduler.group_commit``: one commit (one fsync on SQLite,
        one round trip on Postgres) for every request that wrote meanwhile.
        """
        with write_transaction(self.engine) as conn:
            self._insert(conn, accepted)
            self._settle(conn, final)

    def _insert(self, conn: sa.Connection, rows: Sequence[LedgerValues]) -> int:
        if not rows:
            return 0
        values = [row.model_dump(exclude={"id"}) for row in rows]
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            stmt = sqlite_insert(LedgerRow).on_conflict_do_nothing(
                index_elements=["request_id", "image_index"]
            )
        elif dialect == "postgresql":
            stmt = pg_insert(LedgerRow).on_conflict_do_nothing(constraint="uq_ledger_output")
        else:
            raise NotImplementedError(f"idempotent ledger writes not implemented for {dialect}")
        # SQLAlchemy keeps an INSERT's rowcount only when asked (psycopg reports -1 else)
        result = conn.execute(stmt, values, execution_options={"preserve_rowcount": True})
        return max(result.rowcount, 0)

    def _settle(self, conn: sa.Connection, rows: Sequence[LedgerValues]) -> int:
        if not rows:
            return 0
        table = LedgerRow.__table__  # type: ignore[attr-defined]
        stmt = (
            table.update()
            .where(table.c.request_id == sa.bindparam("k_request_id"),
                   table.c.image_index == sa.bindparam("k_image_index"),
                   table.c.status == "pending")
            .values({name: sa.bindparam(name) for name in _SETTLE_FIELDS})
        )  # fmt: skip
        values = [
            {"k_request_id": r.request_id, "k_image_index": r.image_index,
             **{name: getattr(r, name) for name in _SETTLE_FIELDS}}
            for r in rows
        ]  # fmt: skip
        updated = conn.execute(stmt, values, execution_options={"preserve_rowcount": True})
        settled = max(updated.rowcount, 0)
        if settled < len(rows):  # not accepted first (or settled already: then a no-op)
            settled += self._insert(conn, rows)
        return settled

    def heartbeat(self, holder: str) -> None:
        """``holder`` is alive now: its pending rows are not orphans."""
        table = LedgerHolder.__table__  # type: ignore[attr-defined]
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            found = conn.execute(table.update().where(table.c.holder == holder).values(seen_at=now))
            if found.rowcount == 0:
                conn.execute(table.insert().values(holder=holder, seen_at=now))

    def fail_orphans(self, stale_after_s: float) -> int:
        """Fail pending rows whose holder has not beaten for ``stale_after_s``; how many.

        Their joules stay 0 (``estimated``): what a batch of theirs drew, if one ran, is
        on the device's books as unattributed energy, not guessed onto the output.
        """
        rows, holders = LedgerRow.__table__, LedgerHolder.__table__  # type: ignore[attr-defined]
        now = _utcnow()
        alive = sa.select(holders.c.holder).where(
            holders.c.seen_at >= now - timedelta(seconds=stale_after_s)
        )
        stmt = (
            rows.update()
            .where(rows.c.status == "pending", rows.c.holder.is_not(None),
                   rows.c.holder.not_in(alive))
            .values(status="failed", error=ORPHANED, finished_at=now)
        )  # fmt: skip
        with write_transaction(self.engine) as conn:
            failed = conn.execute(stmt, execution_options={"preserve_rowcount": True})
            conn.execute(holders.delete().where(holders.c.seen_at < now - timedelta(days=1)))
        return max(failed.rowcount, 0)

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
        pending = sa.case((LedgerRow.status == "pending", 1), else_=0)
        query = (
            sa.select(
                LedgerRow.variant,
                LedgerRow.energy_source,
                sa.func.count(sa.distinct(LedgerRow.request_id)),
                sa.func.sum(ok),
                sa.func.count(),
                sa.func.sum(LedgerRow.joules),
                sa.func.sum(pending),
            )
            .group_by(LedgerRow.variant, LedgerRow.energy_source)
            .order_by(LedgerRow.variant)
        )
        with self.engine.connect() as conn:
            groups = conn.execute(query).all()
        usage: dict[str, dict] = {}
        for variant, source, requests, outputs, rows, joules, waiting in groups:
            entry = usage.setdefault(
                variant, {"requests": 0, "outputs": 0, "rows": 0, "pending": 0, "by_source": {}}
            )
            entry["requests"] += requests  # a request has one variant, so no double count
            entry["outputs"] += outputs or 0
            entry["rows"] += rows
            entry["pending"] += waiting or 0
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
                    failed_outputs=entry["rows"] - entry["outputs"] - entry["pending"],
                    pending_outputs=entry["pending"],
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
