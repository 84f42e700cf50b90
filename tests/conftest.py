"""Shared fixtures: one local Ray cluster + Serve app per test session, tiny models once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wattserve.policies.catalog import Catalog, load_catalog
from wattserve.policies.plans import BatchOutput, BatchPlan

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(trylast=True)  # after -m has deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Multi-node and fault tests need a process that is not a driver of the shared cluster."""
    own = ("multinode", "fault")  # each starts a cluster of its own
    kinds = {m for item in items for m in ("ray", *own) if item.get_closest_marker(m)}
    if "ray" in kinds and kinds & set(own):
        skip = pytest.mark.skip(reason="multinode and fault tests start their own Ray cluster: "
                                "run them in a pytest process of their own (make test does, "
                                "or make test-multinode / test-faults)")  # fmt: skip
        for item in items:
            if any(item.get_closest_marker(m) for m in own):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def state_home() -> Iterator[Path]:
    """A short state dir: Ray's unix socket paths must stay under ~107 characters."""
    home = Path(tempfile.mkdtemp(prefix="wst", dir="/tmp"))
    # The CLI under test finds this service's admin token where a user's CLI would.
    previous = os.environ.get("WATTSERVE_HOME")
    os.environ["WATTSERVE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("WATTSERVE_HOME", None)
    else:
        os.environ["WATTSERVE_HOME"] = previous
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir(state_home: Path) -> Path:
    return state_home / "models"


@pytest.fixture(scope="session")
def service(state_home: Path) -> Iterator[object]:
    """The real thing: local Ray, Serve, three worker deployments, SQLite ledger."""
    from wattserve import AdminClient
    from wattserve.cluster.runtime import LocalService, free_port
    from wattserve.cluster.settings import Settings
    from wattserve.workers.pipelines import TINY_CLIP

    settings = dataclasses.replace(Settings.from_env(state_home), audit_clip_model=TINY_CLIP)
    svc = LocalService(settings, port=free_port())
    svc.start()
    try:
        # No background audits under tests that count batches: the audit tests raise it.
        with AdminClient(svc.url, svc.admin_token) as admin:
            admin.set_policy(audit_rate=0.0)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def url(service: object) -> str:
    return service.url  # type: ignore[attr-defined]


class InProcessPool:
    """A ``WorkerPool`` running real ``VariantWorker``s in this process (no Ray).

    ``fail_with`` makes every run raise, to exercise the scheduler's failure accounting.
    """

    def __init__(self, catalog: Catalog, models_dir: Path, fail_with: Exception | None = None):
        from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
        from wattserve.telemetry.devices import open_power_sources
        from wattserve.workers.worker import VariantWorker

        self.agent = TelemetryAgent(open_power_sources("simulated"))
        meter = LocalMeter(self.agent)
        self._workers = {v.name: VariantWorker(v, str(models_dir), meter) for v in catalog.variants}
        self.fail_with = fail_with
        self.plans: list[BatchPlan] = []

    def available(self) -> frozenset[str]:
        return frozenset(self._workers)

    async def run(self, plan: BatchPlan) -> BatchOutput:
        self.plans.append(plan)
        if self.fail_with is not None:
            raise self.fail_with
        return await asyncio.to_thread(self._workers[plan.variant].run, plan)


@pytest.fixture(scope="session")
def inprocess_pool(catalog: Catalog, models_dir: Path) -> InProcessPool:
    return InProcessPool(catalog, models_dir)
