"""How each output of a request came out, and the ledger row that records it.

``Scheduler.generate`` works out, per output, an :class:`Outcome` (a cache hit, a share
of a coalesced flight, a generated output, or why none was made) under the
:class:`RequestContext` every output of the request shares; :func:`ledger_rows` turns
them into the one ledger row per output, and :func:`response` into the answer. Plain
values and pure functions: the clock and the replica id are the caller's.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from wattserve import AdmissionRejected, GenerationRequest, ServiceUnavailable
from wattserve._schemas import (
    CacheStatus,
    CandidateInfo,
    EnergySource,
    ImageDatum,
    ImageGenerationResponse,
    Receipt,
    ReuseMode,
    RouteInfo,
    WattserveExtension,
)
from wattserve.policies.catalog import VariantSpec
from wattserve.policies.latent_reuse import ANONYMOUS_POOL
from wattserve.policies.routing import RouteDecision
from wattserve.scheduler.cache import CacheHit
from wattserve.scheduler.coalescing import SharedOutput
from wattserve.telemetry.ledger import LedgerValues

REASON_CACHE_HIT = "cache_hit"
REASON_DOWNGRADED = "downgraded_power_cap"
REASON_COALESCED = "coalesced"
CANCELLED = "cancelled by client"


@dataclass(frozen=True)
class RequestContext:
    """What every output of one request shares."""

    request: GenerationRequest
    request_id: str
    arrived: float
    variant: VariantSpec
    decision: RouteDecision
    floor: float
    seeds: tuple[int, ...]
    keys: tuple[str | None, ...]  # output keys; None when outputs are not shareable
    reuse: ReuseMode = "exact"
    pool: str = ANONYMOUS_POOL  # whose kept latents its outputs may resume from
    # seconds spent waiting on batches (own, or a flight leader's), one after another
    batch_waits_s: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """How one output of a request was obtained (or why it was not)."""

    png: bytes | None
    variant: str
    batch_id: str
    batch_size: int  # 0 for a cache hit: no generation
    joules: float
    energy_source: EnergySource
    cache: CacheStatus
    route_reason: str
    error: str | None = None
    retry_after_s: float | None = None  # set when a retry later may succeed (429, 503)
    refused_as: type[AdmissionRejected | ServiceUnavailable] = AdmissionRejected
    # a generated output: its schedule's steps and, when resumed, what it resumed from
    steps: int | None = None
    steps_skipped: int = 0
    similarity: float | None = None
    reuse_source: str | None = None  # only when the same tenant paid for the source
    launch_ms: float | None = None  # arrival to its batch's launch: generated outputs only


def coalesced(shared: SharedOutput, error: str | None = None) -> Outcome:
    """An output joined from another request's flight: its share of the joules."""
    return Outcome(
        shared.png, shared.variant, shared.batch_id, shared.batch_size, shared.joules,
        shared.energy_source,  # type: ignore[arg-type]
        "coalesced", REASON_COALESCED, error,
    )  # fmt: skip


def hit_outcome(hit: CacheHit) -> Outcome:
    """A cached output serving a request: 0 J, pointing at the row that paid for it."""
    return Outcome(
        hit.png, hit.variant, f"hit:{hit.source_request_id}.{hit.source_image_index}", 0, 0.0,
        hit.energy_source, "hit", REASON_CACHE_HIT,  # type: ignore[arg-type]
    )  # fmt: skip


def unproduced(ctx: RequestContext, error: str) -> Outcome:
    """An output that was never generated for this request: nothing to charge."""
    return Outcome(None, ctx.variant.name, "none", 0, 0.0, "estimated", "miss",
                   ctx.decision.reason, error)  # fmt: skip


def ledger_rows(
    ctx: RequestContext, outcomes: dict[int, Outcome], latency_ms: float, holder: str | None
) -> list[LedgerValues]:
    """One ledger row per output, in output order; ``holder``: the replica's id."""
    request = ctx.request
    return [
        LedgerValues(
            request_id=ctx.request_id,
            image_index=index,
            user=request.user,
            tenant=request.tenant,
            variant=outcome.variant,
            quality=request.quality,
            route_reason=outcome.route_reason,
            batch_id=outcome.batch_id,
            batch_size=outcome.batch_size,
            joules=outcome.joules,
            energy_source=outcome.energy_source,
            cache=outcome.cache,
            status=_status(outcome),
            error=outcome.error,
            latency_ms=latency_ms,
            launch_ms=outcome.launch_ms,
            seed=ctx.seeds[index],
            width_px=request.width_px,
            height_px=request.height_px,
            holder=holder,
            steps=outcome.steps,
            steps_skipped=outcome.steps_skipped,
            similarity=outcome.similarity,
            reuse_source=outcome.reuse_source,
        )
        for index, outcome in sorted(outcomes.items())
    ]


def _status(outcome: Outcome) -> str:
    if outcome.error is None:
        return "ok"
    return "cancelled" if outcome.error == CANCELLED else "failed"


def route_info(decision: RouteDecision) -> RouteInfo:
    """The routing decision as the response shows it."""
    return RouteInfo(
        variant=decision.variant,
        reason=decision.reason,
        expected_joules_per_output=decision.expected_joules_per_image,
        candidates=[
            CandidateInfo(
                variant=c.variant,
                quality_score=c.quality_score,
                expected_joules_per_output=c.expected_joules_per_image,
                expected_latency_s=c.expected_latency_s,
                rejected_because=c.rejected_because,
            )
            for c in decision.candidates
        ],
    )


def response(
    ctx: RequestContext, outcomes: dict[int, Outcome], rows: list[LedgerValues], created: int
) -> ImageGenerationResponse:
    """The OpenAI-shaped answer: the images, the route taken and a receipt per output."""
    return ImageGenerationResponse(
        created=created,
        data=[ImageDatum(b64_json=base64.b64encode(outcomes[i].png or b"").decode())
              for i in range(ctx.request.n)],
        wattserve=WattserveExtension(
            request_id=ctx.request_id, route=route_info(ctx.decision),
            receipts=[Receipt.model_validate(row, from_attributes=True) for row in rows],
        ),
    )  # fmt: skip
