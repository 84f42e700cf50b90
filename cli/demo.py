"""``wattserve demo``: the main job on embedded defaults.

Starts a local service, sends a built-in workload (the project's own prompts, with
repeats and mixed quality tiers) concurrently through the async SDK, then prints a
per-variant energy table and writes ``demo-report.json`` and a PNG contact sheet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw

import wattserve
from wattserve import AsyncClient, GeneratedImage, Quality, WattserveError
from wattserve._admin import AuditReport
from wattserve._schemas import DEFAULT_SIZE
from wattserve.bench.live import (
    ENERGY_NOTE,
    PhaseRun,
    VariantSummary,
    receipts_of,
    replay,
    split_savings,
    summarize,
)
from wattserve.bench.trace import TraceRequest
from wattserve.cli._demo_audit import (
    DEMO_AUDIT_RATE,
    audit_section,
    audited,
    finished_audit,
    print_audit,
)
from wattserve.cli._render import console, table
from wattserve.cli.bench import progress_bars
from wattserve.cluster.runtime import LocalService, free_port
from wattserve.cluster.settings import Settings
from wattserve.policies.catalog import Catalog
from wattserve.workers.pipelines import TINY_CLIP

TIER_MIX: tuple[tuple[Quality, float], ...] = (("draft", 0.4), ("standard", 0.35), ("high", 0.25))
REPEAT_RATE = 0.3
REPORT_NAME = "demo-report.json"
SHEET_NAME = "demo-contact-sheet.png"
REQUEST_FIELDS = {"prompt", "seed", "quality", "n"}  # what the report lists per request


def demo_prompts() -> list[str]:
    """The project's own demo prompts."""
    text = (resources.files("wattserve.cli") / "demo_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_workload(prompts: list[str], count: int, seed: int) -> list[TraceRequest]:
    """A mixed workload, the same for the same ``seed``: ~30 % repeats, tiers 40/35/25.

    Tiers are draft/standard/high. The first three requests are one per tier, one image
    each, so every tier (and so every built-in variant, and the baseline's reference) is
    measured even in a short run. The image seeds come from ``seed``, so runs with
    different seeds share no outputs through the persistent result cache. Every request
    arrives at once (``arrival_s`` 0): the demo sends them as fast as its concurrency allows.
    """
    rng = random.Random(seed)
    tiers = [tier for tier, _ in TIER_MIX]
    weights = [weight for _, weight in TIER_MIX]
    workload: list[TraceRequest] = []
    for index in range(count):
        if workload and index >= len(tiers) and rng.random() < REPEAT_RATE:
            workload.append(rng.choice(workload))
            continue
        tier = tiers[index] if index < len(tiers) else rng.choices(tiers, weights)[0]
        n = 2 if index >= len(tiers) and rng.random() < 0.15 else 1
        workload.append(TraceRequest(arrival_s=0.0, prompt=rng.choice(prompts),
                                     seed=rng.randrange(2**31), size=DEFAULT_SIZE,
                                     quality=tier, n=n))  # fmt: skip
    return workload


async def _replay_both(
    url: str, workload: list[TraceRequest], concurrency: int
) -> tuple[PhaseRun, PhaseRun]:
    """The workload with wattserve (keeping its images), then as the measured baseline."""
    with progress_bars(console) as progress:
        async with AsyncClient(url) as client:
            achieved = await replay(
                client, workload, max_in_flight=concurrency, keep_images=True, progress=progress
            )
            _all_ok(achieved)
            measured = await replay(
                client, workload, policy="baseline", max_in_flight=concurrency, progress=progress
            )
            _all_ok(measured)
    return achieved, measured


def _all_ok(run: PhaseRun) -> None:
    """Stop when a request failed: a demo missing outputs would misstate its savings."""
    failed = [o for o in run.outcomes if not o.ok]
    if failed:
        raise WattserveError(f"{len(failed)} of {len(run.outcomes)} demo requests failed "
                             f"({run.policy} policy), first: {failed[0].error}")  # fmt: skip


def _variant_row(found: VariantSummary) -> dict[str, object]:
    """A variant's summary in the demo report's own field names (images, not outputs)."""
    return {
        "requests": found.requests,
        "images": found.outputs,
        "generated": found.generated,
        "coalesced": found.coalesced,
        "cache_hits": found.cache_hits,
        "joules": found.joules,
        "joules_per_image": found.joules_per_output,
        "energy_sources": found.energy_sources,
        "latency_ms_p50": found.latency_ms_p50,
    }


def contact_sheet(images: list[GeneratedImage], path: Path, columns: int = 6) -> None:
    """A grid of up to 18 images, each labeled with its variant and joules."""
    shown = images[:18]
    cell, label_h = 96, 24
    rows = max(1, -(-len(shown) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, item in enumerate(shown):
        x, y = (index % columns) * cell, (index // columns) * (cell + label_h)
        sheet.paste(item.image.convert("RGB").resize((cell, cell)), (x, y))
        receipt = item.receipt
        draw.text((x + 2, y + cell + 1), receipt.variant.removeprefix("tiny-sd-"), fill="black")
        draw.text((x + 2, y + cell + 12), f"{receipt.joules:.0f} J", fill="gray")
    sheet.save(path)


def run_demo(
    settings: Settings, out_dir: Path, *, requests: int, concurrency: int, seed: int | None
) -> dict:
    """Start a local service, drive the workload against it, stop it; return the report."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # keep the demo's output readable
    # the audit's CLIP scores: the configured model, else the built-in random-weight one
    settings = dataclasses.replace(
        settings, audit_clip_model=settings.audit_clip_model or TINY_CLIP
    )
    service = LocalService(settings, port=free_port())
    started = time.monotonic()
    console.print(f"starting local Ray + Serve (state: {settings.home}) ...")
    try:
        url = service.start()
        console.print(f"wattserve up at {url} after {time.monotonic() - started:.1f}s")
        assert service.catalog is not None
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        report = drive_workload(url, service.catalog, out_dir, requests, concurrency, seed,
                                admin_token=service.admin_token)  # fmt: skip
    finally:
        service.stop()
    _print_summary(report)
    if report.get("audit") is not None:
        print_audit(AuditReport.model_validate(report["audit"]["report"]))
    return report


def drive_workload(
    url: str,
    catalog: Catalog,
    out_dir: Path,
    requests: int,
    concurrency: int,
    seed: int,
    *,
    admin_token: str | None = None,
    audit_rate: float = DEMO_AUDIT_RATE,
) -> dict:
    """Send the demo workload to a running service; write the report and contact sheet.

    With ``admin_token`` the run is shadow-audited at ``audit_rate`` (``_demo_audit``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = build_workload(demo_prompts(), requests, seed)
    audit = None
    if admin_token is None:
        achieved, measured = asyncio.run(_replay_both(url, workload, concurrency))
    else:
        with audited(url, admin_token, audit_rate) as admin:
            achieved, measured = asyncio.run(_replay_both(url, workload, concurrency))
            found = finished_audit(admin)
        audit = audit_section(found, audit_rate)
    summary, baseline = summarize(achieved), summarize(measured)
    images = [image for outcome in achieved.outcomes for image in outcome.images]
    top = max(catalog.variants, key=lambda v: v.quality_score)
    reference = top.name
    # priced from the run's own batch-1 outputs of the reference; from its catalog prior
    # (labeled estimated) when it made none at batch 1 (an audit held its replica busy)
    savings = split_savings(receipts_of(achieved.outcomes), reference,
                            top.energy_prior.at_batch_size(1))  # fmt: skip
    report = {
        "wattserve_version": wattserve.__version__,
        "created_at": datetime.now(UTC).isoformat(),
        "url": url,
        "energy_note": ENERGY_NOTE,
        "workload": {
            "seed": seed,
            "requests": len(workload),
            "images": summary.outputs,
            "repeat_rate": REPEAT_RATE,
            "tier_mix": dict(TIER_MIX),
            "concurrency": concurrency,
            "wall_s": summary.wall_s,
        },
        "variants": {name: _variant_row(v) for name, v in summary.by_variant.items()},
        "totals": {
            "images": summary.outputs,
            "generations": summary.generated,
            "avoided_by_cache": summary.cache_hits,
            "avoided_by_coalescing": summary.coalesced,
            "average_batch_size": summary.mean_batch_size,
            "joules": summary.joules,
            "joules_per_image": summary.joules_per_output,
            "energy_sources": savings.energy_sources,
        },
        "baseline": {
            "name": savings.baseline_name,
            "joules_per_image": savings.baseline_joules_per_output,
            "joules": savings.baseline_joules,
            "priced_from": "the catalog prior (estimated)"
            if "prior" in savings.baseline_name
            else "mean measured batch-1 joules of that variant in this same run",
        },
        "baseline_measured": {
            "name": "the same workload with policy=baseline: highest-quality variant, batch "
            "size 1, no cache, no coalescing, on the same service right after",
            "images": baseline.outputs,
            "joules": baseline.joules,
            "joules_per_image": baseline.joules_per_output,
            "energy_sources": baseline.energy_sources,
            "variants": sorted(baseline.by_variant),
        },
        "savings": {
            "joules": savings.saved_joules,
            "fraction": savings.saved_fraction,
            "by_cause_joules": savings.by_cause_joules,
            "note": savings.note,
        },
        "audit": audit,  # None: not audited (no admin token)
        "contact_sheet": str(out_dir / SHEET_NAME),
        "requests": [
            {
                **o.request.model_dump(include=REQUEST_FIELDS),
                "receipts": [r.model_dump(mode="json") for r in o.receipts],
            }
            for o in achieved.outcomes
        ],
    }
    contact_sheet(images, out_dir / SHEET_NAME)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_summary(report: dict) -> None:
    table(
        "energy per variant (this run)",
        ["variant", "requests", "images", "generated", "coalesced", "cache hits", "J/image",
         "total J", "source", "p50 ms"],
        [
            [name, v["requests"], v["images"], v["generated"], v["coalesced"], v["cache_hits"],
             v["joules_per_image"], v["joules"], ",".join(v["energy_sources"]),
             v["latency_ms_p50"]]
            for name, v in report["variants"].items()
        ],
    )  # fmt: skip
    totals = report["totals"]
    console.print(
        f"{totals['images']} images: {totals['generations']} generated, "
        f"{totals['avoided_by_coalescing']} coalesced, {totals['avoided_by_cache']} from cache; "
        f"average batch size {totals['average_batch_size']}"
    )
    base, saved = report["baseline"], report["savings"]
    sources = ", ".join(report["totals"]["energy_sources"])
    causes = ", ".join(f"{k} {v:,.0f} J" for k, v in saved["by_cause_joules"].items())
    measured = report["baseline_measured"]
    achieved = report["totals"]["joules_per_image"]
    console.print(
        f"with wattserve {achieved:,.1f} J/image; measured baseline run (same workload, "
        f"highest-quality variant, batch 1, no cache) {measured['joules_per_image']:,.1f} "
        f"J/image: {1 - achieved / measured['joules_per_image']:.0%} less ({sources})"
    )
    console.print(
        f"split by cause against the priced baseline ({base['name']}, "
        f"{base['joules_per_image']:,.1f} J/image priced from {base['priced_from']}): "
        f"{saved['fraction']:.0%} = {causes}"
    )
    audit = report.get("audit")
    if audit is not None:
        spent_j = sum(audit["joules"].values())
        net_j = measured["joules"] - report["totals"]["joules"] - spent_j
        console.print(
            f"the shadow audit's {spent_j:,.0f} J (a cost of proving the savings, booked apart) "
            f"leaves {net_j:,.0f} J saved net against the measured baseline run"
        )
    report_path = Path(report["contact_sheet"]).with_name(REPORT_NAME)
    console.print(f"wrote {report_path} and {report['contact_sheet']}")
