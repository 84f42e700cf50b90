"""`wattserve serve` as an operator runs it, SIGKILLed under load, then started again.

The operator's worst stop: no shutdown handler runs. Ray's processes share the driver's
fate (the kernel kills them with it), so the in-flight requests die with the replicas
that held them; what must survive is on disk. After the restart the janitor fails the
dead run's pending rows, the live budget and the result cache are as they were, and
each request whose client retries with its ``Idempotency-Key`` is resolved exactly once.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time

import httpx
import psutil
import pytest

from tests import _invariants
from tests._serve_proc import serve, stop, user_env, wattserve
from tests._wait import poll
from wattserve import AsyncClient, Client, GenerationResult
from wattserve.cluster.runtime import free_port
from wattserve.telemetry.ledger import ORPHANED, LedgerStore

pytestmark = pytest.mark.fault

KEYED = 6


async def keyed_load(url: str, seed0: int, retries: int) -> list[object]:
    """``KEYED`` distinct high-tier requests, each with a key of its own, at once."""
    async with AsyncClient(url, timeout_s=600, max_retries=retries) as client:
        calls = [client.generate(f"keyed {seed0 + i}", seed=seed0 + i, quality="high",
                                 size="64x64", idempotency_key=f"sigkill-{i}")
                 for i in range(KEYED)]  # fmt: skip
        return list(await asyncio.gather(*calls, return_exceptions=True))


def pending(db_url: str) -> set[tuple[str, int]]:
    """The outputs whose ledger rows are pending: (request id, image index)."""
    ledger = LedgerStore(db_url)
    try:
        return {(r.request_id, r.image_index) for r in ledger.recent(1000, status="pending")}
    finally:
        ledger.close()


def running(processes: list[psutil.Process]) -> list[str]:
    """Those still running (a zombie has exited: only its parent's reaping is left)."""
    names = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                names.append(process.name())
        except psutil.NoSuchProcess:
            continue
    return names


def serves_as_a_user_expects(url: str, port: int, descendants: list[psutil.Process]) -> None:
    """Loopback only, Ray under it, a 429 with Retry-After where the 700 W cap says so."""
    assert any("raylet" in p.name() or "gcs_server" in p.name() for p in descendants)
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == "LISTEN" and c.laddr.port == port]  # fmt: skip
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    body = {"prompt": "a red cube", "seed": 1, "quality": "standard"}
    assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).status_code == 200
    high = {"prompt": "too hot", "seed": 2, "quality": "high"}  # 450 W: never fits
    refused = httpx.post(f"{url}/v1/images/generations", json=high, timeout=120)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "power cap 700 W" in refused.json()["error"]["message"]
    status = httpx.get(f"{url}/v1/status", timeout=10).json()
    assert status["power_cap_w"] == 700 and status["cluster_power_w"] <= 700


def test_serve_serves_survives_a_sigkill_under_load_and_stops_clean() -> None:
    home = tempfile.mkdtemp(prefix="wss", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db_url = f"sqlite:///{home}/wattserve.db"
    # 4 simulated GPUs idle at 70 W each: room for one 400 W medium batch, not a 450 W one
    env = user_env(home, WATTSERVE_POWER_CAP_W="700", WATTSERVE_POWER_SOURCE="simulated")
    proc = serve(env, port)
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        serves_as_a_user_expects(url, port, descendants)
        # The operator raises the budget on the running service: live within 2 s. The cap
        # in the environment only seeded the database: after a restart the change holds.
        set_at = time.monotonic()
        wattserve(env, "budget", "set", "--watts", "1500", "--url", url)
        while httpx.get(f"{url}/v1/status", timeout=10).json()["power_cap_w"] != 1500:
            assert time.monotonic() - set_at < 2.0, "budget not live within 2 s"
            time.sleep(0.05)
        with Client(url, max_retries=0) as client:
            cached = client.generate("kept", seed=1, quality="draft", size="64x64")
        first: list[object] = []
        sender = threading.Thread(
            target=lambda: first.extend(asyncio.run(keyed_load(url, 100, 0))), daemon=True
        )
        sender.start()
        poll("rows pending in the ledger", lambda: pending(db_url) or None, 120, 0.05)
        proc.kill()  # SIGKILL: nothing of ours runs
        proc.wait(timeout=30)
        stuck = pending(db_url)  # nobody is left to settle these
        killed_at = time.monotonic()
        sender.join(timeout=120)
        answered_s = time.monotonic() - killed_at
        assert len(first) == KEYED  # each call ended: with its result or a transport error
        poll("Ray gone with its driver", lambda: not running(descendants) or None, 120)

        gone_s = time.monotonic() - killed_at
        proc = serve(env, port)
        restarted_s = time.monotonic() - killed_at - gone_s
        rows = _invariants.check_ledger(db_url, [])  # the janitor failed the dead run's rows
        orphaned = [r for r in rows if (r.request_id, r.image_index) in stuck]
        assert len(orphaned) == len(stuck) >= 1
        assert all(r.status == "failed" and r.error == ORPHANED for r in orphaned)
        status = json.loads(wattserve(env, "status", "--json", "--url", url))
        assert status["budget"]["cluster_cap_w"] == 1500  # control state intact
        with Client(url, max_retries=0) as client:
            again = client.generate("kept", seed=1, quality="draft", size="64x64")
        assert again.receipts[0].cache == "hit"  # the result cache is intact
        assert again.images[0].png_bytes == cached.images[0].png_bytes

        second = asyncio.run(keyed_load(url, 100, 3))  # each client retries with its key
        assert all(isinstance(r, GenerationResult) for r in second), second
        rows = _invariants.check_ledger(db_url, second)
        for before, after in zip(first, second, strict=True):
            if isinstance(before, GenerationResult):  # finished before the kill: replayed
                assert after.request_id == before.request_id  # type: ignore[union-attr]
        with Client(url) as client:
            books = client.report().reconciliation
        assert books.error_pct < 1.0, books
        figures = {
            "requests": KEYED, "finished_before_kill": sum(
                isinstance(r, GenerationResult) for r in first),
            "served_after_restart": len(second), "orphaned_rows": len(orphaned),
            "ledger_rows": len(rows), "answered_s": round(answered_s, 1),
            "ray_gone_s": round(gone_s, 1),
            "restart_s": round(restarted_s, 1),
            "books_error_pct": round(books.error_pct, 3),
        }  # fmt: skip
        print("fault_figures", "serve_sigkilled", json.dumps(figures))
        descendants = psutil.Process(proc.pid).children(recursive=True)
        stop(proc)  # SIGTERM: a clean stop leaves no Ray process behind
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert alive == [], [p.name() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)
