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
from functools import partial
from typing import Any

import pytest
import ray

from tests import _invariants
from tests._variants import B200, B200_VARIANT
from tests._wait import poll
from wattserve import AdminClient, AsyncClient, GenerationResult, ServiceUnavailable, WorkerFailed
from wattserve.bench._live_stats import longest_over_cap_s
from wattserve.bench.cap_watch import sampled
from wattserve.cluster.admission import cluster_power_w, node_agents
from wattserve.cluster.local import TypedCluster
from wattserve.cluster.names import (
    ADMISSION_NAME,
    CONTROL_NAMESPACE,
    WORKER_DEPLOYMENT,
    variant_app_name,
)
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings
from wattserve.scheduler.batcher import WORKER_DEADLINE_FLOOR_S
from wattserve.telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from wattserve.telemetry.ledger import LedgerStore
from wattserve.workers.faults import CRASH_AFTER_ENV

pytestmark = pytest.mark.fault

START_TIMEOUT_S = 300.0
LARGE = "tiny-sd-large"  # what quality="high" routes to
MEDIUM = "tiny-sd-medium"  # quality="standard"; its workers crash at every batch here
HOLD_S = 30.0
SAMPLE_S = 0.1  # power sampling period under a cap


@pytest.fixture(scope="module")
def cluster() -> Iterator[TypedCluster]:
    # Every process of this cluster inherits its raylet's environment, taken at start: the
    # medium variant's workers crash at every batch (workers/faults.py), nobody else's.
    fault_env = {"WATTSERVE_POWER_SOURCE": "simulated", "WATTSERVE_SIM_DEVICES": "1",
                 CRASH_AFTER_ENV: f"{MEDIUM}:0"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in fault_env}
    os.environ.update(fault_env)
    typed = TypedCluster((), head_cpus=3)
    try:
        typed.start()
    finally:  # what this process's own code reads stays as it was
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    try:
        yield typed
    finally:
        typed.shutdown()


@pytest.fixture(scope="module")
def service(
    cluster: TypedCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalService]:
    home = tmp_path_factory.mktemp("faults")
    # a batch held for power waits long enough to outlive an admission service restart
    settings = replace(Settings.from_env(home), scheduler_replicas=2, power_source="simulated",
                       sim_devices=1, power_hold_s=HOLD_S)  # fmt: skip
    ray.init(address=cluster.address, namespace="wattserve-faults", log_to_driver=False)
    try:
        port = free_port()
        cluster.start_serve(port)  # one proxy: removing a node drops no connection of ours
        running = LocalService(settings, port=port, address=cluster.address)
        running.start(ready_timeout_s=START_TIMEOUT_S)
        yield running
        running.stop()
    finally:
        ray.shutdown()


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
    url: str,
    requests: int,
    quality: str,
    seed0: int,
    *,
    same: bool = False,
    retries: int = 3,
    model: str | None = None,
) -> list[object]:
    """``requests`` SDK calls at once (``same``: all for one output, to coalesce)."""
    async with AsyncClient(url, timeout_s=600, max_retries=retries) as client:
        seeds = [seed0 if same else seed0 + i for i in range(requests)]
        calls = [client.generate(f"fault {seed}", seed=seed, quality=quality, size="64x64",
                                 n=2, model=model) for seed in seeds]  # fmt: skip
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
    # Whoever shared a generation got its bytes. A waiter that took over from a dead
    # leader generates again, maybe in a batch of another size, and CPU kernels of
    # another batch shape may round the last bits differently: bytes per generation.
    by_batch: dict[str, set[bytes]] = {}
    for r in results:
        if isinstance(r, GenerationResult):
            by_batch.setdefault(r.receipts[0].batch_id, set()).add(r.images[0].png_bytes)
    assert all(len(images) == 1 for images in by_batch.values()), by_batch.keys()


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


def test_the_admission_service_killed_under_a_cap(service: LocalService) -> None:
    """Ray restarts it in a new epoch; the cap holds across the restart; all are answered."""
    cap_w = 600.0  # idle 70 W + one 450 W large batch; a 350 W turbo batch beside it won't fit
    idle_w = _invariants.idle_power_w()
    admission = ray.get_actor(ADMISSION_NAME, namespace=CONTROL_NAMESPACE)
    epoch = ray.get(admission.ready.remote(), timeout=30)
    with AdminClient(service.url, token=service.admin_token) as admin:
        admin.set_budget(watts=cap_w)
    samples: list[tuple[float, float]] = []
    try:
        killer = Killer(
            lambda: _invariants.idle_power_w() > idle_w + 1,  # a leased batch draws
            lambda: actor_pid(ADMISSION_NAME, CONTROL_NAMESPACE),
        )

        async def mixed() -> list[object]:
            high, draft = load(service.url, 3, "high", 600), load(service.url, 3, "draft", 610)
            return [r for part in await asyncio.gather(high, draft) for r in part]

        power = partial(cluster_power_w, node_agents())
        results = asyncio.run(sampled(mixed(), power, samples, SAMPLE_S))
        killer.join(timeout=5)
    finally:
        with AdminClient(service.url, token=service.admin_token) as admin:
            admin.set_budget(watts=None)
    assert ray.get(admission.ready.remote(), timeout=60) > epoch  # restarted: a new epoch
    longest = longest_over_cap_s(samples, cap_w)
    assert longest <= 0.1 + SAMPLE_S, f"over the {cap_w:.0f} W cap for {longest:.2f}s"
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    figures["peak_w"] = round(max(w for _, w in samples), 1)
    report("admission_killed_under_cap", killer, figures)
    assert figures["served"] >= 1, figures  # the new epoch grants again


def test_the_only_node_of_a_variants_type_removed(
    cluster: TypedCluster, service: LocalService
) -> None:
    """503 at once (not at the deadline) while no node can host it; served once one joins."""
    with AdminClient(service.url, token=service.admin_token) as admin:
        admin.add_variant(B200_VARIANT)
    node_id = _join_b200(cluster, service)
    idle_w = _invariants.idle_power_w()
    pid = replica_pid(variant_app_name(B200), WORKER_DEPLOYMENT)
    cluster.remove_node(node_id)
    removed_at = time.monotonic()
    # A lost machine's processes die a moment after it: a request sent in that moment may
    # still be served there. The claim is about what follows, once Ray knows it is lost.
    poll("the B200 node marked dead and its replica gone", lambda: _lost(node_id, pid), 60)
    results = asyncio.run(load(service.url, 1, "draft", 700, retries=0, model=B200))
    (answer,) = results
    answered_s = time.monotonic() - removed_at
    assert isinstance(answer, ServiceUnavailable), answer
    assert answer.retry_after_s is not None and answer.retry_after_s > 0
    assert answered_s < WORKER_DEADLINE_FLOOR_S, answered_s  # placement, not the deadline
    figures = _invariants.check(service.settings.db_url, results, idle_w)
    joined_at = time.monotonic()
    _join_b200(cluster, service)
    figures.update(answered_s=round(answered_s, 1),
                   served_again_s_after_join=round(time.monotonic() - joined_at, 1))  # fmt: skip
    print("fault_figures", "variant_node_removed", json.dumps(figures))


def _lost(node_id: str, pid: int) -> bool | None:
    """True once Ray reports ``node_id`` dead and process ``pid`` has exited."""
    import psutil

    alive = any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())
    try:
        running = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        running = False
    return None if alive or running else True


def _join_b200(cluster: TypedCluster, service: LocalService) -> str:
    """A B200 node joins; once its replica serves, one request has been served there."""
    node_id = cluster.add_node("B200")
    with AdminClient(service.url, token=service.admin_token) as admin:
        admin.wait_variant(B200, ["active"], timeout_s=START_TIMEOUT_S)

    def served() -> GenerationResult | None:
        (result,) = asyncio.run(load(service.url, 1, "draft", 750, retries=0, model=B200))
        return result if isinstance(result, GenerationResult) else None

    result = poll(f"{B200} served on the new node", served, START_TIMEOUT_S, every_s=1)
    assert result.receipts[0].variant == B200
    return node_id
