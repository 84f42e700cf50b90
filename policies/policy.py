"""Serving policy and energy budget: the operator's knobs, as plain frozen data.

The control plane (``policies.store``) persists both and every scheduler replica swaps
in the new values within its refresh interval; decisions read whatever is in force.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wattserve import Quality
from wattserve._schemas import ReuseMode


def _default_floors() -> dict[Quality, float]:
    return {"draft": 0.0, "standard": 0.5, "high": 0.8}


@dataclass(frozen=True)
class Policy:
    """Knobs the routing decision reads."""

    quality_floors: dict[Quality, float] = field(default_factory=_default_floors)
    # The tier of a request that names none.
    default_quality: Quality = "standard"
    # Unseeded requests get a fresh seed; share their outputs only when this is on.
    share_unseeded: bool = False
    # Batching: an upper bound over every variant's own limit (None: the variant's), and
    # how long a partial batch may wait for company.
    max_batch_size: int | None = None
    max_wait_s: float = 0.02
    # While the rolling measured J/output runs above the budget's target, the batcher waits
    # this much longer for fuller batches (routing is already cheapest within each floor).
    over_target_wait_factor: float = 4.0
    # Result cache: entry lifetime (None: no expiry) and size cap (LRU beyond it).
    cache_ttl_s: float | None = None
    cache_max_bytes: int = 1 << 30
    # The deadline of a request that names none (None: no deadline).
    default_deadline_s: float | None = None
    # Once any tenant exists, whether requests without an API key are still served.
    allow_anonymous: bool = False
    # How long a finished request's Idempotency-Key replays its response, s.
    idempotency_ttl_s: float = 86_400.0
    # Approximate reuse (policies.latent_reuse): the mode of an unseeded request that
    # names none, and the named pools tenants share latents in (tenant -> pool; the
    # anonymous pool under "(anonymous)"). Everyone else is a pool of their own.
    default_reuse: ReuseMode = "exact"
    reuse_pools: dict[str, str] = field(default_factory=dict)
    # Exact reuse (result cache, coalescing) across tenants is on by default; with this on
    # it stays inside the same pools too: a hit's speed tells that someone else asked.
    pool_exact_reuse: bool = False
    # (variant, tier) pairs the shadow audit measured below tolerance (policies.audit):
    # routing leaves ``demoted`` variants out of the tier, and ``approximate_demoted``
    # variants serve the tier by full generations only, until the admin restores them.
    demoted: frozenset[tuple[str, str]] = frozenset()
    approximate_demoted: frozenset[tuple[str, str]] = frozenset()
    # Shadow audit: the share of off-reference outputs regenerated on the reference
    # (0 disables; tenants may have their own rate), and the tolerances its verdicts
    # judge against: the CLIP score drop a cheaper variant may cost, and the SSIM to the
    # reference a same-model pair (approximate reuse, a cache hit) must keep.
    audit_rate: float = 0.02
    tenant_audit_rates: dict[str, float] = field(default_factory=dict)
    audit_clip_drop_max: float = 0.02
    audit_ssim_min: float = 0.6

    def quality_floor(self, tier: Quality) -> float:
        """Minimum catalog quality score a variant needs to serve ``tier``."""
        return self.quality_floors[tier]

    def audit_rate_for(self, tenant: str | None) -> float:
        """The audit rate of ``tenant``'s outputs: its own where set, else the policy's."""
        if tenant is None:
            return self.audit_rate
        return self.tenant_audit_rates.get(tenant, self.audit_rate)


@dataclass(frozen=True)
class Budget:
    """The energy budget in force: the one interface the control plane will feed live.

    The scheduler reads it through a zero-argument callable at every decision, so a new
    budget applies to the next batch without a restart.
    """

    cluster_cap_w: float | None = None
    joules_per_output_target: float | None = None
    # Per-node caps keyed by Ray node id or a prefix of it. They bind batches of the
    # variants that can be placed on those nodes (``policies.leases``).
    node_caps_w: dict[str, float] = field(default_factory=dict)
