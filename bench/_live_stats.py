"""What a live replay measured: pure aggregation from request outcomes to a phase summary.

No I/O and no clock: ``bench.live`` replays a trace and hands its ``Outcome``s here, and
the demo and the tests do the same with outcomes of their own. Every joule stays with
its energy source: totals are also given per source, and a summary lists the sources it
summed, so a figure mixing measured and simulated joules says so.

Counting rules, the same in every phase:

* An *output* is one image. A request that fails (4xx, 5xx, or the service unreachable)
  counts its ``n`` outputs as failed; it has no receipts and no joules.
* Latency is per request, client side, over requests that succeeded (a refusal is fast
  and would flatter the percentiles); percentiles interpolate linearly between ranks,
  so p50 is the median.
* The batch-size distribution counts *batches* (distinct ``batch_id`` of generated
  outputs) by their size, so a batch of 8 counts once; its mean is the mean batch size.
* J/output is given over two energies: *active*, the receipts' joules (what the batches
  drew, charged to their outputs), and *all fleet energy* (``fleet``), every joule the
  service's telemetry agents measured on all devices over the phase, idle draw included
  (the difference of ``GET /v1/report``'s device books before and after it).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from wattserve import GeneratedImage, Receipt
from wattserve._schemas import ReconciliationInfo, RequestPolicy, ReuseMode
from wattserve.bench.trace import TraceRequest
from wattserve.telemetry.savings import savings_by_cause

SAVINGS_NOTE = (
    "split against the priced baseline (every output on the reference variant at its mean "
    "batch-1 joules in this run); the headline factor is the measured baseline run. Power "
    "capping savings are not attributed yet (0 J). A negative batching figure means batched "
    "outputs cost more per image than the same variant's batch-1 outputs in this run (on a "
    "CPU, batching gives no speedup)."
)

FLEET_NOTE = (
    "all fleet energy: every joule the service's telemetry agents measured on all its "
    "devices (GET /v1/report, reconciliation.device_j) from just before a phase's first "
    "request to just after its last answer, idle draw included, over the outputs served; "
    "idle_joules is the part they attributed to no batch. Anything else the service ran in "
    "that window counts too. None: the books could not be read (a tenant's API key may not)."
)


class FleetEnergy(BaseModel):
    """All device energy the service measured over one phase, idle included."""

    device_joules: float
    idle_joules: float
    window_s: float
    mean_power_w: float | None
    joules_per_output: float | None
    energy_sources: list[str]  # the devices' sources (GET /v1/status)


def fleet_energy(
    before: ReconciliationInfo,
    after: ReconciliationInfo,
    window_s: float,
    outputs: int,
    sources: Sequence[str],
) -> FleetEnergy | None:
    """The books' growth between two readings; None if they went back (an agent restarted)."""
    device_j, idle_j = after.device_j - before.device_j, after.idle_j - before.idle_j
    if device_j < 0 or idle_j < 0:
        return None
    return FleetEnergy(
        device_joules=round(device_j, 3),
        idle_joules=round(idle_j, 3),
        window_s=round(window_s, 3),
        mean_power_w=round(device_j / window_s, 3) if window_s > 0 else None,
        joules_per_output=round(device_j / outputs, 3) if outputs else None,
        energy_sources=sorted(set(sources)),
    )


@dataclass(frozen=True)
class Outcome:
    """One request's fate in one replay: its receipts, or why it failed."""

    index: int  # position in the trace
    request: TraceRequest  # as sent (seed salted)
    sent_s: float  # when it was sent, seconds after the replay began
    latency_s: float  # from its scheduled arrival to its answer, client side
    receipts: tuple[Receipt, ...] = ()
    images: tuple[GeneratedImage, ...] = ()  # only when the replay keeps them (the demo)
    http_status: int | None = None  # failed: the service's status; None if never reached
    error: str | None = None  # failed: the service's message

    @property
    def ok(self) -> bool:
        """Whether the service answered with images."""
        return self.error is None


@dataclass(frozen=True)
class PhaseRun:
    """One replay of a trace under one policy: outcomes in trace order, and its length."""

    policy: RequestPolicy
    outcomes: list[Outcome]
    wall_s: float  # from the replay's start to its last answer
    reuse: ReuseMode = "exact"  # what its unseeded requests asked for
    fleet: FleetEnergy | None = None  # all device energy over it, where the books were read


class SourceSummary(BaseModel):
    """Outputs and joules measured by one energy source."""

    outputs: int
    joules: float
    joules_per_output: float


class VariantSummary(BaseModel):
    """What one variant made in a phase; latency here is the service's, per output."""

    requests: int
    outputs: int
    generated: int
    coalesced: int
    cache_hits: int
    joules: float
    joules_per_output: float
    energy_sources: list[str]
    latency_ms_p50: float


class Percentiles(BaseModel):
    """p50/p95/p99 in seconds; None when nothing succeeded."""

    p50: float | None
    p95: float | None
    p99: float | None


class PhaseSummary(BaseModel):
    """Totals of one phase: outputs, joules by source, latency, reuse, batching, variants."""

    policy: RequestPolicy
    reuse: ReuseMode = "exact"  # what its unseeded requests asked for
    requests: int
    requests_failed: int
    outputs: int  # outputs served (images received)
    outputs_failed: int
    failures_by_status: dict[str, int]  # HTTP status ("unreachable" when there was none)
    joules: float
    joules_per_output: float | None
    energy_sources: list[str]
    by_source: dict[str, SourceSummary]
    latency_s: Percentiles
    wall_s: float
    throughput_outputs_per_s: float | None
    generated: int
    coalesced: int
    cache_hits: int
    approximate: int = 0  # generated by resuming a similar prompt's kept latent
    steps_skipped: int = 0  # denoising steps those resumes did not run
    batch_sizes: dict[int, int]  # batch size -> number of batches
    mean_batch_size: float | None
    by_variant: dict[str, VariantSummary]
    fleet: FleetEnergy | None = None  # J/output over all fleet energy (FLEET_NOTE)


class SavingsSplit(BaseModel):
    """The saving of a run split by cause, against the priced baseline."""

    reference: str
    baseline_name: str
    baseline_joules_per_output: float
    baseline_joules: float
    achieved_joules: float
    saved_joules: float
    saved_fraction: float | None
    by_cause_joules: dict[str, float]
    energy_sources: list[str]
    note: str = SAVINGS_NOTE


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values``, interpolated between ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def longest_over_cap_s(samples: Sequence[tuple[float, float]], cap_w: float) -> float:
    """Longest stretch, in s, over which consecutive (time s, W) samples exceeded ``cap_w``."""
    longest, since = 0.0, None
    for at_s, watts in samples:
        if watts > cap_w + 1e-6:
            since = at_s if since is None else since
            longest = max(longest, at_s - since)
        else:
            since = None
    return longest


def receipts_of(outcomes: Sequence[Outcome]) -> list[Receipt]:
    """Every receipt of the outcomes, in trace order."""
    return [receipt for outcome in outcomes for receipt in outcome.receipts]


def by_source(receipts: Sequence[Receipt]) -> dict[str, SourceSummary]:
    """Outputs, joules and J/output per energy source, sources sorted by name."""
    outputs: Counter[str] = Counter()
    joules: defaultdict[str, float] = defaultdict(float)
    for receipt in receipts:
        outputs[receipt.energy_source] += 1
        joules[receipt.energy_source] += receipt.joules
    return {
        source: SourceSummary(outputs=count, joules=round(joules[source], 3),
                              joules_per_output=round(joules[source] / count, 3))
        for source, count in sorted(outputs.items())
    }  # fmt: skip


def by_variant(receipts: Sequence[Receipt]) -> dict[str, VariantSummary]:
    """Outputs, reuse, joules and the service's p50 latency per variant, sorted by name."""
    summary: dict[str, VariantSummary] = {}
    for variant in sorted({r.variant for r in receipts}):
        mine = [r for r in receipts if r.variant == variant]
        joules = sum(r.joules for r in mine)
        summary[variant] = VariantSummary(
            requests=len({r.request_id for r in mine}),
            outputs=len(mine),
            generated=sum(r.cache == "miss" for r in mine),
            coalesced=sum(r.cache == "coalesced" for r in mine),
            cache_hits=sum(r.cache == "hit" for r in mine),
            joules=round(joules, 3),
            joules_per_output=round(joules / len(mine), 3),
            energy_sources=sorted({r.energy_source for r in mine}),
            latency_ms_p50=round(percentile([r.latency_ms for r in mine], 0.5) or 0.0, 1),
        )
    return summary


def batch_sizes(receipts: Sequence[Receipt]) -> dict[int, int]:
    """Batches by size (a batch counted once, from its generated outputs), sizes ascending."""
    sizes = {r.batch_id: r.batch_size for r in receipts if r.cache == "miss"}
    return dict(sorted(Counter(sizes.values()).items()))


def summarize(run: PhaseRun) -> PhaseSummary:
    """Aggregate one phase's outcomes (see the module docstring for the counting rules)."""
    receipts = receipts_of(run.outcomes)
    failed = [o for o in run.outcomes if not o.ok]
    latencies = [o.latency_s for o in run.outcomes if o.ok]
    joules = sum(r.joules for r in receipts)
    batches = batch_sizes(receipts)
    batch_count = sum(batches.values())

    def rounded(value: float | None, places: int) -> float | None:
        return None if value is None else round(value, places)

    return PhaseSummary(
        policy=run.policy,
        reuse=run.reuse,
        requests=len(run.outcomes),
        requests_failed=len(failed),
        outputs=len(receipts),
        outputs_failed=sum(o.request.n for o in failed),
        failures_by_status=dict(sorted(Counter(
            str(o.http_status or "unreachable") for o in failed).items())),
        joules=round(joules, 3),
        joules_per_output=round(joules / len(receipts), 3) if receipts else None,
        energy_sources=sorted({r.energy_source for r in receipts}),
        by_source=by_source(receipts),
        latency_s=Percentiles(**{f"p{q}": rounded(percentile(latencies, q / 100), 4)
                                 for q in (50, 95, 99)}),
        wall_s=round(run.wall_s, 2),
        throughput_outputs_per_s=round(len(receipts) / run.wall_s, 4) if run.wall_s > 0 else None,
        generated=sum(r.cache == "miss" for r in receipts),
        coalesced=sum(r.cache == "coalesced" for r in receipts),
        cache_hits=sum(r.cache == "hit" for r in receipts),
        approximate=sum(r.cache == "approximate" for r in receipts),
        steps_skipped=sum(r.steps_skipped for r in receipts),
        batch_sizes=batches,
        mean_batch_size=(round(sum(size * count for size, count in batches.items())
                               / batch_count, 3) if batch_count else None),
        by_variant=by_variant(receipts),
        fleet=run.fleet,
    )  # fmt: skip


def factor(baseline: PhaseSummary, achieved: PhaseSummary) -> float | None:
    """Baseline J/output over achieved J/output; None when either has no joules to divide."""
    return _ratio(baseline.joules_per_output, achieved.joules_per_output)


def fleet_factor(baseline: PhaseSummary, achieved: PhaseSummary) -> float | None:
    """The factor over all fleet energy, idle included; None where either was not measured."""
    if baseline.fleet is None or achieved.fleet is None:
        return None
    return _ratio(baseline.fleet.joules_per_output, achieved.fleet.joules_per_output)


def _ratio(baseline_j: float | None, achieved_j: float | None) -> float | None:
    if not baseline_j or not achieved_j:
        return None
    return round(baseline_j / achieved_j, 4)


def split_savings(
    receipts: Sequence[Receipt], reference: str, prior_price_j: float | None = None
) -> SavingsSplit:
    """``telemetry.savings.savings_by_cause`` of ``receipts``, rounded for a report.

    Raises:
        ValueError: no batch-1 output of ``reference`` among the receipts and no prior.
    """
    split = savings_by_cause(receipts, reference, prior_price_j)
    baseline_j = split.baseline_joules
    return SavingsSplit(
        reference=reference,
        baseline_name=split.baseline_name,
        baseline_joules_per_output=round(split.baseline_joules_per_output, 3),
        baseline_joules=round(baseline_j, 3),
        achieved_joules=round(split.achieved_joules, 3),
        saved_joules=round(split.saved_joules, 3),
        saved_fraction=round(split.saved_joules / baseline_j, 4) if baseline_j else None,
        by_cause_joules={k: round(v, 3) for k, v in split.by_cause_joules.items()},
        energy_sources=list(split.energy_sources),
    )


class ResumedVsFull(BaseModel):
    """One variant's generations in the approximate phase, resumed and full."""

    resumed: int
    resumed_joules_per_output: float | None
    steps_skipped_mean: float | None
    full: int
    full_joules_per_output: float | None


def resumed_vs_full(receipts: Sequence[Receipt]) -> dict[str, ResumedVsFull]:
    """Per variant, the phase's resumed and full generations (hits and joins left out)."""
    out = {}
    for variant in sorted({r.variant for r in receipts}):
        mine = [r for r in receipts if r.variant == variant]
        resumed = [r for r in mine if r.cache == "approximate"]
        full = [r for r in mine if r.cache == "miss"]

        def mean(values: list[float]) -> float | None:
            return round(sum(values) / len(values), 3) if values else None

        out[variant] = ResumedVsFull(
            resumed=len(resumed), resumed_joules_per_output=mean([r.joules for r in resumed]),
            steps_skipped_mean=mean([float(r.steps_skipped) for r in resumed]),
            full=len(full), full_joules_per_output=mean([r.joules for r in full]),
        )  # fmt: skip
    return out


class RequestRecord(BaseModel):
    """One request of one phase as sent, and what came back."""

    index: int
    arrival_s: float
    sent_s: float
    latency_s: float
    prompt: str
    seed: int | None
    size: str
    quality: str
    n: int
    tenant: str | None
    status: Literal["ok", "failed"]
    http_status: int | None
    error: str | None
    receipts: list[Receipt]


class PhaseReport(BaseModel):
    """A phase's summary and every request it sent, in trace order."""

    summary: PhaseSummary
    requests: list[RequestRecord]


def records(run: PhaseRun) -> list[RequestRecord]:
    """Every request of a phase as the report lists it."""
    return [
        RequestRecord(
            index=o.index,
            arrival_s=o.request.arrival_s,
            sent_s=round(o.sent_s, 4),
            latency_s=round(o.latency_s, 4),
            prompt=o.request.prompt,
            seed=o.request.seed,
            size=o.request.size,
            quality=o.request.quality,
            n=o.request.n,
            tenant=o.request.tenant,
            status="ok" if o.ok else "failed",
            http_status=o.http_status,
            error=o.error,
            receipts=list(o.receipts),
        )
        for o in run.outcomes
    ]
