"""Idempotency keys: one key, one request, on any replica, across a replica's death."""

from __future__ import annotations

import asyncio

import pytest

from wattserve import AdmissionRejected, Conflict, InvalidRequest
from wattserve.scheduler.idempotency import (
    IdempotencyStore,
    Mismatch,
    Replay,
    Run,
    Wait,
    body_digest,
    check_key,
    run_once,
)
from wattserve.telemetry.ledger import LedgerStore

BODY = {"prompt": "a fox", "n": 1}
DAY_S = 86_400.0


@pytest.fixture
def ledger(tmp_path):
    return LedgerStore(f"sqlite:///{tmp_path}/l.db")


def replica(ledger, name, beating=True):
    if beating:
        ledger.heartbeat(name)
    return IdempotencyStore(ledger.engine, name, stale_after_s=10.0)


def test_claims_run_wait_replay_and_refuse_another_body(ledger):
    a, b = replica(ledger, "rep_a"), replica(ledger, "rep_b")
    digest = body_digest(BODY)
    assert a.claim("t", "k1", digest, DAY_S) == Run()
    assert b.claim("t", "k1", digest, DAY_S) == Wait("rep_a")  # a runs it and is alive
    assert b.claim("t", "k1", body_digest({**BODY, "n": 2}), DAY_S) == Mismatch()
    assert b.claim("other-tenant", "k1", digest, DAY_S) == Run()  # keys are per caller
    a.finish("t", "k1", 200, {"wattserve": {"request_id": "req_1"}})
    assert b.claim("t", "k1", digest, DAY_S) == Replay(200, {"wattserve": {"request_id": "req_1"}})


def test_a_key_held_by_a_replica_that_stopped_is_taken_over(ledger):
    dead = replica(ledger, "rep_dead", beating=False)  # never beat (or long ago)
    live = replica(ledger, "rep_live")
    digest = body_digest(BODY)
    assert dead.claim("t", "k", digest, DAY_S) == Run()
    assert live.claim("t", "k", digest, DAY_S) == Run()
    dead.finish("t", "k", 200, {"late": True})  # the old holder no longer holds it
    assert live.claim("t", "k", digest, DAY_S) == Run()  # still unfinished, still live's


def test_expired_keys_run_again(ledger):
    a = replica(ledger, "rep_a")
    digest = body_digest(BODY)
    assert a.claim("t", "k", digest, ttl_s=-1.0) == Run()  # expires at once
    a.finish("t", "k", 200, {})
    assert a.claim("t", "k", digest, DAY_S) == Run()
    assert a.purge_expired() == 0


def test_run_once_replays_success_and_client_errors_but_releases_retryable_ones(ledger):
    a = replica(ledger, "rep_a")
    calls = []

    async def ok() -> dict:
        calls.append("ok")
        return {"wattserve": {"request_id": f"req_{len(calls)}"}}

    async def busy() -> dict:
        calls.append("busy")
        raise AdmissionRejected("over the cap", retry_after_s=1.0)

    async def bad() -> dict:
        calls.append("bad")
        raise InvalidRequest("size too big", param="size")

    async def go(key, produce, body=BODY):
        return await run_once(a, "t", key, body, DAY_S, produce, wait_s=1.0)

    first = asyncio.run(go("k", ok))
    assert asyncio.run(go("k", ok)) == first and calls == ["ok"]  # replayed, not re-run
    with pytest.raises(AdmissionRejected):
        asyncio.run(go("r", busy))
    assert asyncio.run(go("r", ok))[0] == 200  # a 429 released the key: the retry ran
    with pytest.raises(InvalidRequest):
        asyncio.run(go("b", bad))
    status, body = asyncio.run(go("b", ok))  # a 400 is the answer, replayed
    assert status == 400 and body["error"]["param"] == "size"
    assert calls == ["ok", "busy", "ok", "bad"]
    with pytest.raises(Conflict):
        asyncio.run(go("k", ok, body={**BODY, "n": 3}))


def test_a_repeat_while_running_joins_and_gets_the_same_answer(ledger):
    a, b = replica(ledger, "rep_a"), replica(ledger, "rep_b")
    release = asyncio.Event()

    async def slow() -> dict:
        await release.wait()
        return {"wattserve": {"request_id": "req_slow"}}

    async def twice():
        first = asyncio.create_task(run_once(a, "t", "k", BODY, DAY_S, slow, wait_s=5.0))
        await asyncio.sleep(0.05)  # a has claimed it
        second = asyncio.create_task(run_once(b, "t", "k", BODY, DAY_S, slow, wait_s=5.0))
        await asyncio.sleep(0.25)
        assert not second.done()  # waiting on a's run, not running its own
        release.set()
        return await first, await second

    first, second = asyncio.run(twice())
    assert first == second == (200, {"wattserve": {"request_id": "req_slow"}})


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "bad\nkey"])
def test_bad_keys_are_refused_with_a_reason(key):
    with pytest.raises(InvalidRequest, match="Idempotency-Key"):
        check_key(key)
