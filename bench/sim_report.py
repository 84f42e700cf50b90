"""What a simulation means: achieved vs the measured baseline and the offline oracle.

* **Conventional baseline** (simulated with the same trace, fleet and code): every output
  made by the reference variant — the highest-quality one that can make it — in a batch of one, no
  cache, no coalescing; every GPU that can run its model serves it (on a fleet of
  several GPU types, its copies share the work by expected finish time, as a load
  balancer would).
* **Competent baseline** (the same): what an engineer would configure by hand — each tier
  on the variant with the lowest declared J/image whose declared quality meets its floor,
  dynamically batched with the same cap and wait, no cache, no coalescing, no power cap
  or J/output target. The factor against it is what wattserve adds over a good static
  setup; the factor against the conventional one is what it adds over none.
* **Oracle**: every *distinct* output generated once, by the cheapest catalog variant
  that meets its quality floor at its size, at that variant's most efficient batch size
  the data allows — a lower bound that no scheduler can beat on this catalog. With
  approximate reuse on, each output that may be served approximately is also priced as
  resumed as deep as its band allows at its best proxy similarity to *any* earlier
  request's prompt in its pool and size (an unbounded store that kept everything).
* **Waterfall**: baseline → after cache + coalescing → after approximate cache → after
  batching → after variant routing → after power policy = achieved, using
  ``telemetry.savings.savings_by_cause`` (the same split the live demo and reports use)
  on the achieved run's receipts, in active energy (what the batches drew).
* **Energy basis**: every J/output is given twice: over *active* energy (the batches'
  energy, charged to their outputs: what the ledger and the waterfall count) and over
  *all fleet energy* (``fleet_``): active plus every GPU's idle draw while it ran no
  batch, over the run's makespan — what the operator pays. A batch's measured energy
  already includes its GPU's static draw, so idle is added only for GPU time no batch
  used.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from wattserve._schemas import RequestPolicy, parse_size
from wattserve.bench.fleet import VariantCost
from wattserve.bench.simulate import FleetSimulation, RunResult, SimReceipt
from wattserve.bench.trace import TraceRequest, TraceSpec, make_trace
from wattserve.policies.catalog import Catalog
from wattserve.policies.latent_reuse import (
    BANDS_PROVENANCE,
    DEFAULT_BANDS,
    ReuseMode,
    reuse_mode,
    reuse_pool,
)
from wattserve.policies.policy import Policy
from wattserve.policies.routing import reference_variant
from wattserve.scheduler.identity import output_key
from wattserve.telemetry.savings import SavingsReport, savings_by_cause


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(run: RunResult) -> dict[str, Any]:
    """Totals, latency and reuse counts of one run."""
    ok = [r for r in run.receipts if r.ok]
    joules = sum(r.joules for r in ok)
    latencies = [r.latency_s for r in ok]
    generated = [r for r in ok if r.cache in ("miss", "approximate")]
    resumed = [r for r in ok if r.cache == "approximate"]
    by_variant: dict[str, dict[str, float]] = defaultdict(lambda: {"outputs": 0, "joules": 0.0})
    for r in ok:
        by_variant[r.variant]["outputs"] += 1
        by_variant[r.variant]["joules"] += r.joules
    return {
        "policy": run.policy,
        "outputs": len(ok),
        "refused": len(run.receipts) - len(ok),
        "joules": joules,
        "joules_per_output": joules / len(ok) if ok else None,
        "idle_joules": run.idle_j,
        "fleet_joules": joules + run.idle_j,
        "fleet_joules_per_output": (joules + run.idle_j) / len(ok) if ok else None,
        "cache_hits": sum(r.cache == "hit" for r in ok),
        "coalesced": sum(r.cache == "coalesced" for r in ok),
        "approximate": len(resumed),
        "steps_skipped_share": (
            sum(r.steps_skipped for r in generated) / sum(r.steps or 0 for r in generated)
        )
        if generated
        else None,
        "latent_store": run.latents,
        "generated": len(generated),
        "mean_batch_size": statistics.fmean(r.batch_size for r in generated) if generated else None,
        "batch_sizes": dict(sorted(Counter(r.batch_size for r in generated).items())),
        "moved_power_cap": run.moved,
        "latency_s": {
            "p50": _pct(latencies, 0.5),
            "p95": _pct(latencies, 0.95),
            "p99": _pct(latencies, 0.99),
        },  # fmt: skip
        "simulated_duration_s": run.duration_s,
        "placement_gpus": run.placement,
        "by_variant": {
            v: {**d, "joules_per_output": d["joules"] / d["outputs"]} for v, d in by_variant.items()
        },
        "wall_s": run.wall_s,
    }


def _factor(
    base: dict[str, Any], got: dict[str, Any], per: str = "joules_per_output"
) -> float | None:
    """Baseline J/output over achieved J/output (``per``: active, or ``fleet_`` with idle).

    Per output, so that outputs the achieved run refused (a quality floor no GPU of the
    fleet meets) do not count as savings.
    """
    if not got[per] or base[per] is None:
        return None
    return base[per] / got[per]


class Oracle(NamedTuple):
    """The offline oracle's energy for a trace, over the outputs the fleet can make."""

    joules: float
    distinct: int  # distinct outputs generated (each once)
    outputs: int  # outputs requested, repeats included

    def over(self, got: dict[str, Any]) -> float | None:
        """Achieved over oracle, per output served.

        Outputs a run refused are not a saving; with nothing refused, this is exactly
        achieved joules over oracle joules.
        """
        if not self.joules or not got["outputs"]:
            return None
        return (got["joules"] / got["outputs"]) / (self.joules / self.outputs)


def oracle_joules(
    trace: Sequence[TraceRequest],
    catalog: Catalog,
    costs: dict[str, VariantCost],
    policy: Policy,
    resumed: Sequence[float] | None = None,
) -> Oracle:
    """The offline oracle for ``trace``.

    Outputs no variant of the fleet can make (no variant meets the floor at that size;
    the scheduler refuses them too) are left out. ``resumed`` (by request) is the share
    of each output's energy an approximate resume saves (``resume_bound``).
    """
    outputs = 0
    best: dict[tuple[int, int, float], float] = {}
    seen: set[str] = set()
    total = 0.0
    for index, r in enumerate(trace):
        width_px, height_px = parse_size(r.size)
        floor = policy.quality_floor(r.quality)
        price = best.get((width_px, height_px, floor))
        if price is None:
            fits = [
                costs[v.name].best_energy_per_image_j() for v in catalog.variants
                if v.name in costs and v.quality_score >= floor
                and v.size_problem(width_px, height_px) is None
            ]  # fmt: skip
            price = best[(width_px, height_px, floor)] = min(fits) if fits else -1.0
        if price < 0:
            continue
        outputs += r.n
        for i in range(r.n):
            if r.seed is None:
                key = f"unseeded:{index}:{i}"
            else:
                key = output_key(r.prompt, None, width_px, height_px, r.seed + i)
            if key not in seen:
                seen.add(key)
                total += price * (1.0 - (resumed[index] if resumed else 0.0))
    return Oracle(total, len(seen), outputs)


def resume_bound(
    trace: Sequence[TraceRequest],
    policy_default: ReuseMode,
    fixed_fraction: float = 0.0,
    pools: Mapping[str, str] | None = None,
) -> list[float]:
    """Per request, the share of its energy the best possible approximate resume saves.

    For a request the run may serve approximately (``reuse_mode``, every tenant allowed,
    as in the simulator): the largest band's skip fraction at its best proxy similarity
    to any earlier request's prompt of its pool and size, as if every earlier generation
    were kept and every step captured; times the per-step share (1 - ``fixed_fraction``).
    0 for the rest. O(requests x distinct prompts), in numpy.
    """
    if policy_default != "approximate":
        return [0.0] * len(trace)
    import numpy as np  # noqa: PLC0415 (the [serve] extra, as approximate reuse needs)

    from wattserve.bench.similarity import PromptSimilarity  # noqa: PLC0415

    proxy = PromptSimilarity([r.prompt for r in trace])
    best: dict[tuple[str, str], np.ndarray] = {}  # per (pool, size): max over earlier rows
    shares = []
    for r in trace:
        where = (reuse_pool(r.tenant, pools or {}), r.size)
        row = proxy.row(proxy.id(r.prompt))
        seen = best.get(where)
        share = 0.0
        if seen is not None and reuse_mode(None, r.seed is not None, policy_default, True) == (
            "approximate"
        ):
            similarity = float(seen[proxy.id(r.prompt)])
            fractions = [b.skip_fraction for b in DEFAULT_BANDS if similarity >= b.min_similarity]
            share = max(fractions, default=0.0) * (1.0 - fixed_fraction)
        shares.append(share)
        best[where] = row if seen is None else np.maximum(seen, row)
    return shares


def split_by_cause(achieved: RunResult, reference: str, reference_batch1_j: float) -> SavingsReport:
    """``savings_by_cause`` on the run's served receipts (duck-typed ``Receipt``s)."""
    ok: list[SimReceipt] = [r for r in achieved.receipts if r.ok]
    return savings_by_cause(ok, reference, reference_batch1_j)  # type: ignore[arg-type]


def waterfall(achieved: RunResult, reference: str, reference_batch1_j: float) -> dict[str, float]:
    """Baseline J down to achieved J, one step per cause (priced against the reference)."""
    split = split_by_cause(achieved, reference, reference_batch1_j)
    causes = split.by_cause_joules
    steps = {"baseline": split.baseline_joules}
    level = split.baseline_joules
    for label, names in (("cache + coalescing", ("cache", "coalescing")),
                         ("approximate cache", ("approximate_cache",)),
                         ("batching", ("batching",)), ("variant routing", ("variant_choice",)),
                         ("power policy", ("power_capping",))):  # fmt: skip
        level -= sum(causes.get(n, 0.0) for n in names)
        steps[f"after {label}"] = level
    steps["achieved"] = split.achieved_joules
    return steps


ENERGY_BASIS = {
    "joules_per_output": "active energy: the batches' energy, charged to the outputs they "
    "made (what the waterfall and the savings split count)",
    "fleet_joules_per_output": "all fleet energy: active plus every GPU's idle draw while it "
    "ran no batch, from t=0 to the run's last finish, over outputs served",
}


def simulate_report(
    trace: Sequence[TraceRequest],
    trace_header: dict[str, Any],
    sim: FleetSimulation,
    fleet: str,
    data_provenance: str,
) -> tuple[dict[str, Any], dict[str, RunResult]]:
    """Run ``trace`` as achieved and as both baselines; the report and the three runs.

    The report names everything a figure rests on; the runs feed the figures.
    """
    runs = {name: sim.run(trace, policy=policy) for name, policy in _RUNS.items()}
    got, base, competent = (summarize(runs[name]) for name in _RUNS)
    fixed = min((c.fixed_fraction for c in sim.costs.values()), default=0.0)
    resumed = resume_bound(trace, sim.reuse, fixed, sim.policy.reuse_pools)
    oracle = oracle_joules(trace, sim.catalog, sim.costs, sim.policy, resumed)
    reference = reference_variant(sim.catalog)
    top = [v.name for v in sim.catalog.variants if v.quality_score == reference.quality_score]
    # what a baseline output cost: on one GPU type, exactly the reference's batch-1 price
    steps = waterfall(runs["achieved"], reference.name, base["joules_per_output"] or 0.0)
    split = split_by_cause(runs["achieved"], reference.name, base["joules_per_output"] or 0.0)
    report = {
        "trace": trace_header,
        "fleet": fleet,
        "gpus": sim.gpus,
        "energy_source": f"simulated: J and latency per batch from {data_provenance}; "
        f"idle GPUs at {sim.idle_w:.0f} W (assumed)",
        "energy_basis": ENERGY_BASIS,
        "hardware": f"{fleet} (GPU energy only: no CPU, DRAM or PUE, as measured)",
        "quality_floors": dict(sim.policy.quality_floors),
        "power_cap_w": sim.cap_w,
        "joules_per_output_target": sim.target_j,
        "baseline": f"conventional baseline: every output on {' or '.join(top)} (highest "
        "quality) at batch size 1, no cache or coalescing, on every GPU that can run it; "
        "simulated in the same run",
        "competent": competent_name(sim, runs["competent"], trace),
        "oracle": "every distinct output once, on the cheapest variant meeting its floor and "
        "size, at its most efficient measured batch size"
        + (
            ", resumed as deep as its best proxy similarity to any earlier prompt of its pool "
            "allows"
            if sim.reuse == "approximate"
            else ""
        ),
        "reuse": _reuse_note(sim),
        "achieved": got,
        "baseline_run": base,
        "competent_run": competent,
        "oracle_joules": oracle.joules,
        "distinct_outputs": oracle.distinct,
        "factor_vs_baseline": _factor(base, got),
        "factor_vs_competent": _factor(competent, got),
        "fleet_factor_vs_baseline": _factor(base, got, "fleet_joules_per_output"),
        "fleet_factor_vs_competent": _factor(competent, got, "fleet_joules_per_output"),
        "achieved_over_oracle": oracle.over(got),
        "waterfall_basis": "active energy, against the conventional baseline",
        "waterfall_joules": steps,
        "savings_by_cause_joules": split.by_cause_joules,
        "simplifications": [
            "a refused leader's coalesced waiters are refused with it (live: one retries)",
            "static placement: each GPU serves one variant for the whole run",
        ],
    }
    return report, runs


_RUNS: dict[str, RequestPolicy] = {
    "achieved": "default",
    "baseline": "baseline",
    "competent": "competent",
}


def competent_name(sim: FleetSimulation, run: RunResult, trace: Sequence[TraceRequest]) -> str:
    """The competent baseline as run: what it is, and which variant each tier got."""
    by_tier: dict[str, set[str]] = defaultdict(set)
    for r in run.receipts:
        if r.ok:
            by_tier[trace[r.request_index].quality].add(r.variant)
    mapping = "; ".join(f"{tier} -> {' or '.join(sorted(v))}"
                        for tier, v in sorted(by_tier.items()))  # fmt: skip
    return (
        "competent baseline: each tier on the variant with the lowest declared J/image whose "
        f"declared quality meets its floor ({mapping}), dynamic batching (cap "
        f"{sim.policy.max_batch_size}, wait {sim.policy.max_wait_s:g} s), no cache, "
        "coalescing or approximate reuse, no power cap or J/output target; GPUs placed by "
        "its own demand; simulated in the same run"
    )


def _reuse_note(sim: FleetSimulation) -> dict[str, Any]:
    """What the run's reuse default was and what an approximate figure rests on."""
    if sim.reuse != "approximate":
        return {"default": sim.reuse}
    from wattserve.bench._latents import LATENT_CHANNELS  # noqa: PLC0415 (the [serve] extra)
    from wattserve.bench.similarity import PROVENANCE  # noqa: PLC0415

    return {
        "default": sim.reuse,
        "similarity": PROVENANCE,
        "bands": BANDS_PROVENANCE,
        "latent_store_max_bytes": sim.latent_max_bytes,
        "latent_size": f"assumed {LATENT_CHANNELS} channels at 1/8 side, fp16, per kept step",
        "unseeded_only": "seeded requests stay exact (same seed, same bytes)",
    }


SWEEP_REPEAT_RATES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
SWEEP_TIER_MIXES: dict[str, dict[str, float]] = {
    "all high": {"high": 1.0},
    "mixed 50/30/20": {"draft": 50, "standard": 30, "high": 20},
    "all draft": {"draft": 1.0},
}


def sweep(sim: FleetSimulation, spec: TraceSpec, prompts: Sequence[str]) -> list[dict[str, Any]]:
    """J/output, factors vs both baselines and achieved/oracle by repeat rate and tier mix.

    The "how far can it go" curve: on this catalog and fleet, how much of the saving
    comes from reuse (repeat rate) and how much from serving lower tiers cheaper.
    """
    points = []
    for mix_name, tiers in SWEEP_TIER_MIXES.items():
        for rate in SWEEP_REPEAT_RATES:
            trace = make_trace(spec.model_copy(update={"repeat_rate": rate, "tiers": tiers}),
                               prompts)  # fmt: skip
            got = summarize(sim.run(trace))
            base = summarize(sim.run(trace, policy="baseline"))
            competent = summarize(sim.run(trace, policy="competent"))
            oracle = oracle_joules(trace, sim.catalog, sim.costs, sim.policy)
            points.append({
                "tiers": mix_name, "repeat_rate": rate,
                "joules_per_output": got["joules_per_output"],
                "baseline_joules_per_output": base["joules_per_output"],
                "competent_joules_per_output": competent["joules_per_output"],
                "factor_vs_baseline": _factor(base, got),
                "factor_vs_competent": _factor(competent, got),
                "achieved_over_oracle": oracle.over(got),
            })  # fmt: skip
    return points
