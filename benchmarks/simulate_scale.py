"""How long the fleet simulator takes: N requests of the mixed preset on G H100s.

    python benchmarks/simulate_scale.py --requests 1000000 --gpus 1000

Writes benchmarks/simulate_scale.json. The issue's goal is 1,000 GPUs x 1,000,000
requests in under 60 s on a 2-core machine (the achieved run; the baseline run is a
second run of the same cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from wattserve.bench.fleet import fleet_catalog
from wattserve.bench.profiles import DEFAULT_DATA_DIR
from wattserve.bench.sim_report import summarize
from wattserve.bench.simulate import FleetSimulation
from wattserve.bench.trace import load_prompts, make_trace, preset_spec
from wattserve.policies.catalog import load_catalog

ROOT = Path(__file__).resolve().parent.parent
DATA = DEFAULT_DATA_DIR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--gpus", type=int, default=1000)
    args = parser.parse_args()
    catalog = load_catalog(ROOT / "policies" / "real_catalog.toml")
    catalog, costs = fleet_catalog(catalog, {"H100": args.gpus}, DATA)
    started = time.perf_counter()
    spec = preset_spec("mixed", requests=args.requests, sizes={"1024x1024": 1},
                       rate_per_s=0.5 * args.gpus, seed=1)  # fmt: skip
    trace = make_trace(spec, load_prompts(DATA / "PartiPrompts.tsv").prompts)
    trace_s = time.perf_counter() - started
    run = FleetSimulation(catalog, costs, {"H100": args.gpus}).run(trace)
    result = {
        "requests": args.requests, "gpus": args.gpus, "trace_s": round(trace_s, 2),
        "simulate_s": round(run.wall_s, 2), "outputs": summarize(run)["outputs"],
        "simulated_duration_s": round(run.duration_s, 1), "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }  # fmt: skip
    print(json.dumps(result))
    (ROOT / "benchmarks" / "simulate_scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
