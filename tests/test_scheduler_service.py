"""The request path without Ray: real workers in-process, real SQLite ledger."""

import asyncio
import random

import pytest

from tests.conftest import InProcessPool
from wattserve import GenerationFailed, GenerationRequest
from wattserve.policies.policy import Policy
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 0.25  # every reading advances time: latency is deterministic
        return self.now


def request(**kw):
    return GenerationRequest(**{"prompt": "a red cube", "width_px": 64, "height_px": 64, **kw})


@pytest.fixture
def ledger(tmp_path):
    return LedgerStore(f"sqlite:///{tmp_path}/ledger.db")


async def test_receipts_match_ledger_rows_and_energy_is_labeled(catalog, inprocess_pool, ledger):
    scheduler = Scheduler(catalog, Policy(), inprocess_pool, ledger, clock=FakeClock())
    response = await scheduler.generate(request(n=2, seed=41, quality="draft", user="u1"))
    receipts = response.wattserve.receipts
    assert [r.seed for r in receipts] == [41, 42]
    assert {r.variant for r in receipts} == {"tiny-sd-turbo"}
    assert all(
        r.energy_source == "simulated" and r.joules > 0 and r.cache == "miss" for r in receipts
    )
    assert receipts[0].batch_size == 2 and receipts[0].batch_id == receipts[1].batch_id
    # latency is measured on the injected clock, from arrival to completion
    assert receipts[0].latency_ms > 0 and receipts[0].latency_ms == receipts[1].latency_ms
    # the batch launched after arrival and before the answer: the split of that latency
    assert 0 < receipts[0].launch_ms < receipts[0].latency_ms
    rows = ledger.for_request(response.wattserve.request_id)
    assert [(r.joules, r.status, r.user, r.launch_ms) for r in rows] == [
        (x.joules, "ok", "u1", x.launch_ms) for x in receipts
    ]
    assert len(response.data) == 2


async def test_unseeded_requests_get_a_recorded_seed(catalog, inprocess_pool, ledger):
    scheduler = Scheduler(catalog, Policy(), inprocess_pool, ledger, rng=random.Random(3))
    response = await scheduler.generate(request(quality="draft"))
    seed = response.wattserve.receipts[0].seed
    assert seed == random.Random(3).randrange(2**31)
    assert ledger.for_request(response.wattserve.request_id)[0].seed == seed


async def test_failed_batch_is_recorded_once_with_estimated_energy(catalog, models_dir, ledger):
    pool = InProcessPool(catalog, models_dir, fail_with=RuntimeError("CUDA error: boom"))
    scheduler = Scheduler(catalog, Policy(), pool, ledger, clock=FakeClock())
    with pytest.raises(GenerationFailed, match="boom"):
        await scheduler.generate(request(n=3, seed=1, quality="high"))
    rows = ledger.recent(10)
    assert len(rows) == 3
    assert {(r.status, r.energy_source, r.variant) for r in rows} == {
        ("failed", "estimated", "tiny-sd-large")
    }
    assert all("boom" in r.error for r in rows)
    # 0.25 s of scheduler wall time at 450 W, split over three outputs
    assert sum(r.joules for r in rows) == pytest.approx(450 * 0.25)


class BlockingPool:
    """Answers only when the test says so; here it never does, so the caller must cancel."""

    def __init__(self, names):
        self._names = frozenset(names)
        self.started = asyncio.Event()

    def available(self):
        return self._names

    async def run(self, plan):
        self.started.set()
        await asyncio.Event().wait()


async def test_cancelled_request_is_recorded_once_and_not_as_success(catalog, ledger):
    pool = BlockingPool(catalog.names)
    scheduler = Scheduler(catalog, Policy(), pool, ledger, clock=FakeClock())
    task = asyncio.create_task(scheduler.generate(request(n=2, seed=5, quality="draft")))
    await asyncio.wait_for(pool.started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = ledger.recent(10)
    assert [(r.status, r.error, r.energy_source) for r in rows] == [
        ("cancelled", "cancelled by client", "estimated")
    ] * 2
