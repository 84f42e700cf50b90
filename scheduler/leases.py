"""Where a scheduler replica gets its leases: the seam between batching and the budget.

A ``LeaseGate`` answers one dispatch step's lease asks at once and takes leases back
when their batches end. Two implementations share one decision code
(``policies.leases.LeaseBook``):

* ``LocalLeases`` (here) hosts a book in this process and feeds it a fresh power reading
  at each step: one scheduler replica in tests and in-process use, where nobody else
  launches on the same devices. Its leases count as started when granted (the worker is
  in the same process and starts at once).
* ``RemoteLeases`` (``cluster.admission``) asks the cluster's single admission service,
  the only place a batch of any replica gets permission to draw power.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from wattserve.policies.catalog import Catalog
from wattserve.policies.leases import LeaseAsk, LeaseBook, LeaseDecision, PowerReading
from wattserve.policies.policy import Budget

LOCAL_HOLDER = "local"


class LeaseGate(Protocol):
    """Permission to launch batches: one call per dispatch step, one release per batch."""

    async def request(self, asks: Sequence[LeaseAsk]) -> Sequence[LeaseDecision]:
        """A decision per ask (same keys); never raises: an outage is a refusal."""
        ...

    def release(self, lease_id: str) -> None:
        """The batch of ``lease_id`` ended (either way); idempotent, never blocks."""
        ...

    def configure(self, catalog: Catalog) -> None:
        """Adopt a new catalog (replica counts per variant)."""
        ...


def replica_slots(catalog: Catalog) -> dict[str, int]:
    """Replicas per variant: the slots a lease book hands out."""
    return {v.name: v.resources.replicas for v in catalog.variants}


class LocalLeases:
    """A lease book in this process, read against live power at every step."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        budget: Callable[[], Budget] = Budget,
        cluster_power_w: Callable[[], float | None] = lambda: None,
        node_power_w: Callable[[], dict[str, float]] = dict,
        clock: Callable[[], float] = time.monotonic,
        sample_period_s: float = 0.1,
    ) -> None:
        self._budget = budget
        self._cluster_power_w = cluster_power_w
        self._node_power_w = node_power_w
        self._clock = clock
        self._slots = replica_slots(catalog)
        # No warm-up: this process saw every launch it must account for.
        self.book = LeaseBook(clock=clock, sample_period_s=sample_period_s, warm_up=False)

    def configure(self, catalog: Catalog) -> None:
        """Variants that left the catalog keep their slots, so queued work still drains."""
        self._slots.update(replica_slots(catalog))

    async def request(self, asks: Sequence[LeaseAsk]) -> Sequence[LeaseDecision]:
        """Read power now (only under a cap), then decide and start the granted leases."""
        budget = self._budget()
        self.book.configure(
            cap_w=budget.cluster_cap_w, node_caps_w=budget.node_caps_w, replicas=self._slots
        )
        if budget.cluster_cap_w is not None or budget.node_caps_w:
            measured_w = self._cluster_power_w()
            reading = (
                None
                if measured_w is None
                else PowerReading(self._clock(), measured_w, self._node_power_w())
            )
            self.book.observe(reading)
        decisions = self.book.request(LOCAL_HOLDER, asks)
        for decision in decisions:
            if decision.lease is not None:
                self.book.start(decision.lease.lease_id)
        return decisions

    def release(self, lease_id: str) -> None:
        """Give the slot back; the draw leaves the books with the next reading."""
        self.book.release(lease_id)
