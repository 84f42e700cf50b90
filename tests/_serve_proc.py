"""`wattserve serve` run as a user runs it, in a process of its own: start, CLI, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


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
