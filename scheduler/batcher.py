"""The dynamic batcher: carries out ``plan_batches`` decisions on the worker pool.

Requests submit one output at a time and await its result. A single dispatcher task per
scheduler replica (one event loop) re-plans whenever an output arrives, a batch finishes
or the earliest wait deadline passes, and launches each planned batch as its own task,
so a slow batch never blocks planning. Free replicas per variant are the catalog's
replica count minus batches in flight (each replica takes one batch at a time).

A request that goes away while its output is still queued withdraws it; once launched,
the batch runs for everyone in it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from policies.batching import BatchingSnapshot, QueuedOutput, plan_batches
from policies.catalog import Catalog
from policies.plans import BatchOutput, BatchPlan, WorkItem
from telemetry.energy import estimated_batch_energy
from wattserve import WattserveError
from wattserve._schemas import EnergySource

log = structlog.get_logger(__name__)


class WorkerPool(Protocol):
    """What the scheduler needs from the workers."""

    def available(self) -> frozenset[str]:
        """Names of variants that have at least one replica up."""
        ...

    async def run(self, plan: BatchPlan) -> BatchOutput:
        """Run ``plan`` on a replica of ``plan.variant``."""
        ...


@dataclass(frozen=True)
class BatchedOutput:
    """One output of a finished batch and its share of the batch's energy."""

    png: bytes
    batch_id: str
    batch_size: int
    joules: float
    energy_source: EnergySource


class BatchFailed(WattserveError):
    """The batch an output was in failed; carries the estimated energy share it burned."""

    def __init__(self, message: str, *, batch_id: str, batch_size: int, joules: float) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.batch_size = batch_size
        self.joules = joules


@dataclass
class _Pending:
    queued: QueuedOutput
    item: WorkItem
    future: asyncio.Future[BatchedOutput]


class Batcher:
    """Queues outputs per (variant, size) and launches batches onto free replicas."""

    def __init__(
        self,
        pool: WorkerPool,
        catalog: Catalog,
        *,
        max_batch_size: int | None = None,
        max_wait_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        new_batch_id: Callable[[], str],
        on_batch: Callable[[BatchPlan, BatchOutput], None] | None = None,
    ) -> None:
        self._pool = pool
        self._catalog = catalog
        self._max_wait_s = max_wait_s
        self._cap = {
            v.name: min(v.max_batch_size, max_batch_size or v.max_batch_size)
            for v in catalog.variants
        }
        self._replicas = {v.name: v.resources.replicas for v in catalog.variants}
        self._clock = clock
        self._new_batch_id = new_batch_id
        self._on_batch = on_batch
        self._tickets = itertools.count()
        self._queue: dict[int, _Pending] = {}
        self._in_flight: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        """Outputs waiting for a batch."""
        return len(self._queue)

    def queued_for(self, variant: str) -> int:
        """Outputs waiting for a batch of ``variant``, plus one batch per busy replica."""
        waiting = sum(p.queued.variant == variant for p in self._queue.values())
        busy = self._in_flight.get(variant, 0)
        return waiting + busy * self._cap.get(variant, 1)

    async def submit(
        self, variant: str, width_px: int, height_px: int, item: WorkItem, deadline_s: float | None
    ) -> BatchedOutput:
        """Queue one output and wait for it; raises ``BatchFailed`` if its batch fails."""
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="wattserve-batcher")
        ticket = next(self._tickets)
        queued = QueuedOutput(ticket, variant, width_px, height_px, self._clock(), deadline_s)
        future: asyncio.Future[BatchedOutput] = asyncio.get_running_loop().create_future()
        self._queue[ticket] = _Pending(queued, item, future)
        self._wakeup.set()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._queue.pop(ticket, None)  # withdraw if not launched yet
            raise

    async def _dispatch(self) -> None:
        while True:
            self._wakeup.clear()
            decision = plan_batches(
                BatchingSnapshot(
                    now_s=self._clock(),
                    queued=tuple(p.queued for p in self._queue.values()),
                    free_replicas={
                        name: count - self._in_flight.get(name, 0)
                        for name, count in self._replicas.items()
                    },
                    max_batch_size=self._cap,
                    max_wait_s=self._max_wait_s,
                )
            )
            for tickets in decision.launch:
                members = [self._queue.pop(t) for t in tickets]
                variant = members[0].queued.variant
                self._in_flight[variant] = self._in_flight.get(variant, 0) + 1
                task = asyncio.create_task(self._run(members))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
            timeout = None
            if decision.wake_at_s is not None:
                timeout = max(0.0, decision.wake_at_s - self._clock())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    async def _run(self, members: list[_Pending]) -> None:
        first = members[0].queued
        plan = BatchPlan(
            self._new_batch_id(), first.variant, first.width_px, first.height_px,
            tuple(m.item for m in members),
        )  # fmt: skip
        size = len(members)
        started = self._clock()
        try:
            output = await self._pool.run(plan)
        except Exception as exc:
            variant = self._catalog.get(plan.variant)
            power_w = variant.power_w if variant else 0.0
            energy = estimated_batch_energy(power_w, self._clock() - started)
            error = f"{type(exc).__name__}: {exc}"
            log.warning("batch_failed", batch_id=plan.batch_id, error=error)
            for member in members:
                if not member.future.done():
                    member.future.set_exception(
                        BatchFailed(error, batch_id=plan.batch_id, batch_size=size,
                                    joules=energy.per_output(size))
                    )  # fmt: skip
        else:
            if self._on_batch is not None:
                self._on_batch(plan, output)
            for member, png in zip(members, output.png_images, strict=True):
                if not member.future.done():
                    member.future.set_result(BatchedOutput(
                        png, plan.batch_id, size, output.joules / size, output.energy_source
                    ))  # fmt: skip
        finally:
            self._in_flight[plan.variant] -= 1
            self._wakeup.set()
