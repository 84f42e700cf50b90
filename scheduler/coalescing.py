"""Single-flight coalescing: one generation per identical output in flight.

The first request for a flight key leads: it generates. Every identical request that
arrives before the leader finishes waits on the same flight and gets the same bytes.
When the generation completes, its energy is shared equally by the leader and the
waiters present at that moment (so the ledger still sums to the batch's joules); a
request arriving after completion finds the output in the result cache instead.

A cancelled waiter leaves the flight (or keeps its share if the output was already
shared out) and cancels nobody. If the leader fails, is cancelled or is not heard from
within the lease, the flight fails and each waiter retries once: one of them becomes
the new leader, nobody hangs, nobody is charged twice. Across replicas a leader's
replica also heartbeats (``beat``, every ``LEAD_BEAT_S``); a flight whose leader's
replica has been silent for ``LEAD_STALE_S`` fails within seconds, not at the lease.

Two registries implement ``Flights``: ``LocalFlights`` for one event loop (one
scheduler replica), and ``RemoteFlights``, which routes each key to its owner among a
few ``CoalescerActor``s by rendezvous hashing so that scheduler replicas never both
generate the same output. The actor holds a ``LocalFlights`` of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from wattserve import WattserveError

log = structlog.get_logger(__name__)

DEFAULT_LEASE_S = 300.0
LEAD_BEAT_S = 1.0  # how often a scheduler replica says its flights' leader is alive
LEAD_STALE_S = 5.0  # a leader's replica silent this long is gone: its waiters take over
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

    async def beat(self) -> None:
        """This replica is alive: the flights it leads are not orphans."""
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
    holder: str | None  # the leader's replica (None: this event loop's own)
    waiters: int = 0


class LocalFlights:
    """Flights of one event loop (a replica's own, or a coalescer actor's for many)."""

    def __init__(
        self,
        lease_s: float = DEFAULT_LEASE_S,
        *,
        stale_s: float = LEAD_STALE_S,
        clock: Any = time.monotonic,
    ) -> None:
        self._flights: dict[str, _Flight] = {}
        self._finished: OrderedDict[str, SharedOutput] = OrderedDict()
        self._lease_s = lease_s
        self._stale_s = stale_s
        self._clock = clock
        self._beats: dict[str, float] = {}  # leader replica -> last heard

    def __len__(self) -> int:
        return len(self._flights)

    async def claim(self, key: str, holder: str | None = None) -> bool:
        """See ``Flights.claim``; ``holder`` is the claiming replica (it must beat)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters += 1
            return False
        self._flights[key] = _Flight(asyncio.get_running_loop().create_future(), holder)
        if holder is not None:
            self._beats[holder] = self._clock()
        return True

    async def beat(self, holder: str | None = None) -> None:
        """See ``Flights.beat``."""
        if holder is not None:
            self._beats[holder] = self._clock()

    def _silent_s(self, flight: _Flight) -> float:
        if flight.holder is None:
            return 0.0
        return self._clock() - self._beats.get(flight.holder, float("-inf"))

    async def wait(self, key: str) -> SharedOutput:
        """See ``Flights.wait``.

        A leader silent for the lease, or whose replica stopped beating, is presumed gone.
        """
        flight = self._flights.get(key)
        if flight is None:
            shared = self._finished.get(key)
            if shared is None:
                raise LeaderGone("flight vanished")
            return shared
        deadline = self._clock() + self._lease_s
        while True:
            left_s = deadline - self._clock()
            try:
                step_s = min(left_s, self._stale_s / 2) if flight.holder else left_s
                return await asyncio.wait_for(asyncio.shield(flight.future), max(step_s, 0))
            except TimeoutError:
                if self._silent_s(flight) > self._stale_s:
                    why = f"leader's replica {flight.holder} silent for {self._stale_s:.0f}s"
                elif self._clock() >= deadline:
                    why = f"leader silent for {self._lease_s:.0f}s"
                else:
                    continue
            await self.fail(key, why)
            raise LeaderGone("leader lost")

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
    """``Flights`` spread over coalescer actors; each key lives on exactly one of them.

    A coalescer that cannot be reached (dead, restarting with empty flights) costs only
    sharing: the caller leads on its own, a waiter retries as if its leader were gone.
    """

    def __init__(self, names: Sequence[str], handles: Sequence[Any], holder: str) -> None:
        self._names = list(names)
        self._handles = list(handles)
        self._holder = holder

    def _owner(self, key: str) -> Any:
        return self._handles[owner_index(key, self._names)]

    async def claim(self, key: str) -> bool:
        """See ``Flights.claim``; True (lead alone) when the owner is unreachable."""
        try:
            return await self._owner(key).claim.remote(key, self._holder)
        except Exception as exc:
            log.warning("coalescer_unreachable", call="claim", error=repr(exc))
            return True

    async def beat(self) -> None:
        """See ``Flights.beat``: tell every coalescer (few) that this replica lives."""
        await asyncio.gather(
            *(h.beat.remote(self._holder) for h in self._handles), return_exceptions=True
        )

    async def wait(self, key: str) -> SharedOutput:
        """See ``Flights.wait``."""
        try:
            status, value = await self._owner(key).wait.remote(key)
        except Exception as exc:
            raise LeaderGone(f"coalescer unreachable: {type(exc).__name__}") from None
        if status != "ok":
            raise LeaderGone(value)
        return value

    async def finish(self, key: str, output: SharedOutput) -> SharedOutput:
        """See ``Flights.finish``; the leader keeps the whole output if nobody can share."""
        try:
            return await self._owner(key).finish.remote(key, output)
        except Exception as exc:
            log.warning("coalescer_unreachable", call="finish", error=repr(exc))
            return output

    async def fail(self, key: str, error: str) -> None:
        """See ``Flights.fail``."""
        try:
            await self._owner(key).fail.remote(key, error)
        except Exception as exc:  # its waiters learn it from their own failed wait
            log.warning("coalescer_unreachable", call="fail", error=repr(exc))

    async def leave(self, key: str) -> SharedOutput | None:
        """See ``Flights.leave``."""
        try:
            return await self._owner(key).leave.remote(key)
        except Exception as exc:
            log.warning("coalescer_unreachable", call="leave", error=repr(exc))
            return None


COALESCER_NAMESPACE = "wattserve"


def coalescer_actor_name(index: int) -> str:
    """Ray actor name of coalescer ``index``."""
    return f"wattserve-coalescer-{index}"
