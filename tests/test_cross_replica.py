"""Coalescing across scheduler replicas: owner routing over real coalescer actors."""

import asyncio
import base64

import pytest

from wattserve import GenerationRequest
from wattserve.policies.policy import Policy
from wattserve.scheduler.cache import ResultCache
from wattserve.scheduler.coalescing import (
    LeaderGone,
    LocalFlights,
    RemoteFlights,
    SharedOutput,
    coalescer_actor_name,
    owner_index,
)
from wattserve.scheduler.service import Scheduler
from wattserve.telemetry.ledger import LedgerStore


def test_rendezvous_owner_is_stable_and_spreads_keys():
    owners = ["a", "b", "c"]
    picks = [owner_index(f"k{i}", owners) for i in range(300)]
    assert picks == [owner_index(f"k{i}", owners) for i in range(300)]
    assert all(picks.count(i) > 60 for i in range(3))
    grown = [owner_index(f"k{i}", [*owners, "d"]) for i in range(300)]
    moved = sum(1 for old, new in zip(picks, grown, strict=True) if old != new)
    assert all(new == 3 for old, new in zip(picks, grown, strict=True) if old != new)
    assert moved < 150  # adding an owner only moves keys to the new owner


async def test_a_silent_leader_loses_its_lease_and_waiters_hear_of_it():
    flights = LocalFlights(lease_s=0.05)
    assert await flights.claim("k") is True
    assert await flights.claim("k") is False
    with pytest.raises(LeaderGone, match="leader lost"):
        await flights.wait("k")
    assert await flights.claim("k") is True  # the next claimant leads afresh


async def test_waiters_of_a_replica_that_stopped_beating_take_over_within_seconds():
    """The lease is 300 s; a dead leader's replica is noticed after ``stale_s`` instead."""
    flights = LocalFlights(stale_s=0.2)
    assert await flights.claim("dead", holder="rep_dead") is True
    assert await flights.claim("live", holder="rep_live") is True
    await flights.claim("dead", holder="rep_b")
    await flights.claim("live", holder="rep_b")

    async def keep_beating() -> None:
        while True:
            await flights.beat("rep_live")
            await asyncio.sleep(0.05)

    beater = asyncio.create_task(keep_beating())
    live_waiter = asyncio.create_task(flights.wait("live"))
    with pytest.raises(LeaderGone, match="leader lost"):
        await asyncio.wait_for(flights.wait("dead"), timeout=5)
    assert await flights.claim("dead", holder="rep_b") is True  # a waiter leads now
    assert not live_waiter.done()  # a beating leader keeps its waiters
    out = SharedOutput(b"png", "v", "b", 1, joules=10.0, energy_source="simulated")
    await flights.finish("live", out)
    assert (await asyncio.wait_for(live_waiter, timeout=5)).sharers == 2
    beater.cancel()


async def test_leaving_before_and_after_the_output_is_shared():
    flights = LocalFlights()
    await flights.claim("k")
    await flights.claim("k")
    await flights.claim("k")
    assert await flights.leave("k") is None  # left early: no longer a sharer
    out = SharedOutput(b"png", "v", "b", 1, joules=90.0, energy_source="simulated")
    shared = await flights.finish("k", out)
    assert (shared.sharers, shared.joules) == (2, 45.0)
    assert await flights.leave("k") == shared  # left late: keeps the share it was counted for


@pytest.mark.ray
async def test_two_scheduler_replicas_generate_an_output_once(
    service, catalog, inprocess_pool, tmp_path
):
    from wattserve.cluster.coalescers import start_coalescers

    handles = start_coalescers(2)
    names = [coalescer_actor_name(i) for i in range(2)]
    ledger = LedgerStore(f"sqlite:///{tmp_path}/l.db")
    replicas = [
        Scheduler(catalog, Policy(), inprocess_pool, ledger,
                  cache=ResultCache(ledger.engine, tmp_path / "c"),
                  flights=RemoteFlights(names, handles, holder=f"rep_{i}"))
        for i in range(2)
    ]  # fmt: skip
    plans_before = len(inprocess_pool.plans)
    request = GenerationRequest(prompt="across replicas", width_px=64, height_px=64, seed=9)
    responses = await asyncio.gather(*(replicas[i % 2].generate(request) for i in range(12)))
    assert len(inprocess_pool.plans) - plans_before == 1
    assert len({base64.b64decode(r.data[0].b64_json) for r in responses}) == 1
    caches = sorted(r.wattserve.receipts[0].cache for r in responses)
    assert caches.count("miss") == 1 and set(caches) <= {"miss", "coalesced", "hit"}
    rows = ledger.recent(100)
    generated = inprocess_pool.plans[-1]
    assert len(rows) == 12 and len(generated.items) == 1
