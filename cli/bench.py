"""``wattserve bench``: replay a trace against a running service and its baselines in one run.

A thin shell over ``bench.live.run_live``: build the trace (a preset, generated in memory
at a pace the CPU demo service keeps up with, or a trace file), replay it with progress
bars on stderr, print the comparison and write the JSON report. Wrong input, including
a trace size the service cannot make, is one ``error:`` line and exit 2 before anything
is generated; a service that cannot be reached is exit 1. A request the service refuses
during the run is not an exit: it is counted as failed in the report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, TaskID

from wattserve._client import DEFAULT_BASE_URL
from wattserve._schemas import RequestPolicy, ReuseMode
from wattserve.bench.live import LiveReport, ProgressFn, VariantSummary, run_live
from wattserve.bench.trace import (
    PRESET_DEFAULTS,
    PRESETS,
    Trace,
    TraceHeader,
    load_prompts,
    make_trace,
    preset_prompts,
    preset_spec,
    read_trace,
)
from wattserve.cli._common import ApiKeyOption, JsonOption, UrlOption, errors, fail
from wattserve.cli._render import console, print_json, table

DEFAULT_REQUESTS = 40  # a preset's length here: ~1-2 minutes on the CPU demo service
DEFAULT_RATE_PER_S = 2.0  # arrivals/s for a preset: what the CPU demo service keeps up with
DEMO_PROMPTS = "demo_prompts.txt"
PHASE_LABELS: dict[RequestPolicy, str] = {
    "default": "generating",
    "baseline": "conventional baseline (no wattserve savings)",
    "competent": "competent baseline (fixed tier variants, batched, no reuse)",
}


@contextmanager
def progress_bars(where: Console) -> Iterator[ProgressFn]:
    """A rich progress bar per replay phase, fed by ``bench.live.replay``'s callback.

    The bars start with the first request, so an error before any leaves no trace.
    """
    bars = Progress(console=where, transient=False)
    tasks: dict[RequestPolicy, TaskID] = {}

    def update(policy: RequestPolicy, done: int, total: int) -> None:
        if not tasks:
            bars.start()
        if policy not in tasks:
            tasks[policy] = bars.add_task(PHASE_LABELS[policy], total=total)
        bars.update(tasks[policy], completed=done)

    try:
        yield update
    finally:
        if tasks:
            bars.stop()


def bench(
    trace: Annotated[
        str, typer.Option(help=f"A preset ({', '.join(PRESETS)}) or a trace file (JSONL).")
    ],
    url: UrlOption = DEFAULT_BASE_URL,
    requests: Annotated[
        int | None, typer.Option(help=f"Requests, for a preset (default {DEFAULT_REQUESTS}).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help=f"Trace seed, for a preset (default {PRESET_DEFAULTS['seed']})."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Prompt file, for a preset (default: the demo prompts)."),
    ] = None,
    rate_per_s: Annotated[
        float | None,
        typer.Option(help=f"Arrivals/s, for a preset (default {DEFAULT_RATE_PER_S:g})."),
    ] = None,
    speed: Annotated[
        float, typer.Option(help="Replay speed: arrival times are divided by it.")
    ] = 1.0,
    max_in_flight: Annotated[int, typer.Option(help="Requests outstanding at most.")] = 64,
    no_baseline: Annotated[
        bool, typer.Option("--no-baseline", help="Skip both baseline phases (no factors).")
    ] = False,
    no_competent: Annotated[
        bool,
        typer.Option(
            "--no-competent",
            help="Skip the competent baseline's phase (fixed tier variants, batched, no reuse).",
        ),
    ] = False,
    salt: Annotated[
        int | None,
        typer.Option(
            help="Offset added to every seed (default: random per run, so no run "
            "is served from the cache of an earlier one); give one to reproduce a run."
        ),
    ] = None,
    no_salt: Annotated[
        bool,
        typer.Option(
            "--no-salt",
            help="Send the seeds of the trace unchanged (an earlier run may have cached them).",
        ),
    ] = False,
    reuse: Annotated[
        str,
        typer.Option(
            help="exact, or approximate: first a phase whose unseeded requests ask "
            "reuse=approximate, then the exact one (both against one baseline)."
        ),
    ] = "exact",
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path("bench-report.json"),
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Replay a trace against a running service, then its baselines; print the factors."""
    if no_salt and salt is not None:
        fail("--salt and --no-salt contradict each other: give one", code=2)
    if reuse not in ("exact", "approximate"):
        fail(f"--reuse: want exact or approximate, got {reuse!r}", code=2)
    if not out.parent.is_dir():
        fail(f"--out: no directory {out.parent} to write the report in", code=2)
    replayed = _trace(trace, requests, seed, prompts, rate_per_s)
    try:
        with progress_bars(Console(stderr=True)) as progress, errors():
            report = asyncio.run(
                run_live(url, replayed, speed=speed, max_in_flight=max_in_flight,
                         baseline=not no_baseline, competent=not no_competent, api_key=api_key,
                         salt=0 if no_salt else salt, progress=progress,
                         reuse=cast(ReuseMode, reuse))
            )  # fmt: skip
    except ValueError as exc:  # refused before anything was generated
        fail(str(exc), code=2)
    out.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if json_out:
        print_json(report)
        return
    _print_summary(report, out, _latency_figure(report, out))


def _trace(
    trace: str,
    requests: int | None,
    seed: int | None,
    prompts: Path | None,
    rate_per_s: float | None,
) -> Trace:
    """A preset's trace, made in memory, or a trace file; exits 2 on bad input."""
    if trace not in PRESETS:
        given = {"--requests": requests, "--seed": seed, "--prompts": prompts,
                 "--rate-per-s": rate_per_s}  # fmt: skip
        for option, value in given.items():
            if value is not None:
                fail(f"{option}: applies to a preset; {trace!r} is read as a trace file", 2)
        try:
            return read_trace(trace)
        except OSError as exc:
            fail(f"--trace: cannot read {trace} (presets: {', '.join(PRESETS)}): "
                 f"{exc.strerror or exc}", code=2)  # fmt: skip
        except ValueError as exc:
            fail(f"--trace: {exc}", code=2)
    overrides: dict[str, float] = {
        "requests": DEFAULT_REQUESTS if requests is None else requests,
        "rate_per_s": DEFAULT_RATE_PER_S if rate_per_s is None else rate_per_s,
    }
    if seed is not None:
        overrides["seed"] = seed
    source = (prompts or preset_prompts(trace)
              or Path(str(resources.files("wattserve.cli") / DEMO_PROMPTS)))  # fmt: skip
    try:
        spec = preset_spec(trace, **overrides)
        prompt_set = load_prompts(source)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        fail(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}", code=2)
    except OSError as exc:
        fail(f"--prompts: cannot read {source}: {exc.strerror or exc}", code=2)
    except ValueError as exc:
        fail(f"--prompts: {exc}", code=2)
    header = TraceHeader(**spec.model_dump(), preset=trace, prompts=prompt_set.source)
    return Trace(header, tuple(make_trace(spec, prompt_set.prompts)))


def _hardware(report: LiveReport) -> str:
    return ", ".join(f"{d.count} x {d.name} ({d.source})" for d in report.hardware) or "none listed"


def _latency_figure(report: LiveReport, out: Path) -> str:
    """The latency CDF of both phases as a PNG beside the report; what was written."""
    try:
        from wattserve.bench.plots import latency_png
    except ImportError:
        return "no figure: matplotlib is not installed; pip install 'wattserve[serve]'"
    phases = {"wattserve": report.achieved}
    if report.competent is not None:
        phases["competent baseline"] = report.competent
    if report.baseline is not None:
        phases["conventional baseline"] = report.baseline
    latencies_s = {
        name: [r.latency_s for r in phase.requests if r.status == "ok"]
        for name, phase in phases.items()
    }
    caption = {  # what the figure rests on, as the simulator's figures name it
        "trace": report.trace.model_dump(mode="json"),
        "hardware": f"{_hardware(report)}, behind {report.url}",
        "energy_source": "measured by the service: "
        + ", ".join(report.achieved.summary.energy_sources),
        "baseline": report.baseline_name,
        "competent": report.competent_name if report.competent else None,
        "quality_floors": report.quality_floors,
    }
    path = latency_png(caption, latencies_s, "latency (s, client side, from scheduled arrival)",
                       out.with_name(f"{out.stem}-latency.png"))  # fmt: skip
    return f"and {path}"


def _print_summary(report: LiveReport, out: Path, figure: str) -> None:
    """The phases side by side, per variant, then the factors and what they rest on."""
    phases = [("wattserve", report.achieved.summary)]
    if report.approximate is not None:
        phases.insert(0, ("approximate", report.approximate.summary))
    if report.competent is not None:
        phases.append(("competent baseline", report.competent.summary))
    if report.baseline is not None:
        phases.append(("conventional baseline", report.baseline.summary))
    header = report.trace
    table(
        f"{header.preset or 'trace'} x {header.requests} against {report.url}",
        ["run", "outputs", "failed", "J/output", "J/output incl. idle", "source", "p50 s",
         "p95 s", "p99 s", "out/s", "generated", "coalesced", "hits", "avg batch"],
        [[name, s.outputs, s.outputs_failed, s.joules_per_output,
          s.fleet.joules_per_output if s.fleet else None, ",".join(s.energy_sources),
          s.latency_s.p50, s.latency_s.p95, s.latency_s.p99, s.throughput_outputs_per_s,
          s.generated, s.coalesced, s.cache_hits, s.mean_batch_size] for name, s in phases],
    )  # fmt: skip
    variants = sorted({v for _, s in phases for v in s.by_variant})
    table(
        "per variant",
        ["variant"] + [f"{name} {what}" for name, _ in phases for what in ("outputs", "J/output")],
        [[v] + [cell for _, s in phases for cell in _variant_cells(s.by_variant.get(v))]
         for v in variants],
    )  # fmt: skip
    _print_factors(report)
    _print_approximate(report)
    split = report.savings
    causes = ", ".join(f"{k} {v:,.0f} J" for k, v in split.by_cause_joules.items())
    fraction = "-" if split.saved_fraction is None else f"{split.saved_fraction:.0%}"
    console.print(
        f"split by cause against the priced baseline ({split.baseline_name}, "
        f"{split.baseline_joules_per_output:,.1f} J/output): {fraction} = {causes}"
    )
    floors = ", ".join(f"{tier} >= {floor:g}" for tier, floor in report.quality_floors.items())
    console.print(
        f"trace {header.preset or '-'} seed {header.seed} ({header.prompts.name}), speed "
        f"{report.speed:g}x; hardware {_hardware(report)}; quality floors {floors}; "
        f"seeds salted by {report.salt.offset} ({report.salt.chosen}); wrote {out} {figure}"
    )


def _print_factors(report: LiveReport) -> None:
    """The factor against each baseline that ran, over active and over all fleet energy."""
    achieved = report.achieved.summary
    measured = [
        ("conventional", report.baseline, report.factor, report.fleet_factor,
         "policy=baseline: highest-quality variant, batch 1, no cache"),
        ("competent", report.competent, report.competent_factor, report.competent_fleet_factor,
         "policy=competent: fixed variant per tier, batched, no cache"),
    ]  # fmt: skip
    if report.baseline is None:
        console.print(f"no factor: baseline {report.baseline_name}")
    for name, phase, active, fleet, what in measured:
        if phase is None or active is None:
            continue
        base = phase.summary
        idle = ""
        if fleet is not None and base.fleet and achieved.fleet:
            idle = (
                f"; {fleet:.2f}x over all fleet energy incl. idle "
                f"({base.fleet.joules_per_output:,.1f} vs {achieved.fleet.joules_per_output:,.1f}"
                " J/output, from the service's device books)"
            )
        console.print(
            f"factor {active:.2f}x vs its in-run {name} baseline: {base.joules_per_output:,.1f} "
            f"J/output measured with {what} vs {achieved.joules_per_output:,.1f} J/output with "
            f"wattserve ({1 - 1 / active:.0%} less, active energy; "
            f"{', '.join(achieved.energy_sources)}){idle}"
        )


def _print_approximate(report: LiveReport) -> None:
    """The approximate phase against the exact one and the baseline, when it ran."""
    if report.approximate is None:
        return
    s, split = report.approximate.summary, report.approximate_savings
    against = "-" if report.approximate_factor is None else f"{report.approximate_factor:.2f}x"
    ratio = "-" if report.approximate_vs_exact is None else f"{report.approximate_vs_exact:.2f}x"
    saved = split.by_cause_joules.get("approximate_cache", 0.0) if split else 0.0
    console.print(
        f"approximate reuse on: factor {against} vs the same baseline, {ratio} vs exact "
        f"reuse; {s.approximate} of {s.outputs} outputs resumed ({s.steps_skipped} steps "
        f"skipped), approximate_cache {saved:,.0f} J"
    )
    pairs = [f"{v} {c.resumed_joules_per_output:,.1f} J resumed ({c.resumed}, "
             f"{c.steps_skipped_mean:g} steps skipped on average) vs "
             f"{c.full_joules_per_output:,.1f} J full ({c.full})"
             for v, c in report.resumed_vs_full.items() if c.resumed and c.full]  # fmt: skip
    if pairs:
        console.print("in that phase, per variant: " + "; ".join(pairs))


def _variant_cells(found: VariantSummary | None) -> list[float | None]:
    """Outputs and J/output of a variant in one phase, or blanks where it made none."""
    return [None, None] if found is None else [found.outputs, found.joules_per_output]
