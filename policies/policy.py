"""Serving policy: the operator's knobs that decisions read, as plain frozen data.

Only what is enforced today lives here: the quality floor of each tier and whether
unseeded outputs may be shared. Budgets, batching limits and cache settings join it
when the control plane persists policies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wattserve import Quality


def _default_floors() -> dict[Quality, float]:
    return {"draft": 0.0, "standard": 0.5, "high": 0.8}


@dataclass(frozen=True)
class Policy:
    """Knobs the routing decision reads."""

    quality_floors: dict[Quality, float] = field(default_factory=_default_floors)
    # Unseeded requests get a fresh seed; share their outputs only when this is on.
    share_unseeded: bool = False
    # While the rolling measured J/output runs above the budget's target, the batcher waits
    # this much longer for fuller batches (routing is already cheapest within each floor).
    over_target_wait_factor: float = 4.0

    def quality_floor(self, tier: Quality) -> float:
        """Minimum catalog quality score a variant needs to serve ``tier``."""
        return self.quality_floors[tier]


@dataclass(frozen=True)
class Budget:
    """The energy budget in force: the one interface the control plane will feed live.

    The scheduler reads it through a zero-argument callable at every decision, so a new
    budget applies to the next batch without a restart.
    """

    cluster_cap_w: float | None = None
    joules_per_output_target: float | None = None
