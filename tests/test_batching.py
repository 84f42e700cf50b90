"""Batch formation (pure) and the live batcher on real in-process workers."""

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattserve import GenerationRequest
from wattserve.policies.batching import BatchingSnapshot, QueuedOutput, launch_size, plan_batches
from wattserve.policies.catalog import load_catalog
from wattserve.policies.policy import Budget, Policy
from wattserve.policies.profile import EnergyProfile
from wattserve.policies.target import JoulesTarget
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore


def q(ticket, variant="v", size=64, at=0.0, deadline=None):
    return QueuedOutput(ticket, variant, size, size, at, deadline)


def snap(queued, now=0.0, free=None, cap=4, wait=0.05):
    free = {"v": 1, "w": 1} if free is None else free
    return BatchingSnapshot(now, tuple(queued), free, {"v": cap, "w": cap}, wait)


def test_full_batch_launches_at_once_and_the_rest_waits_for_a_free_replica():
    decision = plan_batches(snap([q(i) for i in range(6)], cap=4))
    assert decision.launch == ((0, 1, 2, 3),)
    assert decision.wake_at_s is None  # the remaining two wait for the replica, not a timer


def test_a_batch_is_cut_to_a_cheaper_measured_size_and_only_on_clear_evidence():
    means = {1: 417.1, 2: 424.4, 3: 421.1, 5: 416.9, 16: 411.6, 32: 419.6}  # SANA, H100
    sana = {size: (j, j) for size, j in means.items()}  # measured without spread
    assert launch_size(sana, 2) == 1  # batch 2 costs 1.7 % more per image than singles
    assert launch_size(sana, 5) == 5  # 0.05 % dearer than 1: within the margin
    assert launch_size(sana, 32) == 16  # the cheapest size, not the largest that fits
    assert launch_size(sana, 4) == 4  # never measured: launch it, and so measure it
    assert launch_size({}, 7) == 7 and launch_size({2: (1.0, 1.0)}, 1) == 1
    noisy = {1: (400.0, 440.0), 2: (410.0, 450.0)}  # a CPU: the intervals overlap
    assert launch_size(noisy, 2) == 2
    queued = [q(i) for i in range(6)]
    bounds = {"v": {1: (9.0, 9.0), 3: (10.0, 10.0)}}
    decision = plan_batches(BatchingSnapshot(0.0, tuple(queued), {"v": 2}, {"v": 3}, 0.05, bounds))
    assert decision.launch == ((0,), (1,))  # both free replicas take one output each


def test_the_profile_bounds_a_size_once_two_batches_measured_it():
    profile = EnergyProfile(load_catalog())
    profile.observe("tiny-sd-turbo", 2, joules_per_output=10.0, latency_s=0.1)
    assert profile.joules_bounds == {}  # one batch says nothing of the spread
    profile.observe("tiny-sd-turbo", 2, joules_per_output=12.0, latency_s=0.1)
    low, high = profile.joules_bounds["tiny-sd-turbo"][2]
    assert (low, high) == pytest.approx((11.0 - 2.0, 11.0 + 2.0))  # mean ± 2 x (s / sqrt 2)


def test_partial_batch_waits_until_max_wait_then_launches():
    early = plan_batches(snap([q(0, at=0.0), q(1, at=0.01)], now=0.02))
    assert early.launch == () and early.wake_at_s == 0.05
    due = plan_batches(snap([q(0, at=0.0), q(1, at=0.01)], now=0.05))
    assert due.launch == ((0, 1),)


def test_deadline_pressure_launches_early_and_orders_the_batch():
    queued = [q(0, at=0.0), q(1, at=0.001, deadline=0.03), q(2, at=0.002)]
    decision = plan_batches(snap(queued, now=0.002))
    assert decision.launch == ((1, 0, 2),)


def test_sizes_and_variants_never_mix_and_oldest_group_goes_first():
    queued = [q(0, "v", 64, at=0.2), q(1, "v", 96, at=0.1), q(2, "w", 64, at=0.0)]
    decision = plan_batches(snap(queued, now=1.0, free={"v": 1, "w": 1}))
    assert decision.launch == ((2,), (1,))  # v has one replica: the older 96px group wins


def test_no_free_replica_launches_nothing():
    assert plan_batches(snap([q(0)], now=9, free={"v": 0})).launch == ()


queued_outputs = st.lists(
    st.builds(
        QueuedOutput,
        ticket=st.integers(0, 10_000),
        variant=st.sampled_from(["v", "w"]),
        width_px=st.sampled_from([64, 96]),
        height_px=st.just(64),
        enqueued_s=st.floats(0, 1),
        deadline_s=st.none() | st.floats(0, 2),
    ),
    max_size=40,
    unique_by=lambda o: o.ticket,
)


@settings(max_examples=300, deadline=None)
@given(
    queued=queued_outputs,
    now=st.floats(0, 2),
    free_v=st.integers(0, 3),
    free_w=st.integers(0, 3),
    cap=st.integers(1, 8),
)
def test_batching_invariants(queued, now, free_v, free_w, cap):
    snapshot = snap(queued, now=now, free={"v": free_v, "w": free_w}, cap=cap)
    decision = plan_batches(snapshot)
    by_ticket = {o.ticket: o for o in queued}
    launched = [t for batch in decision.launch for t in batch]
    assert len(launched) == len(set(launched))  # nothing runs twice
    assert set(launched) <= set(by_ticket)
    for batch in decision.launch:
        assert 1 <= len(batch) <= cap
        assert len({(by_ticket[t].variant, by_ticket[t].width_px) for t in batch}) == 1
    for variant, free in (("v", free_v), ("w", free_w)):
        assert sum(by_ticket[b[0]].variant == variant for b in decision.launch) <= free
    if decision.wake_at_s is not None:
        assert decision.wake_at_s > now - 1e-9


async def test_concurrent_distinct_requests_share_batches(catalog, inprocess_pool, tmp_path):
    class Gate:
        def __init__(self):
            self.open, self.sizes = asyncio.Event(), []

        def available(self):
            return inprocess_pool.available()

        async def run(self, plan):
            self.sizes.append(len(plan.items))
            await self.open.wait()
            return await inprocess_pool.run(plan)

    pool = Gate()
    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    scheduler = Scheduler(catalog, Policy(max_wait_s=0.01), pool, ledger)
    requests = [
        GenerationRequest(prompt=f"p{i}", width_px=64, height_px=64, seed=i, quality="draft")
        for i in range(32)
    ]
    tasks = [asyncio.create_task(scheduler.generate(r)) for r in requests]
    await asyncio.sleep(0.2)
    pool.open.set()
    responses = await asyncio.gather(*tasks)
    assert len(responses) == 32 and scheduler.batcher.queued == 0
    assert sum(pool.sizes) == 32 and max(pool.sizes) == 8  # the turbo variant's cap
    rows = ledger.recent(100)
    assert len(rows) == 32 and max(r.batch_size for r in rows) > 1
    by_batch = {}
    for row in rows:
        by_batch.setdefault(row.batch_id, []).append(row)
    assert all(len(members) == members[0].batch_size for members in by_batch.values())


async def test_over_the_joules_per_output_target_batches_harder(catalog, inprocess_pool, tmp_path):
    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    strict = Scheduler(catalog, Policy(max_wait_s=0.01), inprocess_pool, ledger,
                       budget=lambda: Budget(joules_per_output_target=1.0))  # fmt: skip
    lenient = Scheduler(catalog, Policy(max_wait_s=0.01), inprocess_pool, ledger,
                        budget=lambda: Budget(joules_per_output_target=1e9))  # fmt: skip
    for scheduler in (strict, lenient):
        assert scheduler.rolling_joules_per_output is None and not scheduler.over_target
        await scheduler.generate(GenerationRequest(prompt="t", width_px=64, height_px=64,
                                                   quality="draft"))  # fmt: skip
        assert scheduler.rolling_joules_per_output > 1.0
    assert strict.over_target and strict.batcher.max_wait_s == 0.04
    assert not lenient.over_target and lenient.batcher.max_wait_s == 0.01


def test_solo_outputs_run_alone_and_without_waiting():
    queued = [
        QueuedOutput(0, "v", 64, 64, 0.0, solo=True),
        QueuedOutput(1, "v", 64, 64, 0.0, solo=True),
        q(2, at=0.0),
    ]
    decision = plan_batches(snap(queued, now=0.0, free={"v": 3}))
    assert sorted(decision.launch) == [(0,), (1,)]  # the shared output still waits to fill


async def test_baseline_requests_share_nothing(catalog, inprocess_pool, tmp_path):
    from wattserve.scheduler.cache import ResultCache

    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    scheduler = Scheduler(catalog, Policy(), inprocess_pool, ledger,
                          cache=ResultCache(ledger.engine, tmp_path / "c"))  # fmt: skip
    same = GenerationRequest(prompt="b", width_px=64, height_px=64, seed=3, quality="draft",
                             policy="baseline")  # fmt: skip
    before = len(inprocess_pool.plans)
    responses = await asyncio.gather(*(scheduler.generate(same) for _ in range(3)))
    await scheduler.generate(same)
    assert len(inprocess_pool.plans) - before == 4  # no coalescing, no cache
    receipts = [r.wattserve.receipts[0] for r in responses]
    assert {(r.variant, r.batch_size, r.cache, r.route_reason) for r in receipts} == {
        ("tiny-sd-large", 1, "miss", "baseline")
    }


async def test_a_new_budget_applies_to_the_next_decision_without_restart(
    catalog, inprocess_pool, tmp_path
):
    budget = {"now": Budget(joules_per_output_target=1e9)}
    ledger = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    scheduler = Scheduler(catalog, Policy(max_wait_s=0.01), inprocess_pool, ledger,
                          budget=lambda: budget["now"])  # fmt: skip
    request = GenerationRequest(prompt="live", width_px=64, height_px=64, quality="draft")
    await scheduler.generate(request)
    assert not scheduler.over_target
    budget["now"] = Budget(joules_per_output_target=1.0)  # what the control plane will do
    assert scheduler.over_target


def test_the_joules_target_is_a_rolling_average_held_against_the_budget():
    target = JoulesTarget(alpha=0.5)
    policy = Policy(max_wait_s=0.02, over_target_wait_factor=4.0)
    assert not target.over(10.0) and target.max_wait_s(policy, 10.0) == 0.02
    target.observe(20.0)
    target.observe(10.0)
    assert target.rolling_joules_per_output == 15.0
    assert target.over(10.0) and target.max_wait_s(policy, 10.0) == 0.08
    assert not target.over(None) and not target.over(15.0)
