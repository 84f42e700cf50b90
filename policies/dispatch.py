"""The batch dispatcher's state machine: queued outputs in, launch decisions out.

``DispatchCore`` owns what the dispatcher must remember between decisions — the queue of
outputs (per ticket), batches in flight per variant, the declared draw of batches
launched too recently to show in a power reading — and applies the pure decisions
(``plan_batches``, ``admit``, ``held_fate``) at each :meth:`step`. It has no clock, no
asyncio and no I/O: the caller passes ``now`` and the power picture and carries out the
returned :class:`Step`. The live scheduler's ``Batcher`` drives it from an asyncio task
with real workers; the fleet simulator drives the *same* object from its event queue
under a simulated clock, which is why it exists as a separate, synchronous piece.

One step, in order: plan batches for free replicas; admit each planned batch under the
power cap, in plan order; launch the admitted ones (they leave the queue and occupy a
replica until :meth:`finished`); for outputs in held batches, decide hold / move (once,
to the lowest-drawing variant that still meets their floor and size) / reject.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

from wattserve.policies.admission import HeldOutput, PowerSnapshot, admit, held_fate
from wattserve.policies.batching import BatchingSnapshot, QueuedOutput, plan_batches
from wattserve.policies.catalog import Catalog


@dataclass
class _Entry:
    queued: QueuedOutput
    floor: float  # the quality floor a move must still meet
    moved: bool = False


@dataclass(frozen=True)
class Launch:
    """A batch to run now: its variant, size and members (tickets, and whether moved)."""

    variant: str
    width_px: int
    height_px: int
    tickets: tuple[int, ...]
    moved: tuple[bool, ...]
    draw_w: float  # the variant's declared active power


@dataclass(frozen=True)
class Step:
    """What one decision step decided."""

    launches: tuple[Launch, ...]
    moved: tuple[tuple[int, str], ...]  # (ticket, new variant)
    rejected: tuple[int, ...]  # refused to protect the power cap
    wake_at_s: float | None  # step again by then; None: only on a new output or a finish


_NOTHING = Step((), (), (), None)


class DispatchCore:
    """Queue, replicas in use and recent launches of one scheduler replica."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        max_batch_size: int | None = None,
        max_wait_s: float = 0.02,
        max_hold_s: float = 5.0,
        sample_period_s: float = 0.1,
        joules_bounds: Mapping[str, Mapping[int, tuple[float, float]]] | None = None,
    ) -> None:
        self.max_wait_s = max_wait_s
        # bounds of measured J/output by variant and batch size, read at each step (a live
        # table: the energy profile's) so batches are not made larger than is cheapest
        self._joules_bounds = joules_bounds if joules_bounds is not None else {}
        self.max_hold_s = max_hold_s
        self._sample_period_s = sample_period_s
        self._catalog = catalog
        self._cap: dict[str, int] = {}
        self._replicas: dict[str, int] = {}
        self._draw_w: dict[str, float] = {}
        self._queue: dict[int, _Entry] = {}
        # the same entries by the variant they wait for: a step reads only the variants
        # with a free replica, so its cost does not grow with work queued behind busy ones
        self._by_variant: dict[str, dict[int, _Entry]] = {}
        self._in_flight: dict[str, int] = {}
        # (launch time s, declared draw W) of recent launches, oldest first, and their sum
        self._launched: deque[tuple[float, float]] = deque()
        self._launching_w = 0.0
        self._tickets = itertools.count()
        self.configure(catalog, max_batch_size=max_batch_size)

    def configure(self, catalog: Catalog, *, max_batch_size: int | None) -> None:
        """Adopt a new catalog and batch-size bound.

        Variants that left the catalog keep their limits, so what is already queued on
        them still launches: that is how a retiring variant drains.
        """
        self._catalog = catalog
        for v in catalog.variants:
            self._cap[v.name] = min(v.max_batch_size, max_batch_size or v.max_batch_size)
            self._replicas[v.name] = v.resources.replicas
            self._draw_w[v.name] = v.power_w

    # --- reads ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    def queued_for(self, variant: str) -> int:
        """Outputs waiting for a batch of ``variant``, plus one batch per busy replica."""
        waiting = len(self._by_variant.get(variant, ()))
        return waiting + self._in_flight.get(variant, 0) * self._cap.get(variant, 1)

    def busy_with(self, variant: str) -> bool:
        """Whether any output of ``variant`` is queued or running."""
        return self._in_flight.get(variant, 0) > 0 or bool(self._by_variant.get(variant))

    # --- events -----------------------------------------------------------------------

    def submit(
        self,
        variant: str,
        width_px: int,
        height_px: int,
        now_s: float,
        deadline_s: float | None,
        floor: float = 0.0,
        solo: bool = False,
    ) -> int:
        """Queue one output; returns its ticket."""
        ticket = next(self._tickets)
        queued = QueuedOutput(ticket, variant, width_px, height_px, now_s, deadline_s, solo)
        entry = self._queue[ticket] = _Entry(queued, floor)
        self._by_variant.setdefault(variant, {})[ticket] = entry
        return ticket

    def withdraw(self, ticket: int) -> bool:
        """Drop a still-queued output (its request went away); False if already launched."""
        entry = self._queue.pop(ticket, None)
        if entry is None:
            return False
        del self._by_variant[entry.queued.variant][ticket]
        return True

    def finished(self, variant: str) -> None:
        """A launched batch of ``variant`` ended (either way): its replica is free again."""
        self._in_flight[variant] -= 1

    def step(self, now_s: float, cap_w: float | None, measured_w: float | None) -> Step:
        """Decide what to launch, move and refuse now, under ``cap_w`` (None: uncapped)."""
        free = {
            name: count - self._in_flight.get(name, 0) for name, count in self._replicas.items()
        }
        # outputs for variants without a free replica cannot launch now
        queued = tuple(
            e.queued
            for name, n in free.items()
            if n > 0
            for e in self._by_variant.get(name, {}).values()
        )
        if not queued:  # nothing can launch, so nothing to admit, hold or refuse
            return _NOTHING
        decision = plan_batches(
            BatchingSnapshot(
                now_s=now_s,
                queued=queued,
                free_replicas=free,
                max_batch_size=self._cap,
                max_wait_s=self.max_wait_s,
                joules_bounds=self._joules_bounds,
            )
        )
        wake_at = decision.wake_at_s
        recent = now_s - 2 * self._sample_period_s
        while self._launched and self._launched[0][0] < recent:
            self._launching_w -= self._launched.popleft()[1]
        if not self._launched:
            self._launching_w = 0.0  # no float drift across an idle period
        snapshot = PowerSnapshot(
            cap_w=cap_w,
            measured_w=measured_w,
            launching_w=self._launching_w,
        )
        draws = [self._draw(self._queue[tickets[0]].queued.variant) for tickets in decision.launch]
        launches, moved, rejected = [], [], []
        for tickets, ok in zip(decision.launch, admit(snapshot, draws), strict=True):
            if ok:
                launches.append(self._launch(now_s, tickets))
                continue
            for ticket in tickets:
                fate, to = self._settle_held(now_s, ticket)
                if fate == "reject":
                    rejected.append(ticket)
                elif fate == "move" and to is not None:
                    moved.append((ticket, to))
            due = now_s + self._sample_period_s
            wake_at = due if wake_at is None else min(wake_at, due)
        return Step(tuple(launches), tuple(moved), tuple(rejected), wake_at)

    # --- internals --------------------------------------------------------------------

    def _draw(self, variant: str) -> float:
        return self._draw_w.get(variant, 0.0)

    def _launch(self, now_s: float, tickets: tuple[int, ...]) -> Launch:
        entries = [self._queue.pop(t) for t in tickets]
        first = entries[0].queued
        waiting = self._by_variant[first.variant]
        for t in tickets:
            del waiting[t]
        self._in_flight[first.variant] = self._in_flight.get(first.variant, 0) + 1
        draw_w = self._draw(first.variant)
        self._launched.append((now_s, draw_w))
        self._launching_w += draw_w
        return Launch(first.variant, first.width_px, first.height_px, tickets,
                      tuple(e.moved for e in entries), draw_w)  # fmt: skip

    def _settle_held(self, now_s: float, ticket: int) -> tuple[str, str | None]:
        """``("hold", None)``, ``("move", variant)`` or ``("reject", None)``."""
        entry = self._queue[ticket]
        queued = entry.queued
        held = HeldOutput(ticket, queued.variant, queued.enqueued_s, queued.deadline_s,
                          entry.moved)  # fmt: skip
        cheaper = self._lower_draw_variant(queued, entry.floor)
        fate = held_fate(held, now_s, self.max_hold_s, cheaper)
        if fate == "move" and cheaper is not None:
            del self._by_variant[queued.variant][ticket]
            self._by_variant.setdefault(cheaper, {})[ticket] = entry
            entry.queued = replace(queued, variant=cheaper, enqueued_s=now_s)
            entry.moved = True
            return "move", cheaper
        if fate == "reject":
            del self._queue[ticket]
            del self._by_variant[queued.variant][ticket]
        return fate, None

    def _lower_draw_variant(self, queued: QueuedOutput, floor: float) -> str | None:
        current = self._draw(queued.variant)
        fits = [
            v for v in self._catalog.variants
            if v.power_w < current and v.quality_score >= floor
            and v.size_problem(queued.width_px, queued.height_px) is None
        ]  # fmt: skip
        return min(fits, key=lambda v: v.power_w).name if fits else None
