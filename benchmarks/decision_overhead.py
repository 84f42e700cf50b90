"""Time the pure scheduling decisions at scale: routing and batch formation.

Usage: python benchmarks/decision_overhead.py [--queued 1000] [--variants 10] [--runs 2000]
       [--out benchmarks/decision_overhead.json]

Builds a catalog of ``--variants`` synthetic variants and a queue of ``--queued`` outputs
spread over them and two sizes, then times ``route`` (with profile estimates that
account for each variant's queue) and ``plan_batches`` over that snapshot, one decision
at a time with ``time.perf_counter_ns``. Reports p50/p99/max in microseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from wattserve import GenerationRequest
from wattserve.policies.batching import BatchingSnapshot, QueuedOutput, plan_batches
from wattserve.policies.catalog import Catalog, EnergyPrior, VariantSpec
from wattserve.policies.policy import Policy
from wattserve.policies.profile import EnergyProfile
from wattserve.policies.routing import RoutingState, route


def synthetic_catalog(count: int) -> Catalog:
    variants = tuple(
        VariantSpec(
            name=f"v{i}",
            source=f"/models/v{i}",
            steps=4 + i,
            guidance_scale=5.0,
            max_size_px=1024,
            quality_score=round(0.3 + 0.07 * i, 2),
            quality_provenance="synthetic",
            power_w=300 + 30 * i,
            energy_prior=EnergyPrior(joules_per_image={1: 50.0 + 40 * i}, provenance="synthetic"),
        )  # fmt: skip
        for i in range(count)
    )
    return Catalog(source_path="synthetic", variants=variants)


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return {"p50_us": pick(0.5), "p99_us": pick(0.99), "max_us": ordered[-1] / 1000,
            "mean_us": statistics.mean(ordered) / 1000}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/decision_overhead.json")
    args = parser.parse_args()
    rng = random.Random(0)
    catalog = synthetic_catalog(args.variants)
    profile = EnergyProfile(catalog)
    for v in catalog.variants:
        for size in (1, 2, 4, 8):
            profile.observe(v.name, size, rng.uniform(20, 500), rng.uniform(0.1, 3))
    queued = tuple(
        QueuedOutput(i, f"v{rng.randrange(args.variants)}", rng.choice([512, 1024]), 512,
                     rng.uniform(0, 1), rng.choice([None, rng.uniform(1, 5)]))
        for i in range(args.queued)
    )  # fmt: skip
    depth = {v.name: sum(q.variant == v.name for q in queued) for v in catalog.variants}
    available = frozenset(catalog.names)
    tiers = ["draft", "standard", "high"]

    route_ns, batch_ns = [], []
    for run in range(args.runs):
        request = GenerationRequest(
            prompt="p",
            width_px=512,
            height_px=512,
            quality=tiers[run % 3],
            deadline_s=rng.choice([None, 10.0]),
        )
        started = time.perf_counter_ns()
        estimates = {name: profile.estimate(name, depth[name]) for name in catalog.names}
        route(request, catalog, Policy(), RoutingState(available, estimates))
        route_ns.append(time.perf_counter_ns() - started)
        snapshot = BatchingSnapshot(
            now_s=1.0 + rng.uniform(0, 0.1), queued=queued,
            free_replicas={name: rng.randrange(0, 3) for name in catalog.names},
            max_batch_size={name: 8 for name in catalog.names}, max_wait_s=0.02,
        )  # fmt: skip
        started = time.perf_counter_ns()
        plan_batches(snapshot)
        batch_ns.append(time.perf_counter_ns() - started)
    report = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "queued_outputs": args.queued,
        "variants": args.variants,
        "runs": args.runs,
        "route_with_profile": percentiles_us(route_ns),
        "plan_batches": percentiles_us(batch_ns),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
