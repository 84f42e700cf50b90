"""Group commit of ledger rows: one transaction for every request that wrote meanwhile.

Why: each request writes its rows twice (accepted, then settled) and a transaction per
write costs a commit: an fsync and the database's one write lock on SQLite, a round trip
on Postgres. Under load that caps a replica's requests/s at its commit rate and queues
every request behind the others' commits. Here requests hand their rows over and await;
one task writes everything handed in while the previous transaction ran, in one
transaction (``LedgerStore.write``), then answers each. There is no timer: a lone write
goes out at once, and groups grow by themselves as load rises. A caller is answered only
after its rows are committed, so a response never runs ahead of its ledger row, and a
caller that is cancelled meanwhile does not take its rows out of the group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from wattserve.telemetry.ledger import LedgerStore, LedgerValues

log = structlog.get_logger(__name__)


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Write:
    accepted: Sequence[LedgerValues]
    final: Sequence[LedgerValues]
    done: asyncio.Future[None] = field(default_factory=_future)


class GroupCommit:
    """Accepts and settles ledger rows of concurrent requests, one transaction per group.

    One instance per event loop (per scheduler replica); ``ledger`` does the writing.
    """

    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger
        self._queued: list[_Write] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0  # how many groups were written (for tests and benchmarks)

    async def record(self, rows: Sequence[LedgerValues]) -> None:
        """Insert ``rows`` (``LedgerStore.record``); return once committed.

        Pending rows of a request accepted, or the final rows of one that never had any.
        """
        await self._write(_Write(rows, ()))

    async def settle(self, rows: Sequence[LedgerValues]) -> None:
        """Finalise ``rows`` (``LedgerStore.settle``); return once committed."""
        await self._write(_Write((), rows))

    async def _write(self, write: _Write) -> None:
        if not write.accepted and not write.final:
            return
        self._queued.append(write)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(write.done)  # cancelled or not, the rows are in the group

    async def _drain(self) -> None:
        while self._queued:
            group, self._queued = self._queued, []
            accepted = [row for w in group for row in w.accepted]
            final = [row for w in group for row in w.final]
            try:
                await asyncio.to_thread(self.ledger.write, accepted, final)
            except Exception as exc:  # each request fails as its own write would have
                log.warning("ledger_write_failed", requests=len(group), error=repr(exc))
                for w in group:
                    w.done.set_exception(exc)
                    w.done.exception()  # retrieved here too: a cancelled caller awaits none
            else:
                for w in group:
                    w.done.set_result(None)
            self.transactions += 1
