"""Savings attribution: how much energy a run saved against a named baseline, and why.

The baseline is "every output made by the reference variant (the highest-quality one)
at batch size 1, with no cache or coalescing", priced at the reference variant's mean
measured joules per image at batch size 1 *in the same run*, so baseline and achieved
figures share one energy source and one machine. Each output's saving is split into
causes that add up exactly to the total:

* ``cache`` / ``coalescing``: an output served without generating saves the whole
  baseline price minus whatever it was charged;
* ``variant_choice``: baseline price minus the chosen variant's batch-1 price;
* ``batching``: the chosen variant's batch-1 price minus what the output was charged.

A variant with no batch-1 sample in the run has no batch-1 price, so its whole
difference is counted as variant choice and batching gets zero for it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from wattserve import Receipt

CAUSES = ("cache", "coalescing", "batching", "variant_choice", "power_capping")


@dataclass(frozen=True)
class SavingsReport:
    """Baseline vs achieved joules, and the saving split by cause."""

    baseline_name: str
    baseline_joules_per_output: float
    energy_sources: tuple[str, ...]
    outputs: int
    baseline_joules: float
    achieved_joules: float
    by_cause_joules: dict[str, float] = field(default_factory=dict)

    @property
    def saved_joules(self) -> float:
        """Baseline minus achieved."""
        return self.baseline_joules - self.achieved_joules


def batch1_prices(receipts: Sequence[Receipt]) -> dict[str, float]:
    """Mean joules per output of each variant's generated batch-1 outputs."""
    totals: dict[str, list[float]] = defaultdict(list)
    for receipt in receipts:
        if receipt.cache == "miss" and receipt.batch_size == 1:
            totals[receipt.variant].append(receipt.joules)
    return {variant: sum(js) / len(js) for variant, js in totals.items()}


def savings_by_cause(receipts: Sequence[Receipt], reference_variant: str) -> SavingsReport:
    """Attribute the run's saving against the reference variant at batch 1."""
    prices = batch1_prices(receipts)
    if reference_variant not in prices:
        raise ValueError(
            f"no batch-1 output of reference variant {reference_variant!r} in this run; "
            "a baseline cannot be priced without one"
        )
    baseline_price = prices[reference_variant]
    causes = dict.fromkeys(CAUSES, 0.0)
    for receipt in receipts:
        if receipt.cache == "hit":
            causes["cache"] += baseline_price - receipt.joules
        elif receipt.cache == "coalesced":
            causes["coalescing"] += baseline_price - receipt.joules
        else:
            own_price = prices.get(receipt.variant, receipt.joules)
            causes["variant_choice"] += baseline_price - own_price
            causes["batching"] += own_price - receipt.joules
    return SavingsReport(
        baseline_name=f"every output on {reference_variant} at batch size 1, no cache",
        baseline_joules_per_output=baseline_price,
        energy_sources=tuple(sorted({r.energy_source for r in receipts})),
        outputs=len(receipts),
        baseline_joules=baseline_price * len(receipts),
        achieved_joules=sum(r.joules for r in receipts),
        by_cause_joules=causes,
    )
