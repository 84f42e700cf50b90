"""`wattserve serve` as a user runs it: starts, serves, stops on SIGTERM, leaves nothing."""

import json
import shutil
import tempfile
import time

import httpx
import psutil
import pytest

from tests._serve_proc import serve, stop, user_env, wattserve
from wattserve.cluster.runtime import free_port

pytestmark = pytest.mark.ray


def test_serve_binds_loopback_serves_and_sigterm_leaves_no_ray_process():
    home = tempfile.mkdtemp(prefix="wss", dir="/tmp")
    port = free_port()
    # 4 simulated GPUs idle at 70 W each: room for one 400 W medium batch, not a 450 W one
    env = user_env(home, WATTSERVE_POWER_CAP_W="700")
    proc = serve(env, port)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in p.name() or "gcs_server" in p.name() for p in descendants)
        listening = [
            c
            for c in psutil.net_connections("tcp")
            if c.status == "LISTEN" and c.laddr.port == port
        ]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
        body = {"prompt": "a red cube", "seed": 1, "quality": "standard"}
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).status_code == 200
        high = {"prompt": "too hot", "seed": 2, "quality": "high"}  # 450 W: never fits
        refused = httpx.post(f"{url}/v1/images/generations", json=high, timeout=120)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "power cap 700 W" in refused.json()["error"]["message"]
        status = httpx.get(f"{url}/v1/status", timeout=10).json()
        assert status["power_cap_w"] == 700 and status["cluster_power_w"] <= 700

        # The operator lowers the budget on the running service: live within 2 s.
        set_at = time.monotonic()
        wattserve(env, "budget", "set", "--watts", "300", "--url", url)
        while httpx.get(f"{url}/v1/status", timeout=10).json()["power_cap_w"] != 300:
            assert time.monotonic() - set_at < 2.0, "budget not live within 2 s"
            time.sleep(0.05)
        stop(proc)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert alive == [], [p.name() for p in alive]
        # a restart keeps the live budget: tests/test_faults_serve.py (after a SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_a_policy_change_reaches_every_scheduler_replica_within_two_seconds():
    home = tempfile.mkdtemp(prefix="wss", dir="/tmp")
    port = free_port()
    env = user_env(home, WATTSERVE_SCHEDULER_REPLICAS="2")
    proc = serve(env, port)
    try:
        url = f"http://127.0.0.1:{port}"
        changed = json.loads(wattserve(env, "policy", "set", "--default-quality", "draft",
                                       "--json", "--url", url))  # fmt: skip
        set_at = time.monotonic()
        behind: dict[str, int] = {}
        while True:  # Serve spreads /healthz over the replicas: poll until both have it
            health = httpx.get(f"{url}/healthz", timeout=10).json()
            behind[health["replica"]] = health["revision"]
            if len(behind) == 2 and min(behind.values()) >= changed["revision"]:
                break
            assert time.monotonic() - set_at < 2.0, behind
        body = {"prompt": "which tier", "seed": 9}
        routed = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()
        assert routed["wattserve"]["route"]["variant"] == "tiny-sd-turbo"  # draft, by policy
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)
