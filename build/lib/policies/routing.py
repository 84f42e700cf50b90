"""The routing decision: which variant serves a request, and why.

Today's rule is the foundation of cheapest-capable routing: among the variants that
can make the requested size with quality at or above the tier's floor, pick the one
with the lowest *declared* joules per image (the catalog prior at batch size 1); ties
go to the higher quality, then the name. The decision is plain data over plain data
so the live scheduler and a simulator can both call it; the online energy profile and
deadline/power terms plug in here later as extra fields of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.catalog import Catalog, VariantSpec
from policies.policy import Policy
from wattserve import GenerationRequest, InvalidRequest, NotFound, ServiceUnavailable

REASON_CHEAPEST_CAPABLE = "cheapest_capable"
REASON_REQUESTED_MODEL = "requested_model"


@dataclass(frozen=True)
class Candidate:
    """One variant as the router saw it."""

    variant: str
    quality_score: float
    expected_joules_per_image: float
    rejected_because: str | None = None
    rejected_on: str | None = None  # the request field that ruled it out: size|quality|model


@dataclass(frozen=True)
class RouteDecision:
    """The chosen variant, the reason, and every alternative considered."""

    variant: str
    reason: str
    expected_joules_per_image: float
    candidates: tuple[Candidate, ...]


def _assess(
    variant: VariantSpec, request: GenerationRequest, floor: float, available: frozenset[str]
) -> Candidate:
    why_not, field = variant.size_problem(request.width_px, request.height_px), "size"
    if why_not is None and variant.quality_score < floor:
        why_not, field = f"quality {variant.quality_score:.2f} below floor {floor:.2f}", "quality"
    if why_not is None and variant.name not in available:
        why_not, field = "no replica up", "model"
    return Candidate(
        variant=variant.name,
        quality_score=variant.quality_score,
        expected_joules_per_image=variant.energy_prior.at_batch_size(1),
        rejected_because=why_not,
        rejected_on=field if why_not else None,
    )


def route(
    request: GenerationRequest, catalog: Catalog, policy: Policy, available: frozenset[str]
) -> RouteDecision:
    """Choose the variant for ``request``; raise a ``WattserveError`` if none can serve it."""
    if request.model is not None:
        variant = catalog.get(request.model)
        if variant is None:
            raise NotFound(
                f"model: unknown {request.model!r}; known: {', '.join(catalog.names)} or 'auto'",
                param="model",
            )
        candidate = _assess(variant, request, 0.0, available)
        if candidate.rejected_on == "model":
            raise ServiceUnavailable(f"no replica of model {variant.name!r} is up")
        if candidate.rejected_because:
            raise InvalidRequest(
                f"{candidate.rejected_on}: model {variant.name!r} cannot serve this request: "
                f"{candidate.rejected_because}",
                param=candidate.rejected_on,
            )
        return RouteDecision(
            variant.name, REASON_REQUESTED_MODEL, candidate.expected_joules_per_image, (candidate,)
        )

    floor = policy.quality_floor(request.quality)
    candidates = tuple(_assess(v, request, floor, available) for v in catalog.variants)
    capable = [c for c in candidates if c.rejected_because is None]
    if not capable:
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
        raise InvalidRequest(
            f"quality: no variant meets {request.quality!r} (floor {floor:.2f}) at this size",
            param="quality",
        )
    best = min(capable, key=lambda c: (c.expected_joules_per_image, -c.quality_score, c.variant))
    return RouteDecision(
        best.variant, REASON_CHEAPEST_CAPABLE, best.expected_joules_per_image, candidates
    )
