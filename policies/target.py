"""The joules-per-output target: when measured energy runs over it, batch harder.

A budget may set a J/output target. Each finished batch folds its measured J/output into
an exponentially weighted average; while that average is above the target, partial
batches wait ``Policy.over_target_wait_factor`` times longer for company, so batches
fill and each output costs less (routing is already the cheapest within each quality
floor). Plain state and arithmetic: the live scheduler and the fleet simulator both keep
one and feed it their batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from wattserve.policies.policy import Policy

TARGET_EWMA_ALPHA = 0.1


@dataclass
class JoulesTarget:
    """A rolling measured J/output, held against a target."""

    alpha: float = TARGET_EWMA_ALPHA
    rolling_joules_per_output: float | None = None  # EWMA over batches; None until one ends

    def observe(self, joules_per_output: float) -> None:
        """Fold one finished batch's measured J/output into the rolling figure."""
        old = self.rolling_joules_per_output
        self.rolling_joules_per_output = (
            joules_per_output if old is None else old + self.alpha * (joules_per_output - old)
        )

    def over(self, target_j: float | None) -> bool:
        """Whether the rolling J/output is above ``target_j`` (None: no target)."""
        actual = self.rolling_joules_per_output
        return target_j is not None and actual is not None and actual > target_j

    def max_wait_s(self, policy: Policy, target_j: float | None) -> float:
        """How long a partial batch may wait now: longer while over the target."""
        factor = policy.over_target_wait_factor if self.over(target_j) else 1.0
        return policy.max_wait_s * factor
