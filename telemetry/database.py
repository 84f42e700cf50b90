"""The database: engines, write transactions and versioned schema migrations.

One database holds the ledger, the result-cache index and the control plane (budgets,
policies, tenants, variants). SQLite is the embedded default; PostgreSQL is the choice
when several nodes or replicas write. Any SQLAlchemy URL is accepted.

**Schema versions are migrated, never recreated.** ``MIGRATIONS`` is an ordered list of
steps, each written against *frozen* table definitions (what the schema was at that
version, not what the models say today), so a database written by any earlier release
upgrades in place without losing rows. A fresh database runs every step from the start:
there is one way to build the schema. ``tests/test_migrations.py`` checks that the
migrated schema matches the SQLModel tables the code uses, so the two cannot drift.

=========  ===================================================================
version    change
=========  ===================================================================
1          ``ledger`` and ``result_cache`` (issues 2-4; no version table yet)
2          control plane: ``control_meta``, ``budgets``, ``policies``, ``tenants``,
           ``variants``, ``variant_drains``
3          ``ledger.tenant`` (+ index): per-tenant ledgers, usage and quotas
4          ``ledger.holder``, ``ledger_holders``, ``idempotency_keys``: rows from
           acceptance, the janitor, idempotent requests
5          approximate reuse: ledger step columns, ``latent_cache``, reuse policy
6          ``audits``: the shadow audit's book (issue 14)
7          ``demotions``; audit rate and tolerances in ``policies``, ``tenants``
=========  ===================================================================

**Writers never see "database is locked".** On SQLite every write transaction starts
with ``BEGIN IMMEDIATE`` (it takes the write lock up front and waits up to the busy
timeout for it, instead of failing when a read transaction tries to upgrade), while
reads start a deferred ``BEGIN`` and run beside writers under WAL.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlmodel import create_engine

from wattserve import WattserveError

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
_WRITE = "wattserve_write"  # execution option that marks a write transaction


class SchemaError(WattserveError):
    """The database's schema is newer than this code, or a migration failed."""


def _sqlite_connect(dbapi_conn: object, _record: object) -> None:
    # Let SQLAlchemy's "begin" event (below) emit BEGIN: pysqlite's own implicit BEGIN
    # is always deferred and cannot be made IMMEDIATE per transaction.
    dbapi_conn.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Turning a new database to WAL takes its lock without calling the busy handler, so
    # connections opening it at once can get "database is locked": retry until the timeout.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(db_url: str) -> sa.Engine:
    """An engine for ``db_url``; SQLite gets WAL, a busy timeout and its directory made."""
    url = sa.make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(db_url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        db_url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    )
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


@contextmanager
def write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One atomic write: all of it commits, or (on any exception) none of it does."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{_WRITE: True})
        with conn.begin():
            yield conn


# --- migrations ---------------------------------------------------------------------

VERSION_TABLE = "wattserve_schema"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _v1_ledger_and_cache(conn: sa.Connection) -> None:
    """The schema issues 2-4 shipped (created then by ``create_all``, frozen here).

    Datetimes are SQLModel's UTC-aware columns (``TIMESTAMP WITH TIME ZONE`` where the
    database has one; UTC without an offset on SQLite).
    """
    md = sa.MetaData()
    sa.Table(
        "ledger", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False, index=True),
        sa.Column("image_index", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(256), index=True),
        sa.Column("variant", sa.String(64), nullable=False, index=True),
        sa.Column("quality", sa.String(16), nullable=False),
        sa.Column("route_reason", sa.String(64), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("joules", sa.Float, nullable=False),
        sa.Column("energy_source", sa.String(16), nullable=False),
        sa.Column("cache", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("error", sa.String(1000)),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("width_px", sa.Integer, nullable=False),
        sa.Column("height_px", sa.Integer, nullable=False),
        sa.UniqueConstraint("request_id", "image_index", name="uq_ledger_output"),
    )  # fmt: skip
    sa.Table(
        "result_cache", md,
        sa.Column("output_key", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("quality_score", sa.Float, nullable=False),
        sa.Column("energy_source", sa.String(16), nullable=False),
        sa.Column("png_sha256", sa.String(64), nullable=False, index=True),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("created_s", sa.Float, nullable=False),
        sa.Column("last_used_s", sa.Float, nullable=False, index=True),
        sa.Column("source_request_id", sa.String(64), nullable=False),
        sa.Column("source_image_index", sa.Integer, nullable=False),
    )  # fmt: skip
    md.create_all(conn)


def _v2_control_plane(conn: sa.Connection) -> None:
    """Budgets, policies, tenants and variants: persisted, revisioned control state."""
    md = sa.MetaData()
    sa.Table(
        "control_meta", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    sa.Table(
        "budgets", md,
        sa.Column("scope", sa.String(80), primary_key=True),
        sa.Column("cap_w", sa.Float),
        sa.Column("joules_per_output_target", sa.Float),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
    )  # fmt: skip
    sa.Table(
        "policies", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("default_quality", sa.String(16), nullable=False),
        sa.Column("max_batch_size", sa.Integer),
        sa.Column("max_wait_ms", sa.Float, nullable=False),
        sa.Column("share_unseeded", sa.Boolean, nullable=False),
        sa.Column("cache_ttl_s", sa.Float),
        sa.Column("cache_max_bytes", sa.BigInteger, nullable=False),
        sa.Column("default_deadline_s", sa.Float),
        sa.Column("allow_anonymous", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
    )  # fmt: skip
    sa.Table(
        "tenants", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("daily_kj", sa.Float),
        sa.Column("monthly_kj", sa.Float),
        sa.Column("qualities", sa.String(64), nullable=False),
        sa.Column("rate_limit_per_min", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )  # fmt: skip
    sa.Table(
        "variants", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(1000), nullable=False),
        sa.Column("detail", sa.String(1000)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    sa.Table(
        "variant_drains", md,
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("replica", sa.String(128), primary_key=True),
        sa.Column("drained_at", sa.DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    md.create_all(conn)
    conn.execute(md.tables["control_meta"].insert().values(id=1, revision=0, updated_at=_utcnow()))


def _v3_ledger_tenant(conn: sa.Connection) -> None:
    """Who each output was for: per-tenant ledgers, usage and quotas."""
    conn.execute(sa.text("ALTER TABLE ledger ADD COLUMN tenant VARCHAR(64)"))
    conn.execute(sa.text("CREATE INDEX ix_ledger_tenant ON ledger (tenant, created_at)"))


def _v4_pending_rows_and_idempotency(conn: sa.Connection) -> None:
    """Rows from acceptance (``holder``, heartbeats) and idempotency keys (issue 12)."""
    conn.execute(sa.text("ALTER TABLE ledger ADD COLUMN holder VARCHAR(64)"))
    conn.execute(sa.text("ALTER TABLE policies ADD COLUMN idempotency_ttl_s FLOAT"))
    md = sa.MetaData()
    sa.Table(
        "ledger_holders", md,
        sa.Column("holder", sa.String(64), primary_key=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )  # fmt: skip
    sa.Table(
        "idempotency_keys", md,
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("response_json", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )  # fmt: skip
    md.create_all(conn)


def _v5_approximate_reuse(conn: sa.Connection) -> None:
    """Approximate reuse (issue 13): receipts' step columns and the latent store."""
    for column in ("steps INTEGER", "steps_skipped INTEGER NOT NULL DEFAULT 0",
                   "similarity FLOAT", "reuse_source VARCHAR(80)"):  # fmt: skip
        conn.execute(sa.text(f"ALTER TABLE ledger ADD COLUMN {column}"))
    conn.execute(sa.text("ALTER TABLE policies ADD COLUMN default_reuse VARCHAR(16)"))
    conn.execute(sa.text("ALTER TABLE policies ADD COLUMN pool_exact_reuse BOOLEAN"))
    conn.execute(sa.text("ALTER TABLE tenants ADD COLUMN approximate_reuse BOOLEAN"))
    conn.execute(sa.text("ALTER TABLE tenants ADD COLUMN reuse_pool VARCHAR(64)"))
    md = sa.MetaData()
    sa.Table(
        "latent_cache", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("entry_id", sa.String(80), nullable=False, unique=True),
        sa.Column("pool", sa.String(80), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("width_px", sa.Integer, nullable=False),
        sa.Column("height_px", sa.Integer, nullable=False),
        sa.Column("captured_steps", sa.String(64), nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("saved_steps", sa.Float, nullable=False),
        sa.Column("hits", sa.Integer, nullable=False),
        sa.Column("created_s", sa.Float, nullable=False),
        sa.Column("updated_s", sa.Float, nullable=False),
        sa.Column("source_request_id", sa.String(64), nullable=False),
        sa.Column("source_image_index", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(64)),
        sa.Index("ix_latent_cache_space", "pool", "variant", "width_px", "height_px", "id"),
    )  # fmt: skip
    md.create_all(conn)


def _v6_audits(conn: sa.Connection) -> None:
    """The shadow audit (issue 14): one row per audited output."""
    md = sa.MetaData()
    sa.Table(
        "audits", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("image_index", sa.Integer, nullable=False),
        sa.Column("tenant", sa.String(64)),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("cause", sa.String(32), nullable=False),
        sa.Column("reference_variant", sa.String(64), nullable=False),
        sa.Column("steps_skipped", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(1000)),
        sa.Column("batch_id", sa.String(64)),
        sa.Column("joules", sa.Float, nullable=False),
        sa.Column("energy_source", sa.String(16), nullable=False),
        sa.Column("measure", sa.String(16)),
        *(sa.Column(name, sa.Float) for name in
          ("ssim", "psnr_db", "clip_served", "clip_reference", "clip_drop")),
        sa.Column("random_weights", sa.Boolean, nullable=False),
    )  # fmt: skip
    md.create_all(conn)


def _v7_demotions(conn: sa.Connection) -> None:
    """Audit feedback (issue 14): demotions as control-plane rows, the audit's knobs."""
    for column in ("audit_rate FLOAT", "audit_clip_drop_max FLOAT", "audit_ssim_min FLOAT"):
        conn.execute(sa.text(f"ALTER TABLE policies ADD COLUMN {column}"))
    conn.execute(sa.text("ALTER TABLE tenants ADD COLUMN audit_rate FLOAT"))
    md = sa.MetaData()
    sa.Table(
        "demotions", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("evidence_json", sa.Text, nullable=False),
        sa.Column("demoted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("restored_at", sa.DateTime(timezone=True)),
        sa.Column("revision", sa.Integer, nullable=False),
    )  # fmt: skip
    md.create_all(conn)


def _v8_launch_time(conn: sa.Connection) -> None:
    """Each output's time from arrival to its batch's launch (issue 15: the miss path)."""
    conn.execute(sa.text("ALTER TABLE ledger ADD COLUMN launch_ms FLOAT"))


Migration = Callable[[sa.Connection], None]
MIGRATIONS: tuple[Migration, ...] = (
    _v1_ledger_and_cache, _v2_control_plane, _v3_ledger_tenant, _v4_pending_rows_and_idempotency,
    _v5_approximate_reuse, _v6_audits, _v7_demotions, _v8_launch_time,
)  # fmt: skip
HEAD = len(MIGRATIONS)


def schema_version(conn: sa.Connection) -> int:
    """The version of the schema behind ``conn``: 0 for an empty database."""
    tables = set(sa.inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        row = conn.execute(sa.text(f"SELECT version FROM {VERSION_TABLE}")).first()
        return int(row[0]) if row else 0
    return 1 if "ledger" in tables else 0  # issues 2-4 wrote no version table


def migrate(engine: sa.Engine, target: int = HEAD) -> int:
    """Upgrade the schema to ``target`` in one transaction; return the version before.

    Concurrent callers (several replicas starting at once) serialize on the write lock
    and the later ones find nothing to do.
    """
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7170751)"))  # one migrator
        before = schema_version(conn)
        if before > HEAD:
            raise SchemaError(
                f"database schema version {before} is newer than this wattserve ({HEAD}): "
                "upgrade wattserve instead of downgrading the database"
            )
        if before >= target:
            return before
        for version in range(before + 1, target + 1):
            MIGRATIONS[version - 1](conn)
        if VERSION_TABLE not in sa.inspect(conn).get_table_names():
            conn.execute(sa.text(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)"))
            conn.execute(sa.text(f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)"))
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version = :v"), {"v": target})
    log.info("schema_migrated", before=before, after=target)
    return before
