"""bench.profiles (ML.ENERGY energy/latency models) and the real-variant catalog."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from wattserve.bench.profiles import (
    DEFAULT_DATA_DIR,
    EnergyLatencyModel,
    MeasurementsError,
    fit_models,
    load_measurements,
    main,
    step_variation,
    validate,
)
from wattserve.policies.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[1]
REAL_CATALOG = ROOT / "policies" / "real_catalog.toml"
needs_data = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.is_dir(), reason=f"ML.ENERGY data not present at {DEFAULT_DATA_DIR}"
)
SD21 = ("stabilityai/stable-diffusion-2-1", "H100")


@pytest.fixture(scope="module")
def points():
    return load_measurements()


@pytest.fixture(scope="module")
def models(points):
    return fit_models(points)


@needs_data
def test_row_counts_match_the_data_readme(points):
    v2 = [p for p in points if p.source == "ML.ENERGY v2"]
    v3 = [p for p in points if p.source == "ML.ENERGY v3"]
    assert (len(v2), len(v3)) == (86, 638)
    assert {p.gpu for p in v2} == {"A100", "H100"} and {p.gpu for p in v3} == {"H100", "B200"}
    assert all(p.avg_power_derived for p in v2) and not any(p.avg_power_derived for p in v3)
    assert {p.steps for p in v2} == {25} and {p.steps for p in v3} == {20, 28, 50}
    first = v2[0]
    assert first.source_line == 2 and first.upstream.endswith(
        "data/diffusion/text-to-image/A100-SXM4-40GB/kandinsky-community/"
        "kandinsky-2-2-decoder/bs1+steps25.json"
    )


@needs_data
def test_no_model_varies_in_steps_so_the_step_split_is_an_assumption(points, models):
    assert step_variation(points) == {}
    assert len(models) == 30 and all(m.fixed_fraction == 0.0 for m in models.values())


@needs_data
def test_model_reproduces_every_measured_point_exactly(models):
    for model in models.values():
        for point in model.points:
            got = model.predict(point.batch_size)
            assert got.energy_per_image_j == pytest.approx(point.energy_per_image_j, rel=1e-12)
            assert got.batch_latency_s == pytest.approx(point.batch_latency_s, rel=1e-12)
            assert got.avg_power_w == pytest.approx(point.avg_power_w, rel=1e-9)
            assert not got.extrapolated and not got.steps_assumed


@needs_data
def test_interpolates_between_neighbouring_batch_totals(models):
    model = models[SD21]
    p4, p8 = model.points[2], model.points[3]
    assert (p4.batch_size, p8.batch_size) == (4, 8)
    batch_j = (4 * p4.energy_per_image_j + 8 * p8.energy_per_image_j) / 2
    assert model.energy_per_image_j(6) == pytest.approx(batch_j / 6)
    assert model.batch_latency_s(6) == pytest.approx((p4.batch_latency_s + p8.batch_latency_s) / 2)
    assert not model.predict(6).extrapolated


@needs_data
def test_outside_the_measured_sizes_it_holds_per_image_values_and_flags_it(models):
    model = models[SD21]
    last = model.points[-1]
    got = model.predict(2 * last.batch_size)
    assert got.extrapolated and model.is_extrapolated(2 * last.batch_size)
    assert got.energy_per_image_j == last.energy_per_image_j
    assert got.batch_latency_s == pytest.approx(2 * last.batch_latency_s)
    without_one = replace(model, points=model.points[1:])
    below = without_one.predict(1)
    assert below.extrapolated
    assert below.energy_per_image_j == model.points[1].energy_per_image_j
    assert below.batch_latency_s == pytest.approx(model.points[1].batch_latency_s / 2)


@needs_data
def test_leave_one_out_errors_stay_at_the_reported_values(points):
    rows = {(r.scheme, r.quantity, r.gpu): r for r in validate(points)}
    expected = {  # (points, mean abs %, max abs %), as in the docstring and docs
        ("batch-linear", "energy", "A100"): (22, 1.88, 9.14),
        ("batch-linear", "energy", "B200"): (21, 2.48, 5.03),
        ("batch-linear", "energy", "H100"): (54, 0.79, 3.01),
        ("batch-linear", "energy", "all"): (97, 1.40, 9.14),
        ("batch-linear", "latency", "A100"): (22, 3.87, 25.49),
        ("batch-linear", "latency", "B200"): (21, 0.80, 2.58),
        ("batch-linear", "latency", "H100"): (54, 2.17, 17.78),
        ("batch-linear", "latency", "all"): (97, 2.26, 25.49),
        ("log2-per-image", "energy", "all"): (97, 2.26, 13.80),
        ("log2-per-image", "latency", "all"): (97, 5.71, 42.51),
    }
    for key, (count, mean_pct, max_pct) in expected.items():
        row = rows[key]
        assert row.points == count, key
        assert row.mean_abs_pct == pytest.approx(mean_pct, abs=0.01), key
        assert row.max_abs_pct == pytest.approx(max_pct, abs=0.01), key


@needs_data
@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_step_model_is_monotone_and_exact_at_the_measured_steps(points, fraction):
    model = fit_models(points, fixed_fraction=fraction)[SD21]
    measured = model.points[2]
    energies = [model.energy_per_image_j(4, steps) for steps in range(1, 60)]
    latencies = [model.batch_latency_s(4, steps) for steps in range(1, 60)]
    assert all(a < b for a, b in zip(energies, energies[1:], strict=False))
    assert all(a < b for a, b in zip(latencies, latencies[1:], strict=False))
    assert model.energy_per_image_j(4, 25) == pytest.approx(measured.energy_per_image_j)
    assert model.fixed_j(4) + model.per_step_j(4) * 25 == pytest.approx(measured.energy_per_image_j)
    assert model.fixed_j(4) == pytest.approx(fraction * measured.energy_per_image_j)
    few = model.predict(4, steps=5)
    assert few.steps_assumed and not model.predict(4, steps=25).steps_assumed
    assert few.energy_per_image_j == pytest.approx(
        measured.energy_per_image_j * (fraction + (1 - fraction) * 5 / 25)
    )
    assert few.avg_power_w == pytest.approx(measured.avg_power_w)


@needs_data
def test_bad_arguments_are_refused(models, points):
    with pytest.raises(ValueError, match="fixed_fraction"):
        fit_models(points, fixed_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        models[SD21].predict(0)
    with pytest.raises(ValueError, match="steps"):
        models[SD21].predict(1, steps=0)
    sana = models[("Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", "H100")]
    mixed = (models[SD21].points[0], sana.points[1])  # 25 and 20 steps
    with pytest.raises(ValueError, match="one step count"):
        EnergyLatencyModel("m", "m", "H100", mixed)


def test_missing_data_dir_fails_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(MeasurementsError, match="ML.ENERGY data not found.*--data-dir"):
        load_measurements(tmp_path)
    assert main(["--data-dir", str(tmp_path)]) == 1
    assert "ML.ENERGY data not found" in capsys.readouterr().err


@needs_data
def test_cli_json_runs():
    done = subprocess.run(
        [sys.executable, "-m", "wattserve.bench.profiles", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    document = json.loads(done.stdout)
    assert document["fixed_fraction"]["status"] == "assumption"
    assert len(document["models"]) == 30 and len(document["validation"]) == 16


def _cited_rows(provenance: str) -> tuple[str, list[dict[str, str]]]:
    match = re.search(r"(mlenergy_v[23]_text_to_image_energy\.csv) lines (\d+)-(\d+)", provenance)
    assert match, provenance
    with (DEFAULT_DATA_DIR / match[1]).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return match[1], rows[int(match[2]) - 2 : int(match[3]) - 1]


@needs_data
def test_real_catalog_loads_and_every_number_is_the_one_it_cites():
    catalog = load_catalog(REAL_CATALOG)
    assert len(catalog.variants) == 8
    for variant in catalog.variants:
        assert re.search(r"https?://|arXiv:", variant.quality_provenance), variant.name
        assert variant.resources.num_gpus == 1 and variant.resources.accelerator_types == ("H100",)
        file, rows = _cited_rows(variant.energy_prior.provenance)
        v3 = file.startswith("mlenergy_v3")
        assert {r["model_id" if v3 else "model"] for r in rows} == {variant.source}
        assert all("H100" in r["gpu_model" if v3 else "gpu"] for r in rows)
        assert all(r["num_gpus"] == "1" for r in rows) if v3 else True
        cited = {
            int(r["batch_size"]): float(
                r["energy_per_image_joules" if v3 else "energy_per_image_j"]
            )
            for r in rows
        }
        assert variant.energy_prior.joules_per_image == cited, variant.name
        first = rows[0]
        assert variant.steps == int(first["inference_steps" if v3 else "denoising_steps"])
        assert variant.max_batch_size == max(cited)
        if v3:
            peak_w = max(float(r["avg_power_watts"]) for r in rows)
            assert variant.max_size_px == int(first["image_width"])
        else:  # no power column: J/image x batch / batch latency
            peak_w = max(
                float(r["energy_per_image_j"]) * int(r["batch_size"]) / float(r["batch_latency_s"])
                for r in rows
            )
            assert variant.max_size_px == int(first["resolution_default"].split("x")[0])
        assert variant.power_w == pytest.approx(peak_w, rel=1e-9), variant.name
    turbo = catalog.get("sdxl-turbo-h100")
    assert turbo is not None and "NOT Turbo's intended 1-4 steps" in turbo.energy_prior.provenance
