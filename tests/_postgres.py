"""The PostgreSQL test modules' shared server, fixtures and helpers.

A throwaway PostgreSQL cluster is started once per test module that uses it (``initdb``
+ ``pg_ctl`` in a temp dir, fsync off, trust auth, a unix socket and a free TCP port on
127.0.0.1) and every test gets a database of its own. Where PostgreSQL or the
``psycopg`` driver is not installed the Postgres tests skip with the reason. A test
module binds the fixtures (``pg_cluster``, ``new_pg_db``, ``pg_url``, ``engines``) to
names of its own, so that pytest finds them there.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from wattserve.telemetry.database import make_engine

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
THREADS = 8


# --- a throwaway PostgreSQL ---------------------------------------------------------


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for bin_dir in PG_BIN_DIRS:
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return None


class PgCluster:
    """A PostgreSQL cluster in a temp dir, run as the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL")
            runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
            if runuser is None:
                pytest.skip("running as root and there is no runuser to drop to 'postgres'")
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="wspg", dir="/tmp"))
        self.data, self.sockets = self.root / "data", self.root / "sock"
        self.sockets.mkdir()
        if self.as_user:
            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.port = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=60, check=False
        )

    def start(self) -> None:
        from wattserve.cluster.runtime import free_port

        done = self._run(
            self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stderr or done.stdout}")
        for _ in range(3):  # the free port may be taken before postgres binds it
            self.port = free_port()
            options = (
                f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.sockets}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            done = self._run(
                self.pg_ctl, "start", "-w", "-t", "30", "-D", str(self.data),
                "-l", str(self.root / "postgres.log"), "-o", options,
            )  # fmt: skip
            if done.returncode == 0:
                return
        log = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"pg_ctl start failed: {done.stderr or done.stdout}\n{log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex}"
        admin = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            self._run(self.pg_ctl, "stop", "-D", str(self.data), "-m", "immediate", "-w")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL server for the module; skips when none can be run."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install psycopg[binary]")
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def new_pg_db(pg_cluster: PgCluster) -> Callable[[], str]:
    """Make another fresh database on the module's server; returns its URL."""
    return pg_cluster.create_database


@pytest.fixture
def pg_url(new_pg_db: Callable[[], str]) -> str:
    """A fresh, empty database of this test's own (``CREATE DATABASE t_<uuid>``)."""
    return new_pg_db()


@pytest.fixture
def engines() -> Iterator[Callable[[str], sa.Engine]]:
    """``make_engine`` whose engines are disposed when the test ends."""
    made: list[sa.Engine] = []

    def make(url: str) -> sa.Engine:
        made.append(make_engine(url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


# --- helpers ------------------------------------------------------------------------


def run_threads(count: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(i)`` in ``count`` threads released at once; raise the first error."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results
