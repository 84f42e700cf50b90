"""The fault suite: real failures under load, then the shared invariants (tests/_invariants).

One wattserve service with two scheduler replicas runs on a cluster this module starts
(``TypedCluster``; simulated power). Faults are real: a worker or scheduler replica's
process is found through its actor and sent SIGKILL. Requests go through the SDK, which
sends an ``Idempotency-Key`` per call and retries when a replica dies under it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import ray

from tests import _invariants
from tests._wait import poll
from wattserve import AsyncClient
from wattserve.cluster.local import TypedCluster
from wattserve.cluster.names import WORKER_DEPLOYMENT, variant_app_name
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings
from wattserve.telemetry.ledger import LedgerStore

pytestmark = pytest.mark.fault

START_TIMEOUT_S = 300.0
LARGE = "tiny-sd-large"  # what quality="high" routes to


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    os.environ.setdefault("WATTSERVE_POWER_SOURCE", "simulated")
    os.environ.setdefault("WATTSERVE_SIM_DEVICES", "1")
    home = tmp_path_factory.mktemp("faults")
    with TypedCluster((), head_cpus=3) as cluster:
        ray.init(address=cluster.address, namespace="wattserve-faults", log_to_driver=False)
        settings = replace(Settings.from_env(home), scheduler_replicas=2)
        running = LocalService(settings, port=free_port(), address=cluster.address)
        try:
            running.start(ready_timeout_s=START_TIMEOUT_S)
            yield running
            running.stop()
        finally:
            ray.shutdown()


def replica_pid(app: str, deployment: str, nth: int = 0) -> int:
    """The process id of a Serve replica, found through its actor."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(prefix))  # fmt: skip
    actor = ray.get_actor(names[nth], namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


class Killer(threading.Thread):
    """SIGKILLs ``pid_of()``'s process as soon as ``ready()`` holds; notes when."""

    def __init__(self, ready: Any, pid_of: Any) -> None:
        super().__init__(daemon=True)
        self._ready, self._pid_of = ready, pid_of
        self.killed_at: float | None = None
        self.start()

    def run(self) -> None:
        poll("fault moment", lambda: True if self._ready() else None, 120, every_s=0.05)
        os.kill(self._pid_of(), signal.SIGKILL)
        self.killed_at = time.monotonic()


def report(name: str, killer: Killer, figures: dict[str, Any]) -> None:
    """The figures of one fault, for the closing note (``pytest -m fault -s``)."""
    assert killer.killed_at is not None, "the fault never happened"
    figures["answered_s_after_kill"] = round(time.monotonic() - killer.killed_at, 1)
    print("fault_figures", name, json.dumps(figures))


async def load(url: str, requests: int, quality: str, seed0: int) -> list[object]:
    async with AsyncClient(url, timeout_s=600) as client:
        calls = [client.generate(f"fault {seed0 + i}", seed=seed0 + i, quality=quality,
                                 size="64x64", n=2) for i in range(requests)]  # fmt: skip
        return list(await asyncio.gather(*calls, return_exceptions=True))


def pending_holders(service: LocalService) -> set[str]:
    ledger = LedgerStore(service.settings.db_url)
    try:
        return {r.holder for r in ledger.recent(1000, status="pending") if r.holder}
    finally:
        ledger.close()


def test_a_worker_killed_mid_batch(service: LocalService) -> None:
    """SIGKILL of the large variant's replica while its batch draws power."""
    idle_w = _invariants.idle_power_w()
    killer = Killer(
        lambda: _invariants.idle_power_w() > idle_w + 1,  # a batch runs
        lambda: replica_pid(variant_app_name(LARGE), WORKER_DEPLOYMENT),
    )
    results = asyncio.run(load(service.url, 4, "high", 100))
    killer.join(timeout=5)
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    report("worker_killed_mid_batch", killer, figures)
    assert figures["served"] == 4, figures  # Serve replaced the replica; the retry ran
    assert figures["failed_attempt_j"] > 0  # the dead attempt's draw is in the books


def test_a_scheduler_replica_killed_with_keyed_requests_in_flight(service: LocalService) -> None:
    """Each request the dead replica held is resolved exactly once through its key."""
    idle_w = _invariants.idle_power_w()
    killer = Killer(
        lambda: len(pending_holders(service)) == 2,  # both replicas hold work
        lambda: replica_pid("wattserve", "scheduler"),
    )
    results = asyncio.run(load(service.url, 10, "high", 200))
    killer.join(timeout=5)
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    report("scheduler_replica_killed", killer, figures)
    assert figures["served"] == 10, figures
    assert figures["retried"] >= 1, figures  # some requests were on the dead replica
    assert len({r.request_id for r in results}) == 10  # type: ignore[union-attr]
    assert figures["failed_rows"] >= 1  # the dead replica's rows, failed by the janitor
