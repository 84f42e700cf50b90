"""Sim vs live: simulate the live CPU service's own fleet and compare with `wattserve bench`.

    python benchmarks/validate_sim.py [--requests 40] [--preset mixed] [--seed 0]

Starts a local service (its own state dir), replays a trace against it with
``bench.live.run_live`` (wattserve phase only), fetches the energy profile the service
learned (``GET /admin/profiles``), simulates the same trace (same salted seeds) on the
same fleet (the catalog's replicas) priced by that profile, and compares J/output and
p50 latency. Writes benchmarks/validate_sim.json. The goal: both within 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from importlib import resources
from pathlib import Path

from bench.fleet import costs_from_profile
from bench.live import run_live
from bench.sim_report import summarize
from bench.simulate import FleetSimulation
from bench.trace import Trace, TraceHeader, TraceRequest, load_prompts, make_trace, preset_spec
from cluster.runtime import LocalService, free_port
from cluster.settings import Settings
from policies.catalog import load_catalog
from wattserve import AdminClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--preset", default="mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate-per-s", type=float, default=1.0)
    args = parser.parse_args()
    prompts = load_prompts(Path(str(resources.files("cli") / "demo_prompts.txt")))
    spec = preset_spec(args.preset, requests=args.requests, seed=args.seed,
                       rate_per_s=args.rate_per_s)  # fmt: skip
    requests = make_trace(spec, prompts.prompts)
    header = TraceHeader(**spec.model_dump(), preset=args.preset, prompts=prompts.source)
    salt = 1_000_003  # fixed, so the simulated trace uses exactly the seeds sent live
    settings = Settings.from_env(Path(tempfile.mkdtemp(prefix="wsv", dir="/tmp")))
    with LocalService(settings, port=free_port()) as service:
        live = asyncio.run(run_live(service.url, Trace(header, tuple(requests)),
                                    baseline=False, salt=salt))  # fmt: skip
        with AdminClient(service.url, service.admin_token) as admin:
            profile = admin.profiles()
        catalog = service.catalog
    assert catalog is not None
    salted = [
        TraceRequest(**{**r.model_dump(), "seed": None if r.seed is None else r.seed + salt})
        for r in requests
    ]
    costs = costs_from_profile(catalog, profile, "CPU")
    replicas = {v.name: v.resources.replicas for v in catalog.variants if v.name in costs}
    sim = FleetSimulation(load_catalog(settings.catalog_path), costs, sum(replicas.values()),
                          replicas=replicas)  # fmt: skip
    simulated = summarize(sim.run(salted))
    got = live.achieved.summary
    result = {
        "trace": header.model_dump(mode="json"),
        "live": {"joules_per_output": got.joules_per_output, "p50_s": got.latency_s.p50,
                 "outputs": got.outputs, "cache_hits": got.cache_hits,
                 "coalesced": got.coalesced, "mean_batch_size": got.mean_batch_size},
        "simulated": {"joules_per_output": simulated["joules_per_output"],
                      "p50_s": simulated["latency_s"]["p50"], "outputs": simulated["outputs"],
                      "cache_hits": simulated["cache_hits"], "coalesced": simulated["coalesced"],
                      "mean_batch_size": simulated["mean_batch_size"]},
        "energy_source": f"live: {got.energy_sources}; simulated: the live profile",
    }  # fmt: skip
    # Where live latency goes: the scheduler's own view (receipts) vs the client's.
    served = [r for r in live.achieved.requests if r.status == "ok" and r.receipts]
    scheduler_s = sorted(max(x.latency_ms for x in r.receipts) / 1000 for r in served)
    client_s = sorted(r.latency_s for r in served)
    result["live"]["p50_scheduler_side_s"] = scheduler_s[len(scheduler_s) // 2]
    result["live"]["p50_client_side_s"] = client_s[len(client_s) // 2]
    for metric in ("joules_per_output", "p50_s"):
        live_v, sim_v = result["live"][metric], result["simulated"][metric]
        result[f"{metric}_error_pct"] = 100 * (sim_v - live_v) / live_v if live_v else None
    print(json.dumps(result, indent=2))
    (ROOT / "benchmarks" / "validate_sim.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
