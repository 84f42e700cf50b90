"""Admission under a power budget: which planned batches may start now.

Before a batch launches, the projected cluster power is the live measured power (from
the telemetry agents) plus the draw of batches launched too recently to show up in a
measurement, plus the batch's own declared draw. Batches are admitted in plan order
while the projection stays at or under the cap; the rest are held. The projection is
deliberately conservative (a batch's whole declared power counts as added draw), so the
cap is never exceeded on purpose; what happens to held work — wait, move to a cheaper
variant, or be refused with 429 — is the batcher's to carry out, by these rules:

* an output is held while it has been waiting less than ``max_hold_s`` and its
  deadline (if any) has not passed;
* then it moves, once, to the cheapest-drawing variant that still meets its quality
  floor and size, if that variant draws less than the one it was planned on;
* otherwise it is rejected with a retry-after of ``max_hold_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PowerSnapshot:
    """The power picture at decision time, in watts."""

    cap_w: float | None  # None: no budget in force
    measured_w: float | None  # None: no reading (admit nothing while a cap is set)
    launching_w: float  # declared draw of batches launched within the last sample period


def admit(snapshot: PowerSnapshot, draws_w: Sequence[float]) -> list[bool]:
    """For each proposed batch (in plan order), whether it may launch now."""
    if snapshot.cap_w is None:
        return [True] * len(draws_w)
    if snapshot.measured_w is None:
        return [False] * len(draws_w)
    headroom_w = snapshot.cap_w - snapshot.measured_w - snapshot.launching_w
    decisions = []
    for draw_w in draws_w:
        fits = draw_w <= headroom_w
        decisions.append(fits)
        if fits:
            headroom_w -= draw_w
    return decisions


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
