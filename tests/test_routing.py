import pytest

from wattserve import (
    AdmissionRejected,
    GenerationRequest,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from wattserve.policies.catalog import load_catalog
from wattserve.policies.policy import Policy
from wattserve.policies.profile import OVERHEAD_SAMPLES, EnergyProfile, VariantEstimate
from wattserve.policies.routing import (
    REASON_CHEAPEST_CAPABLE,
    REASON_COMPETENT,
    REASON_REQUESTED_MODEL,
    Candidate,
    RouteDecision,
    RouteRefusal,
    RoutingState,
    route,
)
from wattserve.scheduler._refusals import refusal_error

CATALOG = load_catalog()
ALL = RoutingState(frozenset(CATALOG.names))


def request(**kw):
    return GenerationRequest(**{"prompt": "p", "width_px": 64, "height_px": 64, **kw})


@pytest.mark.parametrize(
    ("tier", "variant"),
    [("draft", "tiny-sd-turbo"), ("standard", "tiny-sd-medium"), ("high", "tiny-sd-large")],
)
def test_each_tier_gets_the_cheapest_variant_meeting_its_floor(tier, variant):
    decision = route(request(quality=tier), CATALOG, Policy(), ALL)
    assert isinstance(decision, RouteDecision) and decision.variant == variant
    assert decision.reason == REASON_CHEAPEST_CAPABLE
    assert {c.variant for c in decision.candidates} == ALL.available
    chosen = next(c for c in decision.candidates if c.variant == variant)
    others = [c for c in decision.candidates if c.rejected_because is None and c is not chosen]
    assert all(c.expected_joules_per_image >= chosen.expected_joules_per_image for c in others)


def test_floor_comes_from_policy():
    lenient = Policy(quality_floors={"draft": 0.0, "standard": 0.0, "high": 0.0})
    assert route(request(quality="high"), CATALOG, lenient, ALL).variant == "tiny-sd-turbo"


def test_ties_go_to_higher_quality():
    tied = CATALOG.model_copy(
        update={"variants": tuple(
            v.model_copy(update={"energy_prior": CATALOG.variants[0].energy_prior})
            for v in CATALOG.variants
        )}
    )  # fmt: skip
    assert route(request(quality="draft"), tied, Policy(), ALL).variant == "tiny-sd-large"


def test_requested_model_is_honoured_and_checked():
    decision = route(request(model="tiny-sd-large", quality="draft"), CATALOG, Policy(), ALL)
    assert (decision.variant, decision.reason) == ("tiny-sd-large", REASON_REQUESTED_MODEL)
    unknown = route(request(model="sdxl"), CATALOG, Policy(), ALL)
    assert isinstance(unknown, RouteRefusal)
    assert (unknown.kind, unknown.param, unknown.retry_after_s) == ("model_unknown", "model", None)
    assert unknown.message == f"model: unknown 'sdxl'; known: {', '.join(CATALOG.names)} or 'auto'"
    assert unknown.candidates == ()
    too_big = route(request(model="tiny-sd-large", width_px=1024), CATALOG, Policy(), ALL)
    assert isinstance(too_big, RouteRefusal)
    assert (too_big.kind, too_big.param, too_big.retry_after_s) == ("size", "size", None)
    assert too_big.message.startswith("size: no variant can make 1024x64 (")
    assert [c.variant for c in too_big.candidates] == ["tiny-sd-large"]


@pytest.mark.parametrize(("width", "height"), [(1024, 64), (64, 16), (60, 64)])
def test_unservable_size_is_a_size_refusal(width, height):
    refusal = route(request(width_px=width, height_px=height), CATALOG, Policy(), ALL)
    assert isinstance(refusal, RouteRefusal)
    assert (refusal.kind, refusal.param, refusal.retry_after_s) == ("size", "size", None)
    assert refusal.message.startswith(f"size: no variant can make {width}x{height} (")
    assert {c.rejected_on for c in refusal.candidates} == {"size"}


def test_no_replica_up_is_unavailable_not_a_client_error():
    refusal = route(
        request(quality="high"), CATALOG, Policy(), RoutingState(frozenset({"tiny-sd-turbo"}))
    )
    assert isinstance(refusal, RouteRefusal)
    assert (refusal.kind, refusal.param, refusal.retry_after_s) == ("unavailable", None, None)
    assert refusal.message == "no replica of a variant for 'high' is up"
    # a cheaper capable variant being down moves the request to the next capable one
    up = RoutingState(frozenset({"tiny-sd-large"}))
    assert route(request(quality="draft"), CATALOG, Policy(), up).variant == "tiny-sd-large"


def test_quality_floor_no_variant_meets_names_the_best_available():
    strict = Policy(quality_floors={"draft": 0.0, "standard": 0.5, "high": 0.95})
    refusal = route(request(quality="high"), CATALOG, strict, ALL)
    assert isinstance(refusal, RouteRefusal)
    assert (refusal.kind, refusal.param, refusal.retry_after_s) == ("quality", "quality", None)
    assert refusal.message.startswith("quality: no variant meets 'high' (floor 0.95) at this size")
    assert "best available is tiny-sd-large" in refusal.message


def test_measured_profile_overrides_the_prior():
    profile = EnergyProfile(CATALOG)
    profile.observe("tiny-sd-medium", 1, joules_per_output=5.0, latency_s=0.1)  # cheaper now
    estimates = {v: profile.estimate(v, queued=0) for v in CATALOG.names}
    assert estimates["tiny-sd-medium"].measured and not estimates["tiny-sd-turbo"].measured
    decision = route(
        request(quality="draft"), CATALOG, Policy(), RoutingState(ALL.available, estimates)
    )
    assert decision.variant == "tiny-sd-medium" and decision.expected_joules_per_image == 5.0


def test_deadline_rules_out_slow_variants_and_refuses_up_front_when_none_is_fast_enough():
    slow = VariantEstimate(10.0, 1, expected_latency_s=3.0, measured=True)
    fast = VariantEstimate(50.0, 1, expected_latency_s=0.2, measured=True)
    state = RoutingState(
        ALL.available, {"tiny-sd-turbo": slow, "tiny-sd-medium": fast, "tiny-sd-large": slow}
    )
    decision = route(request(quality="draft", deadline_s=1.0), CATALOG, Policy(), state)
    assert decision.variant == "tiny-sd-medium"
    turbo = next(c for c in decision.candidates if c.variant == "tiny-sd-turbo")
    assert turbo.rejected_on == "deadline_s"
    refusal = route(request(quality="high", deadline_s=1.0), CATALOG, Policy(), state)
    assert isinstance(refusal, RouteRefusal)
    assert (refusal.kind, refusal.param) == ("deadline", "deadline_s")
    assert refusal.retry_after_s is not None and refusal.retry_after_s >= 1
    assert refusal.retry_after_s == pytest.approx(2.0)  # fastest capable 3.0 s, deadline 1.0 s
    assert refusal.message == (
        "deadline_s: no capable variant is expected within 1.00s; fastest is tiny-sd-large at 3.00s"
    )


_SEEN = (Candidate("tiny-sd-turbo", 0.4, 18.0, rejected_because="x", rejected_on="size"),)


@pytest.mark.parametrize(
    ("refusal", "error", "status"),
    [
        (RouteRefusal("size", "size: no", "size", None, _SEEN), InvalidRequest, 400),
        (RouteRefusal("quality", "quality: no", "quality", None, _SEEN), InvalidRequest, 400),
        (RouteRefusal("model_unknown", "model: unknown", "model", None, ()), NotFound, 404),
        (RouteRefusal("unavailable", "no replica", None, None, _SEEN), ServiceUnavailable, 503),
        (RouteRefusal("deadline", "deadline_s: no", "deadline_s", 2.5, _SEEN),
         AdmissionRejected, 429),
    ],
)  # fmt: skip
def test_each_refusal_kind_maps_to_its_one_error(refusal, error, status):
    exc = refusal_error(refusal)
    assert type(exc) is error and exc.status_code == status
    assert (exc.message, exc.param) == (refusal.message, refusal.param)
    if refusal.kind == "deadline":
        assert exc.retry_after_s == 2.5
    if refusal.kind == "unavailable":  # a replica may come: say when to try again
        assert exc.retry_after_s is not None and exc.retry_after_s > 0


def test_profile_ewma_latency_and_the_batch_an_output_would_join():
    profile = EnergyProfile(CATALOG, alpha=0.5)
    first = profile.estimate("tiny-sd-turbo", queued=0)
    assert (first.joules_per_output, first.expected_latency_s, first.measured) == (
        18.0,
        None,
        False,
    )
    profile.observe("tiny-sd-turbo", 4, joules_per_output=10.0, latency_s=0.4)
    profile.observe("tiny-sd-turbo", 4, joules_per_output=20.0, latency_s=0.6)
    joined = profile.estimate("tiny-sd-turbo", queued=3)  # would join a batch of 4
    assert (joined.batch_size, joined.joules_per_output) == (4, 15.0)
    assert joined.expected_latency_s == pytest.approx(0.5)
    queued_deep = profile.estimate("tiny-sd-turbo", queued=20)  # cap 8: three batches ahead
    assert queued_deep.batch_size == 8 and queued_deep.expected_latency_s == pytest.approx(1.5)


def test_baseline_policy_always_takes_the_highest_quality_variant():
    decision = route(request(quality="draft", policy="baseline"), CATALOG, Policy(), ALL)
    assert (decision.variant, decision.reason) == ("tiny-sd-large", "baseline")


@pytest.mark.parametrize(
    ("tier", "variant"),
    [("draft", "tiny-sd-turbo"), ("standard", "tiny-sd-medium"), ("high", "tiny-sd-large")],
)
def test_competent_maps_each_tier_to_the_cheapest_declared_variant_meeting_its_floor(tier, variant):
    decision = route(request(quality=tier, policy="competent"), CATALOG, Policy(), ALL)
    assert isinstance(decision, RouteDecision)
    assert (decision.variant, decision.reason) == (variant, REASON_COMPETENT)
    spec = CATALOG.get(variant)
    assert decision.expected_joules_per_image == spec.energy_prior.at_batch_size(1)


def test_competent_stays_on_its_variant_whatever_the_profile_or_the_deadline_says():
    # measured: turbo is now dear and slow, medium cheap; the hand-set mapping ignores both
    state = RoutingState(ALL.available, {
        "tiny-sd-turbo": VariantEstimate(900.0, 1, expected_latency_s=30.0, measured=True),
        "tiny-sd-medium": VariantEstimate(5.0, 1, expected_latency_s=0.1, measured=True),
    })  # fmt: skip
    draft = request(quality="draft", policy="competent", deadline_s=1.0)
    decision = route(draft, CATALOG, Policy(), state)
    assert decision.variant == "tiny-sd-turbo" and decision.expected_joules_per_image == 18.0
    assert route(request(quality="draft", deadline_s=1.0), CATALOG, Policy(), state).variant == (
        "tiny-sd-medium"
    )  # the default policy does follow them
    assert all(c.expected_latency_s is None for c in decision.candidates)


def test_competent_ties_go_to_higher_quality_and_refusals_are_data():
    tied = CATALOG.model_copy(
        update={"variants": tuple(
            v.model_copy(update={"energy_prior": CATALOG.variants[0].energy_prior})
            for v in CATALOG.variants
        )}
    )  # fmt: skip
    draft = request(quality="draft", policy="competent")
    assert route(draft, tied, Policy(), ALL).variant == "tiny-sd-large"
    # the mapping is chosen among the variants that are up: turbo down, draft goes to medium
    up = RoutingState(frozenset({"tiny-sd-medium", "tiny-sd-large"}))
    assert route(draft, CATALOG, Policy(), up).variant == "tiny-sd-medium"
    down = route(request(quality="high", policy="competent"), CATALOG, Policy(),
                 RoutingState(frozenset({"tiny-sd-turbo"})))  # fmt: skip
    assert isinstance(down, RouteRefusal) and down.kind == "unavailable"
    too_big = route(request(policy="competent", width_px=1024), CATALOG, Policy(), ALL)
    assert isinstance(too_big, RouteRefusal) and too_big.kind == "size"
    strict = Policy(quality_floors={"draft": 0.0, "standard": 0.5, "high": 0.95})
    refusal = route(request(quality="high", policy="competent"), CATALOG, strict, ALL)
    assert isinstance(refusal, RouteRefusal) and refusal.kind == "quality"


def test_overhead_outside_batches_is_a_median_per_outcome_over_recent_requests():
    profile = EnergyProfile(CATALOG)
    assert profile.overhead_s() == {}
    for seconds in (0.01, 0.02, 5.0):  # one slow request does not move a median
        profile.observe_overhead("miss", seconds)
    profile.observe_overhead("hit", -0.001)  # clock jitter never yields a negative time
    assert profile.overhead_s() == {"hit": 0.0, "miss": 0.02}
    for _ in range(OVERHEAD_SAMPLES):
        profile.observe_overhead("miss", 0.05)
    assert profile.overhead_s()["miss"] == 0.05  # only recent requests count


def test_the_profile_keeps_lifetime_means_and_recent_medians_beside_its_averages():
    profile = EnergyProfile(CATALOG, alpha=0.5)
    for joules, latency_s in ((10.0, 0.1), (20.0, 0.2), (60.0, 5.0)):
        profile.observe("tiny-sd-turbo", 2, joules_per_output=joules, latency_s=latency_s)
    [row] = profile.measured()
    assert (row.variant, row.batch_size, row.batches) == ("tiny-sd-turbo", 2, 3)
    assert row.joules_per_output == 37.5  # EWMA, recent-weighted: what routing reads
    assert row.mean_joules_per_output == 30.0  # what the ledger's totals add up to
    assert row.median_batch_latency_s == 0.2  # the slow outlier does not move it


def test_a_variant_the_audit_demoted_leaves_only_its_tier_and_says_why():
    policy = Policy(demoted=frozenset({("tiny-sd-turbo", "draft")}))
    draft = route(request(quality="draft"), CATALOG, policy, ALL)
    assert isinstance(draft, RouteDecision) and draft.variant != "tiny-sd-turbo"
    (turbo,) = [c for c in draft.candidates if c.variant == "tiny-sd-turbo"]
    assert turbo.rejected_because == "audited below tolerance for 'draft'"
    named = route(request(quality="draft", model="tiny-sd-turbo"), CATALOG, policy, ALL)
    assert isinstance(named, RouteDecision) and named.variant == "tiny-sd-turbo"  # asked for
    only_turbo = Policy(demoted=frozenset({(v, "draft") for v in CATALOG.names}))
    refused = route(request(quality="draft"), CATALOG, only_turbo, ALL)
    assert isinstance(refused, RouteRefusal) and refused.kind == "quality"
