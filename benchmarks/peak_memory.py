"""Run a command and report the peak memory of its whole process tree.

Usage: python benchmarks/peak_memory.py [--out FILE.json] -- COMMAND...

Samples every 0.5 s: the sum of RSS (overcounts pages shared between processes, such
as torch's libraries mapped by every worker) and the sum of PSS (shares them out; the
fairer figure) over the command and all its descendants. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    rss = pss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.monotonic()
    proc = subprocess.Popen(command)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = tree_memory(root)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.5)
    report = {
        "command": command,
        "exit_code": proc.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_tree_rss_mib": round(peak_rss / 2**20),
        "peak_tree_pss_mib": round(peak_pss / 2**20),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(json.dumps(report, indent=2) + "\n")
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
