"""The routing decision: which variant serves a request, and why.

Cheapest capable: among the variants that can make the requested size with quality at
or above the tier's floor and that are expected to finish within the request's deadline,
pick the one with the lowest expected joules per output at the batch it would join
(from the online profile, seeded by the catalog prior); ties go to the higher quality,
then the name. Every variant considered is returned with its estimate and, if it lost,
why. Two named baselines, for measuring savings, take paths of their own: ``baseline``
(the highest-quality variant) and ``competent`` (each tier on the variant with the
lowest declared J/image that meets its floor, fixed whatever the load). When none can
serve it, a ``RouteRefusal`` says why instead, as data: the request path maps it to an
exception at its edge, a simulator counts it. Plain data over plain data, so the live
scheduler and a simulator call the same code; power-budget terms plug in as further
inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from wattserve import GenerationRequest
from wattserve.policies.catalog import Catalog, VariantSpec
from wattserve.policies.policy import Policy
from wattserve.policies.profile import VariantEstimate

REASON_CHEAPEST_CAPABLE = "cheapest_capable"
REASON_REQUESTED_MODEL = "requested_model"
REASON_BASELINE = "baseline"
REASON_COMPETENT = "competent"


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


RefusalKind = Literal["size", "quality", "model_unknown", "unavailable", "deadline"]


@dataclass(frozen=True)
class RouteRefusal:
    """Why no variant can serve a request, as data: the caller decides what to do with it.

    The live scheduler turns it into the matching ``WattserveError`` at its edge
    (``scheduler/_refusals.py``); a simulator counts it. ``message`` is the sentence a
    client reads, ``param`` the request field to blame, ``retry_after_s`` when waiting
    could help (only ``deadline``), and ``candidates`` every variant considered (none for
    ``model_unknown``).
    """

    kind: RefusalKind
    message: str
    param: str | None = None
    retry_after_s: float | None = None
    candidates: tuple[Candidate, ...] = ()


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


def _demoted(candidate: Candidate, tier: str, policy: Policy) -> Candidate:
    """A capable candidate the shadow audit measured below tolerance for ``tier``: out.

    Measured quality overrides declared quality; the admin can undo a demotion.
    """
    if candidate.rejected_because is None and (candidate.variant, tier) in policy.demoted:
        why = f"audited below tolerance for {tier!r}"
        return replace(candidate, rejected_because=why, rejected_on="quality")
    return candidate


def _refuse(
    request: GenerationRequest, candidates: tuple[Candidate, ...], floor: float
) -> RouteRefusal:
    """The refusal that best explains why no candidate is left.

    Size first (nothing else matters if no variant can make it), then a variant being
    down (the client did nothing wrong), then the deadline (waiting may help), and
    otherwise the quality floor, naming the best variant there is.
    """
    ruled_out_on = {c.rejected_on for c in candidates}
    if ruled_out_on == {"size"}:
        reasons = sorted({c.rejected_because or "" for c in candidates})
        message = (
            f"size: no variant can make {request.width_px}x{request.height_px} "
            f"({'; '.join(reasons)})"
        )
        return RouteRefusal("size", message, param="size", candidates=candidates)
    if "model" in ruled_out_on:
        message = f"no replica of a variant for {request.quality!r} is up"
        return RouteRefusal("unavailable", message, candidates=candidates)
    late = [c for c in candidates if c.rejected_on == "deadline_s"]
    if late:
        fastest = min(late, key=lambda c: c.expected_latency_s or 0.0)
        latency_s = fastest.expected_latency_s or 0.0
        message = (
            f"deadline_s: no capable variant is expected within {request.deadline_s:.2f}s; "
            f"fastest is {fastest.variant} at {latency_s:.2f}s"
        )
        retry_after_s = max(1.0, latency_s - (request.deadline_s or 0.0))
        return RouteRefusal("deadline", message, "deadline_s", retry_after_s, candidates)
    best = max(candidates, key=lambda c: c.quality_score)
    message = (
        f"quality: no variant meets {request.quality!r} (floor {floor:.2f}) at this size; "
        f"best available is {best.variant} ({best.quality_score:.2f})"
    )
    return RouteRefusal("quality", message, param="quality", candidates=candidates)


def route(
    request: GenerationRequest, catalog: Catalog, policy: Policy, state: RoutingState
) -> RouteDecision | RouteRefusal:
    """Choose the variant for ``request``, or say why none can serve it.

    A refusal is returned, not raised: it is an ordinary outcome of the decision, and
    each caller (the request path, a simulator) acts on it its own way.
    """
    if request.model is not None:
        variant = catalog.get(request.model)
        if variant is None:
            message = (
                f"model: unknown {request.model!r}; known: {', '.join(catalog.names)} or 'auto'"
            )
            return RouteRefusal("model_unknown", message, param="model")
        candidate = _assess(variant, request, 0.0, state)
        if candidate.rejected_because:
            return _refuse(request, (candidate,), 0.0)
        return RouteDecision(
            variant.name, REASON_REQUESTED_MODEL, candidate.expected_joules_per_image, (candidate,)
        )
    if request.policy == "baseline":
        return _baseline(request, catalog, state)
    floor = policy.quality_floor(request.quality)
    if request.policy == "competent":
        return _competent(request, catalog, floor, state)
    candidates = tuple(
        _demoted(_assess(v, request, floor, state), request.quality, policy)
        for v in catalog.variants
    )
    capable = [c for c in candidates if c.rejected_because is None]
    if not capable:
        return _refuse(request, candidates, floor)
    best = min(capable, key=lambda c: (c.expected_joules_per_image, -c.quality_score, c.variant))
    return RouteDecision(
        best.variant, REASON_CHEAPEST_CAPABLE, best.expected_joules_per_image, candidates
    )


def _baseline(
    request: GenerationRequest, catalog: Catalog, state: RoutingState
) -> RouteDecision | RouteRefusal:
    """The reference without wattserve: the highest-quality variant that can serve it.

    Ties (one model on two GPU types) go to the one expected to finish first, as a load
    balancer would send them; an unmeasured one counts as free.
    """
    candidates = tuple(_assess(v, request, 0.0, state) for v in catalog.variants)
    capable = [c for c in candidates if c.rejected_because is None]
    if not capable:
        return _refuse(request, candidates, 0.0)
    best = max(capable, key=lambda c: (c.quality_score, -(c.expected_latency_s or 0.0),
                                       c.variant))  # fmt: skip
    return RouteDecision(best.variant, REASON_BASELINE, best.expected_joules_per_image, candidates)


def _competent(
    request: GenerationRequest, catalog: Catalog, floor: float, state: RoutingState
) -> RouteDecision | RouteRefusal:
    """The hand-configured reference: each tier on one fixed variant, chosen from the catalog.

    What an engineer would set up without wattserve: the variant with the lowest
    *declared* J/image (the catalog prior at batch size 1) whose declared quality meets
    the tier's floor at this size, among those up. Live estimates are left out on
    purpose, so the choice never follows load or deadlines; ties go to the higher
    quality, then the name.
    """
    declared = RoutingState(state.available)  # no estimates: priced at the prior, no latency
    candidates = tuple(_assess(v, request, floor, declared) for v in catalog.variants)
    capable = [c for c in candidates if c.rejected_because is None]
    if not capable:
        return _refuse(request, candidates, floor)
    best = min(capable, key=lambda c: (c.expected_joules_per_image, -c.quality_score, c.variant))
    return RouteDecision(best.variant, REASON_COMPETENT, best.expected_joules_per_image, candidates)


def reference_variant(catalog: Catalog) -> VariantSpec:
    """The variant the baseline serves everything with: the highest-quality one."""
    return max(catalog.variants, key=lambda v: (v.quality_score, v.name))
