"""The control plane's persisted state: budgets, policies, tenants and variants.

Every change is one write transaction that also bumps the single ``control_meta``
revision, so a change is applied fully or not at all, and a scheduler replica learns
that *something* changed by reading one integer (``revision()``) every refresh
interval; only then does it load a whole new :class:`ControlSnapshot`. The engine is
injected (it is the ledger's; ``telemetry.database`` creates and migrates it). What the
state *means* is pure data in ``policies`` (``Budget``, ``Policy``, ``Tenant``).

Variants have a lifecycle: ``deploying`` (added, being started) → ``active`` (routed
to) → ``retiring`` (no new work; in-flight work drains) → ``retired`` (its deployment
is gone). A deploy that fails is ``failed`` with the reason in ``detail``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import sqlalchemy as sa

from wattserve import Conflict, InvalidRequest, NotFound
from wattserve._admin import (
    BudgetUpdate,
    DemotionInfo,
    PolicyUpdate,
    TenantCreate,
    TenantInfo,
    TenantUpdate,
    VariantRecord,
)
from wattserve._schemas import BudgetInfo
from wattserve.policies.catalog import Catalog, VariantSpec
from wattserve.policies.policy import Budget, Policy
from wattserve.policies.tenancy import Tenant, hash_key, new_api_key
from wattserve.scheduler.control_tables import (
    BudgetRow,
    ControlMetaRow,
    PolicyRow,
    TenantRow,
    VariantDrainRow,
    VariantRow,
    bump_revision,
)
from wattserve.scheduler.demotions import in_force, read_demotions
from wattserve.telemetry.database import write_transaction

CLUSTER_SCOPE = "cluster"
NODE_SCOPE_PREFIX = "node:"
DEFAULT_POLICY = "default"
DEFAULT_IDEMPOTENCY_TTL_S = Policy().idempotency_ttl_s
ROUTABLE_STATES = ("active",)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ControlSnapshot:
    """Everything the control plane decides, as of one revision."""

    revision: int
    budget: Budget
    budget_updated_at: datetime | None
    policy: Policy
    policy_updated_at: datetime | None
    tenants: dict[str, Tenant] = field(default_factory=dict)  # by key hash, active only
    variants: tuple[tuple[VariantSpec, str], ...] = ()  # (spec, state), every state
    demotions: tuple[DemotionInfo, ...] = ()  # the audit's, in force and restored

    def budget_info(self) -> BudgetInfo:
        """The budget as the wire shows it."""
        return BudgetInfo(
            cluster_cap_w=self.budget.cluster_cap_w,
            joules_per_output_target=self.budget.joules_per_output_target,
            node_caps_w=dict(self.budget.node_caps_w),
            updated_at=self.budget_updated_at,
            revision=self.revision,
        )

    def catalog(self, source_path: str = "database") -> Catalog:
        """The variants routing may use now (state ``active``)."""
        specs = tuple(spec for spec, state in self.variants if state in ROUTABLE_STATES)
        return Catalog(source_path=source_path, variants=specs)

    def in_state(self, state: str) -> list[str]:
        """Names of the variants in ``state``."""
        return [spec.name for spec, s in self.variants if s == state]


class ControlStore:
    """Reads and atomic, revision-bumping writes of the control-plane tables."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # --- reads ------------------------------------------------------------------------

    def revision(self) -> int:
        """The current revision: cheap enough to poll every refresh interval."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(ControlMetaRow.revision)).scalar_one())

    def snapshot(self) -> ControlSnapshot:
        """Everything in force now, read in one transaction."""
        with self.engine.connect() as conn, conn.begin():
            revision = int(conn.execute(sa.select(ControlMetaRow.revision)).scalar_one())
            budgets = [
                BudgetRow.model_validate(r._mapping) for r in conn.execute(sa.select(BudgetRow))
            ]
            policy_row = conn.execute(
                sa.select(PolicyRow).where(PolicyRow.name == DEFAULT_POLICY)
            ).first()
            tenants = conn.execute(
                sa.select(TenantRow).where(TenantRow.revoked_at.is_(None))  # type: ignore[union-attr]
            ).all()
            variants = conn.execute(sa.select(VariantRow).order_by(VariantRow.name)).all()
            demotions = read_demotions(conn)
        cluster = next((b for b in budgets if b.scope == CLUSTER_SCOPE), None)
        nodes = {
            b.scope.removeprefix(NODE_SCOPE_PREFIX): b.cap_w
            for b in budgets
            if b.scope.startswith(NODE_SCOPE_PREFIX) and b.cap_w is not None
        }
        budget = Budget(
            cluster_cap_w=cluster.cap_w if cluster else None,
            joules_per_output_target=cluster.joules_per_output_target if cluster else None,
            node_caps_w=nodes,
        )
        budget_at = max((b.updated_at for b in budgets), default=None)
        policy = Policy()
        policy_at = None
        if policy_row is not None:
            p = PolicyRow.model_validate(policy_row._mapping)
            policy = _policy_from_row(p)
            policy_at = p.updated_at
        live = [_tenant_from_row(TenantRow.model_validate(t._mapping)) for t in tenants]
        by_key = {t.key_hash: t for t in live}
        pools = {t.name: t.reuse_pool for t in by_key.values() if t.reuse_pool is not None}
        rates = {t.name: t.audit_rate for t in by_key.values() if t.audit_rate is not None}
        policy = replace(
            policy, reuse_pools=pools, tenant_audit_rates=rates,  # tenants' own settings
            demoted=in_force(demotions, "variant"),  # the audit's measured verdicts
            approximate_demoted=in_force(demotions, "approximate"),
        )  # fmt: skip
        return ControlSnapshot(
            revision=revision,
            budget=budget,
            budget_updated_at=budget_at,
            policy=policy,
            policy_updated_at=policy_at,
            demotions=tuple(demotions),
            tenants=by_key,
            variants=tuple(
                (VariantSpec.model_validate_json(v.spec_json), v.state) for v in variants
            ),
        )

    def tenants(self) -> list[TenantInfo]:
        """Every tenant, revoked ones included, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(TenantRow).order_by(TenantRow.name)).all()
        return [_tenant_info(TenantRow.model_validate(r._mapping)) for r in rows]

    def tenant(self, name: str) -> TenantInfo:
        """One tenant, or ``NotFound``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(TenantRow).where(TenantRow.name == name)).first()
        if row is None:
            raise NotFound(f"no tenant named {name!r}", param="name")
        return _tenant_info(TenantRow.model_validate(row._mapping))

    def variants(self) -> list[VariantRecord]:
        """Every variant with its state, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(VariantRow).order_by(VariantRow.name)).all()
        return [_variant_record(VariantRow.model_validate(r._mapping)) for r in rows]

    def variant(self, name: str) -> VariantRecord:
        """One variant, or ``NotFound``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(VariantRow).where(VariantRow.name == name)).first()
        if row is None:
            raise NotFound(f"no variant named {name!r}", param="name")
        return _variant_record(VariantRow.model_validate(row._mapping))

    def drains(self, variant: str) -> int:
        """How many scheduler replicas have drained ``variant``."""
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).where(VariantDrainRow.variant == variant)
            return int(conn.execute(query).scalar_one())

    # --- writes -----------------------------------------------------------------------

    def set_budget(self, update: BudgetUpdate) -> None:
        """Apply the fields set in ``update`` (``null`` clears) to one scope, atomically."""
        fields = update.model_fields_set - {"node"}
        if not fields:
            raise InvalidRequest("nothing to change: give watts and/or joules_per_output")
        if update.node is not None and "joules_per_output" in fields:
            raise InvalidRequest(
                "joules_per_output is cluster-wide; set it without node", param="node"
            )
        scope = CLUSTER_SCOPE if update.node is None else NODE_SCOPE_PREFIX + update.node
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            revision = bump_revision(conn, now)
            row = conn.execute(sa.select(BudgetRow).where(BudgetRow.scope == scope)).first()
            values = dict(row._mapping) if row else {"scope": scope, "cap_w": None,
                                                      "joules_per_output_target": None}  # fmt: skip
            if "watts" in fields:
                values["cap_w"] = update.watts
            if "joules_per_output" in fields:
                values["joules_per_output_target"] = update.joules_per_output
            values.update(updated_at=now, revision=revision)
            conn.execute(sa.delete(BudgetRow).where(BudgetRow.scope == scope))
            conn.execute(sa.insert(BudgetRow).values(**values))

    def seed_budget(self, cap_w: float | None, joules_per_output_target: float | None) -> bool:
        """Set the cluster budget from settings only if none was ever set; True if it was."""
        if cap_w is None and joules_per_output_target is None:
            return False
        with write_transaction(self.engine) as conn:
            exists = conn.execute(
                sa.select(BudgetRow.scope).where(BudgetRow.scope == CLUSTER_SCOPE)
            ).first()
            if exists:
                return False
            now = _utcnow()
            revision = bump_revision(conn, now)
            conn.execute(sa.insert(BudgetRow).values(
                scope=CLUSTER_SCOPE, cap_w=cap_w, joules_per_output_target=joules_per_output_target,
                updated_at=now, revision=revision,
            ))  # fmt: skip
        return True

    def seed_policy(self, update: PolicyUpdate) -> bool:
        """Apply ``update`` only if the policy was never set; True if it was applied."""
        with self.engine.connect() as conn:
            exists = conn.execute(sa.select(PolicyRow.name)).first()
        if exists or not update.model_fields_set:
            return False
        self.set_policy(update)
        return True

    def set_policy(self, update: PolicyUpdate) -> None:
        """Apply the fields set in ``update`` to the default policy, atomically."""
        fields = update.model_fields_set
        if not fields:
            raise InvalidRequest("nothing to change: give at least one policy field")
        non_nullable = {"default_quality", "max_wait_ms", "share_unseeded", "cache_max_bytes",
                        "allow_anonymous", "idempotency_ttl_s", "default_reuse",
                        "pool_exact_reuse", *_AUDIT_FIELDS}  # fmt: skip
        for name in fields & non_nullable:
            if getattr(update, name) is None:
                raise InvalidRequest(f"{name}: may not be null", param=name)
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            revision = bump_revision(conn, now)
            row = conn.execute(sa.select(PolicyRow).where(PolicyRow.name == DEFAULT_POLICY)).first()
            values = dict(row._mapping) if row else policy_values(Policy())
            for name in fields:
                values[name] = getattr(update, name)
            values.update(name=DEFAULT_POLICY, updated_at=now, revision=revision)
            conn.execute(sa.delete(PolicyRow).where(PolicyRow.name == DEFAULT_POLICY))
            conn.execute(sa.insert(PolicyRow).values(**values))

    def create_tenant(self, create: TenantCreate) -> tuple[TenantInfo, str]:
        """A new tenant and its API key (returned once, stored only as a hash)."""
        api_key = new_api_key()
        now = _utcnow()
        row = TenantRow(
            name=create.name, key_hash=hash_key(api_key), key_prefix=api_key[:10],
            daily_kj=create.daily_kj, monthly_kj=create.monthly_kj,
            qualities=",".join(dict.fromkeys(create.qualities)),
            rate_limit_per_min=create.rate_limit_per_min, created_at=now,
            approximate_reuse=create.approximate_reuse, reuse_pool=create.reuse_pool,
            audit_rate=create.audit_rate,
        )  # fmt: skip
        with write_transaction(self.engine) as conn:
            taken = conn.execute(sa.select(TenantRow.name).where(TenantRow.name == create.name))
            if taken.first():
                raise Conflict(f"a tenant named {create.name!r} already exists", param="name")
            bump_revision(conn, now)
            conn.execute(sa.insert(TenantRow).values(**row.model_dump()))
        return _tenant_info(row), api_key

    def update_tenant(self, name: str, update: TenantUpdate) -> TenantInfo:
        """Apply the fields set in ``update`` (``null`` removes a limit)."""
        fields = update.model_fields_set
        if not fields:
            raise InvalidRequest("nothing to change: give at least one tenant field")
        for name in fields & {"qualities", "approximate_reuse"}:
            if getattr(update, name) is None:
                raise InvalidRequest(f"{name}: may not be null", param=name)
        values = {f: getattr(update, f) for f in fields}
        if "qualities" in values:
            values["qualities"] = ",".join(dict.fromkeys(values["qualities"]))
        with write_transaction(self.engine) as conn:
            self._live_tenant(conn, name)
            bump_revision(conn, _utcnow())
            conn.execute(sa.update(TenantRow).where(TenantRow.name == name).values(**values))
        return self.tenant(name)

    def revoke_tenant(self, name: str) -> TenantInfo:
        """Revoke the tenant's key: its requests are refused from the next refresh on."""
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            self._live_tenant(conn, name)
            bump_revision(conn, now)
            conn.execute(sa.update(TenantRow).where(TenantRow.name == name).values(revoked_at=now))
        return self.tenant(name)

    @staticmethod
    def _live_tenant(conn: sa.Connection, name: str) -> None:
        row = conn.execute(sa.select(TenantRow.revoked_at).where(TenantRow.name == name)).first()
        if row is None:
            raise NotFound(f"no tenant named {name!r}", param="name")
        if row[0] is not None:
            raise Conflict(f"tenant {name!r} is revoked", param="name")

    def seed_variants(self, catalog: Catalog) -> list[str]:
        """Insert the catalog file's variants the database does not know; return them.

        Variants already in the database keep their state and definition: the database,
        not the file, is the catalog once seeded (a retired variant stays retired).
        """
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            known = set(conn.execute(sa.select(VariantRow.name)).scalars())
            new = [v for v in catalog.variants if v.name not in known]
            if new:
                bump_revision(conn, now)
                conn.execute(sa.insert(VariantRow), [
                    {"name": v.name, "spec_json": v.model_dump_json(), "state": "active",
                     "origin": catalog.source_path, "detail": None, "updated_at": now}
                    for v in new
                ])  # fmt: skip
        return [v.name for v in new]

    def add_variant(self, spec: VariantSpec, origin: str = "admin") -> VariantRecord:
        """Record a new variant as ``deploying``; the cluster's reconciler deploys it."""
        now = _utcnow()
        with write_transaction(self.engine) as conn:
            row = conn.execute(sa.select(VariantRow.state).where(VariantRow.name == spec.name))
            state = row.scalar()
            if state is not None and state != "retired":
                raise Conflict(f"variant {spec.name!r} already exists ({state})", param="name")
            bump_revision(conn, now)
            conn.execute(sa.delete(VariantRow).where(VariantRow.name == spec.name))
            conn.execute(sa.delete(VariantDrainRow).where(VariantDrainRow.variant == spec.name))
            conn.execute(sa.insert(VariantRow).values(
                name=spec.name, spec_json=spec.model_dump_json(), state="deploying",
                origin=origin, detail=None, updated_at=now,
            ))  # fmt: skip
        return self.variant(spec.name)

    def retire_variant(self, name: str) -> VariantRecord:
        """Stop routing to ``name`` and let its in-flight work drain before it goes."""
        with write_transaction(self.engine) as conn:
            state = conn.execute(
                sa.select(VariantRow.state).where(VariantRow.name == name)
            ).scalar()
            if state is None:
                raise NotFound(f"no variant named {name!r}", param="name")
            if state != "active":
                raise Conflict(f"variant {name!r} is {state}, not active", param="name")
            others = conn.execute(
                sa.select(sa.func.count()).where(
                    VariantRow.state == "active", VariantRow.name != name
                )
            ).scalar_one()
            if not others:
                raise Conflict(f"variant {name!r} is the last active variant", param="name")
            self._set_state(conn, name, "retiring", None)
        return self.variant(name)

    def set_variant_state(self, name: str, state: str, detail: str | None = None) -> None:
        """Move ``name`` along its lifecycle (the reconciler's and the drainers' call)."""
        with write_transaction(self.engine) as conn:
            self._set_state(conn, name, state, detail)

    def _set_state(self, conn: sa.Connection, name: str, state: str, detail: str | None) -> None:
        now = _utcnow()
        bump_revision(conn, now)
        conn.execute(
            sa.update(VariantRow)
            .where(VariantRow.name == name)
            .values(state=state, detail=detail, updated_at=now)
        )

    def record_drain(self, variant: str, replica: str) -> None:
        """Record that ``replica`` has nothing left queued or running on ``variant``."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                sa.delete(VariantDrainRow).where(
                    VariantDrainRow.variant == variant, VariantDrainRow.replica == replica
                )
            )
            conn.execute(
                sa.insert(VariantDrainRow).values(
                    variant=variant, replica=replica, drained_at=_utcnow()
                )
            )


def _policy_from_row(row: PolicyRow) -> Policy:
    return Policy(
        default_quality=row.default_quality,  # type: ignore[arg-type]
        max_batch_size=row.max_batch_size,
        max_wait_s=row.max_wait_ms / 1000,
        share_unseeded=row.share_unseeded,
        cache_ttl_s=row.cache_ttl_s,
        cache_max_bytes=row.cache_max_bytes,
        default_deadline_s=row.default_deadline_s,
        allow_anonymous=row.allow_anonymous,
        idempotency_ttl_s=(
            DEFAULT_IDEMPOTENCY_TTL_S if row.idempotency_ttl_s is None else row.idempotency_ttl_s
        ),
        default_reuse=row.default_reuse or "exact",  # type: ignore[arg-type]
        pool_exact_reuse=bool(row.pool_exact_reuse),
        **{name: getattr(row, name) for name in _AUDIT_FIELDS if getattr(row, name) is not None},
    )


_AUDIT_FIELDS = ("audit_rate", "audit_clip_drop_max", "audit_ssim_min")  # None: the default


def policy_values(policy: Policy) -> dict:
    """``policy`` as the ``policies`` row and the wire's ``PolicyInfo`` name its fields."""
    return {
        "default_quality": policy.default_quality,
        "max_batch_size": policy.max_batch_size,
        "max_wait_ms": policy.max_wait_s * 1000,
        "share_unseeded": policy.share_unseeded,
        "cache_ttl_s": policy.cache_ttl_s,
        "cache_max_bytes": policy.cache_max_bytes,
        "default_deadline_s": policy.default_deadline_s,
        "allow_anonymous": policy.allow_anonymous,
        "idempotency_ttl_s": policy.idempotency_ttl_s,
        "default_reuse": policy.default_reuse,
        "pool_exact_reuse": policy.pool_exact_reuse,
        **{name: getattr(policy, name) for name in _AUDIT_FIELDS},
    }


def _tenant_from_row(row: TenantRow) -> Tenant:
    return Tenant(
        name=row.name,
        key_hash=row.key_hash,
        daily_kj=row.daily_kj,
        monthly_kj=row.monthly_kj,
        qualities=tuple(row.qualities.split(",")),  # type: ignore[arg-type]
        rate_limit_per_min=row.rate_limit_per_min,
        revoked=row.revoked_at is not None,
        approximate_reuse=row.approximate_reuse is not False,
        reuse_pool=row.reuse_pool,
        audit_rate=row.audit_rate,
    )


def _tenant_info(row: TenantRow) -> TenantInfo:
    return TenantInfo(
        name=row.name,
        key_prefix=row.key_prefix,
        daily_kj=row.daily_kj,
        monthly_kj=row.monthly_kj,
        qualities=row.qualities.split(","),  # type: ignore[arg-type]
        rate_limit_per_min=row.rate_limit_per_min,
        approximate_reuse=row.approximate_reuse is not False,
        reuse_pool=row.reuse_pool,
        audit_rate=row.audit_rate,
        state="revoked" if row.revoked_at else "active",
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _variant_record(row: VariantRow) -> VariantRecord:
    spec = json.loads(row.spec_json)
    return VariantRecord(
        name=row.name,
        state=row.state,  # type: ignore[arg-type]
        origin=row.origin,
        quality_score=spec["quality_score"],
        power_w=spec["power_w"],
        steps=spec["steps"],
        source=spec["source"],
        detail=row.detail,
        updated_at=row.updated_at,
    )
