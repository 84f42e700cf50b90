"""The dynamic batcher: carries out ``plan_batches`` decisions on the worker pool.

Requests submit one output at a time and await its result. A single dispatcher task per
scheduler replica (one event loop) re-plans whenever an output arrives, a batch finishes
or the earliest wait deadline passes, and launches each planned batch as its own task,
so a slow batch never blocks planning. Free replicas per variant are the catalog's
replica count minus batches in flight (each replica takes one batch at a time).

Every planned batch needs a lease (``scheduler.leases.LeaseGate``): one request per
dispatch step for all candidate batches, answered by the lease book that holds the power
budget and the replica slots of every scheduler replica. A batch refused for a slot waits
for a replica; one refused to protect the budget stays queued and is asked for again at
the refusal's ``retry_after_s``. Its outputs wait up to ``max_hold_s`` (or their
deadline), then move once to a lower-drawing variant that still meets their quality
floor, and are otherwise refused: ``AdmissionRejected`` (429) over the power cap,
``ServiceUnavailable`` (503) while no power reading or no admission service is there
(fail closed). The lease is released when the batch ends, either way.

A request that goes away while its output is still queued withdraws it; once launched,
the batch runs for everyone in it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from wattserve import AdmissionRejected, ServiceUnavailable, WattserveError, WorkerFailed
from wattserve._schemas import EnergySource
from wattserve.policies.catalog import Catalog
from wattserve.policies.dispatch import DispatchCore, Launch, Step
from wattserve.policies.latent_reuse import capture_steps
from wattserve.policies.leases import LeaseRefusal
from wattserve.policies.plans import BatchOutput, BatchPlan, WorkItem
from wattserve.scheduler.leases import LeaseGate, LocalLeases
from wattserve.telemetry.energy import estimated_batch_energy

log = structlog.get_logger(__name__)

DISPATCH_RETRY_S = 0.1  # after a failed dispatch step, try again this much later
# The least time a worker call may take before its outputs fail with 503: Serve replacing
# a dead replica (process start and a pipeline load) takes 20-35 s on a loaded machine.
WORKER_DEADLINE_FLOOR_S = 60.0
WORKER_RETRY_AFTER_S = 10.0  # after a worker died twice: about a replica's restart
# No replica up or none placeable: about a node joining and a replica loading on it
NO_REPLICA_RETRY_AFTER_S = 30.0


class WorkerPool(Protocol):
    """What the scheduler needs from the workers."""

    def available(self) -> frozenset[str]:
        """Names of variants that have at least one replica up."""
        ...

    async def run(self, plan: BatchPlan) -> BatchOutput:
        """Run ``plan`` on a replica of ``plan.variant``.

        ``WorkerDied`` if the replica died under it (retried once), ``NoPlacement`` if
        no node can host the variant (not retried).
        """
        ...


class WorkerDied(WattserveError):
    """The replica running a batch died under it (its process is gone)."""


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
    start_step: int = 0  # resumed from a kept latent after this many steps
    latents: bytes | None = None  # this output's kept latents (``.npz``), if any
    launched_at: float | None = None  # the batcher's clock when its batch launched


class WorkerTimeout(ServiceUnavailable):
    """No replica finished the batch within its deadline (none could be placed, or hung)."""


class NoPlacement(ServiceUnavailable):
    """No alive node can host the batch's variant: failing now beats waiting the deadline."""


class BatchFailed(WattserveError):
    """The batch an output was in failed; carries the estimated energy share it burned."""

    def __init__(self, message: str, *, batch_id: str, batch_size: int, joules: float) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.batch_size = batch_size
        self.joules = joules


@dataclass
class _Pending:
    item: WorkItem
    future: asyncio.Future[BatchedOutput]
    background: bool = False


class Batcher:
    """Queues outputs per (variant, size) and launches batches onto free replicas.

    The decisions are ``DispatchCore``'s; this class adds the asyncio around them: a
    future per output, one dispatcher task, one task per running batch.
    """

    def __init__(
        self,
        pool: WorkerPool,
        catalog: Catalog,
        *,
        max_batch_size: int | None = None,
        max_wait_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        new_batch_id: Callable[[], str],
        on_batch: Callable[[BatchPlan, BatchOutput, float], None] | None = None,
        leases: LeaseGate | None = None,
        max_hold_s: float = 5.0,
        max_queued: int = 4096,
        joules_bounds: Mapping[str, Mapping[int, tuple[float, float]]] | None = None,
        expected_batch_s: Callable[[str, int], float | None] = lambda _v, _n: None,
        worker_deadline_floor_s: float = WORKER_DEADLINE_FLOOR_S,
    ) -> None:
        self._pool = pool
        self._expected_batch_s = expected_batch_s
        self._deadline_floor_s = worker_deadline_floor_s
        self.core = DispatchCore(
            catalog, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
            max_hold_s=max_hold_s, joules_bounds=joules_bounds,
        )  # fmt: skip
        self._catalog = catalog
        self._wakeup = asyncio.Event()
        self._clock = clock
        self._new_batch_id = new_batch_id
        self._on_batch = on_batch
        self._pending: dict[int, _Pending] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.leases: LeaseGate = leases if leases is not None else LocalLeases(catalog, clock=clock)
        self._max_queued = max_queued
        self.keep_latents = False  # whether batches keep latents for approximate reuse

    @property
    def max_wait_s(self) -> float:
        """How long a partial batch may wait for company, s."""
        return self.core.max_wait_s

    @max_wait_s.setter
    def max_wait_s(self, value: float) -> None:
        self.core.max_wait_s = value

    def configure(self, catalog: Catalog, *, max_batch_size: int | None) -> None:
        """Adopt a new catalog and batch-size bound (see ``DispatchCore.configure``)."""
        self._catalog = catalog
        self.core.configure(catalog, max_batch_size=max_batch_size)
        self.leases.configure(catalog)
        self._wakeup.set()

    def busy_with(self, variant: str) -> bool:
        """Whether any output of ``variant`` is queued or running here."""
        return self.core.busy_with(variant)

    @property
    def queued(self) -> int:
        """Outputs waiting for a batch."""
        return len(self.core)

    def queued_for(self, variant: str) -> int:
        """Outputs waiting for a batch of ``variant``, plus one batch per busy replica."""
        return self.core.queued_for(variant)

    async def submit(
        self,
        variant: str,
        width_px: int,
        height_px: int,
        item: WorkItem,
        deadline_s: float | None,
        floor: float = 0.0,
        solo: bool = False,
        start_step: int = 0,
        background: bool = False,
    ) -> BatchedOutput:
        """Queue one output and wait for it; raises ``BatchFailed`` if its batch fails.

        ``start_step`` > 0: ``item.latent`` is the latent to resume from after that many
        steps, and the output batches only with others resuming there. ``background``:
        audit work, planned only while no user output waits for the variant and leased
        only when the power cap has room to spare (``DispatchCore.submit``).

        Raises ``AdmissionRejected`` at once when ``max_queued`` outputs already wait.
        """
        if len(self.core) >= self._max_queued:
            raise AdmissionRejected(
                f"queue full: {len(self.core)} outputs waiting", retry_after_s=1.0
            )
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="wattserve-batcher")
        ticket = self.core.submit(variant, width_px, height_px, self._clock(), deadline_s,
                                  floor, solo, start_step, background)  # fmt: skip
        future: asyncio.Future[BatchedOutput] = asyncio.get_running_loop().create_future()
        self._pending[ticket] = _Pending(item, future, background)
        self._wakeup.set()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if self.core.withdraw(ticket):  # still queued: nobody else needs it
                self._pending.pop(ticket, None)
            raise

    async def _dispatch(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                step = await self._step()
            except Exception as exc:  # a dead dispatcher would leave every output waiting
                log.error("dispatch_step_failed", error=f"{type(exc).__name__}: {exc}")
                step = Step((), (), (), self._clock() + DISPATCH_RETRY_S)
            wake_at = step.wake_at_s
            timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    async def _step(self) -> Step:
        """Propose, ask for every candidate's lease at once, settle, carry it out."""
        proposal = self.core.propose(self._clock())
        step = Step((), (), (), proposal.wake_at_s)
        if proposal.asks:  # one lease request per step, for every candidate batch
            step = self.core.settle(proposal, await self.leases.request(proposal.asks))
        self._carry_out(step)
        return step

    def _carry_out(self, step: Step) -> None:
        for lease in step.unused:
            self.leases.release(lease.lease_id)
        for launch in step.launches:
            members = [self._pending.pop(t) for t in launch.tickets]
            task = asyncio.create_task(self._run(launch, members))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        for ticket, to in step.moved:
            log.info("output_moved_power_cap", ticket=ticket, to=to)
        for ticket, refusal in step.rejected:
            pending = self._pending.pop(ticket, None)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(self._refused(refusal))

    def _refused(self, refusal: LeaseRefusal) -> WattserveError:
        """The error a held output ends with: 429 over the cap, 503 without a reading."""
        hold_s = self.core.max_hold_s
        if refusal.reason == "power_cap":
            return AdmissionRejected(
                f"{refusal.message}; no capacity within {hold_s:.0f}s and no "
                "lower-drawing variant meets the request",
                retry_after_s=hold_s,
            )
        return ServiceUnavailable(
            f"power budget cannot be checked ({refusal.message}); held {hold_s:.0f}s",
            retry_after_s=max(1.0, refusal.retry_after_s),
        )

    def _deadline_s(self, plan: BatchPlan) -> float:
        """How long one attempt may take: a few expected batch times, at least the floor.

        The floor covers Serve replacing a dead replica (a pipeline load); without any
        deadline a batch whose variant no node can host would wait forever.
        """
        expected_s = self._expected_batch_s(plan.variant, len(plan.items))
        return max(self._deadline_floor_s, 4 * expected_s if expected_s else 0.0)

    async def _attempt(self, plan: BatchPlan) -> BatchOutput:
        deadline_s = self._deadline_s(plan)
        try:
            return await asyncio.wait_for(self._pool.run(plan), deadline_s)
        except TimeoutError:
            raise WorkerTimeout(
                f"no replica of {plan.variant} finished batch {plan.batch_id} within "
                f"{deadline_s:.0f}s", retry_after_s=self._deadline_floor_s / 4,
            ) from None  # fmt: skip

    async def _run_with_retry(self, plan: BatchPlan) -> tuple[BatchPlan, BatchOutput]:
        """Run a batch; if its replica fails, run it once more as a new attempt.

        The retry has its own ``batch_id`` (Serve picks a healthy replica; it may be on the
        same device, whose books must not see one id start twice). The failed attempt is
        not charged to anyone: what it drew stays on the device's books as a failed
        attempt, and the outputs are charged once, by the attempt that made them. A
        timed-out attempt is not retried (the deadline already covers a replica restart), nor
        one whose variant no node can host.
        """
        try:
            return plan, await self._attempt(plan)
        except ServiceUnavailable:  # past the deadline, or nowhere to run: a retry won't help
            raise
        except Exception as exc:
            retry = replace(plan, batch_id=self._new_batch_id())
            log.warning("batch_retry", batch_id=plan.batch_id, retry_batch_id=retry.batch_id,
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return retry, await self._attempt(retry)

    async def _run(self, launch: Launch, members: list[_Pending]) -> None:
        lease_id = launch.lease.lease_id if launch.lease is not None else None
        variant = self._catalog.get(launch.variant)
        background = all(m.background for m in members)
        keep = (
            capture_steps(variant.steps) if self.keep_latents and variant and not background else ()
        )
        plan = BatchPlan(
            self._new_batch_id(), launch.variant, launch.width_px, launch.height_px,
            tuple(m.item for m in members), lease_id, launch.start_step, keep,
            background=background,
        )  # fmt: skip
        size = len(members)
        started = self._clock()
        try:
            plan, output = await self._run_with_retry(plan)
        except (ServiceUnavailable, WorkerDied) as exc:  # a retry later may well succeed: 503
            log.warning("batch_failed", batch_id=plan.batch_id, error=exc.message)
            failure = exc if isinstance(exc, ServiceUnavailable) else WorkerFailed(
                f"the replicas running batch {plan.batch_id} of {plan.variant} died twice: "
                f"{exc.message}", retry_after_s=WORKER_RETRY_AFTER_S)  # fmt: skip
            for member in members:
                if not member.future.done():
                    member.future.set_exception(failure)
        except Exception as exc:
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
            if self._on_batch is not None:  # with the round trip: launch to results back
                self._on_batch(plan, output, self._clock() - started)
            latents = output.latents or (None,) * size
            for member, moved, png, kept in zip(members, launch.moved, output.png_images,
                                                latents, strict=True):  # fmt: skip
                if not member.future.done():
                    member.future.set_result(BatchedOutput(
                        png, plan.variant, moved, plan.batch_id, size,
                        output.joules / size, output.energy_source, plan.start_step, kept,
                        started,
                    ))  # fmt: skip
        finally:
            if lease_id is not None:
                self.leases.release(lease_id)
            self.core.finished(plan.variant)
            self._wakeup.set()
