import pytest

from policies.catalog import load_catalog
from policies.policy import Policy
from policies.routing import REASON_CHEAPEST_CAPABLE, REASON_REQUESTED_MODEL, route
from wattserve import GenerationRequest, InvalidRequest, NotFound, ServiceUnavailable

CATALOG = load_catalog()
ALL = frozenset(CATALOG.names)


def request(**kw):
    return GenerationRequest(**{"prompt": "p", "width_px": 64, "height_px": 64, **kw})


@pytest.mark.parametrize(
    ("tier", "variant"),
    [("draft", "tiny-sd-turbo"), ("standard", "tiny-sd-medium"), ("high", "tiny-sd-large")],
)
def test_each_tier_gets_the_cheapest_variant_meeting_its_floor(tier, variant):
    decision = route(request(quality=tier), CATALOG, Policy(), ALL)
    assert decision.variant == variant
    assert decision.reason == REASON_CHEAPEST_CAPABLE
    assert {c.variant for c in decision.candidates} == ALL
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
    with pytest.raises(NotFound) as info:
        route(request(model="sdxl"), CATALOG, Policy(), ALL)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequest) as info:
        route(request(model="tiny-sd-large", width_px=1024), CATALOG, Policy(), ALL)
    assert info.value.param == "size"


@pytest.mark.parametrize(("width", "height"), [(1024, 64), (64, 16), (60, 64)])
def test_unservable_size_is_a_size_error(width, height):
    with pytest.raises(InvalidRequest) as info:
        route(request(width_px=width, height_px=height), CATALOG, Policy(), ALL)
    assert info.value.param == "size"


def test_no_replica_up_is_unavailable_not_a_client_error():
    with pytest.raises(ServiceUnavailable):
        route(request(quality="high"), CATALOG, Policy(), frozenset({"tiny-sd-turbo"}))
    # a cheaper capable variant being down moves the request to the next capable one
    up = frozenset({"tiny-sd-large"})
    assert route(request(quality="draft"), CATALOG, Policy(), up).variant == "tiny-sd-large"
