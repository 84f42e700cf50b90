"""Coalescer actors: the owners of in-flight outputs when several scheduler replicas run."""

from __future__ import annotations

from typing import Any

import ray

from wattserve.scheduler.coalescing import (
    COALESCER_NAMESPACE,
    LeaderGone,
    LocalFlights,
    SharedOutput,
    coalescer_actor_name,
)


@ray.remote(num_cpus=0, max_restarts=3)
class CoalescerActor:
    """Hosts a ``LocalFlights`` for the keys that hash to it (an asyncio actor)."""

    def __init__(self, lease_s: float) -> None:
        self._flights = LocalFlights(lease_s)

    async def claim(self, key: str, holder: str | None = None) -> bool:
        """See ``Flights.claim``."""
        return await self._flights.claim(key, holder)

    async def beat(self, holder: str) -> None:
        """See ``Flights.beat``."""
        await self._flights.beat(holder)

    async def wait(self, key: str) -> tuple[str, Any]:
        """``("ok", SharedOutput)`` or ``("failed", reason)``: plain data across Ray."""
        try:
            return "ok", await self._flights.wait(key)
        except LeaderGone as exc:
            return "failed", exc.message

    async def finish(self, key: str, output: SharedOutput) -> SharedOutput:
        """See ``Flights.finish``."""
        return await self._flights.finish(key, output)

    async def fail(self, key: str, error: str) -> None:
        """See ``Flights.fail``."""
        await self._flights.fail(key, error)

    async def leave(self, key: str) -> SharedOutput | None:
        """See ``Flights.leave``."""
        return await self._flights.leave(key)


def start_coalescers(count: int, lease_s: float = 300.0) -> list[Any]:
    """Start (or find) ``count`` named, detached coalescer actors."""
    handles = [
        CoalescerActor.options(
            name=coalescer_actor_name(i),
            namespace=COALESCER_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
        ).remote(lease_s)
        for i in range(count)
    ]
    ray.get([h.leave.remote("__ready__") for h in handles])
    return handles
