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
from wattserve import AsyncClient, GenerationResult, WorkerFailed
from wattserve.cluster.local import TypedCluster
from wattserve.cluster.names import WORKER_DEPLOYMENT, variant_app_name
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings
from wattserve.telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from wattserve.telemetry.ledger import LedgerStore
from wattserve.workers.faults import CRASH_AFTER_ENV

pytestmark = pytest.mark.fault

START_TIMEOUT_S = 300.0
LARGE = "tiny-sd-large"  # what quality="high" routes to
MEDIUM = "tiny-sd-medium"  # quality="standard"; its workers crash at every batch here


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    home = tmp_path_factory.mktemp("faults")
    # Every process of this cluster inherits its raylet's environment, taken at start: the
    # medium variant's workers crash at every batch (workers/faults.py), nobody else's.
    fault_env = {"WATTSERVE_POWER_SOURCE": "simulated", "WATTSERVE_SIM_DEVICES": "1",
                 CRASH_AFTER_ENV: f"{MEDIUM}:0"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in fault_env}
    os.environ.update(fault_env)
    cluster = TypedCluster((), head_cpus=3)
    try:
        cluster.start()
    finally:  # what this process's own code reads stays as it was
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    settings = replace(Settings.from_env(home), scheduler_replicas=2, power_source="simulated",
                       sim_devices=1)  # fmt: skip
    try:
        ray.init(address=cluster.address, namespace="wattserve-faults", log_to_driver=False)
        running = LocalService(settings, port=free_port(), address=cluster.address)
        running.start(ready_timeout_s=START_TIMEOUT_S)
        yield running
        running.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()


def actor_pid(name: str, namespace: str) -> int:
    """The process id of a named actor, asked of the actor itself."""
    actor = ray.get_actor(name, namespace=namespace)
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def replica_pid(app: str, deployment: str, nth: int = 0) -> int:
    """The process id of a Serve replica, found through its actor."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(prefix))  # fmt: skip
    return actor_pid(names[nth], "serve")


class Killer(threading.Thread):
    """SIGKILLs the process(es) ``pids_of()`` names as soon as ``ready()``; notes when."""

    def __init__(self, ready: Any, pids_of: Any) -> None:
        super().__init__(daemon=True)
        self._ready, self._pids_of = ready, pids_of
        self.killed_at: float | None = None
        self.start()

    def run(self) -> None:
        poll("fault moment", lambda: True if self._ready() else None, 120, every_s=0.05)
        pids = self._pids_of()
        for pid in pids if isinstance(pids, list) else [pids]:
            os.kill(pid, signal.SIGKILL)
        self.killed_at = time.monotonic()


def report(name: str, killer: Killer, figures: dict[str, Any]) -> None:
    """The figures of one fault, for the closing note (``pytest -m fault -s``)."""
    assert killer.killed_at is not None, "the fault never happened"
    figures["answered_s_after_kill"] = round(time.monotonic() - killer.killed_at, 1)
    print("fault_figures", name, json.dumps(figures))


async def load(
    url: str, requests: int, quality: str, seed0: int, *, same: bool = False, retries: int = 3
) -> list[object]:
    """``requests`` SDK calls at once (``same``: all for one output, to coalesce)."""
    async with AsyncClient(url, timeout_s=600, max_retries=retries) as client:
        seeds = [seed0 if same else seed0 + i for i in range(requests)]
        calls = [client.generate(f"fault {seed}", seed=seed, quality=quality, size="64x64",
                                 n=2) for seed in seeds]  # fmt: skip
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


def test_a_worker_that_dies_on_its_retry_too_answers_503(service: LocalService) -> None:
    """Every medium batch crashes (fault point): the attempt and its retry both die."""
    idle_w = _invariants.idle_power_w()
    before = _invariants.books().failed_attempt_j
    started = time.monotonic()
    results = asyncio.run(load(service.url, 1, "standard", 300, retries=0))
    (answer,) = results
    assert isinstance(answer, WorkerFailed), answer  # 503 worker_failed with Retry-After
    assert answer.retry_after_s is not None and answer.retry_after_s > 0
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    figures["answered_s"] = round(time.monotonic() - started, 1)
    print("fault_figures", "worker_killed_twice", json.dumps(figures))
    assert _invariants.books().failed_attempt_j > before  # both attempts' draw is booked


def test_a_coalescer_killed_while_its_flight_waits(service: LocalService) -> None:
    """Identical requests share one flight; its coalescers die; everyone is still served."""
    idle_w = _invariants.idle_power_w()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("wattserve-coalescer-")]  # fmt: skip
    pids = [actor_pid(n, AGENT_NAMESPACE) for n in names]
    killer = Killer(
        lambda: _invariants.idle_power_w() > idle_w + 1,
        lambda: pids,
    )
    results = asyncio.run(load(service.url, 4, "high", 400, same=True))
    killer.join(timeout=5)
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    report("coalescers_killed", killer, figures)
    assert figures["served"] == 4, figures
    images = {r.images[0].png_bytes for r in results if isinstance(r, GenerationResult)}
    assert len(images) == 1  # the same seed gives the same bytes, however it was made


def test_a_telemetry_agent_killed_mid_batch(service: LocalService) -> None:
    """The agent restarts on its node; the batch it lost is charged `estimated`, and says so."""
    idle_w = _invariants.idle_power_w()
    node_id = ray.get_runtime_context().get_node_id()
    killer = Killer(
        lambda: _invariants.idle_power_w() > idle_w + 1,
        lambda: actor_pid(agent_actor_name(node_id), AGENT_NAMESPACE),
    )
    results = asyncio.run(load(service.url, 3, "high", 500))
    killer.join(timeout=5)
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    report("agent_killed", killer, figures)
    assert figures["served"] == 3, figures
    sources = {x.energy_source for r in results if isinstance(r, GenerationResult)
               for x in r.receipts}  # fmt: skip
    assert "estimated" in sources, sources  # the lost batch, labelled as such
