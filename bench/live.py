"""Replay a trace against a running wattserve service, and measure its baseline in the same run.

``run_live`` sends a trace's requests through the async SDK at their arrival times
(``arrival_s / speed`` after the start, at most ``max_in_flight`` outstanding), first
with the service's default policy, then — once every answer is in — the *same* requests
again under each named baseline: ``policy="baseline"`` (the conventional one: the
highest-quality variant that can make each size, a batch of one, no cache, no
coalescing) and ``policy="competent"`` (what an engineer would configure by hand: each
tier on the variant with the lowest declared J/image meeting its floor, batched with the
policy's cap and wait, no cache, no coalescing). All phases run on the same service and
the same machine minutes apart, so their ratios (the *factors*, a baseline's J/output
over achieved J/output) hold on a noisy machine where absolute joules drift between runs.
Each phase also reads the service's device books before and after it, for J/output over
all fleet energy, idle included, beside the receipts' active J/output.

With ``reuse="approximate"`` one more phase comes first: the same requests with every
unseeded one asking ``reuse: approximate`` (seeded ones stay exact, as the service's
policy default would leave them), under a seed salt of its own so that its exact outputs
never serve the exact phase from the result cache. It runs first because its own
requests are what it resumes from: run after the exact phase it would resume from that
phase's latents of the very same prompts. On a service that already holds latents of
these prompts (an earlier run), its hits include those: bench on a fresh service home.

The saving is also split by cause (``telemetry.savings``) on the first phase's receipts,
against the *priced* baseline: the reference variant's mean batch-1 joules in that same
phase. The split explains the saving; the measured factor is the headline.

The service's result cache persists across runs, so a second replay of the same trace
would be served from the first one's cache. Every seed is therefore offset by a salt
drawn once per run (the same for every request, so a trace's repeats stay repeats);
a given salt reproduces a run, and salt 0 sends the trace's own seeds.

Nothing is dropped: a request the service refuses (4xx/5xx) or cannot be sent counts its
outputs as failed, with the status and message, in the report. A trace's tenant name is
sent as the request's ``user`` (the service knows tenants by API key; one ``api_key``
serves the whole run). No Ray import here: this is a client of the service like any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel

import wattserve
from wattserve import AsyncClient, TransportError, VariantInfo, WattserveError
from wattserve._schemas import (
    MAX_SEED,
    ClusterStatus,
    ReconciliationInfo,
    RequestPolicy,
    ReuseMode,
    parse_size,
)
from wattserve.bench._live_stats import (
    FLEET_NOTE,
    FleetEnergy,
    Outcome,
    PhaseReport,
    PhaseRun,
    PhaseSummary,
    RequestRecord,
    ResumedVsFull,
    SavingsSplit,
    VariantSummary,
    batch_sizes,
    by_source,
    factor,
    fleet_energy,
    fleet_factor,
    percentile,
    receipts_of,
    records,
    resumed_vs_full,
    split_savings,
    summarize,
)
from wattserve.bench.trace import Trace, TraceHeader, TraceRequest, trace_stats
from wattserve.policies.policy import Policy

__all__ = [
    "ENERGY_NOTE",
    "FleetEnergy",
    "LiveReport",
    "Outcome",
    "PhaseRun",
    "PhaseSummary",
    "ProgressFn",
    "RequestRecord",
    "SavingsSplit",
    "VariantSummary",
    "batch_sizes",
    "by_source",
    "check_sizes",
    "choose_salt",
    "factor",
    "fleet_factor",
    "percentile",
    "receipts_of",
    "replay",
    "run_live",
    "salted",
    "split_savings",
    "summarize",
]

MAX_SALT = 2**62  # salted trace seeds (< 2**31) stay far below MAX_SEED
ENERGY_NOTE = (
    "Joules labeled 'simulated' come from a simulated GPU (idle 70 W, capped at 700 W) whose "
    "draw rises by each running batch's declared power_w; its energy counter is sampled and "
    "split among overlapping batches by the node's telemetry agent, exactly as a real NVML "
    "counter would be. No GPU power was read. 'nvml-counter'/'nvml-power' figures come from "
    "the device; 'estimated' ones from declared power x wall time when no reading covered "
    "the batch."
)
BASELINE_NAME = (
    "conventional baseline, measured: the same requests replayed with policy=baseline on the "
    "same service right after (the highest-quality variant that can make each size, batch "
    "size 1, no cache, no coalescing), at the same arrival times"
)
COMPETENT_NAME = (
    "competent baseline, measured: the same requests replayed with policy=competent on the "
    "same service (each tier on the variant with the lowest declared J/image whose declared "
    "quality meets its floor, dynamic batching with the policy's cap and wait, no cache, no "
    "coalescing; a power cap in force still applies, as a safety limit), at the same "
    "arrival times"
)
FACTOR_NOTE = (
    "a baseline's J/output / achieved J/output, both measured in this run on the same "
    "service; above 1 means wattserve used less energy per output. factor and "
    "competent_factor are over active energy (the receipts), fleet_factor and "
    "competent_fleet_factor over all fleet energy, idle included (fleet_energy_note). "
    "J/output counts served outputs only; failed outputs are listed per phase."
)

# Called with (policy of the phase, requests answered, requests in the phase).
ProgressFn = Callable[[RequestPolicy, int, int], None]


class SaltInfo(BaseModel):
    """The offset added to every seed of the run, and why it is there."""

    offset: int
    chosen: Literal["random", "given", "off"]
    note: str = (
        "every seed is the trace's seed plus this offset (the same for all requests, so "
        "repeats stay repeats), so this run is not served from an earlier run's cache; "
        "--salt OFFSET reproduces it"
    )


class DeviceGroup(BaseModel):
    """Devices of one name and energy source, as ``GET /v1/status`` lists them."""

    name: str
    source: str
    count: int


class LiveReport(BaseModel):
    """Everything ``wattserve bench`` measured, named so the figures can be checked."""

    wattserve_version: str
    created_at: datetime
    url: str
    trace: TraceHeader
    trace_stats: dict[str, Any]
    speed: float
    max_in_flight: int
    salt: SaltInfo
    hardware: list[DeviceGroup]
    quality_floors: dict[str, float]  # the policy's floors per tier (not served by the API)
    variant_quality: dict[str, float]
    energy_note: str = ENERGY_NOTE
    achieved: PhaseReport
    baseline_name: str
    baseline: PhaseReport | None
    factor: float | None
    factor_note: str = FACTOR_NOTE
    competent_name: str = "not measured (--no-baseline or --no-competent)"
    competent: PhaseReport | None = None
    competent_factor: float | None = None
    fleet_factor: float | None = None  # against the conventional baseline, idle included
    competent_fleet_factor: float | None = None
    fleet_energy_note: str = FLEET_NOTE
    savings: SavingsSplit
    # reuse="approximate": the phase with approximate reuse on, its factor against the same
    # baseline, exact J/output over its J/output, and its own savings split
    approximate: PhaseReport | None = None
    approximate_factor: float | None = None
    approximate_vs_exact: float | None = None
    approximate_savings: SavingsSplit | None = None
    # within the approximate phase, per variant: resumed vs full generations' J/output —
    # the same machine at the same minutes, so the least noisy view of what a resume saves
    resumed_vs_full: dict[str, ResumedVsFull] = {}


def choose_salt(salt: int | None) -> SaltInfo:
    """The run's seed offset: random when None, none when 0, else ``salt``.

    Raises:
        ValueError: ``salt`` is outside 0..2**62.
    """
    if salt is None:
        return SaltInfo(offset=random.SystemRandom().randrange(1, MAX_SALT), chosen="random")
    if not 0 <= salt <= MAX_SALT:
        raise ValueError(f"--salt: want 0..{MAX_SALT}, got {salt}")
    return SaltInfo(offset=salt, chosen="given" if salt else "off")


def salted(requests: Sequence[TraceRequest], offset: int) -> list[TraceRequest]:
    """``requests`` with every seed moved by ``offset`` (unseeded ones stay unseeded)."""
    if not offset:
        return list(requests)
    return [
        r if r.seed is None else r.model_copy(update={"seed": (r.seed + offset) % (MAX_SEED + 1)})
        for r in requests
    ]


def check_sizes(requests: Sequence[TraceRequest], variants: Sequence[VariantInfo]) -> None:
    """Refuse a trace with a size no variant of the service can make, before sending.

    Only the largest side is checked: that is the size limit ``GET /v1/models`` serves.

    Raises:
        ValueError: names each such size, how many requests ask for it, and the limit.
    """
    largest = max((v.max_size_px for v in variants), default=0)
    wanted = Counter(r.size for r in requests)
    beyond = [size for size in wanted if max(parse_size(size)) > largest]
    if beyond:
        asked = ", ".join(f"{size} ({wanted[size]} requests)" for size in sorted(beyond))
        raise ValueError(
            f"no variant of the service can make {asked}: the largest side any of its "
            f"{len(variants)} variants makes is {largest} px"
        )


async def replay(
    client: AsyncClient,
    requests: Sequence[TraceRequest],
    *,
    policy: RequestPolicy = "default",
    speed: float = 1.0,
    max_in_flight: int = 64,
    keep_images: bool = False,
    progress: ProgressFn | None = None,
    reuse: ReuseMode = "exact",
) -> PhaseRun:
    """Send ``requests`` at ``arrival_s / speed`` after the start, ``max_in_flight`` at most.

    A request due while ``max_in_flight`` are outstanding waits for one to finish; its
    latency still counts from its scheduled arrival, so a saturated client shows up as
    latency instead of hiding it. A service error or an unreachable service becomes a
    failed ``Outcome``; anything else (a bug) cancels the replay. Images are kept only
    when asked (the demo's contact sheet): a long trace's PNGs add up.
    """
    gate = asyncio.Semaphore(max_in_flight)
    outcomes: list[Outcome] = []
    start = time.monotonic()
    if progress:
        progress(policy, 0, len(requests))

    async def send(index: int, request: TraceRequest, due_s: float) -> None:
        sent_s = time.monotonic() - start
        try:
            result = await client.generate(
                request.prompt, n=request.n, size=request.size, seed=request.seed,
                quality=request.quality, user=request.tenant, policy=policy,
                reuse="approximate" if reuse == "approximate" and request.seed is None else None,
            )  # fmt: skip
        except WattserveError as exc:
            status = None if isinstance(exc, TransportError) else exc.status_code
            outcome = Outcome(index, request, sent_s, time.monotonic() - start - due_s,
                              http_status=status, error=exc.message)  # fmt: skip
        else:
            outcome = Outcome(index, request, sent_s, time.monotonic() - start - due_s,
                              receipts=tuple(result.receipts),
                              images=tuple(result.images) if keep_images else ())  # fmt: skip
        finally:
            gate.release()
        outcomes.append(outcome)
        if progress:
            progress(policy, len(outcomes), len(requests))

    async with asyncio.TaskGroup() as tasks:
        for index, request in enumerate(requests):
            due_s = request.arrival_s / speed
            wait_s = start + due_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await gate.acquire()
            tasks.create_task(send(index, request, due_s))
    wall_s = time.monotonic() - start
    return PhaseRun(policy, sorted(outcomes, key=lambda o: o.index), wall_s, reuse)


async def run_live(
    url: str,
    trace: Trace,
    *,
    speed: float = 1.0,
    max_in_flight: int = 64,
    baseline: bool = True,
    competent: bool = True,
    api_key: str | None = None,
    salt: int | None = None,
    progress: ProgressFn | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    reuse: ReuseMode = "exact",
) -> LiveReport:
    """Replay ``trace`` against the service at ``url``, then its baselines; report all.

    ``baseline=False`` skips both baselines; ``competent=False`` only the competent one.
    ``reuse="approximate"``: first a phase with approximate reuse on (module docstring).

    ``transport`` is the SDK's seam: tests answer without a service.

    Raises:
        ValueError: bad ``speed``/``max_in_flight``/``salt``, or a trace size the
            service cannot make; nothing has been generated then.
        WattserveError: the service could not be asked for its variants or status.
    """
    if not speed > 0:
        raise ValueError(f"--speed: must be above 0, got {speed}")
    if max_in_flight < 1:
        raise ValueError(f"--max-in-flight: must be at least 1, got {max_in_flight}")
    salt_info = choose_salt(salt)
    async with AsyncClient(url, api_key, transport=transport) as client:
        variants = await client.variants()
        check_sizes(trace.requests, variants)
        status = await client.status()
        sent = salted(trace.requests, salt_info.offset)
        phase = functools.partial(_phase, client, [d.source for d in status.devices],
                                  speed=speed, max_in_flight=max_in_flight,
                                  progress=progress)  # fmt: skip
        approximate = None
        if reuse == "approximate":
            own_salt = (salt_info.offset + MAX_SALT // 2) % MAX_SALT  # its own cache entries
            approximate = await phase(salted(trace.requests, own_salt), reuse="approximate")
        achieved = await phase(sent)
        measured = await phase(sent, policy="baseline") if baseline else None
        hand_set = await phase(sent, policy="competent") if baseline and competent else None
    report = live_report(url, trace, variants, status, achieved, measured, salt_info,
                         speed=speed, max_in_flight=max_in_flight)  # fmt: skip
    return with_approximate(with_competent(report, hand_set), approximate, variants)


async def _phase(
    client: AsyncClient, sources: Sequence[str], requests: Sequence[TraceRequest], **replayed: Any
) -> PhaseRun:
    """One ``replay`` between two readings of the service's device books (``FLEET_NOTE``)."""
    before, start = await _books(client), time.monotonic()
    run = await replay(client, requests, **replayed)
    after, window_s = await _books(client), time.monotonic() - start
    if before is None or after is None:
        return run
    outputs = len(receipts_of(run.outcomes))
    return dataclasses.replace(run, fleet=fleet_energy(before, after, window_s, outputs, sources))


async def _books(client: AsyncClient) -> ReconciliationInfo | None:
    """The service's device books now; None where it will not say (then no fleet figure)."""
    try:
        return (await client.report()).reconciliation
    except WattserveError:  # a tenant's key may not read them; a service may predate them
        return None


def with_competent(report: LiveReport, run: PhaseRun | None) -> LiveReport:
    """``report`` with the competent phase and the factors against it (if it ran)."""
    if run is None:
        return report
    summary, achieved = summarize(run), report.achieved.summary
    return report.model_copy(update={
        "competent_name": COMPETENT_NAME,
        "competent": PhaseReport(summary=summary, requests=records(run)),
        "competent_factor": factor(summary, achieved),
        "competent_fleet_factor": fleet_factor(summary, achieved),
    })  # fmt: skip


def with_approximate(
    report: LiveReport,
    run: PhaseRun | None,
    variants: Sequence[VariantInfo],
) -> LiveReport:
    """``report`` with the approximate phase, its factors and its split (if it ran)."""
    if run is None:
        return report
    summary = summarize(run)
    reference = report.savings.reference
    prior = next((v.joules_per_image_prior for v in variants if v.id == reference), None)
    exact = report.achieved.summary
    return report.model_copy(update={
        "approximate": PhaseReport(summary=summary, requests=records(run)),
        "approximate_factor": factor(report.baseline.summary, summary) if report.baseline
        else None,
        "approximate_vs_exact": factor(exact, summary),
        "approximate_savings": split_savings(receipts_of(run.outcomes), reference, prior),
        "resumed_vs_full": resumed_vs_full(receipts_of(run.outcomes)),
    })  # fmt: skip


def live_report(
    url: str,
    trace: Trace,
    variants: Sequence[VariantInfo],
    status: ClusterStatus,
    achieved: PhaseRun,
    measured: PhaseRun | None,
    salt: SaltInfo,
    *,
    speed: float,
    max_in_flight: int,
) -> LiveReport:
    """The report of the default and conventional phases and what the service said of itself."""
    achieved_summary = summarize(achieved)
    baseline_summary = summarize(measured) if measured else None
    reference = _reference(measured, variants)
    prior = next((v.joules_per_image_prior for v in variants if v.id == reference), None)
    devices = Counter((d.name, d.source) for d in status.devices)
    return LiveReport(
        wattserve_version=wattserve.__version__,
        created_at=datetime.now(UTC),
        url=url,
        trace=trace.header,
        trace_stats=trace_stats(trace.requests),
        speed=speed,
        max_in_flight=max_in_flight,
        salt=salt,
        hardware=[
            DeviceGroup(name=name, source=source, count=count)
            for (name, source), count in sorted(devices.items())
        ],
        quality_floors=dict(Policy().quality_floors),
        variant_quality={v.id: v.quality_score for v in sorted(variants, key=lambda v: v.id)},
        achieved=PhaseReport(summary=achieved_summary, requests=records(achieved)),
        baseline_name=BASELINE_NAME if measured else "not measured (--no-baseline)",
        baseline=(
            PhaseReport(summary=baseline_summary, requests=records(measured))
            if measured and baseline_summary
            else None
        ),
        factor=factor(baseline_summary, achieved_summary) if baseline_summary else None,
        fleet_factor=fleet_factor(baseline_summary, achieved_summary) if baseline_summary else None,
        savings=split_savings(receipts_of(achieved.outcomes), reference, prior),
    )


def _reference(measured: PhaseRun | None, variants: Sequence[VariantInfo]) -> str:
    """The variant the baseline phase served most with; else the service's top quality.

    The second is the variant the baseline policy would pick for a size every variant
    makes (``policies.routing.reference_variant``), for a run without a baseline phase.
    """
    used = Counter(r.variant for r in receipts_of(measured.outcomes)) if measured else Counter()
    if used:
        return used.most_common(1)[0][0]
    return max(variants, key=lambda v: (v.quality_score, v.id)).id
