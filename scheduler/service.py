"""The request path, without Ray: route, plan a batch, run it, charge it, record it.

``Scheduler`` is plain asyncio over two seams: a ``WorkerPool`` that carries out a
``BatchPlan`` (Ray Serve handles in production, anything with the same two methods in a
simulator) and the ``LedgerStore``. Coalescing, the result cache and the dynamic
batcher slot in between ``route`` and ``pool.run``; today each request is one batch.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import structlog

from policies.catalog import Catalog
from policies.plans import BatchOutput, BatchPlan, WorkItem
from policies.policy import Policy
from policies.routing import route
from telemetry.energy import EnergyMeasurement, estimated_batch_energy
from telemetry.ledger import LedgerRow, LedgerStore
from wattserve import GenerationFailed, GenerationRequest
from wattserve._schemas import (
    MAX_SEED,
    ImageDatum,
    ImageGenerationResponse,
    Receipt,
    WattserveExtension,
)

log = structlog.get_logger(__name__)


class BatchMetrics(Protocol):
    """Where finished batches are counted (Prometheus in production)."""

    def record_batch(self, variant: str, source: str, joules: float, outputs: int) -> None:
        """Count one finished batch."""
        ...


class WorkerPool(Protocol):
    """What the scheduler needs from the workers."""

    def available(self) -> frozenset[str]:
        """Names of variants that have at least one replica up."""
        ...

    async def run(self, plan: BatchPlan) -> BatchOutput:
        """Run ``plan`` on a replica of ``plan.variant``."""
        ...


def new_id(prefix: str) -> str:
    """A short random id such as ``req_3f2a...``."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Scheduler:
    """Serves generation requests; one instance per ingress replica."""

    def __init__(
        self,
        catalog: Catalog,
        policy: Policy,
        pool: WorkerPool,
        ledger: LedgerStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        metrics: BatchMetrics | None = None,
    ) -> None:
        self.catalog = catalog
        self.policy = policy
        self.pool = pool
        self.ledger = ledger
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._metrics = metrics

    def _seeds(self, request: GenerationRequest) -> list[int]:
        """Image i gets seed base+i; unseeded requests get a recorded random base."""
        base = request.seed if request.seed is not None else self._rng.randrange(2**31)
        return [(base + i) % (MAX_SEED + 1) for i in range(request.n)]

    async def generate(self, request: GenerationRequest) -> ImageGenerationResponse:
        """Route, run and record ``request``; raise a ``WattserveError`` on failure."""
        arrived = self._clock()
        request_id = new_id("req")
        decision = route(request, self.catalog, self.policy, self.pool.available())
        variant = self.catalog.get(decision.variant)
        assert variant is not None  # route() only returns catalog variants
        items = tuple(
            WorkItem(request.prompt, request.negative_prompt, seed) for seed in self._seeds(request)
        )
        plan = BatchPlan(new_id("bat"), variant.name, request.width_px, request.height_px, items)
        log.info(
            "request_routed",
            request_id=request_id,
            variant=variant.name,
            reason=decision.reason,
            n=request.n,
            expected_j_per_image=decision.expected_joules_per_image,
        )
        started = self._clock()
        try:
            output = await self.pool.run(plan)
        except BaseException as exc:
            energy = estimated_batch_energy(variant.power_w, self._clock() - started)
            cancelled = isinstance(exc, asyncio.CancelledError)
            error = "cancelled by client" if cancelled else f"{type(exc).__name__}: {exc}"
            rows = self._rows(request, request_id, plan, decision.reason, energy, arrived, error)
            await asyncio.shield(asyncio.to_thread(self.ledger.record, rows))
            log.warning("batch_failed", request_id=request_id, batch_id=plan.batch_id, error=error)
            if cancelled or not isinstance(exc, Exception):
                raise
            raise GenerationFailed(f"variant {variant.name!r} failed: {error}") from exc
        energy = EnergyMeasurement(output.joules, output.energy_source, output.busy_s)
        if self._metrics is not None:
            self._metrics.record_batch(variant.name, energy.source, energy.joules, len(items))
        rows = self._rows(request, request_id, plan, decision.reason, energy, arrived, None)
        await asyncio.to_thread(self.ledger.record, rows)
        receipts = [Receipt.model_validate(row, from_attributes=True) for row in rows]
        return ImageGenerationResponse(
            created=int(time.time()),
            data=[ImageDatum(b64_json=base64.b64encode(png).decode()) for png in output.png_images],
            wattserve=WattserveExtension(request_id=request_id, receipts=receipts),
        )

    def _rows(
        self,
        request: GenerationRequest,
        request_id: str,
        plan: BatchPlan,
        route_reason: str,
        energy: EnergyMeasurement,
        arrived: float,
        error: str | None,
    ) -> list[LedgerRow]:
        latency_ms = (self._clock() - arrived) * 1000
        return [
            LedgerRow(
                request_id=request_id,
                image_index=index,
                user=request.user,
                variant=plan.variant,
                quality=request.quality,
                route_reason=route_reason,
                batch_id=plan.batch_id,
                batch_size=len(plan.items),
                joules=energy.per_output(len(plan.items)),
                energy_source=energy.source,
                cache="miss",
                status="failed" if error else "ok",
                error=error,
                latency_ms=latency_ms,
                seed=item.seed,
                width_px=plan.width_px,
                height_px=plan.height_px,
            )
            for index, item in enumerate(plan.items)
        ]
