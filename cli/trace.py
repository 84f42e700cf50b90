"""``wattserve trace``: make and inspect the workload traces benchmarks replay.

``make`` builds a preset's spec with any field overridden, writes the trace and prints
what it realised; ``show`` prints a trace file's header and statistics. Both are pure
``bench.trace`` calls. Wrong input (an unknown preset, a malformed weight list, an
unreadable prompt file, a value out of range) is one ``error:`` line and exit 2, and
no trace file is written.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from wattserve.bench.trace import (
    PRESET_DEFAULTS,
    PRESETS,
    PromptSet,
    TraceHeader,
    TraceSpec,
    default_order,
    load_prompts,
    make_trace_file,
    preset_prompts,
    preset_spec,
    read_trace,
    trace_stats,
)
from wattserve.cli._common import JsonOption, fail, option_name
from wattserve.cli._render import fields, print_json


def _default(field: str) -> str:
    """``(default X)`` for a help text, read from ``TraceSpec`` so the two cannot drift."""
    return f"(default {TraceSpec.model_fields[field].default})"


trace_app = typer.Typer(
    help="Make and inspect workload traces (JSONL) for benchmarks.", no_args_is_help=True
)


@trace_app.command()
def make(
    out: Annotated[Path, typer.Option(help="Where to write the trace (JSONL).")],
    preset: Annotated[str, typer.Option(help=f"One of {', '.join(PRESETS)}.")] = "mixed",
    requests: Annotated[
        int | None, typer.Option(help=f"Requests (default {PRESET_DEFAULTS['requests']}).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Trace seed (default {PRESET_DEFAULTS['seed']}).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="A .tsv with a Prompt column (PartiPrompts) or one prompt per line "
            "(default: the preset's own file in the data dir, else the demo prompts)."
        ),
    ] = None,
    prompt_order: Annotated[
        str | None,
        typer.Option(
            help="How new requests take prompts: shuffled passes, or file (the file's "
            "order; default for a preset that says so and for a known session log, such "
            "as diffusiondb_prompts_5k.txt)."
        ),
    ] = None,
    repeat_rate: Annotated[
        float | None,
        typer.Option(
            help="Fraction of requests repeating an earlier one (default: from the preset)."
        ),
    ] = None,
    tiers: Annotated[
        str | None,
        typer.Option(
            help="Tier weights, e.g. draft=50,standard=30,high=20 (default: from the preset)."
        ),
    ] = None,
    sizes: Annotated[
        str | None, typer.Option(help="Size weights, e.g. 64x64=3,128x128=1 (default 64x64=1).")
    ] = None,
    arrival: Annotated[
        str | None, typer.Option(help=f"poisson or bursty (on/off) {_default('arrival')}.")
    ] = None,
    rate_per_s: Annotated[
        float | None,
        typer.Option(
            help=f"Arrivals per second, during ON windows if bursty {_default('rate_per_s')}."
        ),
    ] = None,
    on_s: Annotated[
        float | None, typer.Option(help=f"Bursty: seconds on {_default('on_s')}.")
    ] = None,
    off_s: Annotated[
        float | None, typer.Option(help=f"Bursty: seconds off {_default('off_s')}.")
    ] = None,
    popularity: Annotated[
        str | None,
        typer.Option(
            help=f"Which request a repeat copies: zipf, pareto, uniform {_default('popularity')}."
        ),
    ] = None,
    skew: Annotated[
        float | None, typer.Option(help=f"Zipf exponent or Pareto alpha {_default('skew')}.")
    ] = None,
    seeded_fraction: Annotated[
        float | None,
        typer.Option(
            help=f"Fraction of new requests that carry a seed {_default('seeded_fraction')}."
        ),
    ] = None,
    tenants: Annotated[
        str | None, typer.Option(help="Tenant weights, e.g. acme=3,beta=1 (default: none).")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Write a deterministic trace from a preset (any field overridden); print its stats."""
    prompt_set = _prompts(prompts, preset)
    if prompt_order is None and default_order(prompt_set) == "file":
        prompt_order = "file"
    given = {
        "requests": requests, "seed": seed, "repeat_rate": repeat_rate, "arrival": arrival,
        "rate_per_s": rate_per_s, "on_s": on_s, "off_s": off_s, "popularity": popularity,
        "skew": skew, "seeded_fraction": seeded_fraction, "tiers": _weights(tiers, "--tiers"),
        "sizes": _weights(sizes, "--sizes"), "tenants": _weights(tenants, "--tenants"),
        "prompt_order": prompt_order,
    }  # fmt: skip
    try:
        spec = preset_spec(preset, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        fail(_invalid(exc), code=2)
    except ValueError as exc:
        fail(f"--preset: {exc}", code=2)
    try:
        header, stats = make_trace_file(out, spec, prompt_set, preset=preset)
    except OSError as exc:
        fail(f"--out: cannot write {out}: {exc.strerror or exc}", code=2)
    _show(out, header, stats, json_out)


@trace_app.command()
def show(
    path: Annotated[Path, typer.Argument(help="A trace file (JSONL).", show_default=False)],
    json_out: JsonOption = False,
) -> None:
    """Print how a trace was made (its header) and what it realised."""
    try:
        trace = read_trace(path)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", code=2)
    except ValueError as exc:
        fail(str(exc), code=2)
    _show(path, trace.header, trace_stats(trace.requests), json_out)


def _prompts(given: Path | None, preset: str) -> PromptSet:
    """The prompt file given, else the preset's own, else the demo prompts; exits 2."""
    demo = Path(str(resources.files("wattserve.cli") / "demo_prompts.txt"))
    source = given or (preset_prompts(preset) if preset in PRESETS else None) or demo
    try:
        return load_prompts(source)
    except OSError as exc:
        fail(f"--prompts: cannot read {source}: {exc.strerror or exc}", code=2)
    except ValueError as exc:
        fail(f"--prompts: {exc}", code=2)


def _weights(text: str | None, option: str) -> dict[str, float] | None:
    """``draft=50,high=20`` → ``{"draft": 50.0, "high": 20.0}``; exits 2 if malformed."""
    if text is None:
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, equals, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not equals or not name.strip() or not math.isfinite(weight) or weight < 0:
            fail(f"{option}: want NAME=WEIGHT pairs separated by commas, weights >= 0 "
                 f"(e.g. draft=50,high=20); got {text!r}", code=2)  # fmt: skip
        if name.strip() in weights:
            fail(f"{option}: {name.strip()!r} is listed twice in {text!r}", code=2)
        weights[name.strip()] = weight
    return weights


def _invalid(exc: ValidationError) -> str:
    """The first error of a spec, named by the option that set the field."""
    error = exc.errors(include_url=False)[0]
    why = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return why
    key = "".join(f" {part}" for part in error["loc"][1:2] if isinstance(part, str))
    return f"{option_name(str(error['loc'][0]))}{key}: {why}"


def _show(path: Path, header: TraceHeader, stats: dict[str, Any], json_out: bool) -> None:
    """Print a trace's header and statistics as two tables, or as one JSON object."""
    if json_out:
        print_json({"path": str(path), "header": header, "stats": stats})
        return
    arrival = f"{header.arrival} at {header.rate_per_s:g}/s" + (
        f", {header.on_s:g} s on / {header.off_s:g} s off" if header.arrival == "bursty" else ""
    )
    fields(f"trace {path}", [
        ("preset", header.preset or "-"),
        ("seed", str(header.seed)),
        ("prompts", f"{header.prompts.name} (sha256 {header.prompts.sha256}, "
                    f"{header.prompts.count} prompts)"),
        ("repeat rate", f"{header.repeat_rate:g} ({header.popularity}, skew {header.skew:g})"),
        ("tiers", _mix(header.tiers)),
        ("sizes", _mix(header.sizes)),
        ("prompt order", header.prompt_order),
        ("seeded fraction", f"{header.seeded_fraction:g}"),
        ("arrival", arrival),
        ("tenants", _mix(header.tenants) if header.tenants else "none"),
    ])  # fmt: skip
    rate = stats["mean_rate_per_s"]
    fields("realised", [
        ("requests", f"{stats['requests']:,} ({stats['images']:,} images)"),
        ("repeats", f"{stats['repeats']:,} ({stats['repeat_rate']:.1%})"),
        ("distinct outputs", f"{stats['distinct_outputs']:,}"),
        ("hottest output", f"{stats['hottest_output_share']:.1%} of requests"),
        ("seeded", f"{stats['seeded_fraction']:.1%}"),
        ("tiers", _mix(stats["tiers"], percent=True)),
        ("sizes", _mix(stats["sizes"], percent=True)),
        ("tenants", _mix(stats["tenants"], percent=True) or "none"),
        ("duration", f"{stats['duration_s']:,.1f} s"),
        ("mean rate", "-" if rate is None else f"{rate:.3f}/s"),
    ])  # fmt: skip


def _mix(weights: dict[str, float], percent: bool = False) -> str:
    """``draft 50, high 20`` (or ``draft 50.1%``) for a table cell."""
    return ", ".join(f"{k} {v:.1%}" if percent else f"{k} {v:g}" for k, v in weights.items())
