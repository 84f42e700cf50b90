"""`wattserve serve` as a user runs it: starts, serves, stops on SIGTERM, leaves nothing."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import pytest

from cluster.runtime import free_port

pytestmark = pytest.mark.ray


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float = 240) -> list[str]:
    """Read the server's output until ``needle`` appears (what a user waits for)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} within {timeout_s}s")


def test_serve_binds_loopback_serves_and_sigterm_leaves_no_ray_process():
    home = tempfile.mkdtemp(prefix="wss", dir="/tmp")
    port = free_port()
    env = {
        **os.environ,
        "WATTSERVE_HOME": home,
        "PYTHONUNBUFFERED": "1",
        # 4 simulated GPUs idle at 70 W each: room for one 400 W medium batch, not a 450 W one
        "WATTSERVE_POWER_CAP_W": "700",
    }
    env.pop("RAY_TMPDIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_line(proc, "serving at")
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

        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        assert "stopping" in output and "Traceback" not in output
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert alive == [], [p.name() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)
