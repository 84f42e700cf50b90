"""`wattserve serve` as a user runs it: a policy change reaches every replica.

Start, serve, SIGKILL, restart and SIGTERM: tests/test_faults_serve.py.
"""

import json
import shutil
import tempfile
import time

import httpx
import pytest

from tests._serve_proc import serve, stop, user_env, wattserve
from wattserve.cluster.runtime import free_port

pytestmark = pytest.mark.ray


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
