"""The routing decision: which variant serves a request, and why.

Cheapest capable: among the variants that can make the requested size with quality at
or above the tier's floor and that are expected to finish within the request's deadline,
pick the one with the lowest expected joules per output at the batch it would join
(from the online profile, seeded by the catalog prior); ties go to the higher quality,
then the name. Every variant considered is returned with its estimate and, if it lost,
why. Plain data over plain data, so the live scheduler and a simulator call the same
code; power-budget terms plug in as further inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wattserve.policies.catalog import Catalog, VariantSpec
from wattserve.policies.policy import Policy
from wattserve.policies.profile import VariantEstimate

from wattserve import (
    AdmissionRejected,
    GenerationRequest,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)

REASON_CHEAPEST_CAPABLE = "cheapest_capable"
REASON_REQUESTED_MODEL = "requested_model"
REASON_BASELINE = "baseline"


@dataclass(frozen=True)
class Candidate:
    """One variant as the router saw it."""

    variant: str
    quality_score: float
    expected_joules_per_image: float
    expected_latency_s: float | None = None
    rejected_because: str | None = None
    rejected_on: str | None = None  # what ruled it out: size|quality|model|deadline_s


@dataclass(frozen=True)
class RouteDecision:
    """The chosen variant, the reason, and every alternative considered."""

    variant: str
    reason: str
    expected_joules_per_image: float
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class RoutingState:
    """The live inputs of a decision: what is up and what each variant is expected to cost.

    A variant missing from ``estimates`` is priced at its catalog prior at batch size 1
    with unknown latency.
    """

    available: frozenset[str]
    estimates: Mapping[str, VariantEstimate] = field(default_factory=dict)


def _assess(
    variant: VariantSpec, request: GenerationRequest, floor: float, state: RoutingState
) -> Candidate:
    estimate = state.estimates.get(variant.name)
    joules = estimate.joules_per_output if estimate else variant.energy_prior.at_batch_size(1)
    latency_s = estimate.expected_latency_s if estimate else None
    why_not, on = variant.size_problem(request.width_px, request.height_px), "size"
    if why_not is None and variant.quality_score < floor:
        why_not, on = f"quality {variant.quality_score:.2f} below floor {floor:.2f}", "quality"
    if why_not is None and variant.name not in state.available:
        why_not, on = "no replica up", "model"
    deadline = request.deadline_s
    if why_not is None and deadline is not None and latency_s is not None and latency_s > deadline:
        why_not, on = f"expected {latency_s:.2f}s exceeds deadline {deadline:.2f}s", "deadline_s"
    return Candidate(variant.name, variant.quality_score, joules, latency_s, why_not,
                     on if why_not else None)  # fmt: skip


def _refuse(request: GenerationRequest, candidates: tuple[Candidate, ...], floor: float) -> None:
    """Raise the error that best explains why no candidate is left."""
    ruled_out_on = {c.rejected_on for c in candidates}
    if ruled_out_on == {"size"}:
        reasons = sorted({c.rejected_because or "" for c in candidates})
        raise InvalidRequest(
            f"size: no variant can make {request.width_px}x{request.height_px} "
            f"({'; '.join(reasons)})",
            param="size",
        )
    if "model" in ruled_out_on:
        raise ServiceUnavailable(f"no replica of a variant for {request.quality!r} is up")
    late = [c for c in candidates if c.rejected_on == "deadline_s"]
    if late:
        fastest = min(late, key=lambda c: c.expected_latency_s or 0.0)
        latency_s = fastest.expected_latency_s or 0.0
        raise AdmissionRejected(
            f"deadline_s: no capable variant is expected within {request.deadline_s:.2f}s; "
            f"fastest is {fastest.variant} at {latency_s:.2f}s",
            retry_after_s=max(1.0, latency_s - (request.deadline_s or 0.0)),
            param="deadline_s",
        )
    best = max(candidates, key=lambda c: c.quality_score)
    raise InvalidRequest(
        f"quality: no variant meets {request.quality!r} (floor {floor:.2f}) at this size; "
        f"best available is {best.variant} ({best.quality_score:.2f})",
        param="quality",
    )


def route(
    request: GenerationRequest, catalog: Catalog, policy: Policy, state: RoutingState
) -> RouteDecision:
    """Choose the variant for ``request``; raise a ``WattserveError`` if none can serve it."""
    if request.model is not None:
        variant = catalog.get(request.model)
        if variant is None:
            raise NotFound(
                f"model: unknown {request.model!r}; known: {', '.join(catalog.names)} or 'auto'",
                param="model",
            )
        candidate = _assess(variant, request, 0.0, state)
        if candidate.rejected_because:
            _refuse(request, (candidate,), 0.0)
        return RouteDecision(
            variant.name, REASON_REQUESTED_MODEL, candidate.expected_joules_per_image, (candidate,)
        )
    if request.policy == "baseline":
        return _baseline(request, catalog, state)
    floor = policy.quality_floor(request.quality)
    candidates = tuple(_assess(v, request, floor, state) for v in catalog.variants)
    capable = [c for c in candidates if c.rejected_because is None]
    if not capable:
        _refuse(request, candidates, floor)
    best = min(capable, key=lambda c: (c.expected_joules_per_image, -c.quality_score, c.variant))
    return RouteDecision(
        best.variant, REASON_CHEAPEST_CAPABLE, best.expected_joules_per_image, candidates
    )


def _baseline(request: GenerationRequest, catalog: Catalog, state: RoutingState) -> RouteDecision:
    """The reference without wattserve: the highest-quality variant that can serve it.

    Ties (one model on two GPU types) go to the one expected to finish first, as a load
    balancer would send them; an unmeasured one counts as free.
    """
    candidates = tuple(_assess(v, request, 0.0, state) for v in catalog.variants)
    capable = [c for c in candidates if c.rejected_because is None]
    if not capable:
        _refuse(request, candidates, 0.0)
    best = max(capable, key=lambda c: (c.quality_score, -(c.expected_latency_s or 0.0),
                                       c.variant))  # fmt: skip
    return RouteDecision(best.variant, REASON_BASELINE, best.expected_joules_per_image, candidates)


def reference_variant(catalog: Catalog) -> VariantSpec:
    """The variant the baseline serves everything with: the highest-quality one."""
    return max(catalog.variants, key=lambda v: (v.quality_score, v.name))
