"""Front-door benchmark: cache hits through wattserve against a bare Ray Serve app.

A cache hit does no GPU work, so what it costs is wattserve's own path. On one local
Ray instance this starts the service exactly as ``wattserve serve`` does
(``LocalService``) and, beside it in the same Serve instance, a bare FastAPI app that
answers ``POST /bare/v1/images/generations`` with the same OpenAI-shaped body (the one a
wattserve hit returns, captured once). Both are driven by the same real HTTP load
generator, ``hey`` (Debian/Ubuntu: ``apt-get install hey``; or ``go install
github.com/rakyll/hey@latest``), at the same concurrency, with a POST of the same seeded
64x64 ``draft`` request: every wattserve answer is a hit. Phases alternate (bare,
wattserve, ...) for ``--rounds`` rounds after a warm-up of each, so drift on a shared
machine falls on both.

The JSON report has, per phase, requests/s, p50/p99 latency and the status codes, the
ratio of wattserve's requests/s to the bare app's (median over rounds) and of their
p99s, the ledger check (one final ``ok`` row per 200, none pending) and the miss path's
own overhead: for ``--miss-requests`` unseen requests at the same concurrency, the time
from arrival to the launch of each output's batch (``launch_ms`` in the ledger) at
p50/p99, beside the batch's own run time; under load that includes the wait for the
variant's replica to finish the batch before, so the same is also measured for 16
requests sent one at a time, where it is the scheduler's path and batching window alone.

    python benchmarks/hit_throughput.py                  # 15 s per phase, -c 16
    python benchmarks/hit_throughput.py --profile        # + py-spy of the ingress replica

With ``--profile`` one more wattserve phase runs under py-spy (``--gil``: the samples say
where the replica's one interpreter spends its time), kept out of the ratios.

No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class.
"""

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import ray
import sqlalchemy as sa
from fastapi import FastAPI, Request
from ray import serve

from wattserve import AdminClient
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings

LINE = re.compile(r":\d+\)$")
ROUTE = "/v1/images/generations"
BARE_PREFIX = "/bare"
BODY = {"prompt": "a lighthouse at dusk, front door benchmark", "size": "64x64",
        "quality": "draft", "seed": 7, "n": 1}  # fmt: skip

bare_api = FastAPI()


@serve.deployment(name="bare", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8192)
@serve.ingress(bare_api)
class BareImages:
    """The floor: a Ray Serve FastAPI app that parses the body and returns a fixed answer."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self._answer = answer

    @bare_api.post(ROUTE)
    async def generate(self, request: Request) -> dict[str, Any]:
        await request.json()
        return self._answer


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def hey(url: str, token: str, duration_s: float, concurrency: int) -> dict[str, Any]:
    """One ``hey`` run against ``url``: requests/s, latency quantiles, status codes."""
    command = [
        "hey", "-z", f"{duration_s}s", "-c", str(concurrency), "-m", "POST",
        "-T", "application/json", "-H", f"Authorization: Bearer {token}",
        "-d", json.dumps(BODY), "-o", "csv", url,
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    latencies_s = [float(r["response-time"]) for r in rows]
    span_s = max(float(r["offset"]) + float(r["response-time"]) for r in rows)
    return {
        "requests": len(rows),
        "requests_per_s": round(len(rows) / span_s, 1),
        "latency_p50_ms": round(1000 * (percentile(latencies_s, 0.5) or 0), 1),
        "latency_p99_ms": round(1000 * (percentile(latencies_s, 0.99) or 0), 1),
        "status_codes": dict(Counter(r["status-code"] for r in rows)),
    }


def ledger_counts(engine: sa.Engine) -> Counter[str]:
    """Ledger rows per status."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM ledger GROUP BY status"))
        return Counter({status: count for status, count in rows})


def wait_settled(engine: sa.Engine, timeout_s: float = 30) -> Counter[str]:
    """Ledger counts once no row is pending (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    counts = ledger_counts(engine)
    while counts["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = ledger_counts(engine)
    return counts


def py_spy() -> str:
    """The py-spy beside this interpreter (pip install py-spy), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def ingress_pid() -> int:
    """PID of the (single) scheduler replica's process, found through its actor."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::wattserve#scheduler#")]  # fmt: skip
    actor = ray.get_actor(names[0], namespace="serve")
    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30))


def top_frames(collapsed: str, limit: int = 20, leaf_only: bool = False) -> list[dict[str, Any]]:
    """Functions by share of samples with them on the stack, or at its top (``leaf_only``).

    ``collapsed``: py-spy's raw format, a ``frame;frame;... count`` line per stack.
    """
    shares: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        frames = [LINE.sub(")", frame) for frame in stack.split(";")]  # a function, not a line
        for frame in {frames[-1]} if leaf_only else set(frames):
            shares[frame] += int(count)
    return [{"frame": frame, "share": round(n / total, 3)}
            for frame, n in shares.most_common(limit)]  # fmt: skip


def profiled_hey(url: str, token: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """A wattserve phase with py-spy sampling the ingress replica the whole time."""
    spy = subprocess.Popen(
        [py_spy(), "record", "--pid", str(ingress_pid()), "--duration", str(int(args.duration_s)),
         "--format", "raw", "--rate", "100", "--gil", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    result = hey(url, token, args.duration_s, args.concurrency)
    _, err = spy.communicate(timeout=120)
    if spy.returncode != 0:
        return {**result, "profile_error": err.strip()[-400:]}
    collapsed = out.read_text()
    return {**result, "stacks": str(out), "top_inclusive": top_frames(collapsed),
            "top_self": top_frames(collapsed, leaf_only=True)}  # fmt: skip


async def miss_phase(url: str, token: str, requests: int, concurrency: int, tag: str) -> list[str]:
    """``requests`` unseen requests, ``concurrency`` at a time; their request ids."""
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:

        async def one(i: int) -> str:
            async with gate:
                body = {**BODY, "prompt": f"{tag} miss {i}: {BODY['prompt']}"}
                response = await client.post(ROUTE, json=body)
                response.raise_for_status()
                return str(response.json()["wattserve"]["request_id"])

        return list(await asyncio.gather(*(one(i) for i in range(requests))))


def miss_overhead(engine: sa.Engine, request_ids: list[str]) -> dict[str, Any]:
    """Arrival to batch launch (and the batch's run after it) of the miss phase's outputs."""
    query = sa.text("SELECT launch_ms, latency_ms, batch_size FROM ledger "
                    "WHERE request_id IN :ids AND status = 'ok'"
                    ).bindparams(sa.bindparam("ids", expanding=True))  # fmt: skip
    with engine.connect() as conn:
        rows = conn.execute(query, {"ids": request_ids}).all()
    launch = [r.launch_ms for r in rows if r.launch_ms is not None]
    after = [r.latency_ms - r.launch_ms for r in rows if r.launch_ms is not None]
    return {
        "requests": len(request_ids), "outputs_with_launch": len(launch),
        "arrival_to_launch_p50_ms": round(percentile(launch, 0.5) or 0, 1),
        "arrival_to_launch_p99_ms": round(percentile(launch, 0.99) or 0, 1),
        "launch_to_answer_p50_ms": round(percentile(after, 0.5) or 0, 1),
        "launch_to_answer_p99_ms": round(percentile(after, 0.99) or 0, 1),
        "batch_size_p50": percentile([float(r.batch_size) for r in rows], 0.5),
    }  # fmt: skip


def prepare(service: LocalService) -> tuple[str, dict[str, Any]]:
    """A benchmark tenant (no audits: see README) and the hit answer the bare app returns."""
    with AdminClient(service.url, service.admin_token) as admin:
        tenant = admin.create_tenant("frontdoor", audit_rate=0.0)
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    for _ in range(2):  # the first generates and caches it, the second is a hit
        answer = httpx.post(f"{service.url}{ROUTE}", json=BODY, headers=headers, timeout=600)
        answer.raise_for_status()
    hit = answer.json()
    assert hit["wattserve"]["receipts"][0]["cache"] == "hit", hit["wattserve"]["receipts"]
    return tenant.api_key, hit


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    settings = replace(Settings.from_env(home), power_source="simulated")
    service = LocalService(settings, port=free_port())
    service.start(ready_timeout_s=600)
    try:
        token, hit = prepare(service)
        serve.run(BareImages.bind(hit), name="bare", route_prefix=BARE_PREFIX)
        engine = sa.create_engine(settings.db_url)
        urls = {"bare": f"{service.url}{BARE_PREFIX}{ROUTE}", "wattserve": f"{service.url}{ROUTE}"}
        for url in urls.values():  # warm both: connections, code paths, caches
            hey(url, token, args.warmup_s, args.concurrency)
        phases: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            for name, url in urls.items():
                before = wait_settled(engine)
                result = hey(url, token, args.duration_s, args.concurrency)
                if name == "wattserve":
                    after = wait_settled(engine)
                    result["ledger"] = {k: after[k] - before[k] for k in ("ok", "pending")}
                    result["ledger"]["lost"] = result["status_codes"].get("200", 0) - (
                        after["ok"] - before["ok"]
                    )
                phases.append({"phase": name, "round": round_, **result})
        profile = None
        if args.profile:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            profile = profiled_hey(urls["wattserve"], token, args,
                                   args.out.with_suffix(".pyspy.txt"))  # fmt: skip
        miss = None
        if args.miss_requests:  # under the same concurrency, then one at a time (no queue)
            ids = asyncio.run(miss_phase(service.url, token, args.miss_requests,
                                         args.concurrency, "loaded"))  # fmt: skip
            alone = asyncio.run(miss_phase(service.url, token, 16, 1, "alone"))
            miss = {"concurrency": args.concurrency, **miss_overhead(engine, ids),
                    "one_at_a_time": miss_overhead(engine, alone)}  # fmt: skip
    finally:
        service.stop()
    return summarize(args, phases, miss, profile)


def summarize(args: argparse.Namespace, phases: list[dict[str, Any]], miss: dict[str, Any] | None,
              profile: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """The report: phases, the ratios (median over rounds), the checks, the machine."""
    by = {name: [p for p in phases if p["phase"] == name] for name in ("bare", "wattserve")}
    rps = [w["requests_per_s"] / b["requests_per_s"] for b, w in zip(*by.values(), strict=True)]
    p99 = [w["latency_p99_ms"] / b["latency_p99_ms"] for b, w in zip(*by.values(), strict=True)]
    hey_version = subprocess.run(["hey", "-h"], capture_output=True, text=True).stderr
    return {
        "benchmark": "hit_throughput",
        "load": {"generator": "hey", "duration_s": args.duration_s,
                 "concurrency": args.concurrency, "body": BODY, "rounds": args.rounds},
        "throughput_ratio": round(statistics.median(rps), 3),
        "p99_ratio": round(statistics.median(p99), 3),
        "goal": {"throughput_ratio_min": 0.8, "p99_ratio_max": 1.5},
        "all_200": all(set(p["status_codes"]) == {"200"} for p in phases),
        "ledger_rows_lost": sum(p["ledger"]["lost"] for p in by["wattserve"]),
        "phases": phases,
        "miss_path": miss,
        "profile": profile,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "ray": ray.__version__,
                    "platform": platform.platform(), "hey": "hey" if hey_version else None},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--miss-requests", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="py-spy the ingress replica")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed: apt-get install hey (or go install "
                         "github.com/rakyll/hey@latest)")  # fmt: skip
    if args.profile and shutil.which(py_spy()) is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    home = Path(tempfile.mkdtemp(prefix="wshits"))
    try:
        report = run(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "throughput_ratio",
                    "p99_ratio",
                    "all_200",
                    "ledger_rows_lost",
                    "miss_path",
                )
            },
            indent=2,
        )
    )
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
