"""A simulated fleet: GPUs, which variant each one serves, and what a batch costs there.

Costs come from the ML.ENERGY measurements (``bench.profiles``): for every variant of the
catalog, its model's measured J/image and batch latency on the fleet's GPU type, per
batch size up to the variant's ``max_batch_size`` (precomputed into a table, because the
simulator prices millions of batches). A variant whose model was not measured on that
GPU type cannot be placed there.

**Placement** is static for a run (dynamic placement is a later issue's seam): every GPU
serves one variant, and GPUs are split among the variants in proportion to the GPU-time
the trace's requests would need on the variant routing picks for them before any queue
forms (at least one GPU each while there are enough). The baseline run therefore puts
the whole fleet on the reference variant, as an operator without wattserve would.

**Power.** A GPU running a batch draws the batch's measured average power (its energy
over its latency); an idle GPU draws ``idle_w``, an assumption (ML.ENERGY does not
measure idle power; 70 W is what this project's simulated device uses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bench.profiles import EnergyLatencyModel, MeasuredPoint, fit_models, load_measurements
from policies.catalog import Catalog, VariantSpec
from wattserve import InvalidRequest
from wattserve._admin import ProfileList

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

    def best_energy_per_image_j(self) -> float:
        """The lowest J/image over the batch sizes the variant may run."""
        return min(e / b for b, e in enumerate(self.batch_energy_j) if b)


def variant_costs(
    catalog: Catalog, gpu: str, data_dir: Path | str | None = None
) -> dict[str, VariantCost]:
    """Cost tables for the catalog's variants that were measured on ``gpu``."""
    models = fit_models(load_measurements(data_dir))
    costs = {}
    for spec in catalog.variants:
        model = models.get((spec.source, gpu))
        if model is not None:
            costs[spec.name] = _table(spec, model)
    if not costs:
        measured = sorted({g for _, g in models})
        raise InvalidRequest(
            f"fleet: no catalog variant was measured on {gpu} (measured GPUs: {measured})"
        )
    return costs


def _table(spec: VariantSpec, model: EnergyLatencyModel) -> VariantCost:
    energy, latency = [0.0], [0.0]
    for size in range(1, spec.max_batch_size + 1):
        prediction = model.predict(size, spec.steps)
        energy.append(prediction.energy_per_image_j * size)
        latency.append(prediction.batch_latency_s)
    return VariantCost(spec.name, model.gpu, tuple(energy), tuple(latency),
                       max(model.batch_sizes))  # fmt: skip


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
    interpolation as the ML.ENERGY models, over the batch sizes the service measured.
    The profile does not record image size; it is priced as measured.
    """
    by_variant: dict[str, list[MeasuredPoint]] = {}
    for point in profile.data:
        spec = catalog.get(point.variant)
        if spec is None:
            continue
        by_variant.setdefault(point.variant, []).append(MeasuredPoint(
            model_id=spec.source, nickname=spec.name, gpu=label, num_gpus=1,
            batch_size=point.batch_size, steps=spec.steps, width_px=spec.max_size_px,
            height_px=spec.max_size_px, energy_per_image_j=point.joules_per_output,
            batch_latency_s=point.batch_latency_s,
            avg_power_w=point.joules_per_output * point.batch_size / point.batch_latency_s,
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
        costs[name] = _table(spec, model)
    if not costs:
        raise InvalidRequest("profile: it names no variant of the catalog")
    return costs
