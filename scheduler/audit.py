"""The shadow auditor: regenerate a sample of cheap outputs on the reference, score them.

After a request settles, each output off the reference path (``policies.audit``) is
sampled at the audit rate and queued here with its served image. One task per scheduler
replica takes the queue in order and submits each job to the batcher as *background*
work on the tier's reference variant, same prompt, seed and size: it is planned only
while no user output waits for that variant and leased only with room under the power
cap to spare (``DispatchCore.submit``), so it never runs ahead of user work. The queue
is bounded; a job that cannot start within ``window_s`` is withdrawn and booked as
``dropped``. Scores run on a thread; every audit, scored or not, is one ``audits`` row
with the reference run's metered energy: the cost of proving the savings.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from wattserve.policies.audit import AuditCause, audit_cause, measure_for, sampled
from wattserve.policies.plans import WorkItem
from wattserve.scheduler.batcher import BatchedOutput, Batcher
from wattserve.scheduler.outcomes import Outcome, RequestContext
from wattserve.telemetry.audits import AuditRow, AuditStore
from wattserve.telemetry.quality import ClipScorer, image_similarity

log = structlog.get_logger(__name__)

MAX_QUEUED = 32
WINDOW_S = 300.0


# What else happens to a recorded audit (metrics, the demotion judgement); blocking,
# called on a thread.
AuditSink = Callable[[AuditRow], None]


@dataclass(frozen=True)
class AuditJob:
    """One served output to regenerate on the reference and compare."""

    request_id: str
    image_index: int
    tenant: str | None
    tier: str
    prompt: str
    negative_prompt: str | None
    seed: int
    width_px: int
    height_px: int
    variant: str  # what served it
    cause: AuditCause
    reference_variant: str
    steps_skipped: int
    served_png: bytes
    queued_s: float


class Auditor:
    """Samples outputs, runs their reference generations as background work, books them."""

    def __init__(
        self,
        store: AuditStore,
        *,
        clip: ClipScorer | None = None,
        after: AuditSink | None = None,
        max_queued: int = MAX_QUEUED,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.store, self.clip, self._after = store, clip, after
        self.window_s = window_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[AuditJob] = asyncio.Queue(max_queued)
        self._task: asyncio.Task[None] | None = None
        self.overflowed = 0  # jobs not queued because the queue was full
        self._running = 0
        self.idle = asyncio.Event()  # set while nothing is queued or running
        self.idle.set()

    @property
    def pending(self) -> int:
        """Audits queued or running here, not yet in the book."""
        return self._queue.qsize() + self._running

    def draw(self, rate: float) -> bool:
        """Whether one output is audited at ``rate`` (the policy's, or its tenant's own)."""
        return sampled(rate, self._rng.random())

    def offer_request(
        self,
        ctx: RequestContext,
        outcomes: dict[int, Outcome],
        reference_variant: str,
        rate: float,
        batcher: Batcher,
    ) -> None:
        """Offer, each drawn at ``rate``, a settled request's off-reference outputs."""
        request = ctx.request
        for index, outcome in sorted(outcomes.items()):
            cause = audit_cause(outcome.variant, reference_variant, outcome.cache)
            if cause is None or outcome.png is None or outcome.error or not self.draw(rate):
                continue
            self.offer(AuditJob(
                ctx.request_id, index, request.tenant, request.quality, request.prompt,
                request.negative_prompt, ctx.seeds[index], request.width_px, request.height_px,
                outcome.variant, cause, reference_variant, outcome.steps_skipped, outcome.png,
                self._clock(),
            ), batcher)  # fmt: skip

    def offer(self, job: AuditJob, batcher: Batcher) -> bool:
        """Queue ``job`` (False, counted, when the queue is full); start the task once."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.overflowed += 1
            log.info("audit_overflow", request_id=job.request_id, queued=self._queue.qsize())
            return False
        self.idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(batcher), name="wattserve-auditor")
        return True

    async def _run(self, batcher: Batcher) -> None:
        while True:
            job = await self._queue.get()
            self._running = 1
            try:
                row = await self._audit(job, batcher)
                await asyncio.to_thread(self._book, row)
                log.info("audit_recorded", request_id=job.request_id, status=row.status,
                         variant=job.variant, cause=job.cause, measure=row.measure)  # fmt: skip
            except Exception as exc:  # one bad audit must not stop the others
                log.error("audit_failed", request_id=job.request_id,
                          error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            finally:
                self._running = 0
                if self._queue.empty():
                    self.idle.set()

    def _book(self, row: AuditRow) -> None:
        self.store.record(row)
        if self._after is not None:
            self._after(row)

    async def _audit(self, job: AuditJob, batcher: Batcher) -> AuditRow:
        left_s = self.window_s - (self._clock() - job.queued_s)
        submit = batcher.submit(
            job.reference_variant, job.width_px, job.height_px,
            WorkItem(job.prompt, job.negative_prompt, job.seed), None, background=True,
        )  # fmt: skip
        try:
            made = await asyncio.wait_for(submit, max(left_s, 0.0))
        except TimeoutError:  # no spare capacity within the window: withdrawn, counted
            return self._row(job, "dropped", detail=f"no spare capacity within {self.window_s}s")
        except Exception as exc:
            return self._row(job, "failed", detail=f"{type(exc).__name__}: {exc}")
        return await asyncio.to_thread(self._scored, job, made)

    def _scored(self, job: AuditJob, made: BatchedOutput) -> AuditRow:
        """Score the pair; the verdict's measure by what the two images have in common."""
        same_family = job.variant == job.reference_variant
        row = self._row(job, "scored", made=made)
        row.measure = measure_for(same_family, self.clip is not None)
        pixels = image_similarity(job.served_png, made.png)
        row.ssim, row.psnr_db = pixels.ssim, pixels.psnr_db
        if self.clip is not None:
            row.clip_served = self.clip.score(job.prompt, job.served_png)
            row.clip_reference = self.clip.score(job.prompt, made.png)
            row.clip_drop = row.clip_reference - row.clip_served
            row.random_weights = self.clip.random_weights
        return row

    @staticmethod
    def _row(
        job: AuditJob, status: str, *, made: BatchedOutput | None = None, detail: str | None = None
    ) -> AuditRow:
        return AuditRow(
            request_id=job.request_id, image_index=job.image_index, tenant=job.tenant,
            tier=job.tier, variant=job.variant, cause=job.cause,
            reference_variant=job.reference_variant, steps_skipped=job.steps_skipped,
            status=status, detail=detail,
            batch_id=made.batch_id if made else None,
            joules=made.joules if made else 0.0,
            energy_source=made.energy_source if made else "estimated",
        )  # fmt: skip
