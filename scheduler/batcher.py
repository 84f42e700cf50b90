"""The dynamic batcher: carries out ``plan_batches`` decisions on the worker pool.

Requests submit one output at a time and await its result. A single dispatcher task per
scheduler replica (one event loop) re-plans whenever an output arrives, a batch finishes
or the earliest wait deadline passes, and launches each planned batch as its own task,
so a slow batch never blocks planning. Free replicas per variant are the catalog's
replica count minus batches in flight (each replica takes one batch at a time).

Under a power cap (``power_cap_w()``, read at every decision), each planned batch must also pass
``policies.admission.admit`` against the live cluster power; a batch that does not fit
stays queued and is re-checked every ``sample_period_s``. Its outputs wait up to
``max_hold_s`` (or their deadline), then move once to a lower-drawing variant that still
meets their quality floor, and are otherwise refused with ``AdmissionRejected`` (429).

A request that goes away while its output is still queued withdraws it; once launched,
the batch runs for everyone in it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from policies.admission import HeldOutput, PowerSnapshot, admit, held_fate
from policies.batching import BatchingSnapshot, QueuedOutput, plan_batches
from policies.catalog import Catalog
from policies.plans import BatchOutput, BatchPlan, WorkItem
from telemetry.energy import estimated_batch_energy
from wattserve import AdmissionRejected, WattserveError
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
    variant: str
    moved: bool  # moved to a lower-drawing variant to stay under the power cap
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
    floor: float
    moved: bool = False


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
        power_cap_w: Callable[[], float | None] = lambda: None,
        cluster_power_w: Callable[[], float | None] = lambda: None,
        max_hold_s: float = 5.0,
        sample_period_s: float = 0.1,
        max_queued: int = 4096,
    ) -> None:
        self._pool = pool
        self.max_wait_s = max_wait_s
        self._catalog = catalog
        self._cap: dict[str, int] = {}
        self._replicas: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self.configure(catalog, max_batch_size=max_batch_size)
        self._clock = clock
        self._new_batch_id = new_batch_id
        self._on_batch = on_batch
        self._tickets = itertools.count()
        self._queue: dict[int, _Pending] = {}
        self._in_flight: dict[str, int] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._power_cap_w = power_cap_w
        self._cluster_power_w = cluster_power_w
        self._max_hold_s = max_hold_s
        self._sample_period_s = sample_period_s
        self._launched: list[tuple[float, float]] = []  # (launch time, declared draw W)
        self._max_queued = max_queued

    def configure(self, catalog: Catalog, *, max_batch_size: int | None) -> None:
        """Adopt a new catalog and batch-size bound.

        Variants that left the catalog keep their limits, so what is already queued on
        them still launches: that is how a retiring variant drains.
        """
        self._catalog = catalog
        for v in catalog.variants:
            self._cap[v.name] = min(v.max_batch_size, max_batch_size or v.max_batch_size)
            self._replicas[v.name] = v.resources.replicas
        self._wakeup.set()

    def busy_with(self, variant: str) -> bool:
        """Whether any output of ``variant`` is queued or running here."""
        return self._in_flight.get(variant, 0) > 0 or any(
            p.queued.variant == variant for p in self._queue.values()
        )

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
        self,
        variant: str,
        width_px: int,
        height_px: int,
        item: WorkItem,
        deadline_s: float | None,
        floor: float = 0.0,
        solo: bool = False,
    ) -> BatchedOutput:
        """Queue one output and wait for it; raises ``BatchFailed`` if its batch fails.

        Raises ``AdmissionRejected`` at once when ``max_queued`` outputs already wait.
        """
        if len(self._queue) >= self._max_queued:
            raise AdmissionRejected(
                f"queue full: {len(self._queue)} outputs waiting", retry_after_s=1.0
            )
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="wattserve-batcher")
        ticket = next(self._tickets)
        queued = QueuedOutput(ticket, variant, width_px, height_px, self._clock(), deadline_s, solo)
        future: asyncio.Future[BatchedOutput] = asyncio.get_running_loop().create_future()
        self._queue[ticket] = _Pending(queued, item, future, floor)
        self._wakeup.set()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._queue.pop(ticket, None)  # withdraw if not launched yet
            raise

    async def _dispatch(self) -> None:
        while True:
            self._wakeup.clear()
            now = self._clock()
            decision = plan_batches(
                BatchingSnapshot(
                    now_s=now,
                    queued=tuple(p.queued for p in self._queue.values()),
                    free_replicas={
                        name: count - self._in_flight.get(name, 0)
                        for name, count in self._replicas.items()
                    },
                    max_batch_size=self._cap,
                    max_wait_s=self.max_wait_s,
                )
            )
            wake_at = decision.wake_at_s
            admitted = self._admit(now, decision.launch)
            for tickets, ok in zip(decision.launch, admitted, strict=True):
                if ok:
                    self._launch(now, [self._queue.pop(t) for t in tickets])
                else:
                    self._settle_held(now, tickets)
                    due = now + self._sample_period_s
                    wake_at = due if wake_at is None else min(wake_at, due)
            timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _draw_w(self, variant: str) -> float:
        spec = self._catalog.get(variant)
        return spec.power_w if spec else 0.0

    def _admit(self, now: float, launch: tuple[tuple[int, ...], ...]) -> list[bool]:
        """Which planned batches fit under the power cap right now."""
        recent = now - 2 * self._sample_period_s
        self._launched = [(t, w) for t, w in self._launched if t >= recent]
        cap_w = self._power_cap_w()
        snapshot = PowerSnapshot(
            cap_w=cap_w,
            measured_w=self._cluster_power_w() if cap_w is not None else None,
            launching_w=sum(w for _, w in self._launched),
        )
        draws = [self._draw_w(self._queue[tickets[0]].queued.variant) for tickets in launch]
        return admit(snapshot, draws)

    def _settle_held(self, now: float, tickets: tuple[int, ...]) -> None:
        """Held outputs that ran out of time move to a lower-drawing variant or are refused."""
        for ticket in tickets:
            pending = self._queue[ticket]
            queued = pending.queued
            held = HeldOutput(ticket, queued.variant, queued.enqueued_s, queued.deadline_s,
                              pending.moved)  # fmt: skip
            cheaper = self._lower_draw_variant(queued, pending.floor)
            fate = held_fate(held, now, self._max_hold_s, cheaper)
            if fate == "move" and cheaper is not None:
                pending.queued = replace(queued, variant=cheaper, enqueued_s=now)
                pending.moved = True
                log.info("output_moved_power_cap", ticket=ticket, to=cheaper)
            elif fate == "reject":
                self._queue.pop(ticket)
                pending.future.set_exception(
                    AdmissionRejected(
                        f"power cap {self._power_cap_w() or 0:.0f} W: no capacity within "
                        f"{self._max_hold_s:.0f}s and no lower-drawing variant meets the request",
                        retry_after_s=self._max_hold_s,
                    )
                )

    def _lower_draw_variant(self, queued: QueuedOutput, floor: float) -> str | None:
        current = self._draw_w(queued.variant)
        fits = [
            v for v in self._catalog.variants
            if v.power_w < current and v.quality_score >= floor
            and v.size_problem(queued.width_px, queued.height_px) is None
        ]  # fmt: skip
        return min(fits, key=lambda v: v.power_w).name if fits else None

    def _launch(self, now: float, members: list[_Pending]) -> None:
        variant = members[0].queued.variant
        self._in_flight[variant] = self._in_flight.get(variant, 0) + 1
        self._launched.append((now, self._draw_w(variant)))
        task = asyncio.create_task(self._run(members))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_with_retry(self, plan: BatchPlan) -> BatchOutput:
        """Run a batch; if its replica fails, run it once more (Serve picks a healthy one).

        The failed attempt is not charged to anyone: whatever it drew stays on the device's
        books (``wattserve report``), and the outputs are charged once, by the attempt that
        made them.
        """
        try:
            return await self._pool.run(plan)
        except Exception as exc:
            log.warning("batch_retry", batch_id=plan.batch_id, error=f"{type(exc).__name__}: {exc}")
            return await self._pool.run(plan)

    async def _run(self, members: list[_Pending]) -> None:
        first = members[0].queued
        plan = BatchPlan(
            self._new_batch_id(), first.variant, first.width_px, first.height_px,
            tuple(m.item for m in members),
        )  # fmt: skip
        size = len(members)
        started = self._clock()
        try:
            output = await self._run_with_retry(plan)
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
                        png, plan.variant, member.moved, plan.batch_id, size,
                        output.joules / size, output.energy_source,
                    ))  # fmt: skip
        finally:
            self._in_flight[plan.variant] -= 1
            self._wakeup.set()
