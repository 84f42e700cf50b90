"""Measure the telemetry agent's sampling overhead: CPU time of its thread per wall second.

Usage: python benchmarks/sampling_overhead.py [--seconds 20] [--hz 10] [--devices 1 8]
       [--source simulated|nvml] [--out benchmarks/sampling_overhead.json]

For each device count, runs a TelemetryAgent's sampling thread for ``--seconds`` and
reports the thread's CPU time as a percentage of one core (``time.thread_time``), per
agent and per device. On a machine without a GPU only the simulated source can run; an
NVML call costs more, so measure with ``--source nvml`` on a GPU machine before quoting
a figure for one.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from wattserve.telemetry.agent import TelemetryAgent
from wattserve.telemetry.devices import open_power_sources


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--source", default="simulated")
    parser.add_argument("--out", default="benchmarks/sampling_overhead.json")
    args = parser.parse_args()
    runs = []
    for count in args.devices:
        devices = open_power_sources(args.source, simulated_count=count)
        agent = TelemetryAgent(devices, sample_hz=args.hz)
        agent.start()
        time.sleep(args.seconds)
        agent.stop()
        runs.append(
            {
                "source": devices.kind,
                "devices": len(devices.devices),
                "sample_hz": args.hz,
                "seconds": args.seconds,
                "cpu_pct_of_one_core": round(agent.sampling_cpu_pct, 4),
                "cpu_pct_per_device": round(agent.sampling_cpu_pct / len(devices.devices), 4),
            }
        )
    report = {"machine": platform.machine(), "python": platform.python_version(), "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
