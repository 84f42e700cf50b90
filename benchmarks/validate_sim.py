"""Sim vs live: simulate the live CPU service's own fleet and compare with `wattserve bench`.

    python benchmarks/validate_sim.py [--presets mixed,draft-heavy,unique-high]
                                      [--requests 120] [--rate-per-s 1.0] [--seed 0]

Starts a local service (its own state dir) and, for each preset: replays a trace against
it with ``bench.live.run_live`` (wattserve phase only), fetches the energy profile the
service has learned (``GET /admin/profiles``), simulates the same trace (same salted
seeds) on the same fleet (the catalog's replicas) priced by that profile — its batch
costs and its measured time per request outside batches — and compares J/output and p50
latency. Writes benchmarks/validate_sim.json. The goal: both within 10 %.

Latency is compared where the simulator models it: in the scheduler, from a request's
arrival to its outputs being ready (the ledger's ``latency_ms``). The client's p50 adds
the HTTP hop and the Serve proxy, which no profile holds; it is reported beside it, with
that hop's measured median. Per outcome (cache hit, or the variant that made it) the
medians are reported too: where a trace's outputs fall into clusters far apart (hits in
milliseconds, a turbo variant at 0.1 s, a large one at 1.2 s), the overall p50 can land
in the gap between two of them, and then it says more about the mix than about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from importlib import resources
from pathlib import Path

from wattserve import AdminClient
from wattserve._admin import ProfileList
from wattserve.bench.fleet import costs_from_profile
from wattserve.bench.live import LiveReport, RequestRecord, run_live
from wattserve.bench.sim_report import summarize
from wattserve.bench.simulate import FleetSimulation, SimReceipt
from wattserve.bench.trace import (
    PRESETS,
    Trace,
    TraceHeader,
    TraceRequest,
    load_prompts,
    make_trace,
    preset_spec,
)
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings
from wattserve.policies.catalog import Catalog

ROOT = Path(__file__).resolve().parent.parent
SALT = 1_000_003  # fixed per preset, so the simulated trace uses exactly the seeds sent live


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="mixed,draft-heavy,unique-high")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate-per-s", type=float, default=1.0)
    args = parser.parse_args()
    presets = args.presets.split(",")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; known: {', '.join(PRESETS)}")
    prompts = load_prompts(Path(str(resources.files("wattserve.cli") / "demo_prompts.txt")))
    settings = Settings.from_env(Path(tempfile.mkdtemp(prefix="wsv", dir="/tmp")))
    runs = []
    with LocalService(settings, port=free_port()) as service:
        assert service.catalog is not None
        for index, preset in enumerate(presets):
            spec = preset_spec(preset, requests=args.requests, seed=args.seed,
                               rate_per_s=args.rate_per_s)  # fmt: skip
            header = TraceHeader(**spec.model_dump(), preset=preset, prompts=prompts.source)
            trace = Trace(header, tuple(make_trace(spec, prompts.prompts)))
            salt = SALT * (index + 1)  # no preset is served from another one's cache
            live = asyncio.run(run_live(service.url, trace, baseline=False, salt=salt))
            with AdminClient(service.url, service.admin_token) as admin:
                profile = admin.profiles()
            runs.append(_compare(trace, salt, live, profile, service.catalog))
            print(json.dumps(runs[-1], indent=2))
    result = {
        "runs": runs,
        "latency_compared": "in the scheduler: arrival to outputs ready (ledger latency_ms)",
        "energy_source": "live: the service's meters; simulated: the profile it learned",
    }
    print(
        "\n".join(
            f"{r['preset']}: J/output live {r['live']['joules_per_output']:.1f} sim "
            f"{r['simulated']['joules_per_output']:.1f} "
            f"({r['joules_per_output_error_pct']:+.1f} %);"
            f" p50 live {r['live']['p50_s']:.3f} s sim {r['simulated']['p50_s']:.3f} s "
            f"({r['p50_s_error_pct']:+.1f} %)"
            for r in runs
        )
    )
    (ROOT / "benchmarks" / "validate_sim.json").write_text(json.dumps(result, indent=2) + "\n")


def _compare(
    trace: Trace, salt: int, live: LiveReport, profile: ProfileList, catalog: Catalog
) -> dict:
    """Simulate ``trace`` as the service saw it and set the two side by side."""
    salted = [
        TraceRequest(**{**r.model_dump(), "seed": None if r.seed is None else r.seed + salt})
        for r in trace.requests
    ]
    costs = costs_from_profile(catalog, profile, "CPU")
    replicas = {v.name: v.resources.replicas for v in catalog.variants if v.name in costs}
    sim = FleetSimulation(catalog, costs, {"CPU": sum(replicas.values())}, replicas=replicas,
                          overhead_s=profile.overhead_s)  # fmt: skip
    run = sim.run(salted)
    simulated = summarize(run)
    got = live.achieved.summary
    served = [r for r in live.achieved.requests if r.status == "ok" and r.receipts]
    scheduler_s = [max(x.latency_ms for x in r.receipts) / 1000 for r in served]
    hop_s = [r.latency_s - s for r, s in zip(served, scheduler_s, strict=True)]
    sim_s = [x.latency_s for x in run.receipts if x.ok]
    result = {
        "preset": trace.header.preset,
        "trace": trace.header.model_dump(mode="json"),
        "live": {"joules_per_output": got.joules_per_output,
                 "p50_s": statistics.median(scheduler_s), "mean_s": statistics.mean(scheduler_s),
                 "p50_client_side_s": got.latency_s.p50,
                 "http_hop_p50_s": statistics.median(hop_s),
                 "outputs": got.outputs, "cache_hits": got.cache_hits,
                 "coalesced": got.coalesced, "mean_batch_size": got.mean_batch_size,
                 "energy_sources": got.energy_sources},
        "simulated": {"joules_per_output": simulated["joules_per_output"],
                      "p50_s": statistics.median(sim_s), "mean_s": statistics.mean(sim_s),
                      "outputs": simulated["outputs"], "cache_hits": simulated["cache_hits"],
                      "coalesced": simulated["coalesced"],
                      "mean_batch_size": simulated["mean_batch_size"]},
        "p50_s_by_outcome": _by_outcome(served, run.receipts),
        "profile_overhead_s": profile.overhead_s,
    }  # fmt: skip
    for metric in ("joules_per_output", "p50_s", "mean_s"):
        live_v, sim_v = result["live"][metric], result["simulated"][metric]
        result[f"{metric}_error_pct"] = 100 * (sim_v - live_v) / live_v if live_v else None
    return result


def _by_outcome(served: list[RequestRecord], receipts: list[SimReceipt]) -> dict[str, dict]:
    """Median latency per variant (or ``cache hit``), live and simulated: where they part."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in served:
        first = r.receipts[0]
        name = "cache hit" if first.cache == "hit" else first.variant
        groups.setdefault(name, {"live": [], "sim": []})["live"].append(first.latency_ms / 1000)
    for x in receipts:
        name = "cache hit" if x.cache == "hit" else x.variant
        groups.setdefault(name, {"live": [], "sim": []})["sim"].append(x.latency_s)
    return {
        name: {side: round(statistics.median(v), 4) if v else None for side, v in g.items()}
        | {"n_live": len(g["live"]), "n_sim": len(g["sim"])}
        for name, g in sorted(groups.items())
    }


if __name__ == "__main__":
    main()
