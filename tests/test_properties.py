"""Invariants of the request path under many interleavings (hypothesis, event-driven fakes).

The pool here is a fake on purpose: it answers with distinct synthetic bytes per
(variant, prompt, seed) after a random short delay, so thousands of interleavings run in
seconds; the real workers are exercised by the other test files.
"""

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattserve import AdmissionRejected, GenerationRequest
from wattserve.policies.plans import BatchOutput, BatchPlan, WorkItem
from wattserve.policies.policy import Policy
from wattserve.scheduler.batcher import Batcher
from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore


class FakePool:
    def __init__(self, names, rng):
        self.names, self.rng, self.generated = frozenset(names), rng, []

    def available(self):
        return self.names

    async def run(self, plan: BatchPlan) -> BatchOutput:
        await asyncio.sleep(self.rng.uniform(0, 0.003))
        self.generated.extend((plan.variant, i.prompt, i.seed) for i in plan.items)
        pngs = tuple(f"{plan.variant}|{i.prompt}|{i.seed}".encode() for i in plan.items)
        return BatchOutput(plan.batch_id, pngs, 0.0, 0.001, 1.0 * len(pngs), "simulated")


@settings(max_examples=40, deadline=None)
@given(
    copies=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    unseeded=st.integers(0, 3),
    shuffle_seed=st.integers(0, 10_000),
)
def test_each_request_answered_once_and_identical_work_generated_once(
    catalog, tmp_path_factory, copies, unseeded, shuffle_seed
):
    tmp = tmp_path_factory.mktemp("prop")
    ledger = LedgerStore(f"sqlite:///{tmp}/l.db")
    rng = random.Random(shuffle_seed)
    pool = FakePool(catalog.names, rng)
    cache = ResultCache(ledger.engine, tmp / "c")
    scheduler = Scheduler(catalog, Policy(max_wait_s=0.001), pool, ledger, cache=cache)
    requests = [
        GenerationRequest(prompt=f"p{k}", width_px=64, height_px=64, seed=k, quality="draft")
        for k, count in enumerate(copies)
        for _ in range(count)
    ] + [GenerationRequest(prompt="u", width_px=64, height_px=64, quality="draft")] * unseeded
    rng.shuffle(requests)

    async def run_all():
        return await asyncio.gather(*(scheduler.generate(r) for r in requests))

    responses = asyncio.run(run_all())
    assert len(responses) == len(requests)
    ids = [r.wattserve.request_id for r in responses]
    assert len(set(ids)) == len(ids)  # answered once each
    seeded = [g for g in pool.generated if g[1] != "u"]
    assert len(seeded) == len(copies)  # one generation per distinct seeded output
    assert len(pool.generated) == len(copies) + unseeded
    rows = ledger.recent(1000)
    assert len(rows) == len(requests)  # one ledger row per output, none lost
    assert sum(r.joules for r in rows) == pytest.approx(len(pool.generated) * 1.0)


async def test_full_queue_is_refused_at_once_with_retry_after(catalog):
    pool = FakePool(catalog.names, random.Random(0))
    batcher = Batcher(pool, catalog, max_queued=2, max_wait_s=10, new_batch_id=lambda: "b")
    item = WorkItem("p", None, 1)
    first = [asyncio.create_task(batcher.submit("tiny-sd-turbo", 64, 64, item, None))
             for _ in range(2)]  # fmt: skip
    await asyncio.sleep(0)
    with pytest.raises(AdmissionRejected) as info:
        await batcher.submit("tiny-sd-turbo", 64, 64, item, None)
    assert "queue full" in info.value.message and info.value.retry_after_s >= 1
    for task in first:
        task.cancel()
