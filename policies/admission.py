"""What happens to work held back to protect the power budget.

Whether a batch may start under the budget is the lease book's decision
(``policies.leases``: cap minus measured power minus leases not yet visible in the
measurement). Outputs of a batch it refuses are held, and each step decides their fate:

* an output is held while it has been waiting less than ``max_hold_s`` and its
  deadline (if any) has not passed;
* then it moves, once, to the cheapest-drawing variant that still meets its quality
  floor and size, if that variant draws less than the one it was planned on;
* otherwise it is rejected with a retry-after of ``max_hold_s``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeldOutput:
    """An output whose batch could not launch under the cap."""

    ticket: int
    variant: str
    enqueued_s: float
    deadline_s: float | None
    moved: bool  # already moved once


def held_fate(
    held: HeldOutput, now_s: float, max_hold_s: float, cheaper_variant: str | None
) -> str:
    """``hold``, ``move`` (to ``cheaper_variant``) or ``reject`` for one held output."""
    out_of_time = now_s - held.enqueued_s >= max_hold_s or (
        held.deadline_s is not None and now_s >= held.deadline_s
    )
    if not out_of_time:
        return "hold"
    if cheaper_variant is not None and not held.moved:
        return "move"
    return "reject"
