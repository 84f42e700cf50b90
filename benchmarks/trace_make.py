"""Time making, writing and reading a large workload trace.

Usage: python benchmarks/trace_make.py [--requests 1000000] [--preset mixed]
       [--prompts cli/demo_prompts.txt] [--out benchmarks/trace_make.json]

Three timings, each of the whole trace: ``make_trace`` (every request as a validated
``TraceRequest`` in memory), ``make_trace_file`` (what ``wattserve trace make`` runs:
generate, write and tally in one stream) and ``read_trace`` (validate every line back).
Also reports peak RSS and the file size. A note for the README, not a test: the times
depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from wattserve.bench.trace import load_prompts, make_trace, make_trace_file, preset_spec, read_trace

T = TypeVar("T")


def timed(label: str, action: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.2f} s", flush=True)
    return result, round(seconds, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--preset", default="mixed")
    parser.add_argument("--prompts", default="cli/demo_prompts.txt")
    parser.add_argument("--out", default="benchmarks/trace_make.json")
    args = parser.parse_args()

    prompts = load_prompts(args.prompts)
    spec = preset_spec(args.preset, requests=args.requests)
    requests, make_s = timed("make_trace", lambda: make_trace(spec, prompts.prompts))
    del requests
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.jsonl"
        (_, stats), file_s = timed(
            "make_trace_file", lambda: make_trace_file(path, spec, prompts, args.preset)
        )
        size_bytes = path.stat().st_size
        _, read_s = timed("read_trace", lambda: read_trace(path))
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "preset": args.preset,
        "prompts": prompts.source.model_dump(),
        "requests": args.requests,
        "make_trace_s": make_s,
        "make_trace_file_s": file_s,
        "read_trace_s": read_s,
        "file_bytes": size_bytes,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "stats": stats,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
