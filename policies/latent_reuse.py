"""Approximate reuse: resume a similar prompt from a cached intermediate latent.

NIRVANA (NSDI'24) keeps the noise state of earlier generations; a new prompt similar
enough to a cached one starts from that state and skips the first K denoising steps —
the more similar, the larger K. MoDM (ASPLOS'26) publishes the bands it uses on a
50-step schedule: cosine similarity of the prompts' text embeddings above 0.65 / 0.75 /
0.85 / 0.90 / 0.95 skips 5 / 10 / 15 / 20 / 25 steps. Those are this module's defaults,
kept as fractions of the schedule so that a variant of any step count scales them; a
catalog entry may carry its own calibrated bands instead.

Everything here is plain data and pure functions, shared by the live service
(``scheduler.latents``) and the fleet simulator:

* ``capture_steps`` — after which steps a generation keeps its latent;
* ``steps_to_skip`` — how many steps a similarity buys, never more than was captured
  (a band's K never exceeds a step the cache can resume from);
* ``reuse_mode`` — whether a request may be served approximately at all;
* ``reuse_pool`` — whose latents a request may resume from (tenancy);
* ``benefit`` / ``evictions`` — NIRVANA's "least computationally beneficial and
  frequently used" eviction: steps saved per hit × hits, decayed over time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

ReuseMode = Literal["exact", "approximate"]

PUBLISHED_STEPS = 50
# (min cosine similarity, steps skipped of PUBLISHED_STEPS), from MoDM's released code
PUBLISHED_BANDS: tuple[tuple[float, int], ...] = (
    (0.65, 5), (0.75, 10), (0.85, 15), (0.90, 20), (0.95, 25),
)  # fmt: skip
BANDS_PROVENANCE = (
    "MoDM (ASPLOS'26) / NIRVANA (NSDI'24) bands: cosine > 0.65/0.75/0.85/0.90/0.95 skips "
    "5/10/15/20/25 of 50 steps, scaled to the variant's step count"
)
CAPTURE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)  # of the steps, where latents are kept
ANONYMOUS_POOL = "(anonymous)"
DEFAULT_HALF_LIFE_S = 6 * 3600.0


@dataclass(frozen=True)
class ReuseBand:
    """Similarity at or above ``min_similarity`` skips ``skip_fraction`` of the steps."""

    min_similarity: float
    skip_fraction: float


DEFAULT_BANDS: tuple[ReuseBand, ...] = tuple(
    ReuseBand(similarity, steps / PUBLISHED_STEPS) for similarity, steps in PUBLISHED_BANDS
)


def variant_bands(bands: Sequence[tuple[float, float]] | None) -> tuple[ReuseBand, ...]:
    """A catalog entry's ``reuse_bands`` as bands; the published defaults when None."""
    if bands is None:
        return DEFAULT_BANDS
    return tuple(ReuseBand(similarity, fraction) for similarity, fraction in bands)


def capture_steps(steps: int, fractions: Sequence[float] = CAPTURE_FRACTIONS) -> tuple[int, ...]:
    """The distinct step counts, in (0, steps), after which a latent is kept.

    A one-step variant keeps nothing: there is no step to skip without skipping all.
    """
    points = {round(f * steps) for f in fractions}
    return tuple(sorted(p for p in points if 0 < p < steps))


def steps_to_skip(
    similarity: float, steps: int, bands: Sequence[ReuseBand], captured: Iterable[int]
) -> int:
    """Steps a resume may skip at ``similarity``: the deepest kept step within its band.

    0 when the similarity is below every band or no kept step is shallow enough.
    """
    fractions = [b.skip_fraction for b in bands if similarity >= b.min_similarity]
    if not fractions:
        return 0
    allowed = int(max(fractions) * steps + 1e-9)
    usable = [step for step in captured if 0 < step <= allowed and step < steps]
    return max(usable, default=0)


@dataclass(frozen=True)
class ReuseRefusal:
    """Why a request may not be served approximately (a 403, not a silent downgrade)."""

    message: str


def reuse_mode(
    requested: ReuseMode | None,
    seeded: bool,
    policy_default: ReuseMode,
    tenant_allowed: bool,
) -> ReuseMode | ReuseRefusal:
    """Whether a request is served exactly or may resume from a similar prompt's latent.

    An approximate result is a different image, so it is opt-in: a request that names a
    seed keeps "same seed, same bytes" unless it says ``approximate`` itself; the policy
    default applies only to unseeded requests of tenants allowed to use it. A request
    that asks for ``approximate`` without the allowance is refused, not quietly served
    exactly: the caller asked for something this tenant may not have.
    """
    if requested == "approximate":
        if not tenant_allowed:
            return ReuseRefusal("reuse: this tenant may not use approximate reuse")
        return "approximate"
    if requested == "exact" or seeded:
        return "exact"
    return "approximate" if policy_default == "approximate" and tenant_allowed else "exact"


def reuse_pool(tenant: str | None, shared_pools: Mapping[str, str]) -> str:
    """The pool whose latents (and whose latents only) ``tenant`` may resume from.

    Each tenant is its own pool, anonymous traffic one more, unless the admin put the
    tenant into a named shared pool: an approximate hit carries content of the prompt
    that made the latent, so latents never cross tenants by default.
    """
    if tenant is None:
        return shared_pools.get(ANONYMOUS_POOL, ANONYMOUS_POOL)
    return shared_pools.get(tenant, f"tenant:{tenant}")


@dataclass(frozen=True)
class LatentEntry:
    """What eviction needs to know of one stored generation's latents."""

    entry_id: str
    size_bytes: int
    deepest_step: int  # the most steps one resume from it can skip
    saved_steps: float  # steps its hits saved, decayed to ``updated_s`` (its creation
    #                     counts as one hit at ``deepest_step``: a new entry is not first out)
    updated_s: float


def decayed(value: float, since_s: float, now_s: float, half_life_s: float) -> float:
    """``value`` halved every ``half_life_s`` since ``since_s``."""
    return value * 0.5 ** (max(0.0, now_s - since_s) / half_life_s)


def benefit(entry: LatentEntry, now_s: float, half_life_s: float = DEFAULT_HALF_LIFE_S) -> float:
    """Steps this entry saves, hits counted and decayed: what eviction keeps highest."""
    return decayed(entry.saved_steps, entry.updated_s, now_s, half_life_s)


def after_hit(
    entry: LatentEntry, skipped: int, now_s: float, half_life_s: float = DEFAULT_HALF_LIFE_S
) -> LatentEntry:
    """``entry`` once a resume from it skipped ``skipped`` steps at ``now_s``."""
    saved = benefit(entry, now_s, half_life_s) + skipped
    return LatentEntry(entry.entry_id, entry.size_bytes, entry.deepest_step, saved, now_s)


def evictions(
    entries: Iterable[LatentEntry],
    max_bytes: int,
    now_s: float,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
) -> tuple[str, ...]:
    """Entry ids to drop, least beneficial first, until the rest fit in ``max_bytes``."""
    ranked = sorted(entries, key=lambda e: (benefit(e, now_s, half_life_s), e.updated_s))
    excess = sum(e.size_bytes for e in ranked) - max_bytes
    dropped = []
    for entry in ranked:
        if excess <= 0:
            break
        dropped.append(entry.entry_id)
        excess -= entry.size_bytes
    return tuple(dropped)
