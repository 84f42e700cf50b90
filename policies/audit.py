"""The shadow audit's decisions: what to audit, which score means anything, the verdict.

A saving only counts at equal quality, and every quality claim in the catalog is
declared. The audit measures it on the service's own traffic: a sample of the outputs
served by anything other than the reference path (a cheaper variant than the tier's
reference, approximate reuse, a cache hit made by another variant) is regenerated on the
reference variant with the same prompt, seed and size, and the pair is scored.

Which score means anything depends on the pair. Image similarity (SSIM, PSNR) compares
pixels, so it is only a measure when both images come from the same model family and
seed (approximate reuse on the reference, the reference's own cached output). Between
different models only a text-image score (CLIP) compares like with like: the drop of
the served image's score below the reference's. A pair with neither gets no verdict.

The verdict is a confidence rule over one (variant, cause, tier)'s scores: ``fail`` when
the 95 % interval lies wholly on the wrong side of the tolerance, ``pass`` when wholly on
the right side, ``undecided`` otherwise or with fewer than ``min_samples`` scores. A
failure demotes the variant (or its approximate reuse) for that tier in routing.

Plain data and pure functions: the live auditor and tests call the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from wattserve._admin import DemotionKind  # what a demotion takes away

AuditCause = Literal["variant_choice", "approximate", "cache"]
Measure = Literal["ssim", "psnr_db", "clip_drop"]
Outcome = Literal["pass", "fail", "undecided"]

MIN_SAMPLES = 8  # no verdict on fewer scored pairs than this
CONFIDENCE = 0.95
# The measure a verdict rests on, per kind of pair (see the module docstring).
SAME_FAMILY_MEASURE: Measure = "ssim"
CROSS_MODEL_MEASURE: Measure = "clip_drop"


@dataclass(frozen=True)
class Tolerance:
    """How far a measure may go before an output is worse than the reference's."""

    measure: Measure
    limit: float
    higher_is_better: bool  # ssim, psnr_db: yes; clip_drop: no


def tolerances(clip_drop_max: float, ssim_min: float) -> dict[Measure, Tolerance]:
    """The policy's tolerances by measure (PSNR is reported, never judged on)."""
    return {
        "clip_drop": Tolerance("clip_drop", clip_drop_max, higher_is_better=False),
        "ssim": Tolerance("ssim", ssim_min, higher_is_better=True),
    }


def audit_cause(served_variant: str, reference_variant: str, cache: str) -> AuditCause | None:
    """Why an output is off the reference path, or None if it is the reference's own.

    A coalesced output is its leader's generation: the leader is the one sampled.
    """
    if cache == "approximate":
        return "approximate"
    if cache not in ("miss", "hit") or served_variant == reference_variant:
        return None
    return "cache" if cache == "hit" else "variant_choice"


def sampled(rate: float, draw: float) -> bool:
    """Whether an output is audited, given a uniform draw in [0, 1)."""
    return draw < rate


def measure_for(same_family: bool, clip_available: bool) -> Measure | None:
    """The measure a pair's verdict rests on; None when no score compares the two."""
    if same_family:
        return SAME_FAMILY_MEASURE
    return CROSS_MODEL_MEASURE if clip_available else None


def demotion_kind(cause: AuditCause) -> DemotionKind:
    """What a failing verdict on ``cause`` takes away."""
    return "approximate" if cause == "approximate" else "variant"


@dataclass(frozen=True)
class Interval:
    """Mean and two-sided confidence interval of a sample (t distribution)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None


def _t_quantile(df: int, confidence: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The sample's mean and its ``confidence`` interval; bounds None below two values."""
    n = len(values)
    if n == 0:
        return Interval(0, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(1, mean, None, None)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = _t_quantile(n - 1, confidence) * math.sqrt(variance / n)
    return Interval(n, mean, mean - half, mean + half)


@dataclass(frozen=True)
class Verdict:
    """One group's scores against its tolerance."""

    outcome: Outcome
    measure: Measure | None
    limit: float | None
    interval: Interval
    why: str


def verdict(
    values: Sequence[float], tolerance: Tolerance | None, min_samples: int = MIN_SAMPLES
) -> Verdict:
    """``fail`` / ``pass`` only when the whole interval is on one side of the tolerance."""
    found = interval(values)
    if tolerance is None:
        return Verdict("undecided", None, None, found, "no score compares these images")
    name, limit = tolerance.measure, tolerance.limit
    if found.n < min_samples or found.low is None or found.high is None:
        why = f"{found.n} of {min_samples} scored pairs needed"
        return Verdict("undecided", name, limit, found, why)
    worse = found.high < limit if tolerance.higher_is_better else found.low > limit
    better = found.low >= limit if tolerance.higher_is_better else found.high <= limit
    side = ">=" if tolerance.higher_is_better else "<="
    span = f"{name} {found.mean:.4f} [{found.low:.4f}, {found.high:.4f}]"
    if worse:
        return Verdict("fail", name, limit, found, f"{span} wholly outside {side} {limit}")
    if better:
        return Verdict("pass", name, limit, found, f"{span} wholly within {side} {limit}")
    return Verdict("undecided", name, limit, found, f"{span} straddles {limit}")
