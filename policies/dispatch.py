"""The batch dispatcher's state machine: queued outputs in, launch decisions out.

``DispatchCore`` owns what one scheduler replica must remember between decisions — the
queue of outputs (per ticket) and its batches in flight per variant — and applies the
pure decisions (``plan_batches``, ``held_fate``). It has no clock, no asyncio and no I/O:
the caller passes ``now`` and carries out what it returns. The live scheduler's
``Batcher`` drives it from an asyncio task with real workers; the fleet simulator drives
the *same* object from its event queue under a simulated clock.

One decision is two calls around a lease request, so that permission to draw power
comes from one place for every replica (``policies.leases.LeaseBook``, hosted by the
admission service, or in process for one replica and the simulator):

1. :meth:`propose` plans batches for this replica's free replicas (``plan_batches``) and
   turns each into a ``LeaseAsk`` (declared draw, age of its oldest output);
2. the caller asks the lease book for all of them at once (one call per step);
3. :meth:`settle` launches the granted ones (they leave the queue and occupy a replica
   until :meth:`finished`); a batch refused for lack of a free slot stays queued; for
   outputs in a batch refused to protect the power budget it decides hold / move (once,
   to the lowest-drawing variant that still meets their floor and size) / reject.

The queue may change while the lease request is out (a request withdraws its output):
settle launches what is still queued and hands back leases it could not use.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from wattserve.policies.admission import HeldOutput, held_fate
from wattserve.policies.batching import BatchingSnapshot, QueuedOutput, plan_batches
from wattserve.policies.catalog import Catalog
from wattserve.policies.leases import Lease, LeaseAsk, LeaseBook, LeaseDecision, LeaseRefusal

# Refusals that protect the power budget: their outputs are held, moved or rejected.
# A missing slot is not one of them: the batch simply waits for a replica.
POWER_REFUSALS = frozenset({"power_cap", "no_reading", "warming_up", "unavailable"})


@dataclass
class _Entry:
    queued: QueuedOutput
    floor: float  # the quality floor a move must still meet
    moved: bool = False
    background: bool = False  # audit work: only where no user output waits (see propose)


@dataclass(frozen=True)
class Launch:
    """A batch to run now: its variant, size, members (tickets, whether moved), lease."""

    variant: str
    width_px: int
    height_px: int
    tickets: tuple[int, ...]
    moved: tuple[bool, ...]
    draw_w: float  # the variant's declared active power
    lease: Lease | None = None
    start_step: int = 0  # every member resumes after this many steps (0: full runs)


@dataclass(frozen=True)
class Proposal:
    """Batches this replica would launch now, each as the lease it asks for."""

    now_s: float
    batches: tuple[tuple[int, ...], ...]  # tickets of each planned batch
    asks: tuple[LeaseAsk, ...]  # one per batch, ``key`` = its index here
    wake_at_s: float | None


@dataclass(frozen=True)
class Step:
    """What one decision step decided."""

    launches: tuple[Launch, ...]
    moved: tuple[tuple[int, str], ...]  # (ticket, new variant)
    rejected: tuple[tuple[int, LeaseRefusal], ...]  # (ticket, why) refused for the budget
    wake_at_s: float | None  # step again by then; None: only on a new output or a finish
    unused: tuple[Lease, ...] = ()  # granted, but every member left meanwhile: release


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
        joules_bounds: Mapping[str, Mapping[int, tuple[float, float]]] | None = None,
    ) -> None:
        self.max_wait_s = max_wait_s
        # bounds of measured J/output by variant and batch size, read at each step (a live
        # table: the energy profile's) so batches are not made larger than is cheapest
        self._joules_bounds = joules_bounds if joules_bounds is not None else {}
        self.max_hold_s = max_hold_s
        self._catalog = catalog
        self._cap: dict[str, int] = {}
        self._replicas: dict[str, int] = {}
        self._draw_w: dict[str, float] = {}
        self._queue: dict[int, _Entry] = {}
        # the same entries by the variant they wait for: a step reads only the variants
        # with a free replica, so its cost does not grow with work queued behind busy ones
        self._by_variant: dict[str, dict[int, _Entry]] = {}
        self._in_flight: dict[str, int] = {}
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
        start_step: int = 0,
        background: bool = False,
    ) -> int:
        """Queue one output; returns its ticket.

        A ``background`` output (the shadow audit's) is planned only while no other output
        waits for its variant, and its lease yields to the power cap: it never runs ahead
        of user work. It never moves to another variant: its variant is the point.
        """
        ticket = next(self._tickets)
        queued = QueuedOutput(ticket, variant, width_px, height_px, now_s, deadline_s, solo,
                              start_step)  # fmt: skip
        entry = self._queue[ticket] = _Entry(queued, floor, background=background)
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

    def propose(self, now_s: float) -> Proposal:
        """Plan batches for the free replicas; each becomes a lease ask."""
        free = {
            name: count - self._in_flight.get(name, 0) for name, count in self._replicas.items()
        }
        # outputs for variants without a free replica cannot launch now
        queued = tuple(e.queued for name, n in free.items() if n > 0 for e in self._plannable(name))
        if not queued:  # nothing can launch, so nothing to ask for, hold or refuse
            return Proposal(now_s, (), (), None)
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
        asks = []
        for key, tickets in enumerate(decision.launch):
            entries = [self._queue[t].queued for t in tickets]
            oldest_s = min(q.enqueued_s for q in entries)
            variant = entries[0].variant
            background = all(self._queue[t].background for t in tickets)
            asks.append(LeaseAsk(key, variant, self._draw(variant), now_s - oldest_s,
                                 background=background))  # fmt: skip
        return Proposal(now_s, decision.launch, tuple(asks), decision.wake_at_s)

    def settle(self, proposal: Proposal, decisions: Sequence[LeaseDecision]) -> Step:
        """Launch the granted batches; hold, move or reject those refused for the budget."""
        now_s, wake_at = proposal.now_s, proposal.wake_at_s
        launches, moved, rejected, unused = [], [], [], []
        by_key = {d.key: d for d in decisions}
        for key, tickets in enumerate(proposal.batches):
            present = tuple(t for t in tickets if t in self._queue)
            decision = by_key.get(key)
            lease = decision.lease if decision is not None else None
            if lease is not None:
                if present:
                    launches.append(self._launch(present, lease))
                else:
                    unused.append(lease)
                continue
            refusal = decision.refusal if decision is not None else None
            retry_s = refusal.retry_after_s if refusal is not None else 0.1
            due = now_s + max(retry_s, 1e-3)
            wake_at = due if wake_at is None else min(wake_at, due)
            if refusal is None or refusal.reason not in POWER_REFUSALS:
                continue  # no free slot (or no answer for it): wait for a replica
            for ticket in present:
                fate, to = self._settle_held(now_s, ticket)
                if fate == "reject":
                    rejected.append((ticket, refusal))
                elif fate == "move" and to is not None:
                    moved.append((ticket, to))
        return Step(tuple(launches), tuple(moved), tuple(rejected), wake_at, tuple(unused))

    def step(self, now_s: float, book: LeaseBook, holder: str = "local") -> Step:
        """One whole decision against an in-process lease book (simulator, tests)."""
        proposal = self.propose(now_s)
        if not proposal.asks:
            return replace(_NOTHING, wake_at_s=proposal.wake_at_s)
        return self.settle(proposal, book.request(holder, proposal.asks))

    # --- internals --------------------------------------------------------------------

    def _plannable(self, variant: str) -> list[_Entry]:
        """What waits for ``variant``: its user outputs, or its background ones if none."""
        waiting = list(self._by_variant.get(variant, {}).values())
        users = [e for e in waiting if not e.background]
        return users or waiting

    def _draw(self, variant: str) -> float:
        return self._draw_w.get(variant, 0.0)

    def _launch(self, tickets: tuple[int, ...], lease: Lease) -> Launch:
        entries = [self._queue.pop(t) for t in tickets]
        first = entries[0].queued
        waiting = self._by_variant[first.variant]
        for t in tickets:
            del waiting[t]
        self._in_flight[first.variant] = self._in_flight.get(first.variant, 0) + 1
        return Launch(first.variant, first.width_px, first.height_px, tickets,
                      tuple(e.moved for e in entries), self._draw(first.variant),
                      lease, first.start_step)  # fmt: skip

    def _settle_held(self, now_s: float, ticket: int) -> tuple[str, str | None]:
        """``("hold", None)``, ``("move", variant)`` or ``("reject", None)``."""
        entry = self._queue[ticket]
        queued = entry.queued
        held = HeldOutput(ticket, queued.variant, queued.enqueued_s, queued.deadline_s,
                          entry.moved)  # fmt: skip
        # an audit is of its variant: it is held or dropped, never moved
        cheaper = None if entry.background else self._lower_draw_variant(queued, entry.floor)
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
        if queued.start_step:  # its latent belongs to its variant's latent space
            return None
        current = self._draw(queued.variant)
        fits = [
            v for v in self._catalog.variants
            if v.power_w < current and v.quality_score >= floor
            and v.size_problem(queued.width_px, queued.height_px) is None
        ]  # fmt: skip
        return min(fits, key=lambda v: v.power_w).name if fits else None
