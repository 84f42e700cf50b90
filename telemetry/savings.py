"""Savings attribution: how much energy a run saved against a named baseline, and why.

The baseline is "every output made by the reference variant (the highest-quality one)
at batch size 1, with no cache or coalescing", priced at the reference variant's mean
measured joules per generated output at batch size 1 *in the same run* (B), so
baseline and achieved figures share one energy source and one machine.

Outputs are grouped by generation: a generated output and every coalesced request that
shared it (same ``batch_id`` and ``seed``) form one group of n sharers whose receipts sum
to the generation's full cost F. With P the chosen variant's batch-1 price, the group
saves n*B - F, split exactly as

* ``variant_choice`` = n * (B - P): the chosen variant instead of the reference;
* ``coalescing`` = (n - 1) * P: generations avoided by sharing;
* ``batching`` = P - F: the one generation cost less (or more) than a batch of one.

A cache hit saves B - 0 (``cache``). A variant with no batch-1 sample in the run has no
price of its own: P = F, and batching gets nothing for it.

A generation resumed from a cached latent (``cache = approximate``) skipped s of the
schedule's S steps: of its P - F, ``approximate_cache`` gets P * s / S (the skipped steps
at the variant's measured per-step price, P spread evenly over the steps: today's
``fixed_fraction`` of 0, see docs/energy-models.md) and batching the rest. P is priced
from full (not resumed) batch-1 generations only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from wattserve import Receipt

CAUSES = (
    "cache", "approximate_cache", "coalescing", "batching", "variant_choice", "power_capping",
)  # fmt: skip


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


def _generations(receipts: Sequence[Receipt]) -> dict[tuple[str, int], list[Receipt]]:
    """Generated outputs and their sharers, keyed by (batch_id, seed)."""
    groups: dict[tuple[str, int], list[Receipt]] = defaultdict(list)
    for receipt in receipts:
        if receipt.cache != "hit":
            groups[(receipt.batch_id, receipt.seed)].append(receipt)
    return groups


def _batch1_prices(groups: Iterable[list[Receipt]]) -> dict[str, float]:
    """Mean full cost of each variant's outputs generated in batches of one."""
    costs: dict[str, list[float]] = defaultdict(list)
    for group in groups:
        if group[0].batch_size == 1 and not group[0].steps_skipped:
            costs[group[0].variant].append(sum(r.joules for r in group))
    return {variant: sum(js) / len(js) for variant, js in costs.items()}


def _skipped_share(receipt: Receipt) -> float:
    """The share of its schedule a generation skipped by resuming (0: a full one)."""
    if not receipt.steps_skipped or not receipt.steps:
        return 0.0
    return receipt.steps_skipped / receipt.steps


def savings_by_cause(
    receipts: Sequence[Receipt], reference_variant: str, prior_price_j: float | None = None
) -> SavingsReport:
    """Attribute the run's saving against the reference variant at batch 1.

    Without a batch-1 output of the reference variant among ``receipts`` the baseline is
    priced at ``prior_price_j`` (the catalog's prior: an ``estimated`` figure, and the
    baseline's name says so) or, when that is None too, cannot be priced (ValueError).
    """
    generations = _generations(receipts).values()
    prices = _batch1_prices(generations)
    name = f"every output on {reference_variant} at batch size 1, no cache"
    sources = {r.energy_source for r in receipts}
    if reference_variant in prices:
        baseline_price = prices[reference_variant]
    elif prior_price_j is not None:
        baseline_price = prior_price_j
        name += " (priced from the catalog prior: estimated)"
        sources.add("estimated")
    else:
        raise ValueError(
            f"no batch-1 output of reference variant {reference_variant!r} in this run; "
            "a baseline cannot be priced without one"
        )
    causes = dict.fromkeys(CAUSES, 0.0)
    causes["cache"] = sum(baseline_price - r.joules for r in receipts if r.cache == "hit")
    for group in generations:
        sharers, full_cost = len(group), sum(r.joules for r in group)
        own_price = prices.get(group[0].variant, full_cost)
        causes["variant_choice"] += sharers * (baseline_price - own_price)
        causes["coalescing"] += (sharers - 1) * own_price
        skipped = _skipped_share(group[0]) * own_price
        causes["approximate_cache"] += skipped
        causes["batching"] += own_price - full_cost - skipped
    return SavingsReport(
        baseline_name=name,
        baseline_joules_per_output=baseline_price,
        energy_sources=tuple(sorted(sources)),
        outputs=len(receipts),
        baseline_joules=baseline_price * len(receipts),
        achieved_joules=sum(r.joules for r in receipts),
        by_cause_joules=causes,
    )
