"""Single-flight coalescing: one generation per identical output in flight.

The first request for a flight key leads: it generates. Every identical request that
arrives before the leader finishes waits on the same flight and gets the same bytes.
When the generation completes, its energy is shared equally by the leader and the
waiters present at that moment (so the ledger still sums to the batch's joules); a
request arriving after completion finds the output in the result cache instead.

A cancelled waiter leaves the flight (or keeps its share if the output was already
shared out) and cancels nobody. If the leader fails, is cancelled or is not heard from
within the lease, the flight fails and each waiter retries once: one of them becomes
the new leader, nobody hangs, nobody is charged twice.

Two registries implement ``Flights``: ``LocalFlights`` for one event loop (one
scheduler replica), and ``RemoteFlights``, which routes each key to its owner among a
few ``CoalescerActor``s by rendezvous hashing so that scheduler replicas never both
generate the same output. The actor holds a ``LocalFlights`` of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from wattserve import WattserveError

DEFAULT_LEASE_S = 300.0
_FINISHED_KEPT = 4096


class LeaderGone(WattserveError):
    """The generation a request was waiting on failed or was cancelled; retry it."""


@dataclass(frozen=True)
class SharedOutput:
    """A finished generation as its sharers see it.

    ``joules`` is the output's full charge when handed to ``finish``; the returned copy
    carries each sharer's part in ``joules`` and the number of sharers.
    """

    png: bytes
    variant: str
    batch_id: str
    batch_size: int
    joules: float
    energy_source: str
    sharers: int = 1


class Flights(Protocol):
    """A registry of outputs in flight."""

    async def claim(self, key: str) -> bool:
        """True when the caller leads ``key`` (generates it), False when it joined."""
        ...

    async def wait(self, key: str) -> SharedOutput:
        """The output of a joined flight; raises ``LeaderGone`` if it failed."""
        ...

    async def finish(self, key: str, output: SharedOutput) -> SharedOutput:
        """Share ``output`` with the waiters; return the leader's (equal) share."""
        ...

    async def fail(self, key: str, error: str) -> None:
        """Fail the flight; waiters retry."""
        ...

    async def leave(self, key: str) -> SharedOutput | None:
        """A waiter gives up: its share if the flight already finished, else None."""
        ...


@dataclass
class _Flight:
    future: asyncio.Future[SharedOutput]
    waiters: int = 0


class LocalFlights:
    """Flights of one event loop."""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        self._flights: dict[str, _Flight] = {}
        self._finished: OrderedDict[str, SharedOutput] = OrderedDict()
        self._lease_s = lease_s

    def __len__(self) -> int:
        return len(self._flights)

    async def claim(self, key: str) -> bool:
        """See ``Flights.claim``."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters += 1
            return False
        self._flights[key] = _Flight(asyncio.get_running_loop().create_future())
        return True

    async def wait(self, key: str) -> SharedOutput:
        """See ``Flights.wait``; a leader silent for the lease is presumed gone."""
        flight = self._flights.get(key)
        if flight is None:
            shared = self._finished.get(key)
            if shared is None:
                raise LeaderGone("flight vanished")
            return shared
        try:
            return await asyncio.wait_for(asyncio.shield(flight.future), self._lease_s)
        except TimeoutError:
            await self.fail(key, f"leader silent for {self._lease_s:.0f}s")
            raise LeaderGone("leader lost") from None

    async def finish(self, key: str, output: SharedOutput) -> SharedOutput:
        """See ``Flights.finish``."""
        flight = self._flights.pop(key, None)
        sharers = 1 + (flight.waiters if flight else 0)
        shared = replace(output, joules=output.joules / sharers, sharers=sharers)
        if flight is not None and not flight.future.done():
            flight.future.set_result(shared)
        self._finished[key] = shared
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)
        return shared

    async def fail(self, key: str, error: str) -> None:
        """See ``Flights.fail``."""
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.future.done():
            flight.future.set_exception(LeaderGone(error))
            flight.future.exception()  # retrieved: a flight nobody waits on is fine

    async def leave(self, key: str) -> SharedOutput | None:
        """See ``Flights.leave``."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters -= 1
            return None
        return self._finished.get(key)


def owner_index(key: str, owners: Sequence[str]) -> int:
    """Rendezvous hashing: the owner of ``key`` among ``owners`` (stable when one is added)."""
    scores = [hashlib.sha256(f"{owner}|{key}".encode()).digest() for owner in owners]
    return max(range(len(owners)), key=scores.__getitem__)


class RemoteFlights:
    """``Flights`` spread over coalescer actors; each key lives on exactly one of them."""

    def __init__(self, names: Sequence[str], handles: Sequence[Any]) -> None:
        self._names = list(names)
        self._handles = list(handles)

    def _owner(self, key: str) -> Any:
        return self._handles[owner_index(key, self._names)]

    async def claim(self, key: str) -> bool:
        """See ``Flights.claim``."""
        return await self._owner(key).claim.remote(key)

    async def wait(self, key: str) -> SharedOutput:
        """See ``Flights.wait``."""
        status, value = await self._owner(key).wait.remote(key)
        if status != "ok":
            raise LeaderGone(value)
        return value

    async def finish(self, key: str, output: SharedOutput) -> SharedOutput:
        """See ``Flights.finish``."""
        return await self._owner(key).finish.remote(key, output)

    async def fail(self, key: str, error: str) -> None:
        """See ``Flights.fail``."""
        await self._owner(key).fail.remote(key, error)

    async def leave(self, key: str) -> SharedOutput | None:
        """See ``Flights.leave``."""
        return await self._owner(key).leave.remote(key)


COALESCER_NAMESPACE = "wattserve"


def coalescer_actor_name(index: int) -> str:
    """Ray actor name of coalescer ``index``."""
    return f"wattserve-coalescer-{index}"
