"""A simulated fleet: GPUs by type, which variant each one serves, what a batch costs.

Costs come from the ML.ENERGY measurements (``bench.profiles``): for every variant of the
catalog, its model's measured J/image and batch latency on the GPU type it runs on, per
batch size up to the variant's ``max_batch_size`` (precomputed into a table, because the
simulator prices millions of batches). ``fleet_catalog`` decides which variants run on
which GPU types of a fleet (``8xH100,4xB200``): a model runs wherever it was measured.

**Placement** is static for a run (dynamic placement is a later issue's seam): every GPU
serves one variant, and each GPU type's GPUs are split among its variants in proportion
to the GPU-time the trace's requests would need on the variant routing picks for them
before any queue forms (at least one GPU each while there are enough). The baseline run
therefore puts the reference model on every GPU that can run it, as an operator without
wattserve would.

**Power.** A GPU running a batch draws the batch's measured average power (its energy
over its latency); an idle GPU draws ``idle_w``, an assumption (ML.ENERGY does not
measure idle power; 70 W is what this project's simulated device uses, whatever the GPU
type).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from wattserve import InvalidRequest
from wattserve._admin import ProfileList
from wattserve.bench.profiles import (
    DEFAULT_FIXED_FRACTION,
    EnergyLatencyModel,
    MeasuredPoint,
    fit_models,
    load_measurements,
)
from wattserve.policies.catalog import Catalog, EnergyPrior, VariantSpec

IDLE_W = 70.0
_FLEET_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z0-9]+)\s*$")


def parse_fleet(spec: str) -> dict[str, int]:
    """``"8xH100,4xA100"`` → ``{"H100": 8, "A100": 4}``."""
    fleet: dict[str, int] = {}
    for part in spec.split(","):
        match = _FLEET_RE.match(part)
        if match is None:
            raise InvalidRequest(f"fleet: want COUNTxGPU[,COUNTxGPU...], got {part!r}")
        count, gpu = int(match.group(1)), match.group(2).upper()
        if count < 1 or count > 1_000_000:
            raise InvalidRequest(f"fleet: a GPU count must be 1..1000000, got {count}")
        fleet[gpu] = fleet.get(gpu, 0) + count
    return fleet


@dataclass(frozen=True)
class VariantCost:
    """Measured-model cost of one variant on one GPU type, by batch size (index = size)."""

    variant: str
    gpu: str
    batch_energy_j: tuple[float, ...]  # index b: joules of a whole batch of b images
    batch_latency_s: tuple[float, ...]  # index b: seconds for a batch of b images
    extrapolated_above: int  # batch sizes above this were not measured (values held)
    # index b: measured round trips of batches of b to draw from (a live profile's; empty
    # where only the model's one value is known, as for every ML.ENERGY cost)
    latency_samples_s: tuple[tuple[float, ...], ...] = ()
    # share of a generation's energy and time that does not scale with steps (the
    # model's assumed ``fixed_fraction``): a resumed batch saves only the rest
    fixed_fraction: float = DEFAULT_FIXED_FRACTION

    def latency_s(self, size: int, rng: random.Random) -> float:
        """How long one batch of ``size`` takes.

        A measured round trip drawn at random where a live profile gave them, so the
        replay varies as the service did; else the model's value.
        """
        samples = self.latency_samples_s[size] if size < len(self.latency_samples_s) else ()
        return rng.choice(samples) if samples else self.batch_latency_s[size]

    def best_energy_per_image_j(self) -> float:
        """The lowest J/image over the batch sizes the variant may run."""
        return min(e / b for b, e in enumerate(self.batch_energy_j) if b)


def fleet_catalog(
    catalog: Catalog, fleet: dict[str, int], data_dir: Path | str | None = None
) -> tuple[Catalog, dict[str, VariantCost]]:
    """The catalog as it would run on ``fleet``, and what each variant costs there.

    A variant runs on GPUs of its native type (the first of its ``accelerator_types``),
    priced from its model's measurements on that type. On each other GPU type of the
    fleet where its model was measured, and where the catalog has no variant of that
    model already, it gets a *derived* twin: named for that type (``sdxl-h100`` on A100
    is ``sdxl-a100``), with the same model, steps, sizes and quality, and that type's
    measured energy per image (the prior), peak power and largest measured batch. A
    variant without an accelerator type runs on every GPU type where its model was
    measured, under its own name when the fleet has one type. Variants measured nowhere
    in the fleet are left out.
    """
    models = fit_models(load_measurements(data_dir))
    specs: list[VariantSpec] = []
    costs: dict[str, VariantCost] = {}
    for gpu in fleet:
        native = {v.source for v in catalog.variants if v.resources.native_accelerator_type == gpu}
        for spec in catalog.variants:
            model = models.get((spec.source, gpu))
            accelerator = spec.resources.native_accelerator_type
            if model is None or (accelerator != gpu and spec.source in native):
                continue
            if accelerator != gpu and (accelerator is not None or len(fleet) > 1):
                spec = _derived(spec, gpu, model)
            if spec.name in costs:
                continue
            specs.append(spec)
            costs[spec.name] = _table(spec, model)
    if not costs:
        measured = sorted({g for _, g in models})
        raise InvalidRequest(
            f"fleet: no catalog variant was measured on {', '.join(fleet)} "
            f"(measured GPUs: {measured})"
        )
    return Catalog(source_path=catalog.source_path, variants=tuple(specs)), costs


def _derived(spec: VariantSpec, gpu: str, model: EnergyLatencyModel) -> VariantSpec:
    """``spec``'s model on another GPU type, with that type's measured numbers."""
    accelerator = spec.resources.native_accelerator_type
    suffix = f"-{accelerator.lower()}" if accelerator else ""
    base = spec.name[: -len(suffix)] if suffix and spec.name.endswith(suffix) else spec.name
    rows = ", ".join(sorted({f"{p.source_file} line {p.source_line}" for p in model.points}))
    return spec.model_copy(update={
        "name": f"{base}-{gpu.lower()}",
        "power_w": max(p.avg_power_w for p in model.points),
        "max_batch_size": max(model.batch_sizes),
        "resources": spec.resources.model_copy(update={"accelerator_types": (gpu,)}),
        "energy_prior": EnergyPrior(
            joules_per_image={p.batch_size: p.energy_per_image_j for p in model.points},
            provenance=f"derived from {spec.name} for {gpu}: ML.ENERGY measurements of "
            f"{spec.source} on {gpu} ({rows})",
        ),
    })  # fmt: skip


def _table(spec: VariantSpec, model: EnergyLatencyModel) -> VariantCost:
    energy, latency = [0.0], [0.0]
    for size in range(1, spec.max_batch_size + 1):
        prediction = model.predict(size, spec.steps)
        energy.append(prediction.energy_per_image_j * size)
        latency.append(prediction.batch_latency_s)
    return VariantCost(spec.name, model.gpu, tuple(energy), tuple(latency),
                       max(model.batch_sizes),
                       fixed_fraction=model.fixed_fraction)  # fmt: skip


def place(gpus: int, demand_s: dict[str, float]) -> dict[str, int]:
    """Split ``gpus`` among variants in proportion to ``demand_s`` (largest remainders).

    Every variant with demand gets at least one GPU while there are enough GPUs; with
    fewer GPUs than variants, the most demanded ones get one each.
    """
    wanted = sorted((v for v, d in demand_s.items() if d > 0), key=lambda v: -demand_s[v])
    if not wanted:
        return {}
    if gpus <= len(wanted):
        return {v: 1 for v in wanted[:gpus]}
    total = sum(demand_s[v] for v in wanted)
    spare = gpus - len(wanted)
    shares = {v: spare * demand_s[v] / total for v in wanted}
    placed = {v: 1 + int(shares[v]) for v in wanted}
    left = gpus - sum(placed.values())
    for v in sorted(wanted, key=lambda v: -(shares[v] - int(shares[v])))[:left]:
        placed[v] += 1
    return placed


def with_replicas(catalog: Catalog, replicas: dict[str, int]) -> Catalog:
    """The catalog restricted to placed variants, each with its number of GPUs."""
    specs = tuple(
        spec.model_copy(
            update={
                "resources": spec.resources.model_copy(update={"replicas": replicas[spec.name]})
            }
        )
        for spec in catalog.variants
        if replicas.get(spec.name, 0) > 0
    )
    return Catalog(source_path=catalog.source_path, variants=specs)


def costs_from_profile(
    catalog: Catalog, profile: ProfileList, label: str
) -> dict[str, VariantCost]:
    """Cost tables from what a live service learned (``GET /admin/profiles``).

    For simulating that service's own fleet (the sim-vs-live validation): the same
    interpolation as the ML.ENERGY models, over the batch sizes the service measured,
    priced at each size's mean J/output and median round trip where the profile has
    them (its EWMAs otherwise: they follow change, which routing wants and a replay of
    the whole run does not), and each batch at a measured size takes one of that size's
    recent round trips, drawn at random: a queue grows with the mean service time and a
    median falls where the spread puts it, so one number per size would get both wrong.
    The profile does not record image size; it is priced as measured.
    """
    by_variant: dict[str, list[MeasuredPoint]] = {}
    samples: dict[str, dict[int, tuple[float, ...]]] = {}  # recent round trips
    for point in profile.data:
        spec = catalog.get(point.variant)
        if spec is None:
            continue
        samples.setdefault(point.variant, {})[point.batch_size] = tuple(
            point.recent_batch_latencies_s
        )
        joules = point.mean_joules_per_output or point.joules_per_output
        latency_s = point.median_batch_latency_s or point.batch_latency_s
        by_variant.setdefault(point.variant, []).append(MeasuredPoint(
            model_id=spec.source, nickname=spec.name, gpu=label, num_gpus=1,
            batch_size=point.batch_size, steps=spec.steps, width_px=spec.max_size_px,
            height_px=spec.max_size_px, energy_per_image_j=joules,
            batch_latency_s=latency_s, avg_power_w=joules * point.batch_size / latency_s,
            avg_power_derived=True, ulysses_degree=None, ring_degree=None,
            source=f"live profile of replica {profile.replica}", source_file="", source_line=0,
            upstream=", ".join(profile.energy_sources),
        ))  # fmt: skip
    costs = {}
    for name, points in by_variant.items():
        spec = catalog.get(name)
        assert spec is not None
        model = EnergyLatencyModel(spec.source, name, label,
                                   tuple(sorted(points, key=lambda p: p.batch_size)))  # fmt: skip
        table = _table(spec, model)
        drawn = tuple(samples[name].get(size, ()) for size in range(len(table.batch_latency_s)))
        costs[name] = replace(table, latency_samples_s=drawn)
    if not costs:
        raise InvalidRequest("profile: it names no variant of the catalog")
    return costs
