"""Measure the busy time of each built-in variant and the simulated energy prior it implies.

Usage: python benchmarks/measure_priors.py [--out benchmarks/priors.json] [--runs 5]

Writes a JSON report: per variant, the median busy seconds of one 64x64 image at
batch size 1 (after one warm-up), the declared power_w, and power_w x busy time, the
figure that belongs in the catalog's ``energy_prior`` (labeled simulated).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from wattserve.policies.catalog import load_catalog
from wattserve.policies.plans import BatchPlan, WorkItem
from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
from wattserve.telemetry.devices import open_power_sources
from wattserve.workers.worker import VariantWorker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/priors.json")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    report = {
        "machine": platform.machine(),
        "cpu_threads": 1,
        "torch": torch.__version__,
        "size": "64x64",
        "energy_source": "simulated",
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as models_dir:
        for variant in load_catalog().variants:
            meter = LocalMeter(TelemetryAgent(open_power_sources("simulated")))
            worker = VariantWorker(variant, models_dir, meter)
            plan = BatchPlan("b", variant.name, 64, 64, (WorkItem("a red cube", None, 7),))
            worker.run(plan)  # warm-up
            busy = [worker.run(plan).busy_s for _ in range(args.runs)]
            median_s = statistics.median(busy)
            report["variants"][variant.name] = {
                "busy_s_median": round(median_s, 4),
                "busy_s_runs": [round(b, 4) for b in busy],
                "power_w": variant.power_w,
                "simulated_joules_per_image": round(variant.power_w * median_s, 1),
                "catalog_prior_joules_per_image": variant.energy_prior.at_batch_size(1),
            }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["variants"], indent=2))


if __name__ == "__main__":
    main()
