"""The database layer's concurrency guarantees, on real PostgreSQL and on SQLite.

Replicas starting at once migrate a database once, concurrent control-plane writers
lose no update, and SQLite never answers "database is locked". The PostgreSQL tests use
the throwaway server of ``tests._postgres`` (a database of their own each) and skip
where PostgreSQL or ``psycopg`` is not installed; the SQLite ones always run.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from tests import _postgres
from tests._postgres import THREADS, run_threads
from wattserve._admin import BudgetUpdate
from wattserve.scheduler.control_store import ControlStore
from wattserve.telemetry.database import HEAD, migrate, schema_version

# the shared server's fixtures, bound here so that pytest finds them for this module
pg_cluster, new_pg_db, pg_url = _postgres.pg_cluster, _postgres.new_pg_db, _postgres.pg_url
engines = _postgres.engines

WRITES = 20


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/wattserve.db"


# --- concurrency: PostgreSQL and SQLite -----------------------------------------------


def _concurrent_migrations(url: str, engines: Callable[[str], sa.Engine]) -> None:
    replicas = [engines(url) for _ in range(4)]  # four replicas starting at once
    befores = run_threads(4, lambda i: migrate(replicas[i]))
    assert sorted(befores) == [0, HEAD, HEAD, HEAD]  # type: ignore[type-var]
    with replicas[0].connect() as conn:
        assert schema_version(conn) == HEAD
        assert conn.execute(sa.text("SELECT count(*) FROM wattserve_schema")).scalar_one() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM control_meta")).scalar_one() == 1
    assert ControlStore(replicas[0]).revision() == 0


def _concurrent_budget_writes(url: str, engines: Callable[[str], sa.Engine]) -> None:
    migrate(engines(url))
    stores = [ControlStore(engines(url)) for _ in range(THREADS)]  # one engine per writer

    def write(i: int) -> None:
        for n in range(WRITES):
            stores[i].set_budget(BudgetUpdate(watts=100 + i * WRITES + n))

    run_threads(THREADS, write)
    snapshot = stores[0].snapshot()
    assert snapshot.revision == THREADS * WRITES  # no lost updates
    assert snapshot.budget_info().revision == THREADS * WRITES
    assert 100 <= snapshot.budget.cluster_cap_w < 100 + THREADS * WRITES  # type: ignore[operator]
    with stores[0].engine.connect() as conn:
        assert conn.execute(sa.text("SELECT revision FROM budgets")).scalars().all() == [
            THREADS * WRITES
        ]


def test_concurrent_migrations_on_postgres_run_once(pg_url, engines):
    _concurrent_migrations(pg_url, engines)


def test_concurrent_control_writes_on_postgres_lose_no_update(pg_url, engines):
    _concurrent_budget_writes(pg_url, engines)


def test_concurrent_migrations_on_sqlite_run_once(tmp_path, engines):
    _concurrent_migrations(sqlite_url(tmp_path), engines)


def test_concurrent_control_writes_on_sqlite_never_see_database_is_locked(tmp_path, engines):
    _concurrent_budget_writes(sqlite_url(tmp_path), engines)


def test_opening_a_new_sqlite_database_mid_write_waits_for_the_lock(tmp_path, engines):
    # Switching a new database to WAL needs its exclusive lock, and SQLite answers "database
    # is locked" at once (no busy handler) while another connection holds a write lock:
    # what replicas opening a fresh file together hit now and then (the tests above).
    path = tmp_path / "wattserve.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x INTEGER)")  # still in rollback-journal mode
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.2, holder.execute, args=("COMMIT",))
    release.start()
    try:
        engine = engines(f"sqlite:///{path}")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        holder.close()
