"""``wattserve simulate``: a trace over a simulated fleet, against two baselines and oracle.

A thin shell over ``bench.simulate`` / ``bench.sim_report``: build or read the trace,
price the catalog's variants on the fleet's GPU from the ML.ENERGY data, run achieved and
both baselines (conventional and competent), print the comparison and write the JSON
report. Wrong input is one ``error:``
line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer
from pydantic import ValidationError

from wattserve import WattserveError
from wattserve._admin import ProfileList
from wattserve.bench.fleet import costs_from_profile, fleet_catalog, parse_fleet
from wattserve.bench.profiles import DEFAULT_DATA_DIR, MeasurementsError
from wattserve.bench.sim_report import simulate_report, sweep
from wattserve.bench.simulate import FleetSimulation, RunResult
from wattserve.bench.trace import (
    PRESETS,
    load_prompts,
    make_trace,
    preset_prompts,
    preset_spec,
    read_trace,
)
from wattserve.cli._common import JsonOption, fail
from wattserve.cli._render import print_json, table
from wattserve.policies.catalog import CatalogError, load_catalog
from wattserve.policies.latent_reuse import ReuseMode
from wattserve.policies.policy import Policy

NO_FIGURES = "no figures: matplotlib is not installed; pip install 'wattserve[serve]'"
REAL_CATALOG = Path(__file__).resolve().parent.parent / "policies" / "real_catalog.toml"


def simulate(
    trace: Annotated[str, typer.Option(help=f"A preset ({', '.join(PRESETS)}) or a trace file.")],
    fleet: Annotated[
        str, typer.Option(help="GPUs by type, e.g. 8xH100 or 8xH100,4xB200 (ML.ENERGY types).")
    ],
    requests: Annotated[
        int | None,
        typer.Option(min=1, help="Requests, for a preset (default 2000, or the preset's own)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Trace seed, for a preset.")] = 0,
    size: Annotated[str, typer.Option(help="Image size, for a preset.")] = "1024x1024",
    rate_per_s: Annotated[
        float | None, typer.Option(help="Arrivals/s for a preset (default 0.5 per GPU).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Prompt file for a preset (default: its own, else PartiPrompts)."),
    ] = None,
    reuse: Annotated[
        str,
        typer.Option(
            help="The policy's reuse default: exact, or approximate (unseeded requests may "
            "resume from a similar prompt's kept latent; similarity by the labeled "
            "tfidf-proxy, see bench/similarity.py)."
        ),
    ] = "exact",
    latent_cache_mb: Annotated[
        float | None,
        typer.Option(help="Latent store cap, MiB, with --reuse approximate (default 1024)."),
    ] = None,
    cap_w: Annotated[float | None, typer.Option(help="Fleet power cap, W.")] = None,
    target_j: Annotated[
        float | None,
        typer.Option(help="J/output target: over it, batches wait longer to fill (as live)."),
    ] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option(
            help="The policy's default deadline, s: routing passes over variants "
            "expected to miss it (how work spills to other GPUs)."
        ),
    ] = None,
    catalog: Annotated[
        Path | None,
        typer.Option(help="Variant catalog (default: the shipped policies/real_catalog.toml)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="ML.ENERGY data (default: $WATTSERVE_DATA_DIR, else ../shared/data)."),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Price variants from a live service's learned profile (JSON of "
            "GET /admin/profiles) instead of ML.ENERGY, adding its measured time per "
            "request outside batches; the fleet is then the catalog's replicas, as deployed."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path("sim-report.json"),
    sweep_curve: Annotated[
        bool,
        typer.Option("--sweep", help="Also sweep repeat rate x tier mix (a preset's trace)."),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Simulate a trace on a fleet: factors vs both baselines, achieved/oracle, the waterfall."""
    catalog = catalog or REAL_CATALOG
    data_dir = data_dir or DEFAULT_DATA_DIR
    try:
        gpus = parse_fleet(fleet)
        variants = load_catalog(catalog)
        replicas, overhead_s = None, None
        if profile is None:
            variants, costs = fleet_catalog(variants, gpus, data_dir)
            provenance = f"ML.ENERGY v2/v3 on {', '.join(gpus)} ({data_dir.name})"
        else:
            if len(gpus) != 1:
                fail("--fleet: with --profile, one label for the live service's fleet", 2)
            [gpu] = gpus
            learned = ProfileList.model_validate_json(profile.read_text(encoding="utf-8"))
            costs = costs_from_profile(variants, learned, gpu)
            overhead_s = learned.overhead_s
            replicas = {v.name: v.resources.replicas for v in variants.variants if v.name in costs}
            gpus = {gpu: sum(replicas.values())}
            provenance = (f"the live profile in {profile.name} "
                          f"(sources: {', '.join(learned.energy_sources) or 'none'})")  # fmt: skip
    except (WattserveError, CatalogError, MeasurementsError) as exc:
        fail(exc.message, code=2)
    except (OSError, ValidationError) as exc:
        fail(f"--profile: {exc}", code=2)
    if cap_w is not None and cap_w <= 0:
        fail("--cap-w: must be positive", code=2)
    if target_j is not None and target_j <= 0:
        fail("--target-j: must be positive", code=2)
    if deadline_s is not None and deadline_s <= 0:
        fail("--deadline-s: must be positive", code=2)
    latent_max_bytes = _reuse_options(reuse, latent_cache_mb)
    count = sum(gpus.values())
    if trace in PRESETS:
        try:
            count_of = requests or PRESETS[trace].get("requests") or 2000
            spec = preset_spec(trace, requests=count_of, seed=seed, sizes={size: 1},
                               rate_per_s=rate_per_s or 0.5 * count)  # fmt: skip
            prompt_set = load_prompts(
                prompts or preset_prompts(trace, data_dir) or data_dir / "PartiPrompts.tsv"
            )
        except (ValidationError, ValueError, OSError) as exc:
            fail(f"--trace: {exc}", code=2)
        requests_list = make_trace(spec, prompt_set.prompts)
        sweep_from = (spec, prompt_set.prompts)
        header = {**spec.model_dump(mode="json"), "preset": trace,
                  "prompts": prompt_set.source.model_dump()}  # fmt: skip
    else:
        try:
            read = read_trace(trace)
        except (OSError, ValueError) as exc:
            fail(f"--trace: {exc}", code=2)
        requests_list, header = list(read.requests), read.header.model_dump(mode="json")
        sweep_from = (read.header, ())
        if sweep_curve:
            fail("--sweep: needs a preset (it regenerates the trace at each point)", code=2)
    sim = FleetSimulation(variants, costs, gpus, cap_w=cap_w, target_j=target_j,
                          replicas=replicas,
                          overhead_s=overhead_s,
                          policy=Policy(default_deadline_s=deadline_s),
                          reuse=cast(ReuseMode, reuse),  # checked by _reuse_options
                          latent_max_bytes=latent_max_bytes)  # fmt: skip
    report, runs = simulate_report(requests_list, header, sim, fleet, provenance)
    if sweep_curve:
        report["sweep"] = sweep(sim, *sweep_from)
    report["plots"] = _figures(report, runs, out.with_suffix(""))
    out.write_text(json.dumps(report, indent=2, default=str))
    if json_out:
        print_json(report)
        return
    got = report["achieved"]
    _print_runs(report, f"{header.get('preset') or trace} on {fleet} (simulated: {provenance})")
    table(f"waterfall (J, {report['waterfall_basis']})", ["step", "joules"],
          [[k, v] for k, v in report["waterfall_joules"].items()])  # fmt: skip
    baseline_j = report["waterfall_joules"]["baseline"] or 1.0
    table("savings by cause (J, share of the priced baseline)", ["cause", "joules", "share"],
          [[k, v, f"{v / baseline_j:.1%}"]
           for k, v in report["savings_by_cause_joules"].items()])  # fmt: skip
    if reuse == "approximate":
        store = got["latent_store"]
        typer.echo(
            f"approximate reuse: {got['approximate']} of {got['outputs']} outputs resumed "
            f"from a kept latent, {got['steps_skipped_share'] or 0.0:.1%} of generated steps "
            f"skipped; latent store kept {store.get('kept', 0)}, evicted "
            f"{store.get('evicted', 0)}; similarity: {report['reuse']['similarity']}"
        )
    if got["refused"]:
        typer.echo(
            f"achieved refused {got['refused']} of {got['outputs'] + got['refused']} outputs "
            "(a quality floor no variant on this fleet meets, a deadline, or the power cap); "
            "the factors and achieved/oracle are per output served"
        )
    figures = f" and {', '.join(report['plots'])}" if report["plots"] else f" ({NO_FIGURES})"
    typer.echo(
        f"factor vs conventional baseline {_x(report['factor_vs_baseline'])}, vs competent "
        f"baseline {_x(report['factor_vs_competent'])} (active energy); over all fleet energy "
        f"incl. idle {_x(report['fleet_factor_vs_baseline'])} and "
        f"{_x(report['fleet_factor_vs_competent'])}; achieved/oracle "
        f"{report['achieved_over_oracle']:.2f}"
    )
    typer.echo(f"{report['baseline']}\n{report['competent']}\nwrote {out}{figures}")


def _x(factor: float | None) -> str:
    return "-" if factor is None else f"{factor:.2f}x"


def _print_runs(report: dict, title: str) -> None:
    """The three runs and the oracle, J/output over active and over all fleet energy."""
    oracle_per = report["oracle_joules"] / max(report["distinct_outputs"], 1)
    rows = [[name, s["outputs"], s["refused"], s["joules_per_output"] or 0.0,
             s["fleet_joules_per_output"] or 0.0, s["latency_s"]["p50"] or 0.0,
             s["latency_s"]["p99"] or 0.0, s["mean_batch_size"] or 0.0]
            for name, s in (("achieved", report["achieved"]),
                            ("competent baseline", report["competent_run"]),
                            ("conventional baseline", report["baseline_run"]))]  # fmt: skip
    rows.append(["oracle (per distinct output)", report["distinct_outputs"], 0, oracle_per,
                 None, 0.0, 0.0, 0.0])  # fmt: skip
    table(title, ["run", "outputs", "refused", "J/output active", "J/output incl. idle",
                  "p50 s", "p99 s", "mean batch"], rows)  # fmt: skip


def _reuse_options(reuse: str, latent_cache_mb: float | None) -> int | None:
    """The latent store cap in bytes (None: the default); exits 2 on bad input."""
    if reuse not in ("exact", "approximate"):
        fail(f"--reuse: want exact or approximate, got {reuse!r}", code=2)
    if latent_cache_mb is not None and latent_cache_mb <= 0:
        fail("--latent-cache-mb: must be positive", code=2)
    if reuse == "approximate":
        try:
            import sklearn  # noqa: F401, PLC0415 (the [serve] extra)
        except ImportError:
            fail("--reuse approximate: needs scikit-learn; pip install 'wattserve[serve]'", 2)
    return None if latent_cache_mb is None else int(latent_cache_mb * 2**20)


def _figures(report: dict, runs: dict[str, RunResult], stem: Path) -> list[str]:
    """The report's PNGs, or none where matplotlib (the [serve] extra) is not installed."""
    try:
        from wattserve.bench.plots import latency_png, power_png, sweep_png, waterfall_png
    except ImportError:
        return []
    latencies = {name: [r.latency_s for r in run.receipts if r.ok] for name, run in runs.items()}
    paths = [
        waterfall_png(report, Path(f"{stem}-waterfall.png")),
        power_png(report, runs["achieved"], Path(f"{stem}-power.png")),
        latency_png(report, latencies, "latency (s, simulated)", Path(f"{stem}-latency.png")),
    ]
    if "sweep" in report:
        paths.append(sweep_png(report, report["sweep"], Path(f"{stem}-sweep.png")))
    return [str(p) for p in paths]
