"""The shadow audit on the request path: real in-process workers, SQLite, the tiny CLIP."""

from __future__ import annotations

import asyncio
import random

import pytest

from wattserve import GenerationRequest
from wattserve.policies.audit import tolerances
from wattserve.policies.plans import BatchOutput, BatchPlan
from wattserve.policies.policy import Policy
from wattserve.scheduler.audit import Auditor
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.audits import AuditStore, audit_report
from wattserve.telemetry.ledger import LedgerStore
from wattserve.telemetry.quality import ClipScorer
from wattserve.workers.pipelines import TINY_CLIP, resolve_clip_model

ALWAYS = Policy(audit_rate=1.0)  # every off-reference output audited


def request(**kw):
    return GenerationRequest(**{"prompt": "a red cube", "width_px": 64, "height_px": 64, **kw})


class GatedPool:
    """The in-process pool, with the large variant held until the test opens the gate."""

    def __init__(self, inner):
        self.inner, self.gate, self.order = inner, asyncio.Event(), []

    def available(self):
        return self.inner.available()

    async def run(self, plan: BatchPlan) -> BatchOutput:
        self.order.append((plan.variant, plan.background))
        if plan.variant == "tiny-sd-large":
            await self.gate.wait()
        return await self.inner.run(plan)


@pytest.fixture
def stores(tmp_path):
    url = f"sqlite:///{tmp_path}/w.db"
    return LedgerStore(url), AuditStore(url)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ClipScorer(resolve_clip_model(TINY_CLIP, tmp_path_factory.mktemp("clip")))


async def test_a_cheap_output_is_regenerated_on_the_reference_scored_and_booked(
    catalog, inprocess_pool, stores, clip
):
    ledger, audits = stores
    auditor = Auditor(audits, clip=clip)
    scheduler = Scheduler(catalog, ALWAYS, inprocess_pool, ledger, auditor=auditor)
    response = await scheduler.generate(request(seed=5, quality="draft"))
    assert response.wattserve.receipts[0].variant == "tiny-sd-turbo"
    await asyncio.wait_for(auditor.idle.wait(), 120)
    (row,) = audits.rows()
    assert (row.status, row.variant, row.cause, row.reference_variant, row.tier) == (
        "scored", "tiny-sd-turbo", "variant_choice", "tiny-sd-large", "draft")  # fmt: skip
    assert row.joules > 0 and row.energy_source == "simulated" and row.batch_id
    assert row.measure == "clip_drop" and row.random_weights  # different models: CLIP only
    assert row.clip_drop == pytest.approx(row.clip_reference - row.clip_served)
    assert 0 < row.ssim <= 1 and row.psnr_db > 0
    # the audit's energy is its own: no ledger row for it, the request's rows unchanged
    assert [r.request_id for r in ledger.recent(10)] == [response.wattserve.request_id]
    (group,) = audit_report(audits.rows(), tolerances(0.02, 0.8), min_samples=8)
    assert group["audited"] == 1 and group["verdict"] == "undecided"
    assert group["random_weight_scores"]


async def test_the_reference_own_outputs_and_baseline_requests_are_not_audited(
    catalog, inprocess_pool, stores
):
    ledger, audits = stores
    auditor = Auditor(audits)
    scheduler = Scheduler(catalog, ALWAYS, inprocess_pool, ledger, auditor=auditor)
    await scheduler.generate(request(seed=6, quality="high"))  # the reference itself
    await scheduler.generate(request(seed=7, quality="draft", policy="baseline"))
    await asyncio.wait_for(auditor.idle.wait(), 60)
    assert audits.rows() == []


async def test_audit_work_never_runs_ahead_of_user_work(catalog, inprocess_pool, stores):
    ledger, audits = stores
    pool = GatedPool(inprocess_pool)
    auditor = Auditor(audits)
    policy = Policy(max_wait_s=0.0, audit_rate=1.0)
    scheduler = Scheduler(catalog, policy, pool, ledger, auditor=auditor)
    first = asyncio.create_task(scheduler.generate(request(seed=8, quality="high")))
    await poll_async(lambda: pool.order[:1] == [("tiny-sd-large", False)])  # holds large
    await scheduler.generate(request(seed=9, quality="draft"))  # turbo: its audit queues
    await poll_async(lambda: scheduler.batcher.queued >= 1)  # the audit waits for large
    later = asyncio.create_task(scheduler.generate(request(seed=10, quality="high")))
    await poll_async(lambda: scheduler.batcher.queued >= 2)  # the user's output waits too
    pool.gate.set()
    await asyncio.gather(first, later)
    await asyncio.wait_for(auditor.idle.wait(), 120)
    assert pool.order == [("tiny-sd-large", False), ("tiny-sd-turbo", False),
                          ("tiny-sd-large", False), ("tiny-sd-large", True)]  # fmt: skip
    assert [r.status for r in audits.rows()] == ["scored"]


async def test_an_audit_without_spare_capacity_in_its_window_is_dropped_and_counted(
    catalog, inprocess_pool, stores
):
    ledger, audits = stores
    pool = GatedPool(inprocess_pool)
    auditor = Auditor(audits, window_s=0.5)
    policy = Policy(max_wait_s=0.0, audit_rate=1.0)
    scheduler = Scheduler(catalog, policy, pool, ledger, auditor=auditor)
    first = asyncio.create_task(scheduler.generate(request(seed=11, quality="high")))
    await poll_async(lambda: bool(pool.order))
    await scheduler.generate(request(seed=12, quality="draft"))
    await asyncio.wait_for(auditor.idle.wait(), 30)  # the large replica never came free
    (row,) = audits.rows()
    assert row.status == "dropped" and row.joules == 0 and "spare capacity" in row.detail
    assert scheduler.batcher.queued == 0  # withdrawn, not left to run later
    pool.gate.set()
    await first


def test_sampling_draws_at_the_rate(tmp_path):
    auditor = Auditor(AuditStore(f"sqlite:///{tmp_path}/a.db"), rng=random.Random(1))
    drawn = sum(auditor.draw(0.1) for _ in range(5000))
    assert 400 < drawn < 600  # binomial(5000, 0.1): 500 +- 21
    assert sum(auditor.draw(0.0) for _ in range(100)) == 0  # 0 disables


def test_a_tenants_own_rate_overrides_the_policys():
    policy = Policy(audit_rate=0.5, tenant_audit_rates={"acme": 0.0})
    assert policy.audit_rate_for("acme") == 0.0
    assert policy.audit_rate_for("other") == 0.5 and policy.audit_rate_for(None) == 0.5


async def poll_async(ready, timeout_s: float = 60.0) -> None:
    """Yield to the event loop until ``ready()``; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not ready():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
