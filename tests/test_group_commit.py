"""Group commit: concurrent requests' rows share transactions, each caller waits for its own."""

import asyncio

import pytest
import sqlalchemy as sa

from wattserve.scheduler.group_commit import GroupCommit
from wattserve.telemetry.ledger import LedgerRow, LedgerStore


def row(request_id, status="ok"):
    return LedgerRow(
        request_id=request_id, image_index=0, variant="v", quality="draft",
        route_reason="cheapest_capable", batch_id="bat_1", batch_size=1, joules=1.0,
        energy_source="simulated", cache="miss", status=status, latency_ms=5.0, seed=1,
        width_px=64, height_px=64,
    )  # fmt: skip


@pytest.fixture
def ledger(tmp_path):
    return LedgerStore(f"sqlite:///{tmp_path}/ledger.db")


async def test_concurrent_writes_share_transactions_and_each_row_lands_once(ledger):
    writes = GroupCommit(ledger)
    await asyncio.gather(*(writes.record([row(f"r{i}", "pending")]) for i in range(50)))
    await asyncio.gather(*(writes.settle([row(f"r{i}")]) for i in range(50)))
    await asyncio.gather(*(writes.settle([row(f"hit{i}")]) for i in range(50)))  # never pending
    rows = ledger.window(None, None)
    assert len(rows) == 100 and {r.status for r in rows} == {"ok"}
    # each burst was handed in before the writer ran: one transaction per burst
    assert writes.transactions == 3


async def test_a_cancelled_caller_still_gets_its_rows_committed(ledger):
    writes = GroupCommit(ledger)
    blocker = asyncio.create_task(writes.settle([row("first")]))
    waiter = asyncio.create_task(writes.settle([row("second")]))
    await asyncio.sleep(0)  # both handed in
    waiter.cancel()
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await waiter
    deadline = asyncio.get_running_loop().time() + 10
    while len(ledger.window(None, None)) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the cancelled row never landed"
        await asyncio.sleep(0.01)


async def test_a_failed_transaction_fails_every_caller_in_it_and_the_next_group_runs(ledger):
    writes = GroupCommit(ledger)
    with ledger.engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TRIGGER no_boom BEFORE INSERT ON ledger WHEN NEW.request_id = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'no'); END"
        ))  # fmt: skip
    results = await asyncio.gather(writes.settle([row("boom")]), writes.settle([row("fine")]),
                                   return_exceptions=True)  # fmt: skip
    # one group, one transaction: both callers hear of its failure, neither row landed
    assert all(isinstance(r, sa.exc.IntegrityError) for r in results)
    await writes.settle([row("after")])
    assert [r.request_id for r in ledger.window(None, None)] == ["after"]
