"""Reuse of a finished output: which cached copy, if any, may serve a request.

The rule the result cache applies (live, through ``scheduler.cache.ResultCache``) and the
fleet simulator applies (in memory): a copy is usable if it is fresh (younger than the
TTL, when there is one), made by a variant at or above the request's quality floor, and
made by the named variant when the request named one; the best quality wins, ties to
the newest. Plain data in, plain data out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedCopy:
    """One stored output of a given output key."""

    variant: str
    quality_score: float
    created_s: float  # wall clock (or simulated clock) when stored


def usable_copies(
    copies: Iterable[CachedCopy],
    floor: float,
    only_variant: str | None,
    now_s: float,
    ttl_s: float | None,
) -> list[CachedCopy]:
    """The copies that may serve the request, best first."""
    fit = [
        c for c in copies
        if c.quality_score >= floor
        and (only_variant is None or c.variant == only_variant)
        and (ttl_s is None or c.created_s >= now_s - ttl_s)
    ]  # fmt: skip
    return sorted(fit, key=lambda c: (c.quality_score, c.created_s), reverse=True)
