"""Batch formation: which queued outputs run together, and when.

Compatible outputs (same variant, same size, same start step — a resumed output runs
only the tail of the schedule; steps and guidance are per variant) queue together,
ordered by deadline, then arrival. A group launches a batch only when one of its
variant's replicas is free — so no replica is ever queued more than one batch deep, and
under load the queue grows and batches grow with it ("batch harder when busy") —
and then only when the batch is full, its oldest output has waited ``max_wait_s``, or an
output's deadline is closer than ``max_wait_s``. Groups whose oldest output waited
longest are served first.

A batch is not always as large as it can be: bigger is not always cheaper per output
(SANA 1.5 1.6B on an H100 costs 1.7 % more per image at batch 2 than at 1, and its
cheapest size is 16 of the 32 that fit). The profile gives, per measured batch size, a
confidence interval of the mean J/output (mean ± 2 standard errors, over at least two
batches). When even the high end of a smaller size's interval is below the low end of
the size a batch would have, by more than ``SMALLER_BATCH_MARGIN``, the smaller batch
launches and the rest wait for the next one. Noisy measurements (a CPU, where every size
costs about the same per image) therefore never split a batch; sizes not yet measured
twice launch as they come, which is how they get measured.

A pure function over a frozen snapshot: the live batcher and the fleet simulator call
the same code with their own clocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

SMALLER_BATCH_MARGIN = 0.005  # a smaller batch must be 0.5 % cheaper per output to win


@dataclass(frozen=True)
class QueuedOutput:
    """One output waiting for a batch."""

    ticket: int
    variant: str
    width_px: int
    height_px: int
    enqueued_s: float
    deadline_s: float | None = None  # absolute, on the same clock as ``enqueued_s``
    solo: bool = False  # must run in a batch of its own (the baseline policy)
    start_step: int = 0  # resumes from a kept latent after this many steps (0: full run)


@dataclass(frozen=True)
class BatchingSnapshot:
    """Everything ``plan_batches`` looks at."""

    now_s: float
    queued: tuple[QueuedOutput, ...]
    free_replicas: Mapping[str, int]
    max_batch_size: Mapping[str, int]
    max_wait_s: float
    # (low, high) bounds of measured J/output, by variant and batch size (the profile's)
    joules_bounds: Mapping[str, Mapping[int, tuple[float, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchingDecision:
    """Batches to launch now (tickets, in launch order) and when to decide again."""

    launch: tuple[tuple[int, ...], ...]
    wake_at_s: float | None  # None: nothing to do until an output arrives or a batch ends


def _order(item: QueuedOutput) -> tuple[bool, float, float, int]:
    no_deadline = item.deadline_s is None
    return (no_deadline, item.deadline_s or 0.0, item.enqueued_s, item.ticket)


def _due(items: list[QueuedOutput], now: float, max_wait_s: float) -> tuple[float, bool]:
    """(when the group's oldest output has waited long enough, whether a deadline is near)."""
    oldest_s = min(i.enqueued_s for i in items)
    urgent = any(i.deadline_s is not None and i.deadline_s - now <= max_wait_s for i in items)
    return oldest_s + max_wait_s, urgent


def launch_size(bounds: Mapping[int, tuple[float, float]] | None, available: int) -> int:
    """How many of ``available`` compatible outputs to launch as one batch.

    ``available``, unless a smaller measured size is surely cheaper per output: the
    high end of its J/output interval below the low end of ``available``'s by more than
    ``SMALLER_BATCH_MARGIN``; then the surely-cheapest such size.
    """
    at = bounds.get(available) if bounds else None
    if at is None or bounds is None:
        return available
    smaller = [(high, size) for size, (_, high) in bounds.items() if size < available]
    if not smaller:
        return available
    high, size = min(smaller)
    return size if high < at[0] * (1 - SMALLER_BATCH_MARGIN) else available


def plan_batches(snapshot: BatchingSnapshot) -> BatchingDecision:
    """Decide which batches to launch now.

    One pass groups the queue and notes each group's oldest arrival and deadline
    pressure; only groups that launch are sorted. Groups whose variant has no free
    replica are skipped outright.
    """
    free = {name: n for name, n in snapshot.free_replicas.items() if n > 0}
    now, max_wait_s = snapshot.now_s, snapshot.max_wait_s
    groups: dict[tuple[str, int, int, int, int], list] = {}
    for item in snapshot.queued:
        if item.variant not in free:
            continue
        solo_key = -item.ticket - 1 if item.solo else 0
        key = (item.variant, item.width_px, item.height_px, item.start_step, solo_key)
        group = groups.get(key)
        if group is None:
            group = groups[key] = [[], item.enqueued_s, False]
        group[0].append(item)
        if item.enqueued_s < group[1]:
            group[1] = item.enqueued_s
        if item.deadline_s is not None and item.deadline_s - now <= max_wait_s:
            group[2] = True
    launch: list[tuple[int, ...]] = []
    wake_at: float | None = None
    for items, oldest_s, urgent in sorted(groups.values(), key=lambda g: g[1]):
        variant = items[0].variant
        cap = max(1, snapshot.max_batch_size.get(variant, 1))
        due_s = oldest_s + max_wait_s
        if len(items) < cap and now < due_s and not urgent and not items[0].solo:
            wake_at = due_s if wake_at is None else min(wake_at, due_s)
            continue
        if free.get(variant, 0) <= 0:
            continue  # an older group of this variant took the last free replica
        items.sort(key=_order)
        measured = snapshot.joules_bounds.get(variant)
        while True:
            size = launch_size(measured, min(len(items), cap))
            launch.append(tuple(i.ticket for i in items[:size]))
            items = items[size:]
            free[variant] -= 1
            if not items or free[variant] <= 0:
                break
            due_s, urgent = _due(items, now, max_wait_s)
            if len(items) < cap and now < due_s and not urgent:
                wake_at = due_s if wake_at is None else min(wake_at, due_s)
                break
    return BatchingDecision(tuple(launch), wake_at)
