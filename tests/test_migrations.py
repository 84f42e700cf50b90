"""Schema migrations: old databases upgrade in place, and migrations match the models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

import wattserve.scheduler.cache  # noqa: F401  (registers the result_cache model)
import wattserve.scheduler.control_tables  # noqa: F401  (registers the control-plane models)
import wattserve.scheduler.idempotency  # noqa: F401  (registers the idempotency_keys model)
import wattserve.scheduler.latents  # noqa: F401  (registers the latent_cache model)
import wattserve.telemetry.audits  # noqa: F401  (registers the audits model)
from wattserve._admin import BudgetUpdate, TenantCreate
from wattserve.scheduler.control_store import ControlStore
from wattserve.telemetry.database import HEAD, SchemaError, make_engine, migrate, schema_version
from wattserve.telemetry.ledger import LedgerRow, LedgerStore

V1_LEDGER_ROW = {
    "request_id": "req_old", "image_index": 0, "created_at": datetime(2026, 11, 1, tzinfo=UTC),
    "finished_at": datetime(2026, 11, 1, tzinfo=UTC), "user": "u", "variant": "tiny-sd-turbo",
    "quality": "draft", "route_reason": "cheapest_capable", "batch_id": "bat_1",
    "batch_size": 1, "joules": 17.5, "energy_source": "simulated", "cache": "miss",
    "status": "ok", "error": None, "latency_ms": 12.0, "seed": 7, "width_px": 64,
    "height_px": 64,
}  # fmt: skip


def columns(engine: sa.Engine) -> dict[str, dict[str, tuple[str, bool]]]:
    inspector = sa.inspect(engine)
    return {
        table: {
            c["name"]: (type(c["type"]).__name__.upper(), bool(c["nullable"]))
            for c in inspector.get_columns(table)
        }
        for table in inspector.get_table_names()
        if table != "wattserve_schema"
    }


def test_fresh_migration_builds_exactly_the_tables_the_models_declare(tmp_path):
    migrated = make_engine(f"sqlite:///{tmp_path}/migrated.db")
    migrate(migrated)
    declared = make_engine(f"sqlite:///{tmp_path}/declared.db")
    SQLModel.metadata.create_all(declared)
    assert columns(migrated) == columns(declared)
    got = {i["name"] for i in sa.inspect(migrated).get_indexes("ledger")}
    want = {i["name"] for i in sa.inspect(declared).get_indexes("ledger")}
    assert got == want


def test_an_issue_4_database_with_rows_upgrades_without_losing_them(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    engine = make_engine(url)
    migrate(engine, target=1)
    with engine.begin() as conn:  # what issue 4 wrote: no version table, no tenant column
        conn.execute(sa.text("DROP TABLE wattserve_schema"))
        conn.execute(sa.table("ledger", *map(sa.column, V1_LEDGER_ROW)).insert(), V1_LEDGER_ROW)
    assert schema_version(engine.connect()) == 1
    store = LedgerStore(url)  # opening migrates
    assert schema_version(store.engine.connect()) == HEAD
    [row] = store.recent(10)
    assert (row.request_id, row.joules, row.tenant) == ("req_old", 17.5, None)
    assert ControlStore(store.engine).revision() == 0


def test_this_issues_first_schema_upgrades_with_control_rows_and_ledger_rows_intact(tmp_path):
    url = f"sqlite:///{tmp_path}/v2.db"
    engine = make_engine(url)
    migrate(engine, target=2)
    at = {"at": datetime(2026, 11, 2, tzinfo=UTC)}
    with engine.begin() as conn:
        conn.execute(sa.table("ledger", *map(sa.column, V1_LEDGER_ROW)).insert(), V1_LEDGER_ROW)
        conn.execute(
            sa.text(
                "INSERT INTO tenants (name, key_hash, key_prefix, daily_kj, qualities,"
                " created_at) VALUES ('acme', 'h', 'ws_abc', 5.0, 'draft', :at)"
            ),
            at,
        )
        conn.execute(
            sa.text(
                "INSERT INTO budgets (scope, cap_w, updated_at, revision)"
                " VALUES ('cluster', 300, :at, 1)"
            ),
            at,
        )
        conn.execute(sa.text("UPDATE control_meta SET revision = 1"))
    assert migrate(engine) == 2
    control = ControlStore(engine)
    snapshot = control.snapshot()
    assert snapshot.budget.cluster_cap_w == 300 and snapshot.revision == 1
    assert [t.name for t in control.tenants()] == ["acme"]
    assert LedgerStore(url).recent(5)[0].request_id == "req_old"
    LedgerStore(url).record([LedgerRow(**{**V1_LEDGER_ROW, "request_id": "req_new",
                                          "tenant": "acme"})])  # fmt: skip
    assert LedgerStore(url).tenant_joules("acme", datetime(2026, 1, 1, tzinfo=UTC)) == 17.5


def test_migrating_twice_is_a_no_op_and_a_newer_schema_is_refused(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    assert migrate(engine) == 0
    assert migrate(engine) == HEAD
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE wattserve_schema SET version = :v"), {"v": HEAD + 1})
    with pytest.raises(SchemaError, match="newer than this wattserve"):
        migrate(engine)


def test_a_failed_write_changes_nothing(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/x.db")
    control = ControlStore(store.engine)
    control.set_budget(BudgetUpdate(watts=300))
    before = control.snapshot()
    control.create_tenant(TenantCreate(name="acme"))
    with pytest.raises(Exception, match="already exists"):
        control.create_tenant(TenantCreate(name="acme"))
    after = control.snapshot()
    assert after.revision == before.revision + 1  # the duplicate bumped nothing
    assert after.budget == before.budget
