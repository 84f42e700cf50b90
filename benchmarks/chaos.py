"""Chaos benchmark: a mixed trace through the SDK while replicas are killed for real.

Starts a local cluster (simulated power) and wattserve with two scheduler replicas, then
replays the same ``--requests``-request mixed trace twice through ``AsyncClient`` (which
sends an ``Idempotency-Key`` per call and retries): once calm, once while a random
worker or scheduler replica is SIGKILLed every ``--kill-every-s`` (its process found
through its actor). The chaos phase's prompts are salted, so it cannot hit the calm
phase's cache. Writes a JSON report:

* ``unanswered``: requests that got neither a result nor a deliberate refusal (must be 0);
* ``outputs_without_one_final_row``: outputs with zero or two final ledger rows, and
  ``pending_rows`` left after the janitor's period (must be 0);
* ``books_error_pct`` and ``power_back_to_idle`` after the run;
* per phase: status counts, ``retried_share`` (requests that needed a retry) and latency
  p50/p99 of served requests.

    python benchmarks/chaos.py --requests 200 --kill-every-s 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from wattserve import AdmissionRejected, AsyncClient, GenerationResult, ServiceUnavailable
from wattserve.bench.trace import make_trace, preset_spec
from wattserve.cluster.admission import cluster_books, cluster_power_w, node_agents
from wattserve.cluster.local import TypedCluster
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings
from wattserve.telemetry.ledger import LedgerStore

ON_PURPOSE = (AdmissionRejected, ServiceUnavailable)
JANITOR_S = 30.0


def victims() -> list[str]:
    """Names of the Serve replicas a fault may hit: scheduler and worker replicas."""
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(("SERVE_REPLICA::wattserve#", "SERVE_REPLICA::wattserve-variant"))
    )  # fmt: skip


def kill_every(period_s: float, stop: threading.Event, rng: random.Random, log: list) -> None:
    """SIGKILL a random replica's process every ``period_s`` until ``stop``."""
    while not stop.wait(period_s):
        try:
            name = rng.choice(victims())
            actor = ray.get_actor(name, namespace="serve")
            pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            os.kill(pid, signal.SIGKILL)
            log.append({"at_s": round(time.monotonic(), 1), "killed": name})
        except Exception as exc:  # a replica still starting: skip this beat
            log.append({"at_s": round(time.monotonic(), 1), "skipped": repr(exc)})


async def replay(url: str, trace: list, salt: str) -> list[tuple[object, float]]:
    """Every request at its arrival time; (result or error, latency s) in trace order."""
    async with AsyncClient(url, timeout_s=900) as client:
        started = time.monotonic()

        async def one(request: Any) -> tuple[object, float]:
            await asyncio.sleep(max(0.0, started + request.arrival_s - time.monotonic()))
            sent = time.monotonic()
            try:
                result: object = await client.generate(
                    f"{salt}{request.prompt}", seed=request.seed, quality=request.quality,
                    size=request.size, n=request.n,
                )  # fmt: skip
            except Exception as exc:
                result = exc
            return result, time.monotonic() - sent

        return list(await asyncio.gather(*(one(r) for r in trace)))


def phase_stats(name: str, answers: list[tuple[object, float]]) -> dict[str, Any]:
    served = [(r, s) for r, s in answers if isinstance(r, GenerationResult)]
    latencies = sorted(s for _, s in served)
    codes = Counter("200" if isinstance(r, GenerationResult) else type(r).__name__
                    for r, _ in answers)  # fmt: skip
    return {
        "phase": name, "requests": len(answers), "status_counts": dict(codes),
        "unanswered": sum(1 for r, _ in answers
                          if not isinstance(r, (GenerationResult, *ON_PURPOSE))),
        "errors": dict(Counter(f"{type(r).__name__}: {str(r)[:160]}" for r, _ in answers
                               if isinstance(r, Exception)).most_common(8)),
        "retried_share": round(sum(r.attempts > 1 for r, _ in served) / max(1, len(served)), 3),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 2)
        if latencies else None,
    }  # fmt: skip


def ledger_check(db_url: str, answers: list[tuple[object, float]]) -> dict[str, Any]:
    """Outputs with other than one final row, after waiting out the janitor."""
    ledger = LedgerStore(db_url)
    try:
        deadline = time.monotonic() + JANITOR_S
        while ledger.recent(10_000, status="pending") and time.monotonic() < deadline:
            time.sleep(0.5)
        rows = ledger.window(None, None)
        per_output = Counter((r.request_id, r.image_index) for r in rows if r.status != "pending")
        served = [r for r, _ in answers if isinstance(r, GenerationResult)]
        missing = sum(
            1 for result in served for i in range(len(result.images))
            if per_output[(result.request_id, i)] != 1
        )  # fmt: skip
        return {
            "ledger_rows": len(rows),
            "pending_rows": sum(1 for r in rows if r.status == "pending"),
            "outputs_without_one_final_row": missing + sum(1 for c in per_output.values() if c > 1),
        }
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate-per-s", type=float, default=1.5)
    parser.add_argument("--kill-every-s", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    os.environ.setdefault("WATTSERVE_POWER_SOURCE", "simulated")
    os.environ.setdefault("WATTSERVE_SIM_DEVICES", "1")
    spec = preset_spec("mixed", requests=args.requests, seed=args.seed,
                       rate_per_s=args.rate_per_s)  # fmt: skip
    trace = make_trace(spec, [f"a chaos scene number {i}" for i in range(400)])
    home = Path(tempfile.mkdtemp(prefix="wschaos"))
    with TypedCluster((), head_cpus=3) as cluster:
        ray.init(address=cluster.address, namespace="wattserve-chaos", log_to_driver=False)
        settings = replace(Settings.from_env(home), scheduler_replicas=2)
        service = LocalService(settings, port=free_port(), address=cluster.address)
        service.start(ready_timeout_s=600)
        try:
            idle_w = cluster_power_w(node_agents())
            calm = asyncio.run(replay(service.url, trace, "calm: "))
            stop, kills = threading.Event(), []
            killer = threading.Thread(target=kill_every, daemon=True,
                                      args=(args.kill_every_s, stop, random.Random(args.seed),
                                            kills))  # fmt: skip
            killer.start()
            chaos = asyncio.run(replay(service.url, trace, "chaos: "))
            stop.set()
            killer.join(timeout=60)
            checks = ledger_check(settings.db_url, calm + chaos)
            deadline = time.monotonic() + 10
            while cluster_power_w(node_agents()) > idle_w + 1e-6 and time.monotonic() < deadline:
                time.sleep(0.2)
            total = cluster_books(node_agents())
            report = {
                "benchmark": "chaos", "requests_per_phase": args.requests,
                "kill_every_s": args.kill_every_s, "energy_source": "simulated",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "phases": [phase_stats("calm", calm), phase_stats("chaos", chaos)],
                "kills": kills, **checks,
                "books_error_pct": round(total.error_pct, 3),
                "failed_attempt_j": round(total.failed_attempt_j, 1),
                "power_back_to_idle": cluster_power_w(node_agents()) <= idle_w + 1e-6,
            }  # fmt: skip
        finally:
            service.stop()
            ray.shutdown()
            shutil.rmtree(home, ignore_errors=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
