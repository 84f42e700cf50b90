"""The control plane's tables (SQLModel): what ``telemetry.database`` migrations build.

Split from ``scheduler.control_store`` (the operations on them) so the schema reads on
its own; ``tests/test_migrations.py`` checks the migrations build exactly these.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


class ControlMetaRow(SQLModel, table=True):
    """The single revision counter every change bumps."""

    __tablename__ = "control_meta"

    id: int = Field(primary_key=True)
    revision: int
    updated_at: datetime


class BudgetRow(SQLModel, table=True):
    """The cluster budget (scope ``cluster``) or one node's cap (scope ``node:<id>``)."""

    __tablename__ = "budgets"

    scope: str = Field(primary_key=True, max_length=80)
    cap_w: float | None = None
    joules_per_output_target: float | None = None
    updated_at: datetime
    revision: int


class PolicyRow(SQLModel, table=True):
    """A serving policy; only ``default`` is used today."""

    __tablename__ = "policies"

    name: str = Field(primary_key=True, max_length=64)
    default_quality: str = Field(max_length=16)
    max_batch_size: int | None = None
    max_wait_ms: float
    share_unseeded: bool
    cache_ttl_s: float | None = None
    cache_max_bytes: int = Field(sa_type=sa.BigInteger)
    default_deadline_s: float | None = None
    allow_anonymous: bool
    idempotency_ttl_s: float | None = None  # None (rows before schema 4): the default
    default_reuse: str | None = Field(default=None, max_length=16)  # None: exact
    pool_exact_reuse: bool | None = None  # None (rows before schema 5): off
    audit_rate: float | None = None  # None (rows before schema 7): the defaults
    audit_clip_drop_max: float | None = None
    audit_ssim_min: float | None = None
    updated_at: datetime
    revision: int


class TenantRow(SQLModel, table=True):
    """A tenant: its key's hash (never the key), quotas and limits."""

    __tablename__ = "tenants"

    name: str = Field(primary_key=True, max_length=64)
    key_hash: str = Field(max_length=64, unique=True)
    key_prefix: str = Field(max_length=16)
    daily_kj: float | None = None
    monthly_kj: float | None = None
    qualities: str = Field(max_length=64)  # comma-separated tiers
    rate_limit_per_min: int | None = None
    # approximate reuse: whether allowed (None, rows before schema 5: yes) and the named
    # pool it shares latents in (None: a pool of its own)
    approximate_reuse: bool | None = None
    reuse_pool: str | None = Field(default=None, max_length=64)
    audit_rate: float | None = None  # None: the policy's
    created_at: datetime
    revoked_at: datetime | None = None


class VariantRow(SQLModel, table=True):
    """One catalog variant and where it is in its lifecycle."""

    __tablename__ = "variants"

    name: str = Field(primary_key=True, max_length=64)
    spec_json: str = Field(sa_type=sa.Text)
    state: str = Field(max_length=16)
    origin: str = Field(max_length=1000)
    detail: str | None = Field(default=None, max_length=1000)
    updated_at: datetime


class VariantDrainRow(SQLModel, table=True):
    """A scheduler replica's word that it has no work left on a retiring variant."""

    __tablename__ = "variant_drains"

    variant: str = Field(primary_key=True, max_length=64)
    replica: str = Field(primary_key=True, max_length=128)
    drained_at: datetime


class DemotionRow(SQLModel, table=True):
    """A (variant, tier) the shadow audit demoted, with its evidence; restored by the admin."""

    __tablename__ = "demotions"

    id: int | None = Field(default=None, primary_key=True)
    variant: str = Field(max_length=64)
    tier: str = Field(max_length=16)
    kind: str = Field(max_length=16)  # variant | approximate
    evidence_json: str = Field(sa_type=sa.Text)
    demoted_at: datetime
    restored_at: datetime | None = None
    revision: int


def bump_revision(conn: sa.Connection, now: datetime) -> int:
    """Bump the single control revision inside ``conn``'s transaction; the new revision."""
    conn.execute(
        sa.update(ControlMetaRow).values(revision=ControlMetaRow.revision + 1, updated_at=now)
    )
    return int(conn.execute(sa.select(ControlMetaRow.revision)).scalar_one())
