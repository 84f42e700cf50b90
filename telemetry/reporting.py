"""Ledger reports over a time window: totals per variant and per tenant, and savings.

Pure functions over ledger rows (no database, no clock), so a report over any slice of
the ledger, or over a simulated one, is computed the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime

from wattserve import Receipt
from wattserve._admin import SavingsInfo, UsageRow, WindowReport
from wattserve.telemetry.ledger import LedgerRow
from wattserve.telemetry.savings import savings_by_cause

ANONYMOUS = "(anonymous)"


def _usage(rows: Sequence[LedgerRow], key: Callable[[LedgerRow], str]) -> list[UsageRow]:
    groups: dict[str, list[LedgerRow]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    result = []
    for name, members in sorted(groups.items()):
        outputs = sum(r.status == "ok" for r in members)
        pending = sum(r.status == "pending" for r in members)
        joules = sum(r.joules for r in members)
        by_source: dict[str, float] = defaultdict(float)
        for r in members:
            by_source[r.energy_source] += r.joules
        result.append(
            UsageRow(
                key=name,
                requests=len({r.request_id for r in members}),
                outputs=outputs,
                failed_outputs=len(members) - outputs - pending,
                pending_outputs=pending,
                joules=joules,
                joules_per_output=joules / outputs if outputs else None,
                joules_by_source=dict(by_source),
            )
        )
    return result


def window_report(
    rows: Sequence[LedgerRow],
    *,
    since: datetime | None,
    until: datetime | None,
    tenant: str | None,
    target: float | None,
    reference: str,
    reference_prior_j: float,
    audit_joules: dict[str, float] | None = None,
) -> WindowReport:
    """Totals and savings of ``rows`` (one window of the ledger).

    Savings are against the named baseline of ``telemetry.savings``: every successful
    output on the ``reference`` variant at batch 1, priced from the window's own batch-1
    outputs of that variant, or from its catalog prior (labelled estimated) if it has none.
    ``audit_joules`` (by source) is the shadow audit's energy in the window: it belongs to
    no output, and the net saving subtracts it.
    """
    ok = [r for r in rows if r.status == "ok"]
    joules = sum(r.joules for r in rows)
    receipts = [Receipt.model_validate(r, from_attributes=True) for r in ok]
    if receipts:
        found = savings_by_cause(receipts, reference, reference_prior_j)
        savings = SavingsInfo(
            baseline=found.baseline_name,
            baseline_joules_per_output=found.baseline_joules_per_output,
            outputs=found.outputs,
            baseline_joules=found.baseline_joules,
            achieved_joules=found.achieved_joules,
            by_cause_joules=found.by_cause_joules,
            energy_sources=list(found.energy_sources),
        )
    else:
        savings = SavingsInfo(
            baseline=f"every output on {reference} at batch size 1, no cache",
            baseline_joules_per_output=None, outputs=0, baseline_joules=None,
            achieved_joules=0.0, by_cause_joules={}, energy_sources=[],
        )  # fmt: skip
    audit = {k: round(v, 3) for k, v in (audit_joules or {}).items()}
    spent = savings.achieved_joules + sum(audit.values())
    net = None if savings.baseline_joules is None else savings.baseline_joules - spent
    savings = savings.model_copy(update={"audit_joules": audit, "net_saved_joules": net})
    return WindowReport(
        since=since,
        until=until,
        tenant=tenant,
        outputs=len(ok),
        joules=joules,
        joules_per_output=joules / len(ok) if ok else None,
        joules_per_output_target=target,
        by_variant=_usage(rows, lambda r: r.variant),
        by_tenant=_usage(rows, lambda r: r.tenant or ANONYMOUS),
        savings=savings,
    )
