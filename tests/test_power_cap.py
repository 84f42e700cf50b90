"""Admission under a power cap: pure rules, then real workers on a simulated GPU."""

import asyncio

import pytest

from wattserve import AdmissionRejected, GenerationRequest
from wattserve.policies.admission import HeldOutput, held_fate
from wattserve.policies.policy import Budget, Policy
from wattserve.scheduler.leases import LocalLeases
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore


def test_held_outputs_wait_then_move_once_then_are_refused():
    held = HeldOutput(1, "big", enqueued_s=0.0, deadline_s=None, moved=False)
    assert held_fate(held, 1.0, max_hold_s=5, cheaper_variant="small") == "hold"
    assert held_fate(held, 5.0, max_hold_s=5, cheaper_variant="small") == "move"
    assert held_fate(held, 5.0, max_hold_s=5, cheaper_variant=None) == "reject"
    moved = HeldOutput(1, "small", 0.0, None, moved=True)
    assert held_fate(moved, 6.0, max_hold_s=5, cheaper_variant="tiny") == "reject"
    urgent = HeldOutput(1, "big", 0.0, deadline_s=0.5, moved=False)
    assert held_fate(urgent, 0.6, max_hold_s=5, cheaper_variant=None) == "reject"


def request(**kw):
    return GenerationRequest(**{"prompt": "capped", "width_px": 64, "height_px": 64, **kw})


@pytest.fixture
def watch_power(inprocess_pool):
    """Sample the simulated GPU's power while a test runs; yields the samples list."""
    samples: list[float] = []

    async def sample(stop: asyncio.Event):
        while not stop.is_set():
            node, _ = inprocess_pool.agent.status()
            samples.append(node.power_w)
            await asyncio.sleep(0.005)

    return sample, samples


async def run_capped(scheduler, requests, sample):
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(stop))
    results = await asyncio.gather(
        *(scheduler.generate(r) for r in requests), return_exceptions=True
    )
    stop.set()
    await sampler
    return results


def capped_scheduler(catalog, pool, ledger, cap_w, max_hold_s):
    """A scheduler under a cluster cap, reading live power from the pool's simulated GPU."""

    def budget():
        return Budget(cluster_cap_w=cap_w)

    leases = LocalLeases(catalog, budget=budget,
                         cluster_power_w=lambda: pool.agent.status()[0].power_w)  # fmt: skip
    return Scheduler(catalog, Policy(), pool, ledger, budget=budget, leases=leases,
                     max_hold_s=max_hold_s)  # fmt: skip


async def test_cap_holds_then_serves_everything_without_exceeding_it(
    catalog, inprocess_pool, tmp_path, watch_power
):
    sample, samples = watch_power
    ledger = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    scheduler = capped_scheduler(catalog, inprocess_pool, ledger, cap_w=480, max_hold_s=30)
    results = await run_capped(
        scheduler, [request(seed=i, quality="standard") for i in range(6)], sample
    )
    assert all(not isinstance(r, Exception) for r in results)
    assert max(samples) <= 480  # 70 W idle + one 400 W batch at a time
    assert {r.wattserve.receipts[0].variant for r in results} == {"tiny-sd-medium"}
    assert len(ledger.recent(100)) == 6


async def test_work_moves_to_a_lower_drawing_variant_or_is_refused_with_429(
    catalog, inprocess_pool, tmp_path, watch_power
):
    sample, samples = watch_power
    ledger = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    scheduler = capped_scheduler(catalog, inprocess_pool, ledger, cap_w=440, max_hold_s=0.2)
    scheduler.profile.observe("tiny-sd-medium", 1, joules_per_output=1.0, latency_s=0.1)
    draft = [request(seed=100 + i, quality="draft") for i in range(3)]  # routed to medium now
    high = [request(seed=200 + i, quality="high") for i in range(2)]  # only large qualifies
    results = await run_capped(scheduler, draft + high, sample)
    for moved in results[:3]:
        receipt = moved.wattserve.receipts[0]
        assert (receipt.variant, receipt.route_reason) == ("tiny-sd-turbo", "downgraded_power_cap")
    for refused in results[3:]:
        assert isinstance(refused, AdmissionRejected) and refused.retry_after_s > 0
        assert "power cap 440 W" in refused.message
    assert max(samples) <= 440
    rows = ledger.recent(100)
    assert len(rows) == 5  # nobody lost: refused outputs are on the books as failed
    assert sum(r.status == "failed" for r in rows) == 2
