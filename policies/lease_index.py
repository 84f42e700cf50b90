"""The lease book's incremental bookkeeping: live leases, running draw sums, deadline heaps.

``policies.leases.LeaseBook`` is called at every dispatch step of the fleet simulator
with ~1,000 live leases, so it never scans them (its docstring's **Cost**). These are the
structures that let it avoid that: a set of leases by id with the running sum of their
declared draw (:class:`Drawing`), and a min-heap of when each lease of a set is due
(:class:`Due`), with lazy deletion. Pure data structures: no clock, no rules.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wattserve.policies.leases import Lease


@dataclass(slots=True)
class Live:
    """One live lease of the book: the lease, where it may land and its start, if any."""

    lease: Lease
    nodes: frozenset[str]
    seq: int  # grant order
    started_s: float | None = None


class Drawing:
    """Leases by id with the running sum of their declared draw (W)."""

    def __init__(self) -> None:
        self.leases: dict[str, Live] = {}
        self.draw_w, self._removed = 0.0, 0

    def add(self, lease_id: str, live: Live) -> None:
        """Add the lease and its draw to the sum."""
        self.leases[lease_id] = live
        self.draw_w += live.lease.draw_w

    def discard(self, lease_id: str) -> Live | None:
        """Remove the lease if here; the sum restarts from its members now and then."""
        live = self.leases.pop(lease_id, None)
        if live is not None:
            self._removed += 1
            if self._removed > len(self.leases):
                self.draw_w, self._removed = sum(x.lease.draw_w for x in self.leases.values()), 0
            else:
                self.draw_w -= live.lease.draw_w
        return live


class Due:
    """A min-heap of (time_s, lease_id) over a set of leases, with lazy deletion.

    An entry is live while its lease is in the set and ``due(lease)`` still gives its
    time; stale ones are skipped when popped, and the heap is rebuilt from the set when
    they outnumber it, so it stays O(set) in size.
    """

    def __init__(self, due: Callable[[Live], float]) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due = due

    def push(self, lease_id: str, live: Live, members: Mapping[str, Live]) -> None:
        """Add an entry for the lease; rebuild from ``members`` when stale ones pile up."""
        heapq.heappush(self._heap, (self._due(live), lease_id))
        if len(self._heap) > 2 * len(members) + 64:
            self._heap = [(self._due(x), i) for i, x in members.items()]
            heapq.heapify(self._heap)

    def pop(self, members: Mapping[str, Live], limit_s: float, *, inclusive: bool) -> Iterator[str]:
        """Ids of members due before ``limit_s`` (or at it, if ``inclusive``), soonest first."""
        heap = self._heap
        while heap and (heap[0][0] <= limit_s if inclusive else heap[0][0] < limit_s):
            time_s, lease_id = heapq.heappop(heap)
            live = members.get(lease_id)
            if live is not None and self._due(live) == time_s:
                yield lease_id
