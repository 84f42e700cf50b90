"""One cluster power budget across scheduler replicas: overshoot, lease latency, throughput.

Starts a three-node local cluster (a CPU head, an H100 node, an H200 node; simulated
power of each node's type), then for 1 and 2 scheduler replicas in turn: deploys
wattserve into it (``LocalService(address=...)``, as ``wattserve serve --address``),
sets a cluster cap below the offered load, sends ``--requests`` distinct mixed requests
at once (saturating), and samples every node's power at ``--sample-s`` directly from the
agents. Writes a JSON report:

* ``max_overshoot_w`` / ``longest_over_cap_ms``: the largest sampled excess over the cap
  and the longest stretch of consecutive samples above it;
* ``lease_round_trip_ms_p50/p99``: lease requests timed inside a scheduler replica
  (``GET /v1/status`` → ``admission``);
* ``requests_per_min`` under the cap, per replica count (phases alternate 1, 2, 1, 2, ...
  ``--rounds`` times; the medians are compared), and their ratio.

    python benchmarks/cluster_budget.py --cap-w 700 --requests 36
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import ray

from wattserve import AdminClient, Client
from wattserve.bench._live_stats import longest_over_cap_s
from wattserve.bench.cap_watch import burst, sampled, status_counts
from wattserve.cluster.admission import cluster_power_w, node_agents
from wattserve.cluster.local import TypedCluster
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings


def phase(address: str, home: Path, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    settings = replace(Settings.from_env(home), scheduler_replicas=replicas)
    service = LocalService(settings, port=free_port(), address=address)
    service.start(ready_timeout_s=600)
    try:
        with AdminClient(service.url, token=service.admin_token) as admin:
            admin.set_budget(watts=args.cap_w)
        samples: list[tuple[float, float]] = []
        load = burst(service.url, args.requests, 10_000 * replicas)
        results, seconds = asyncio.run(
            sampled(load, partial(cluster_power_w, node_agents()), samples, args.sample_s)
        )
        codes = status_counts(results)
        ok = codes.get("200", 0)
        with Client(service.url) as client:
            admission = client.status().admission
    finally:
        service.stop()
    watts = [w for _, w in samples]
    return {
        "scheduler_replicas": replicas,
        "requests": args.requests,
        "answered_200": ok,
        "status_counts": codes,
        "seconds": round(seconds, 2),
        "requests_per_min": round(ok / seconds * 60, 2),
        "samples": len(samples),
        "max_power_w": round(max(watts), 1),
        "max_overshoot_w": round(max(0.0, max(watts) - args.cap_w), 1),
        "longest_over_cap_ms": round(longest_over_cap_s(samples, args.cap_w) * 1000, 1),
        "admission": admission.model_dump() if admission else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-w", type=float, default=700.0)
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--sample-s", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2, help="1- and 2-replica phases each")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    os.environ.setdefault("WATTSERVE_POWER_SOURCE", "simulated")
    os.environ.setdefault("WATTSERVE_SIM_DEVICES", "1")
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"wsb{os.getpid()}"
    with TypedCluster(("H100", "H200")) as cluster:
        ray.init(address=cluster.address, namespace="wattserve-bench", log_to_driver=False)
        try:
            order = [n for _ in range(args.rounds) for n in (1, 2)]  # alternate: drift cancels
            phases = [phase(cluster.address, root / f"r{i}", n, args) for i, n in enumerate(order)]
        finally:
            ray.shutdown()
    rates = {n: statistics.median(p["requests_per_min"] for p in phases
                                  if p["scheduler_replicas"] == n) for n in (1, 2)}  # fmt: skip
    report = {
        "benchmark": "cluster_budget",
        "cap_w": args.cap_w,
        "energy_source": "simulated",
        "cluster": "local: CPU head + fake H100 node + fake H200 node, 1 simulated GPU each",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "phases": phases,
        "rounds": args.rounds,
        "requests_per_min_median": {str(n): round(r, 2) for n, r in rates.items()},
        "requests_per_min_ratio_2_vs_1": round(rates[2] / rates[1], 3),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
