"""Energy and latency of real model variants, from the ML.ENERGY measurements only.

The fleet simulator must not invent numbers, so every figure here comes from the two
ML.ENERGY text-to-image tables in ``../shared/data`` next to the repository (``data_dir``
/ ``--data-dir`` overrides it; its README gives sources, commits and licences):

* v2 (``mlenergy_v2_text_to_image_energy.csv``, 86 rows): SD 2.1, SDXL, SDXL-Turbo,
  SSD-1B, SD3 Medium, Kandinsky, Openjourney on A100 and H100, 25 steps, fp16. It has
  no power column: ``avg_power_w`` is derived as J/image x batch / batch latency, and
  labelled ``avg_power_derived``.
* v3 (``mlenergy_v3_text_to_image_energy.csv``, 638 rows): SD3.5, FLUX.1-dev,
  Hunyuan-DiT, PixArt-Sigma, SANA 1.5 on H100 and B200, 1024x1024 bf16, measured power.

Batch size. One :class:`EnergyLatencyModel` per (model, GPU) on one GPU interpolates
*batch totals* (batch energy J, batch latency s) piecewise linearly in the batch size
between measured sizes. A batch costs roughly a fixed overhead plus a per-image share,
so totals are close to affine between neighbours; interpolating per-image values in
log2(batch) was tried too and is worse (table below). Outside the measured sizes the
per-image values of the nearest one are held (no invented trend) and ``extrapolated`` is
set. Every measured point is reproduced exactly.

Steps. Per image, ``J(steps) = fixed_j + per_step_j * steps`` (latency likewise), with
``fixed_j = fixed_fraction * J(measured steps)``. The split is NOT identifiable from
this data: every model was measured at exactly one step count (v2: 25; v3: 20, 28 or
50), so no two points differ in steps alone (:func:`step_variation` checks this). The
pairs that look useful are not: SDXL-Turbo and SDXL share an architecture and 25 steps
but differ in resolution (512 vs 1024 px); SSD-1B and SDXL share steps, resolution,
text encoders and VAE but differ in the UNet. ``fixed_fraction`` (the share of energy
that does not scale with steps: text encoders, VAE decode) is therefore an
ASSUMPTION, default 0.0 (everything scales with steps). 0.0 adds no number from outside
the data; it makes predictions below the measured step count a lower bound on energy
and latency (a real fixed cost only adds to them). Pass another value to study it.

Validation (leave one out: each interior measured batch size predicted from its two
neighbours, i.e. across a gap twice as wide as the model ever interpolates; absolute
error in %, ``python -m bench.profiles``)::

    scheme          quantity   GPU   points  mean %  max %
    batch-linear    energy     A100      22    1.88   9.14
    batch-linear    energy     B200      21    2.48   5.03
    batch-linear    energy     H100      54    0.79   3.01
    batch-linear    energy     all       97    1.40   9.14
    batch-linear    latency    A100      22    3.87  25.49
    batch-linear    latency    B200      21    0.80   2.58
    batch-linear    latency    H100      54    2.17  17.78
    batch-linear    latency    all       97    2.26  25.49
    log2-per-image  energy     all       97    2.26  13.80
    log2-per-image  latency    all       97    5.71  42.51
    fixed_fraction  0.0        ASSUMPTION, not fitted (no step variation in the data)

The worst latency errors sit at the knee where a GPU stops being underused (e.g.
SDXL-Turbo on A100 at batch 4, from batch 2 and 8); docs/energy-models.md has details.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Literal

from wattserve import WattserveError

DATA_DIR_ENV = "WATTSERVE_DATA_DIR"
# ``$WATTSERVE_DATA_DIR`` if set, else ``../shared/data`` next to the repository.
DEFAULT_DATA_DIR = Path(
    os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
V2_FILE = "mlenergy_v2_text_to_image_energy.csv"
V3_FILE = "mlenergy_v3_text_to_image_energy.csv"
V2_UPSTREAM = "ml-energy/leaderboard-v2@c3af7f31e231a2a7021c5f8e2a54dd712d02e6e2"
V3_UPSTREAM = (
    "ml-energy/leaderboard@0cd52dab897c5d91a45f4d413038f3b8b4251b0f "
    "public/data/tasks/text-to-image.json"
)
DEFAULT_FIXED_FRACTION = 0.0
Scheme = Literal["batch-linear", "log2-per-image"]
SCHEMES: tuple[Scheme, ...] = ("batch-linear", "log2-per-image")

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_FIXED_FRACTION",
    "EnergyLatencyModel",
    "MeasuredPoint",
    "MeasurementsError",
    "Prediction",
    "ValidationRow",
    "fit_models",
    "load_measurements",
    "step_variation",
    "validate",
]


class MeasurementsError(WattserveError):
    """The ML.ENERGY data is missing or not in the expected shape."""


@dataclass(frozen=True)
class MeasuredPoint:
    """One measured configuration, normalised across the v2 and v3 tables.

    ``source_line`` is the line in ``source_file`` (the header is line 1); ``upstream``
    names the repository, commit and file the row was copied from.
    """

    model_id: str
    nickname: str
    gpu: str
    num_gpus: int
    batch_size: int
    steps: int
    width_px: int
    height_px: int
    energy_per_image_j: float
    batch_latency_s: float
    avg_power_w: float
    avg_power_derived: bool
    ulysses_degree: int | None
    ring_degree: int | None
    source: str
    source_file: str
    source_line: int
    upstream: str


@dataclass(frozen=True)
class Prediction:
    """A model's answer; ``steps_assumed`` when it relies on ``fixed_fraction``."""

    energy_per_image_j: float
    batch_latency_s: float
    avg_power_w: float
    extrapolated: bool
    steps_assumed: bool


def _gpu(name: str) -> str:
    for short in ("A100", "H100", "B200"):
        if short in name:
            return short
    raise MeasurementsError(f"unknown GPU {name!r} in the ML.ENERGY data")


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise MeasurementsError(
            f"ML.ENERGY data not found: {path} (the shared data dir is ../shared/data next "
            "to the repository; set WATTSERVE_DATA_DIR or pass --data-dir to point elsewhere)",
            param="data_dir",
        )
    with path.open(newline="", encoding="utf-8") as handle:
        return list(enumerate(csv.DictReader(handle), start=2))


def _v2_point(line: int, row: dict[str, str]) -> MeasuredPoint:
    width, height = (int(side) for side in row["resolution_default"].split("x"))
    batch, energy_j = int(row["batch_size"]), float(row["energy_per_image_j"])
    latency_s = float(row["batch_latency_s"])
    return MeasuredPoint(
        row["model"], row["nickname"], _gpu(row["gpu"]), 1, batch,
        int(row["denoising_steps"]), width, height, energy_j, latency_s,
        avg_power_w=energy_j * batch / latency_s, avg_power_derived=True,
        ulysses_degree=None, ring_degree=None, source="ML.ENERGY v2", source_file=V2_FILE,
        source_line=line, upstream=f"{V2_UPSTREAM} {row['source_file']}",
    )  # fmt: skip


def _v3_point(line: int, row: dict[str, str]) -> MeasuredPoint:
    return MeasuredPoint(
        row["model_id"], row["nickname"], _gpu(row["gpu_model"]), int(row["num_gpus"]),
        int(row["batch_size"]), int(row["inference_steps"]), int(row["image_width"]),
        int(row["image_height"]), float(row["energy_per_image_joules"]),
        float(row["batch_latency_s"]), avg_power_w=float(row["avg_power_watts"]),
        avg_power_derived=False, ulysses_degree=int(row["ulysses_degree"]),
        ring_degree=int(row["ring_degree"]), source="ML.ENERGY v3", source_file=V3_FILE,
        source_line=line, upstream=V3_UPSTREAM,
    )  # fmt: skip


def load_measurements(data_dir: Path | str | None = None) -> list[MeasuredPoint]:
    """Every row of both tables as :class:`MeasuredPoint` (v2 first, in file order)."""
    folder = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    try:
        points = [_v2_point(n, row) for n, row in _rows(folder / V2_FILE)]
        points += [_v3_point(n, row) for n, row in _rows(folder / V3_FILE)]
    except (KeyError, ValueError) as exc:
        raise MeasurementsError(f"ML.ENERGY data in {folder} is malformed: {exc!r}") from exc
    return points


def step_variation(points: Iterable[MeasuredPoint]) -> dict[str, list[int]]:
    """Models measured at more than one step count (the only data that could fit steps)."""
    steps: dict[str, set[int]] = defaultdict(set)
    for point in points:
        steps[point.model_id].add(point.steps)
    return {model: sorted(counts) for model, counts in steps.items() if len(counts) > 1}


def _line(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) for x within [xs[0], xs[-1]] (xs ascending)."""
    if x == xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in pairwise(zip(xs, ys, strict=True)):
        if x0 <= x < x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"{x} lies outside {xs[0]}..{xs[-1]}")


@dataclass(frozen=True)
class EnergyLatencyModel:
    """Energy and latency of one model on one GPU, from its measured batch sizes.

    Built by :func:`fit_models`; the module docstring explains the interpolation, the
    held per-image values outside the measured sizes and the ``fixed_fraction`` assumption.
    Units: joules per image, seconds per batch, watts. Immutable and thread-safe.
    """

    model_id: str
    nickname: str
    gpu: str
    points: tuple[MeasuredPoint, ...]
    fixed_fraction: float = DEFAULT_FIXED_FRACTION
    scheme: Scheme = "batch-linear"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fixed_fraction < 1.0:
            raise ValueError("fixed_fraction must be in [0, 1)")
        if not self.points or len({p.batch_size for p in self.points}) != len(self.points):
            raise ValueError("need at least one point and one point per batch size")
        if len({(p.steps, p.width_px, p.height_px) for p in self.points}) != 1:
            raise ValueError("all points must share one step count and one image size")

    @property
    def measured_steps(self) -> int:
        """The one step count the model was measured at."""
        return self.points[0].steps

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Measured batch sizes, ascending."""
        return tuple(p.batch_size for p in self.points)

    def is_extrapolated(self, batch_size: int) -> bool:
        """Whether ``batch_size`` lies outside the measured batch sizes."""
        return not self.batch_sizes[0] <= batch_size <= self.batch_sizes[-1]

    def _at_measured_steps(self, batch_size: int) -> tuple[float, float]:
        """(J/image, batch latency s) at the measured steps."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.is_extrapolated(batch_size):  # hold the nearest size's per-image values
            near = self.points[0] if batch_size < self.batch_sizes[0] else self.points[-1]
            return near.energy_per_image_j, near.batch_latency_s / near.batch_size * batch_size
        if self.scheme == "batch-linear":
            sizes = [float(b) for b in self.batch_sizes]
            energy_j = [p.energy_per_image_j * p.batch_size for p in self.points]
            latency_s = [p.batch_latency_s for p in self.points]
            return (
                _line(sizes, energy_j, batch_size) / batch_size,
                _line(sizes, latency_s, batch_size),
            )
        logs = [math.log2(b) for b in self.batch_sizes]
        energy_j = [p.energy_per_image_j for p in self.points]
        per_image_s = [p.batch_latency_s / p.batch_size for p in self.points]
        x = math.log2(batch_size)
        return _line(logs, energy_j, x), _line(logs, per_image_s, x) * batch_size

    def _step_scale(self, steps: int | None) -> float:
        if steps is None or steps == self.measured_steps:
            return 1.0
        if steps < 1:
            raise ValueError("steps must be >= 1")
        share = steps / self.measured_steps
        return self.fixed_fraction + (1.0 - self.fixed_fraction) * share

    def predict(self, batch_size: int, steps: int | None = None) -> Prediction:
        """Energy, latency and power of a batch; ``steps`` None means the measured steps."""
        energy_j, latency_s = self._at_measured_steps(batch_size)
        scale = self._step_scale(steps)
        energy_j, latency_s = energy_j * scale, latency_s * scale
        return Prediction(
            energy_per_image_j=energy_j,
            batch_latency_s=latency_s,
            avg_power_w=energy_j * batch_size / latency_s,
            extrapolated=self.is_extrapolated(batch_size),
            steps_assumed=steps is not None and steps != self.measured_steps,
        )

    def energy_per_image_j(self, batch_size: int, steps: int | None = None) -> float:
        """GPU joules per image in a batch of ``batch_size``."""
        return self.predict(batch_size, steps).energy_per_image_j

    def batch_latency_s(self, batch_size: int, steps: int | None = None) -> float:
        """Seconds for one batch of ``batch_size`` images."""
        return self.predict(batch_size, steps).batch_latency_s

    def avg_power_w(self, batch_size: int, steps: int | None = None) -> float:
        """Average GPU watts while the batch runs (batch joules / batch seconds)."""
        return self.predict(batch_size, steps).avg_power_w

    def fixed_j(self, batch_size: int) -> float:
        """Per-image joules that do not scale with steps (``fixed_fraction``, assumed)."""
        return self.fixed_fraction * self._at_measured_steps(batch_size)[0]

    def per_step_j(self, batch_size: int) -> float:
        """Per-image joules per denoising step (the rest, spread over measured steps)."""
        energy_j = self._at_measured_steps(batch_size)[0]
        return (1.0 - self.fixed_fraction) * energy_j / self.measured_steps


def fit_models(
    points: Iterable[MeasuredPoint],
    fixed_fraction: float = DEFAULT_FIXED_FRACTION,
    scheme: Scheme = "batch-linear",
) -> dict[tuple[str, str], EnergyLatencyModel]:
    """One model per (model id, GPU) from the single-GPU points, keyed that way."""
    groups: dict[tuple[str, str], list[MeasuredPoint]] = defaultdict(list)
    for point in points:
        if point.num_gpus == 1:
            groups[(point.model_id, point.gpu)].append(point)
    return {
        key: EnergyLatencyModel(
            model_id=key[0],
            nickname=group[0].nickname,
            gpu=key[1],
            points=tuple(sorted(group, key=lambda p: p.batch_size)),
            fixed_fraction=fixed_fraction,
            scheme=scheme,
        )
        for key, group in sorted(groups.items())
    }


@dataclass(frozen=True)
class ValidationRow:
    """Leave-one-out absolute % error of one quantity on one GPU (or ``all``)."""

    scheme: Scheme
    quantity: str  # "energy" (J/image) or "latency" (batch seconds)
    gpu: str
    points: int
    mean_abs_pct: float
    max_abs_pct: float


def validate(points: Iterable[MeasuredPoint]) -> list[ValidationRow]:
    """Predict every interior measured batch size from its neighbours, both schemes."""
    points = tuple(points)
    errors: dict[tuple[Scheme, str, str], list[float]] = defaultdict(list)
    for scheme in SCHEMES:
        for model in fit_models(points, scheme=scheme).values():
            for i in range(1, len(model.points) - 1):
                held = model.points[i]
                rest = model.points[:i] + model.points[i + 1 :]
                guess = replace(model, points=rest).predict(held.batch_size)
                for quantity, got, want in (
                    ("energy", guess.energy_per_image_j, held.energy_per_image_j),
                    ("latency", guess.batch_latency_s, held.batch_latency_s),
                ):
                    pct = abs(got / want - 1.0) * 100.0
                    errors[(scheme, quantity, model.gpu)].append(pct)
                    errors[(scheme, quantity, "all")].append(pct)
    return [
        ValidationRow(scheme, quantity, gpu, len(v), sum(v) / len(v), max(v))
        for (scheme, quantity, gpu), v in sorted(errors.items())
    ]


def _report(
    models: dict[tuple[str, str], EnergyLatencyModel], rows: list[ValidationRow], fraction: float
) -> str:
    lines = ["model | GPU | steps | size px | batch sizes | J/image (b=1 .. max) | W at b=1"]
    for model in models.values():
        first, last = model.points[0], model.points[-1]
        power = f"{first.avg_power_w:.1f}" + (" (derived)" if first.avg_power_derived else "")
        lines.append(
            f"{model.model_id} | {model.gpu} | {model.measured_steps} | "
            f"{first.width_px}x{first.height_px} | {','.join(map(str, model.batch_sizes))} | "
            f"{first.energy_per_image_j:.1f} .. {last.energy_per_image_j:.1f} | {power}"
        )
    lines += ["", "scheme | quantity | GPU | points | mean abs % | max abs %"]
    lines += [
        f"{r.scheme} | {r.quantity} | {r.gpu} | {r.points} | {r.mean_abs_pct:.2f} | "
        f"{r.max_abs_pct:.2f}"
        for r in rows
    ]
    lines.append(f"fixed_fraction = {fraction} | ASSUMPTION, not fitted (see module docstring)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the fitted models and the leave-one-out validation (``--json`` for JSON)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.profiles",
        description="ML.ENERGY energy/latency models per (model, GPU) and their validation.",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--fixed-fraction", type=float, default=DEFAULT_FIXED_FRACTION)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    try:
        points = load_measurements(args.data_dir)
        models = fit_models(points, fixed_fraction=args.fixed_fraction)
    except (MeasurementsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = validate(points)
    if not args.json:
        print(_report(models, rows, args.fixed_fraction))
        return 0
    document = {
        "fixed_fraction": {
            "value": args.fixed_fraction,
            "status": "assumption",
            "reason": "every model was measured at one step count",
            "models_with_step_variation": step_variation(points),
        },
        "models": [{**asdict(m), "measured_steps": m.measured_steps} for m in models.values()],
        "validation": [asdict(r) for r in rows],
    }
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
