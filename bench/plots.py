"""PNG figures of a simulation report; every figure names what its numbers rest on.

Each figure's caption carries the energy source, hardware, trace, baseline and quality
floors from the report, so a figure lifted out of its report still says what it shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from wattserve.bench.simulate import RunResult  # noqa: E402


def caption(report: dict[str, Any]) -> str:
    """Energy source, hardware, trace, baselines and quality floors, in one block."""
    trace = report["trace"]
    name = trace.get("preset") or "trace"
    floors = ", ".join(f"{k} >= {v:g}" for k, v in report["quality_floors"].items())
    competent = f"\n{report['competent']}" if report.get("competent") else ""
    return (
        f"trace: {name} ({trace.get('requests')} requests, seed {trace.get('seed')}, "
        f"repeat rate {trace.get('repeat_rate')}); hardware: {report['hardware']}\n"
        f"energy: {report['energy_source']}\n"
        f"baseline: {report['baseline']}{competent}\nquality floors (GenEval): {floors}"
    )


def _finish(fig: plt.Figure, report: dict[str, Any], path: Path) -> Path:
    fig.text(0.01, 0.01, caption(report), fontsize=6.5, va="bottom", ha="left", wrap=True)
    fig.subplots_adjust(bottom=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def waterfall_png(report: dict[str, Any], path: Path) -> Path:
    """Baseline → each cause → achieved, in J/output, with the oracle as a line."""
    steps = report["waterfall_joules"]
    outputs = max(report["achieved"]["outputs"], 1)
    labels = list(steps)
    values = [v / outputs for v in steps.values()]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    previous = values[0]
    for i, value in enumerate(values):
        if i in (0, len(values) - 1):
            ax.bar(i, value, color="#4c72b0")
        else:
            ax.bar(i, previous - value, bottom=min(value, previous),
                   color="#55a868" if value <= previous else "#c44e52")  # fmt: skip
        ax.text(i, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
        previous = value
    oracle = report["oracle_joules"] / outputs
    ax.axhline(oracle, color="black", linestyle="--", linewidth=1)
    ax.text(len(values) - 0.5, oracle, f"oracle {oracle:,.0f}", va="bottom", ha="right",
            fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel(f"joules per output (GPU {report['waterfall_basis']})")
    ax.set_title(f"savings waterfall: {report['factor_vs_baseline']:.2f}x vs the conventional "
                 f"baseline ({report['factor_vs_competent']:.2f}x vs the competent one), "
                 f"{report['achieved_over_oracle']:.2f}x the oracle")  # fmt: skip
    return _finish(fig, report, path)


def power_png(report: dict[str, Any], run: RunResult, path: Path) -> Path:
    """Fleet power over simulated time, against the cap."""
    fig, ax = plt.subplots(figsize=(9, 5))
    times = [t for t, _ in run.power_w]
    watts = [w for _, w in run.power_w]
    ax.step(times, watts, where="post", linewidth=0.7)
    if report["power_cap_w"] is not None:
        ax.axhline(report["power_cap_w"], color="#c44e52", linestyle="--", label="cap")
        ax.legend()
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("fleet power (W)")
    ax.set_title("fleet power over time")
    return _finish(fig, report, path)


def latency_png(
    report: dict[str, Any], latencies_s: dict[str, list[float]], xlabel: str, path: Path
) -> Path:
    """Latency CDF of each run (served outputs), simulated or live."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, values in latencies_s.items():
        ordered = sorted(values)
        if ordered:
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction served")
    ax.set_title("latency CDF")
    ax.legend()
    return _finish(fig, report, path)


def sweep_png(report: dict[str, Any], points: list[dict[str, Any]], path: Path) -> Path:
    """J/output against repeat rate, one line per tier mix, with each one's baseline."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for mix in dict.fromkeys(p["tiers"] for p in points):
        mine = [p for p in points if p["tiers"] == mix]
        line = ax.plot([p["repeat_rate"] for p in mine],
                       [p["joules_per_output"] for p in mine], marker="o", label=mix)  # fmt: skip
        ax.plot([p["repeat_rate"] for p in mine], [p["baseline_joules_per_output"] for p in mine],
                linestyle=":", color=line[0].get_color(),
                label=f"{mix}: conventional baseline")  # fmt: skip
        ax.plot([p["repeat_rate"] for p in mine],
                [p["competent_joules_per_output"] for p in mine], linestyle="--",
                color=line[0].get_color(), label=f"{mix}: competent baseline")  # fmt: skip
    best = max(points, key=lambda p: p["factor_vs_baseline"] or 0)
    ax.set_title(f"J/output vs repeat rate and tier mix (best: {best['factor_vs_baseline']:.2f}x "
                 f"at {best['tiers']}, repeat rate {best['repeat_rate']})")  # fmt: skip
    ax.set_xlabel("repeat rate (fraction of requests repeating an earlier output)")
    ax.set_ylabel("joules per output (GPU energy)")
    ax.legend(fontsize=7)
    return _finish(fig, report, path)
