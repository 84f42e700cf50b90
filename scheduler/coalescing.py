"""Single-flight coalescing: one generation per identical output in flight.

The first request for a flight key leads: it generates. Every identical request that
arrives before the leader finishes waits on the same future and gets the same bytes.
When the generation completes, its energy is shared equally by the leader and the
waiters present at that moment (so the ledger still sums to the batch's joules); a
request arriving after completion finds the output in the result cache instead.

Waiters await a shielded future, so a cancelled waiter never cancels the flight. If the
leader fails or is cancelled, the flight fails and each waiter retries once from the
top: one of them becomes the new leader, nobody hangs, nobody is charged twice.

Scope: one scheduler replica (one event loop). Coalescing across replicas needs routing
each key to one owner (consistent hashing over coalescer actors); that is not built yet.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class SharedOutput:
    """A finished generation as its sharers see it."""

    png: bytes
    variant: str
    batch_id: str
    batch_size: int
    joules_per_sharer: float
    energy_source: str
    sharers: int


@dataclass
class Flight:
    """One output being generated, and who is waiting for it."""

    future: asyncio.Future[SharedOutput]
    waiters: int = 0


class SingleFlight:
    """Flights by key, for one event loop."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def lead_or_join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (creates it)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters += 1
            return flight, False
        flight = Flight(asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        return flight, True

    def sharers(self, key: str) -> int:
        """Leader plus current waiters of the flight for ``key``."""
        flight = self._flights.get(key)
        return 1 + flight.waiters if flight else 1

    def finish(self, key: str, output: SharedOutput) -> None:
        """Hand the output to every waiter and close the flight."""
        flight = self._flights.pop(key)
        flight.future.set_result(output)

    def fail(self, key: str, exc: BaseException) -> None:
        """Close the flight with an error; waiters retry."""
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.future.done():
            flight.future.set_exception(exc)
            flight.future.exception()  # mark retrieved: a flight with no waiters is fine

    @staticmethod
    async def wait(flight: Flight) -> SharedOutput:
        """Wait for a flight without letting this waiter's cancellation cancel it."""
        return await asyncio.shield(flight.future)
