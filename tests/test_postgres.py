"""The database layer on real PostgreSQL.

A throwaway PostgreSQL cluster is started once for this module (``tests._postgres``) and
every test gets a database of its own. Where PostgreSQL or the ``psycopg`` driver is not
installed the Postgres tests skip with the reason. The concurrency guarantees, on
PostgreSQL and SQLite, are ``test_postgres_concurrency.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

import wattserve.scheduler.cache  # noqa: F401  (registers the result_cache model)
import wattserve.scheduler.control_tables  # noqa: F401  (registers the control-plane models)
import wattserve.scheduler.idempotency  # noqa: F401  (registers the idempotency_keys model)
import wattserve.scheduler.latents  # noqa: F401  (registers the latent_cache model)
import wattserve.telemetry.audits  # noqa: F401  (registers the audits model)
from tests import _postgres
from tests._postgres import THREADS, run_threads
from tests.test_migrations import V1_LEDGER_ROW
from wattserve import Conflict
from wattserve._admin import BudgetUpdate, PolicyUpdate, TenantCreate
from wattserve.policies.catalog import Catalog
from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.control_store import ControlStore
from wattserve.telemetry.database import HEAD, migrate, schema_version
from wattserve.telemetry.ledger import ANY_TENANT, LedgerRow, LedgerStore

# the shared server's fixtures, bound here so that pytest finds them for this module
pg_cluster, new_pg_db, pg_url = _postgres.pg_cluster, _postgres.new_pg_db, _postgres.pg_url
engines = _postgres.engines


# --- helpers ------------------------------------------------------------------------


def schema(engine: sa.Engine) -> dict[str, dict]:
    """Every table's columns (type, tz, nullability), primary key, uniques and indexes."""
    inspector = sa.inspect(engine)
    out = {}
    for table in inspector.get_table_names():
        if table == "wattserve_schema":
            continue
        out[table] = {
            "columns": {
                c["name"]: (
                    type(c["type"]).__name__.upper(),
                    getattr(c["type"], "timezone", None),
                    bool(c["nullable"]),
                )
                for c in inspector.get_columns(table)
            },
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table)
            ),
        }
    return out


def ledger_row(request_id: str, image_index: int = 0, **fields: object) -> LedgerRow:
    return LedgerRow(**{**V1_LEDGER_ROW, "request_id": request_id, "image_index": image_index,
                        **fields})  # fmt: skip


# --- schema ---------------------------------------------------------------------------


def test_fresh_migration_on_postgres_builds_exactly_the_tables_the_models_declare(
    new_pg_db, engines
):
    migrated, declared = engines(new_pg_db()), engines(new_pg_db())
    assert migrate(migrated) == 0
    SQLModel.metadata.create_all(declared)
    got, want = schema(migrated), schema(declared)
    assert set(got) == set(want) == {
        "ledger", "result_cache", "control_meta", "budgets", "policies", "tenants", "variants",
        "variant_drains", "ledger_holders", "idempotency_keys", "latent_cache", "audits",
        "demotions",
    }  # fmt: skip
    for table in want:
        assert got[table] == want[table], table
    ledger_indexes = {name for name, _, _ in got["ledger"]["indexes"]}
    assert {"ix_ledger_tenant", "ix_ledger_request_id", "ix_ledger_created_at"} <= ledger_indexes
    assert ("uq_ledger_output", ("request_id", "image_index")) in got["ledger"]["unique"]
    assert got["ledger"]["columns"]["created_at"][:2] == ("TIMESTAMP", True)


def test_an_issue_4_postgres_database_with_rows_upgrades_without_losing_them(pg_url, engines):
    engine = engines(pg_url)
    migrate(engine, target=1)
    with engine.begin() as conn:  # what issue 4 wrote: no version table, no tenant column
        conn.execute(sa.text("DROP TABLE wattserve_schema"))
        ledger = sa.table("ledger", *map(sa.column, V1_LEDGER_ROW))
        conn.execute(ledger.insert(), [V1_LEDGER_ROW, {**V1_LEDGER_ROW, "image_index": 1}])
    with engine.connect() as conn:
        assert schema_version(conn) == 1
    store = LedgerStore(pg_url)  # opening migrates
    try:
        with store.engine.connect() as conn:
            assert schema_version(conn) == HEAD
        rows = store.recent(10)
        assert [(r.request_id, r.image_index, r.joules, r.tenant) for r in rows] == [
            ("req_old", 1, 17.5, None),
            ("req_old", 0, 17.5, None),
        ]
        assert rows[0].created_at == V1_LEDGER_ROW["created_at"]
        assert ControlStore(store.engine).revision() == 0
        # the upgraded table takes new, tenant-tagged rows next to the old ones
        assert store.record([ledger_row("req_new", tenant="acme")]) == 1
        assert store.tenant_joules("acme", datetime(2026, 1, 1, tzinfo=UTC)) == 17.5
        assert migrate(store.engine) == HEAD
    finally:
        store.close()


# --- the ledger -----------------------------------------------------------------------


def test_ledger_writes_on_postgres_are_idempotent_and_filters_use_aware_datetimes(pg_url):
    store = LedgerStore(pg_url)
    try:
        base = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)
        plus2 = timezone(timedelta(hours=2))
        rows = [
            ledger_row("req_a", 0, tenant="acme", created_at=base, joules=10.0),
            ledger_row("req_a", 1, tenant="acme", created_at=base, joules=11.0),
            ledger_row("req_b", 0, tenant="beta", created_at=base + timedelta(hours=1),
                       joules=5.0, variant="tiny-sd-large", status="error"),
            ledger_row("req_c", 0, tenant=None, created_at=base + timedelta(hours=2),
                       joules=3.0),
            # 14:30 at UTC+2 is 12:30 UTC: after base, before req_b
            ledger_row("req_d", 0, tenant="acme",
                       created_at=datetime(2026, 11, 5, 14, 30, tzinfo=plus2), joules=7.0),
        ]  # fmt: skip
        assert store.record(rows) == 5
        assert store.record(rows) == 0  # a replayed write adds nothing
        assert store.record([*rows[:2], ledger_row("req_e", tenant="acme", created_at=base)]) == 1
        assert len(store.recent(100)) == 6

        later = base + timedelta(minutes=1)  # excludes req_a and req_e (at base)
        assert store.tenant_joules("acme", base) == 10.0 + 11.0 + 7.0 + 17.5
        assert store.tenant_joules("acme", later) == 7.0
        assert store.tenant_joules("acme", later.astimezone(plus2)) == 7.0  # same instant
        assert store.tenant_joules("nobody", base) == 0.0

        assert {r.request_id for r in store.recent(10, tenant="acme")} == {"req_a", "req_d",
                                                                           "req_e"}  # fmt: skip
        assert [r.request_id for r in store.recent(10, tenant=None)] == ["req_c"]
        assert len(store.recent(10, tenant=ANY_TENANT)) == 6
        assert [r.request_id for r in store.recent(10, tenant="acme", since=later)] == ["req_d"]
        assert [r.request_id for r in store.recent(10, status="error")] == ["req_b"]
        [d] = store.recent(1, tenant="acme", since=later)
        assert d.created_at == datetime(2026, 11, 5, 12, 30, tzinfo=UTC)
        assert d.created_at.utcoffset() == timedelta(0)  # read back in UTC

        window = store.window(later, base + timedelta(hours=2))
        assert [r.request_id for r in window] == ["req_b", "req_d"]  # oldest id first
        assert [r.request_id for r in store.window(None, None, tenant="beta")] == ["req_b"]

        usage = {u.variant: u for u in store.usage_by_variant()}
        turbo = usage["tiny-sd-turbo"]
        assert (turbo.requests, turbo.outputs, turbo.failed_outputs) == (4, 5, 0)
        assert turbo.joules == 10.0 + 11.0 + 3.0 + 7.0 + 17.5
        large = usage["tiny-sd-large"]
        assert (large.requests, large.outputs, large.failed_outputs) == (1, 0, 1)
    finally:
        store.close()


def test_concurrent_replays_of_the_same_ledger_rows_on_postgres_add_them_once(pg_url):
    stores = [LedgerStore(pg_url) for _ in range(THREADS)]
    try:
        rows = [ledger_row("req_dup", i) for i in range(25)]
        added = run_threads(THREADS, lambda i: stores[i].record(rows))
        assert sum(added) == 25  # type: ignore[arg-type]
        assert len(stores[0].recent(100)) == 25
    finally:
        for store in stores:
            store.close()


def test_rows_from_acceptance_settle_once_and_orphans_fail_on_postgres(pg_url):
    """Concurrent settles of one output (its replica and the janitor's view) land once."""
    stores = [LedgerStore(pg_url) for _ in range(THREADS)]
    try:
        store = stores[0]
        store.heartbeat("rep_live")
        pending = [ledger_row("req_p", i, status="pending", holder="rep_live", joules=0.0)
                   for i in range(5)]  # fmt: skip
        store.record([*pending, ledger_row("req_o", status="pending", holder="rep_gone")])
        final = [ledger_row("req_p", i, joules=float(i)) for i in range(5)]
        settled = run_threads(THREADS, lambda i: stores[i].settle(final))
        assert sum(settled) == 5  # type: ignore[arg-type]
        assert [r.status for r in store.for_request("req_p")] == ["ok"] * 5
        assert store.fail_orphans(stale_after_s=10.0) == 1
        assert store.for_request("req_o")[0].status == "failed"
        (usage,) = store.usage_by_variant()
        assert (usage.outputs, usage.failed_outputs, usage.pending_outputs) == (5, 1, 0)
    finally:
        for each in stores:
            each.close()


# --- the control plane ----------------------------------------------------------------


def test_control_store_round_trip_on_postgres(pg_url, engines, catalog: Catalog):
    engine = engines(pg_url)
    migrate(engine)
    control = ControlStore(engine)
    assert control.revision() == 0

    control.set_budget(BudgetUpdate(watts=300, joules_per_output=40.0))
    control.set_budget(BudgetUpdate(node="ab12", watts=120))
    control.set_budget(BudgetUpdate(watts=None))  # clears the cap, keeps the target
    control.set_policy(PolicyUpdate(default_quality="standard", max_wait_ms=25.0,
                                    cache_max_bytes=1 << 40, allow_anonymous=False))  # fmt: skip
    _, api_key = control.create_tenant(TenantCreate(name="acme", daily_kj=5.0,
                                                    qualities=["draft", "draft"]))  # fmt: skip
    assert api_key
    before = control.snapshot()
    assert before.revision == 5
    with pytest.raises(Conflict, match="already exists"):
        control.create_tenant(TenantCreate(name="acme", daily_kj=99.0))
    assert control.snapshot() == before  # the refused write changed nothing

    assert before.budget.cluster_cap_w is None
    assert before.budget.joules_per_output_target == 40.0
    assert dict(before.budget.node_caps_w) == {"ab12": 120}
    assert before.budget_updated_at is not None and before.budget_updated_at.tzinfo is not None
    assert before.policy.default_quality == "standard"
    assert before.policy.max_wait_s == 0.025
    assert before.policy.cache_max_bytes == 1 << 40  # a BIGINT column
    assert before.policy.allow_anonymous is False
    [tenant] = before.tenants.values()
    assert (tenant.name, tenant.daily_kj, tenant.qualities) == ("acme", 5.0, ("draft",))
    assert [t.name for t in control.tenants()] == ["acme"]

    names = [v.name for v in catalog.variants]
    assert control.seed_variants(catalog) == names
    assert control.seed_variants(catalog) == []  # seeded once
    retired = control.retire_variant(names[0])
    assert retired.state == "retiring" and retired.updated_at.tzinfo is not None
    after = control.snapshot()
    assert after.revision == before.revision + 2
    assert after.in_state("retiring") == [names[0]]
    assert sorted(after.in_state("active")) == sorted(names[1:])
    assert [v.name for v in after.catalog().variants] == [
        v.name for v in catalog.variants if v.name != names[0]
    ]
    for name in names[1:-1]:
        control.retire_variant(name)
    with pytest.raises(Conflict, match="last active variant"):
        control.retire_variant(names[-1])


# --- the result cache -----------------------------------------------------------------


def test_result_cache_on_postgres_shared_by_replicas(pg_url, engines, tmp_path):
    migrate(engines(pg_url))
    clock = iter(range(1000, 2000))
    replicas = [
        ResultCache(engines(pg_url), tmp_path / "cache", max_bytes=25, clock=lambda: next(clock))
        for _ in range(THREADS)
    ]
    # every replica finishes the same output at once: one row, no unique-key error
    run_threads(THREADS, lambda i: replicas[i].put("key_1", "tiny-sd-turbo", 0.5, "simulated",
                                                   b"png-one", "req_1", 0))  # fmt: skip
    assert replicas[0].stats() == {"entries": 1, "bytes": 7}
    replicas[0].put("key_1", "tiny-sd-large", 0.9, "nvml", b"png-two", "req_2", 0)
    hit = replicas[1].get("key_1", min_quality=0.4)
    assert hit is not None and (hit.png, hit.variant) == (b"png-two", "tiny-sd-large")
    assert replicas[1].get("key_1", min_quality=0.95) is None
    # past the 25-byte cap the least recently used entry (turbo) is evicted
    replicas[2].put("key_2", "tiny-sd-turbo", 0.5, "simulated", b"png-three-long", "req_3", 0)
    assert replicas[0].stats() == {"entries": 2, "bytes": 21}
    assert replicas[0].get("key_1", 0.0, variant="tiny-sd-turbo") is None
