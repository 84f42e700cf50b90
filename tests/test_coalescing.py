"""Single-flight coalescing and the result cache in the request path (real workers, no Ray)."""

import asyncio
import hashlib
from dataclasses import replace

import pytest

from wattserve import GenerationFailed, GenerationRequest
from wattserve.policies.policy import Policy
from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore


def request(**kw):
    return GenerationRequest(**{"prompt": "a red cube", "width_px": 64, "height_px": 64, **kw})


def sha(response, index=0):
    import base64

    return hashlib.sha256(base64.b64decode(response.data[index].b64_json)).hexdigest()


class GatedPool:
    """Wraps a real pool; every batch waits for the test to open the gate."""

    def __init__(self, inner, fail_first=0):
        self.inner, self.gate, self.fail_first = inner, asyncio.Event(), fail_first
        self.plans, self.outputs = [], []

    def available(self):
        return self.inner.available()

    async def run(self, plan):
        self.plans.append(plan)
        await self.gate.wait()
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("worker crashed")
        output = await self.inner.run(plan)
        self.outputs.append(output)
        return output


@pytest.fixture
def stores(tmp_path):
    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    return ledger, ResultCache(ledger.engine, tmp_path / "cache")


async def until(predicate):
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def test_identical_concurrent_requests_make_one_generation_and_share_its_joules(
    catalog, inprocess_pool, stores
):
    ledger, cache = stores
    pool = GatedPool(inprocess_pool)
    scheduler = Scheduler(catalog, Policy(), pool, ledger, cache=cache)
    tasks = [asyncio.create_task(scheduler.generate(request(seed=7))) for _ in range(16)]
    await until(lambda: len(pool.plans) == 1 and len(scheduler._flights) == 1)
    await asyncio.sleep(0.05)  # let every request join before the batch finishes
    pool.gate.set()
    responses = await asyncio.gather(*tasks)
    assert len(pool.plans) == 1
    assert len({sha(r) for r in responses}) == 1
    receipts = [r.wattserve.receipts[0] for r in responses]
    assert sorted(r.cache for r in receipts) == ["coalesced"] * 15 + ["miss"]
    assert len({r.batch_id for r in receipts}) == 1
    rows = ledger.recent(100)
    assert len(rows) == 16 and len({r.request_id for r in rows}) == 16
    assert sum(r.joules for r in rows) == pytest.approx(pool.outputs[0].joules)
    assert len({round(r.joules, 9) for r in rows}) == 1


async def test_repeat_is_a_cache_hit_with_zero_joules_even_after_restart(
    catalog, inprocess_pool, stores, tmp_path
):
    ledger, cache = stores
    first = await Scheduler(catalog, Policy(), inprocess_pool, ledger, cache=cache).generate(
        request(seed=11, n=2, quality="draft")
    )
    restarted_ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    restarted = Scheduler(
        catalog, Policy(), inprocess_pool, restarted_ledger,
        cache=ResultCache(restarted_ledger.engine, tmp_path / "cache"),
    )  # fmt: skip
    plans_before = len(inprocess_pool.plans)
    again = await restarted.generate(request(seed=11, n=2, quality="draft"))
    assert len(inprocess_pool.plans) == plans_before
    # all hits (from disk after the restart): no pending rows first, one write of the final
    assert restarted.writes.transactions == 1
    assert [r.cache for r in restarted_ledger.for_request(again.wattserve.request_id)] == [
        "hit",
        "hit",
    ]
    # and the next repeat is answered from the memory tier, the files gone meanwhile
    for blob in (tmp_path / "cache").rglob("*.png"):
        blob.unlink()
    third = await restarted.generate(request(seed=11, n=2, quality="draft"))
    assert [sha(third, i) for i in range(2)] == [sha(first, i) for i in range(2)]
    assert [sha(again, i) for i in range(2)] == [sha(first, i) for i in range(2)]
    for receipt in again.wattserve.receipts:
        assert (receipt.cache, receipt.joules, receipt.route_reason) == ("hit", 0.0, "cache_hit")
        assert receipt.launch_ms is None  # no batch of its own
        assert receipt.batch_id == f"hit:{first.wattserve.request_id}.{receipt.image_index}"


async def test_cache_serves_lower_tiers_from_better_variants_not_the_reverse(
    catalog, inprocess_pool, stores
):
    ledger, cache = stores
    scheduler = Scheduler(catalog, Policy(), inprocess_pool, ledger, cache=cache)
    await scheduler.generate(request(seed=21, quality="draft"))  # made by turbo
    high = await scheduler.generate(request(seed=21, quality="high"))
    assert high.wattserve.receipts[0].cache == "miss"  # turbo's image is not good enough
    draft = await scheduler.generate(request(seed=21, quality="draft"))
    assert (draft.wattserve.receipts[0].cache, draft.wattserve.receipts[0].variant) == (
        "hit", "tiny-sd-large",
    )  # fmt: skip
    forced = await scheduler.generate(request(seed=21, model="tiny-sd-medium"))
    assert forced.wattserve.receipts[0].cache == "miss"


async def test_unseeded_requests_are_neither_cached_nor_coalesced(catalog, inprocess_pool, stores):
    ledger, cache = stores
    scheduler = Scheduler(catalog, Policy(), inprocess_pool, ledger, cache=cache)
    a, b = await asyncio.gather(
        scheduler.generate(request(quality="draft")), scheduler.generate(request(quality="draft"))
    )
    assert {a.wattserve.receipts[0].cache, b.wattserve.receipts[0].cache} == {"miss"}
    assert cache.stats()["entries"] == 0


async def test_a_crashed_batch_is_retried_once_and_charged_once(catalog, inprocess_pool, stores):
    ledger, cache = stores
    pool = GatedPool(inprocess_pool, fail_first=1)
    pool.gate.set()
    scheduler = Scheduler(catalog, Policy(), pool, ledger, cache=cache)
    response = await scheduler.generate(request(seed=51, n=2))
    first, retry = pool.plans  # the same batch, run again as a new attempt with its own id
    assert replace(first, batch_id=retry.batch_id) == retry and first.batch_id != retry.batch_id
    rows = ledger.for_request(response.wattserve.request_id)
    assert [r.status for r in rows] == ["ok", "ok"]
    assert {r.batch_id for r in rows} == {retry.batch_id}  # the attempt that made them
    assert sum(r.joules for r in rows) == pytest.approx(pool.outputs[0].joules)


async def test_leader_failure_promotes_a_waiter_and_nobody_is_charged_twice(
    catalog, inprocess_pool, stores
):
    ledger, cache = stores
    pool = GatedPool(inprocess_pool, fail_first=2)  # the batch and its one retry both fail
    scheduler = Scheduler(catalog, Policy(), pool, ledger, cache=cache)
    leader = asyncio.create_task(scheduler.generate(request(seed=31)))
    await until(lambda: len(pool.plans) == 1)
    waiters = [asyncio.create_task(scheduler.generate(request(seed=31))) for _ in range(3)]
    await asyncio.sleep(0.05)
    pool.gate.set()
    with pytest.raises(GenerationFailed, match="worker crashed"):
        await leader
    served = await asyncio.gather(*waiters)
    assert len(pool.plans) == 3  # the failed batch, its retry, and a promoted waiter's batch
    assert sorted(r.wattserve.receipts[0].cache for r in served) == [
        "coalesced",
        "coalesced",
        "miss",
    ]
    rows = ledger.recent(10)
    assert len(rows) == 4 and sum(r.status == "failed" for r in rows) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_others(catalog, inprocess_pool, stores):
    ledger, cache = stores
    pool = GatedPool(inprocess_pool)
    scheduler = Scheduler(catalog, Policy(), pool, ledger, cache=cache)
    tasks = [asyncio.create_task(scheduler.generate(request(seed=41))) for _ in range(3)]
    await until(lambda: len(pool.plans) == 1)
    await asyncio.sleep(0.05)
    tasks[2].cancel()
    pool.gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert sha(done[0]) == sha(done[1])
    rows = ledger.recent(10)
    assert len(rows) == 3
    cancelled = [r for r in rows if r.status == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0].error == "cancelled by client"
    assert cancelled[0].joules == 0  # it left before the output existed: no share
    assert sum(r.joules for r in rows) == pytest.approx(pool.outputs[0].joules)
