"""The admission service: the one place in the cluster a batch gets permission to draw power.

One named, detached actor (``ADMISSION_NAME``) hosts a ``policies.leases.LeaseBook``
and is its only power poller: every ``sample_period_s`` it reads every node's agent
(``power_w``) and feeds the book; every ``REFRESH_S`` it reloads the budget and the
catalog from the control plane's database (the same revision-polled state the scheduler
replicas read) and which nodes each variant can be placed on. Scheduler replicas ask it
for leases once per dispatch step (``RemoteLeases``); workers confirm each start with it.

If the actor dies, Ray restarts it (``max_restarts=-1``) with a new epoch: leases of the
old one are void (a worker's start confirmation is refused), and the new book grants
nothing until a reading taken after the restart shows whatever the old epoch started.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import ray
import structlog

from wattserve._schemas import AdmissionInfo
from wattserve.cluster.agents import node_device_type
from wattserve.cluster.names import ADMISSION_NAME, CONTROL_NAMESPACE
from wattserve.policies.catalog import Catalog
from wattserve.policies.leases import (
    LeaseAsk,
    LeaseBook,
    LeaseBookState,
    LeaseDecision,
    LeaseRefusal,
    PowerReading,
)
from wattserve.scheduler.leases import LocalLeases, replica_slots
from wattserve.telemetry.agent import AGENT_NAMESPACE, agent_actor_name
from wattserve.telemetry.attribution import Reconciliation
from wattserve.telemetry.logs import configure_logging

log = structlog.get_logger(__name__)

REFRESH_S = 0.5
NODES_REFRESH_S = 2.0
LEASE_CALL_TIMEOUT_S = 2.0
ROUND_TRIPS_KEPT = 10_000


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def variant_nodes(catalog: Catalog, nodes: Sequence[dict[str, Any]]) -> dict[str, frozenset[str]]:
    """Alive node ids each variant can be placed on (by its accepted device types)."""
    alive = [n for n in nodes if n.get("Alive")]
    placed: dict[str, frozenset[str]] = {}
    for variant in catalog.variants:
        accepted = set(variant.resources.accelerator_types)
        placed[variant.name] = frozenset(
            n["NodeID"] for n in alive if not accepted or node_device_type(n) in accepted
        )
    return placed


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class AdmissionService:
    """Hosts the cluster's lease book (an asyncio actor: calls never block each other)."""

    def __init__(self, db_url: str, sample_period_s: float = 0.1) -> None:
        from wattserve.scheduler.control_store import ControlStore
        from wattserve.telemetry.ledger import LedgerStore

        configure_logging(json=True)
        self._control = ControlStore(LedgerStore(db_url).engine)
        self._sample_period_s = sample_period_s
        self.epoch = time.time_ns() // 1_000_000  # grows across restarts
        self._book = LeaseBook(
            clock=time.monotonic, epoch=self.epoch, sample_period_s=sample_period_s
        )
        self._revision = -1
        self._nodes_for: dict[str, frozenset[str]] = {}
        self._catalog: Catalog | None = None
        self._capped = False
        self._tasks: list[asyncio.Task[None]] = []
        log.info("admission_service_started", epoch=self.epoch)

    async def _ensure_loops(self) -> None:
        if not self._tasks:
            await self._refresh()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_power()),
                           loop.create_task(self._refresh_forever())]  # fmt: skip

    async def ready(self) -> int:
        """Start polling (idempotent); the epoch in force."""
        await self._ensure_loops()
        return self.epoch

    async def _refresh_forever(self) -> None:
        last_nodes = 0.0
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                force = time.monotonic() - last_nodes >= NODES_REFRESH_S
                await self._refresh(force_nodes=force)
                if force:
                    last_nodes = time.monotonic()
            except Exception as exc:  # the database may blip: keep the last budget
                log.warning("admission_refresh_failed", error=repr(exc))

    async def _refresh(self, force_nodes: bool = True) -> None:
        revision = await asyncio.to_thread(self._control.revision)
        if revision != self._revision:
            snapshot = await asyncio.to_thread(self._control.snapshot)
            self._catalog = snapshot.catalog()
            budget = snapshot.budget
            self._capped = budget.cluster_cap_w is not None or bool(budget.node_caps_w)
            self._book.configure(cap_w=budget.cluster_cap_w, node_caps_w=budget.node_caps_w,
                                 replicas=replica_slots(self._catalog))  # fmt: skip
            self._revision = revision
            force_nodes = True
            log.info("admission_budget", cap_w=budget.cluster_cap_w, revision=revision)
        if force_nodes and self._catalog is not None:
            nodes = await asyncio.to_thread(ray.nodes)
            self._nodes_for = variant_nodes(self._catalog, nodes)

    async def _poll_power(self) -> None:
        while True:
            started = time.monotonic()
            try:
                agents = await asyncio.to_thread(node_agents)
                readings = await asyncio.gather(*(a.power_w.remote() for a in agents))
                nodes = dict(readings)
                self._book.observe(PowerReading(started, sum(nodes.values()), nodes))
            except Exception as exc:  # no reading: the book grants nothing under a cap
                self._book.observe(None)
                log.warning("admission_power_unavailable", error=repr(exc))
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self._sample_period_s - elapsed))

    async def request(self, holder: str, asks: list[LeaseAsk]) -> tuple[LeaseDecision, ...]:
        """One dispatch step's asks from ``holder``, each placed on its variant's nodes."""
        await self._ensure_loops()
        placed = [replace(a, nodes=self._nodes_for.get(a.variant, frozenset())) for a in asks]
        return self._book.request(holder, placed)

    async def start(self, lease_id: str) -> bool:
        """A worker is about to start the batch of ``lease_id``: False means do not."""
        return self._book.start(lease_id)

    async def release(self, lease_ids: list[str]) -> int:
        """Batches ended; returns how many leases were still held (idempotent)."""
        return sum(self._book.release(lease_id) for lease_id in lease_ids)

    async def state(self) -> LeaseBookState:
        """The book's totals, for status pages and benchmarks."""
        return self._book.state()

    async def refresh(self) -> None:
        """Reload the budget and catalog now (a scheduler replica just changed them)."""
        await self._refresh()


def node_agents() -> list[Any]:
    """Handles of the telemetry agents of all alive nodes (blocking: GCS lookups)."""
    handles = []
    for node in ray.nodes():
        if node.get("Alive"):
            try:
                name = agent_actor_name(node["NodeID"])
                handles.append(ray.get_actor(name, namespace=AGENT_NAMESPACE))
            except ValueError:
                log.warning("node_without_telemetry_agent", node_id=node["NodeID"])
    return handles


def cluster_power_w(agents: list[Any]) -> float:
    """Every node's power now, W, read from its telemetry agent (blocking)."""
    return sum(w for _, w in ray.get([a.power_w.remote() for a in agents], timeout=10))


def cluster_books(agents: list[Any]) -> Reconciliation:
    """Every node's energy books, summed (blocking)."""
    books = ray.get([a.reconciliation.remote() for a in agents], timeout=30)
    return sum(books, Reconciliation.zero())


def start_admission(db_url: str, sample_period_s: float = 0.1) -> Any:
    """Start (or find) the cluster's admission service; returns its handle once polling."""
    handle = AdmissionService.options(
        name=ADMISSION_NAME, namespace=CONTROL_NAMESPACE, lifetime="detached",
        get_if_exists=True,
    ).remote(db_url, sample_period_s)  # fmt: skip
    ray.get(handle.ready.remote())
    return handle


def admission_handle() -> Any:
    """The running admission service (``ValueError`` if there is none)."""
    return ray.get_actor(ADMISSION_NAME, namespace=CONTROL_NAMESPACE)


class RemoteLeases:
    """``LeaseGate`` over the admission service, failing closed while a cap is set.

    Unreachable (dead, restarting, slow past ``LEASE_CALL_TIMEOUT_S``): under a cap every
    ask is refused as ``unavailable``, so held work waits and ends with 503; uncapped,
    only replica slots are at stake and a local book hands them out meanwhile.
    """

    def __init__(self, holder: str, catalog: Catalog, capped: Callable[[], bool]) -> None:
        self._holder = holder
        self._capped = capped
        self._handle: Any = None
        self._fallback = LocalLeases(catalog)
        self.round_trips_ms: deque[float] = deque(maxlen=ROUND_TRIPS_KEPT)

    def configure(self, catalog: Catalog) -> None:
        """Keep the fallback's slots current (the service reads the catalog itself)."""
        self._fallback.configure(catalog)

    async def request(self, asks: Sequence[LeaseAsk]) -> Sequence[LeaseDecision]:
        """Ask the service; an outage is a refusal under a cap, a local grant otherwise."""
        try:
            if self._handle is None:
                self._handle = await asyncio.to_thread(admission_handle)
            started = time.perf_counter()
            call = self._handle.request.remote(self._holder, list(asks))
            decisions = await asyncio.wait_for(call, LEASE_CALL_TIMEOUT_S)
            self.round_trips_ms.append((time.perf_counter() - started) * 1000)
            return decisions
        except Exception as exc:
            self._handle = None  # look it up again: it may have been restarted
            log.warning("admission_unreachable", error=repr(exc))
            if not self._capped():
                return await self._fallback.request(asks)
            refusal = LeaseRefusal("unavailable", "admission service unreachable", 1.0)
            return [LeaseDecision(a.key, refusal=refusal) for a in asks]

    async def info(self) -> AdmissionInfo | None:
        """The service's book and this replica's lease round trips (None: unreachable)."""
        try:
            handle = self._handle or await asyncio.to_thread(admission_handle)
            book: LeaseBookState = await asyncio.wait_for(
                handle.state.remote(), LEASE_CALL_TIMEOUT_S
            )
        except Exception as exc:
            log.warning("admission_unreachable", error=repr(exc))
            return None
        times = sorted(self.round_trips_ms)
        return AdmissionInfo(
            epoch=book.epoch, measured_w=book.measured_w, pending_w=book.pending_w,
            headroom_w=book.headroom_w, leases=book.leases, warming_up=book.warming_up,
            replica=self._holder, lease_round_trips=len(times),
            lease_round_trip_ms_p50=_quantile(times, 0.5),
            lease_round_trip_ms_p99=_quantile(times, 0.99),
        )  # fmt: skip

    async def refresh(self) -> None:
        """Have the service reload the budget now (after an admin change), best effort."""
        try:
            handle = self._handle or await asyncio.to_thread(admission_handle)
            await asyncio.wait_for(handle.refresh.remote(), LEASE_CALL_TIMEOUT_S)
        except Exception as exc:  # it reloads on its own within REFRESH_S anyway
            log.warning("admission_refresh_unreachable", error=repr(exc))

    def release(self, lease_id: str) -> None:
        """Fire and forget: a lost release only leaves a lease to expire on its own."""
        if self._fallback.book.release(lease_id):
            return
        if self._handle is not None:
            self._handle.release.remote([lease_id])
