"""`wattserve serve` as a user runs it: starts, serves, stops on SIGTERM, leaves nothing."""

import json
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

from wattserve.cluster.runtime import free_port

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


def serve(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_line(proc, "serving at")
    except BaseException:
        proc.kill()
        raise
    return proc


def wattserve(env: dict[str, str], *args: str) -> str:
    """Run the CLI as a user would, in a fresh process; its stdout."""
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopping" in output and "Traceback" not in output
    return output


def user_env(home: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "WATTSERVE_HOME": home, "PYTHONUNBUFFERED": "1", **extra}
    for name in ("RAY_TMPDIR", "WATTSERVE_ADMIN_TOKEN", "WATTSERVE_URL"):
        env.pop(name, None)
    return env


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
        before = json.loads(wattserve(env, "status", "--json", "--url", url))["budget"]

        stop(proc)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert alive == [], [p.name() for p in alive]

        # ... and it survives a restart, even with the old cap still in the environment.
        proc = serve(env, port)
        after = json.loads(wattserve(env, "status", "--json", "--url", url))["budget"]
        assert after["cluster_cap_w"] == 300 and after["updated_at"] == before["updated_at"]
        stop(proc)
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
