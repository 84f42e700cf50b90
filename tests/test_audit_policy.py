"""The shadow audit's pure decisions: causes, sampling, measures and the confidence rule."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from wattserve.policies.audit import (
    MIN_SAMPLES,
    audit_cause,
    interval,
    measure_for,
    sampled,
    tolerances,
    verdict,
)

TOL = tolerances(clip_drop_max=0.02, ssim_min=0.8)


def test_only_outputs_off_the_reference_path_are_audited():
    assert audit_cause("turbo", "large", "miss") == "variant_choice"
    assert audit_cause("turbo", "large", "hit") == "cache"
    assert audit_cause("large", "large", "approximate") == "approximate"
    assert audit_cause("large", "large", "miss") is None  # the reference's own output
    assert audit_cause("large", "large", "hit") is None
    assert audit_cause("turbo", "large", "coalesced") is None  # its leader is sampled


def test_sampling_rate_is_honoured_statistically():
    rng = random.Random(7)
    n = 20_000
    audited = sum(sampled(0.02, rng.random()) for _ in range(n))
    # binomial(20000, 0.02): mean 400, sd ~19.8; five sd either side
    assert 300 < audited < 500
    assert not any(sampled(0.0, rng.random()) for _ in range(1000))


def test_pixels_compare_only_within_a_family_clip_across_models():
    assert measure_for(same_family=True, clip_available=False) == "ssim"
    assert measure_for(same_family=False, clip_available=True) == "clip_drop"
    assert measure_for(same_family=False, clip_available=False) is None


def test_interval_matches_a_known_t_interval():
    found = interval([1.0, 2.0, 3.0, 4.0])
    assert found.mean == 2.5
    # t(0.975, 3) = 3.182; sd = 1.291; half = 3.182 * 1.291 / 2 = 2.054
    assert abs((found.high or 0) - 2.5 - 2.054) < 1e-3


def test_no_verdict_below_the_minimum_sample_or_without_a_measure():
    assert verdict([1.0] * (MIN_SAMPLES - 1), TOL["ssim"]).outcome == "undecided"
    assert verdict([0.5] * 50, None).outcome == "undecided"


@settings(max_examples=50, deadline=None)
@given(n=st.integers(min_value=MIN_SAMPLES, max_value=200))
def test_identical_images_always_pass(n):
    """SSIM of an image with itself is 1 and its CLIP drop 0, whatever the sample size."""
    assert verdict([1.0] * n, TOL["ssim"]).outcome == "pass"
    assert verdict([0.0] * n, TOL["clip_drop"]).outcome == "pass"


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    excess=st.floats(min_value=0.02, max_value=0.2),
    noise=st.floats(min_value=0.0, max_value=0.02),
)
def test_a_systematic_drop_beyond_tolerance_fails_within_a_bounded_sample(seed, excess, noise):
    """Drops of tolerance + excess with noise sd <= excess: fail within 40 pairs, never pass."""
    rng = random.Random(seed)
    drops: list[float] = []
    outcome = "undecided"
    for _ in range(40):
        drops.append(0.02 + excess + rng.gauss(0.0, noise))
        outcome = verdict(drops, TOL["clip_drop"]).outcome
        assert outcome != "pass"
        if outcome == "fail":
            break
    assert outcome == "fail", drops
