"""scripts/gpu_check.py without a GPU (--cpu-smoke), its catalog, and the built-in weights."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from wattserve.bench.step_energy import fit_line, fit_step_energy
from wattserve.policies.catalog import BuiltinArch, load_catalog

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
GPU_CATALOG = REPO / "scripts" / "gpu_catalog.toml"

# sha256 of tiny-sd-turbo's saved weights, recorded with the builder as it was before
# BuiltinArch grew its optional fields: the defaults must keep building these bytes.
TINY_TURBO_SHA256 = {
    "unet/diffusion_pytorch_model.safetensors": (
        "bb2fdea824fa409cfdccc8ddce42f8ca33304c6f6db581140282eee5f8501871"
    ),
    "text_encoder/model.safetensors": (
        "18e274d2231e1810ca741d19e63e495321e2d06c3a111b4d153b51ed86e445d7"
    ),
    "vae/diffusion_pytorch_model.safetensors": (
        "ee1146f6c20e700adcf7bf65028583fc7f098e1f34c6a3e6a9be9bd965ba37ec"
    ),
}


def _run_script(*args, out=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("WATTSERVE_POWER_SOURCE", None)
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cpu_smoke(tmp_path_factory):
    """One --cpu-smoke run (batches and the step sweep) shared by the tests below."""
    out = tmp_path_factory.mktemp("gpu-check-out")
    proc = _run_script("--cpu-smoke", "--repeats", "1", "--sweep-repeats", "2", out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "gpu-check.json").read_text())


def test_cpu_smoke_measures_both_ways_and_writes_the_report(cpu_smoke):
    proc, report = cpu_smoke
    assert json.loads(proc.stdout) == report  # stdout is the same single JSON document
    assert report["mode"] == "cpu-smoke" and report["complete"] is True
    assert report["errors"] == []
    assert report["power_source"]["kind"] == "simulated"
    assert report["devices"] and report["devices"][0]["supports_energy_counter"] is True
    assert "pytest" not in report
    by_size = report["by_batch_size"]
    assert set(by_size) == {"1", "2"}
    for row in by_size.values():
        assert row["energy_source"] == ["simulated"]
        assert row["agent_j_per_image"] > 0
        assert row["integrated_j_per_image"] > 0
        assert row["batch_latency_s"] > 0
        assert row["agent_over_integrated"] > 0
    timed = [b for b in report["batches"] if not b["warmup"]]
    assert {b["batch_size"] for b in timed} == {1, 2}
    for batch in timed:
        assert batch["images"] == batch["batch_size"]
        assert batch["energy_source"] == "simulated"
        assert batch["agent_joules"] > 0 and batch["integrated_joules"] > 0


def test_cpu_smoke_step_sweep_reports_points_and_fits_labelled_simulated(cpu_smoke):
    _, report = cpu_smoke
    sweep = report["step_sweep"]
    assert sweep["power_source"] == "simulated" and sweep["steps"] == [1, 2, 4]
    assert sweep["repeats"] == 2 and sweep["skipped"] == {}
    assert "nvml" not in json.dumps(sweep)  # never labelled as a GPU measurement
    archs = sweep["architectures"]
    assert {name: arch["variant"] for name, arch in archs.items()} == {
        "sd21": "tiny-sd-turbo",
        "sdxl": "tiny-sdxl-arch-random",
    }
    for arch in archs.values():
        points = arch["points"]
        assert [p["steps"] for p in points if p["warmup"]] == [arch["default_steps"]]
        timed = [p for p in points if not p["warmup"]]
        assert sorted(p["steps"] for p in timed) == [1, 1, 2, 2, 4, 4]
        for point in points:
            assert point["batch_size"] == point["images"] == 1
            assert point["energy_source"] == "simulated"
            assert point["integrated_source"] == "simulated"
            assert point["agent_joules"] > 0 and point["integrated_joules"] > 0
        for key, joules in (("agent", "agent_joules"), ("integrated", "integrated_joules")):
            fit = arch["fits"][key]
            assert fit["energy_source"] == ["simulated"]
            assert fit["points"] == 6 and fit["step_counts"] == [1, 2, 4]
            assert fit["default_steps"] == arch["default_steps"]
            again = fit_step_energy([(p["steps"], p[joules]) for p in timed], arch["default_steps"])
            assert fit["fixed_j"] == pytest.approx(again.fixed_j)
            assert fit["per_step_j"] == pytest.approx(again.per_step_j)
            assert fit["fixed_fraction_at_default"] == again.fixed_fraction_at_default
            assert fit["r_squared"] == again.r_squared
        latency = arch["fits"]["latency"]
        assert {"fixed_s", "per_step_s", "r_squared", "s_at_default"} <= set(latency)
    assert arch["default_steps"] == 4  # the toy SDXL variant's own steps
    assert archs["sd21"]["default_steps"] == 1  # tiny-sd-turbo's


def test_step_sweep_options_are_checked_before_anything_runs():
    proc = _run_script("--cpu-smoke", "--sweep-steps", "4")
    assert proc.returncode != 0 and "2 or more step counts" in proc.stderr
    proc = _run_script("--cpu-smoke", "--sweep-archs", "sd3")
    assert proc.returncode != 0 and "--sweep-archs takes sd21,sdxl" in proc.stderr


def test_sdxl_sweep_is_skipped_not_failed_when_the_time_budget_is_spent(tmp_path):
    proc = _run_script(
        "--cpu-smoke", "--repeats", "1", "--sweep-archs", "sdxl", "--time-budget-s", "0",
        out=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((tmp_path / "gpu-check.json").read_text())["step_sweep"]
    assert sweep["architectures"] == {}
    assert "--time-budget-s" in sweep["skipped"]["sdxl"]


def test_step_fit_recovers_exact_fixed_and_per_step_energy():
    points = [(steps, 120.0 + 30.0 * steps) for steps in (1, 2, 4, 8, 25)]
    fit = fit_step_energy(points, default_steps=25)
    assert fit.fixed_j == pytest.approx(120.0)
    assert fit.per_step_j == pytest.approx(30.0)
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.rms_residual_j == pytest.approx(0.0, abs=1e-9)
    assert fit.j_at_default == pytest.approx(870.0)
    assert fit.fixed_fraction_at_default == pytest.approx(120.0 / 870.0)
    assert fit.step_counts == (1, 2, 4, 8, 25) and fit.points == 5
    assert fit.predict(10) == pytest.approx(420.0)
    assert fit.as_dict()["step_counts"] == [1, 2, 4, 8, 25]
    # with no fixed cost at all the fraction is 0, not something invented
    zero = fit_step_energy([(1, 16.8), (4, 67.2)], default_steps=25)
    assert zero.fixed_j == pytest.approx(0.0, abs=1e-9)
    assert zero.fixed_fraction_at_default == pytest.approx(0.0, abs=1e-9)


def test_step_fit_handles_noise_and_repeats():
    rng = random.Random(13)
    fixed, per_step = 95.0, 36.0
    points = [
        (steps, fixed + per_step * steps + rng.gauss(0.0, 4.0))
        for _ in range(3)
        for steps in (1, 2, 4, 8, 25)
    ]
    fit = fit_step_energy(points, default_steps=25)
    assert fit.points == 15 and fit.step_counts == (1, 2, 4, 8, 25)
    assert fit.fixed_j == pytest.approx(fixed, abs=5.0)
    assert fit.per_step_j == pytest.approx(per_step, abs=0.5)
    assert 0.99 < fit.r_squared < 1.0
    assert 0 < fit.rms_residual_j < 8.0
    assert fit.fixed_fraction_at_default == pytest.approx(fixed / (fixed + 25 * per_step), abs=0.01)
    # the same as ordinary least squares through every point, repeats not averaged first
    intercept, slope, r_squared, _ = fit_line(points)
    assert (fit.fixed_j, fit.per_step_j, fit.r_squared) == (intercept, slope, r_squared)


def test_step_fit_reports_noise_as_fitted_without_clamping():
    # no step dependence and one low point at 1 step: a negative intercept is reported
    fit = fit_step_energy([(1, 10.0), (2, 30.0), (4, 70.0)], default_steps=4)
    assert fit.fixed_j < 0 and fit.fixed_fraction_at_default < 0
    flat = fit_step_energy([(1, 50.0), (4, 50.0)], default_steps=4)
    assert flat.per_step_j == 0.0 and flat.r_squared is None  # nothing to explain
    assert flat.fixed_fraction_at_default == pytest.approx(1.0)


@pytest.mark.parametrize(
    "points",
    [[], [(25, 900.0)], [(25, 900.0), (25, 910.0), (25, 905.0)]],
    ids=["none", "one point", "one step count"],
)
def test_step_fit_refuses_fewer_than_two_distinct_step_counts(points):
    with pytest.raises(ValueError, match="2 or more distinct step counts"):
        fit_step_energy(points, default_steps=25)


def test_step_fit_rejects_bad_points():
    with pytest.raises(ValueError, match="step counts must be >= 1"):
        fit_step_energy([(0, 10.0), (2, 20.0)], default_steps=25)
    with pytest.raises(ValueError, match="non-finite"):
        fit_step_energy([(1, math.nan), (2, 20.0)], default_steps=25)
    with pytest.raises(ValueError, match="default_steps"):
        fit_step_energy([(1, 10.0), (2, 20.0)], default_steps=0)


FORBIDDEN = ("setpowermanagementlimit", "set_power", "nvidia-smi -pl", "nvmldeviceset")


def test_gpu_check_never_changes_a_power_limit():
    modules = [SCRIPT, *sorted(SCRIPT.parent.glob("_gpu_*.py"))]
    assert len(modules) >= 3  # the entry point and its sibling modules
    for module in modules:
        source = module.read_text(encoding="utf-8").lower()
        for forbidden in FORBIDDEN:
            assert forbidden not in source, module.name


def test_gpu_catalog_holds_the_sd21_architecture():
    catalog = load_catalog(GPU_CATALOG)
    assert catalog.names == ["sd21-arch-random"]
    variant = catalog.get("sd21-arch-random")
    assert variant is not None and variant.is_builtin
    assert (variant.steps, variant.guidance_scale, variant.dtype) == (25, 7.5, "float16")
    assert variant.quality_score == 0.0 and "random weights" in variant.quality_provenance
    assert variant.resources.num_gpus == 1
    assert variant.energy_prior.joules_per_image[1] == pytest.approx(386.46)
    assert "ML.ENERGY v2" in variant.energy_prior.provenance
    arch = variant.builtin
    assert arch is not None
    assert arch.unet_block_out_channels == [320, 640, 1280, 1280]
    assert arch.down_cross_attention == [True, True, True, False]
    assert arch.unet_attention_head_dim == [5, 10, 20, 20]
    assert (arch.text_hidden_size, arch.text_layers, arch.text_heads) == (1024, 23, 16)
    assert (arch.text_hidden_act, arch.text_vocab_size) == ("gelu", 49408)
    assert arch.vae_block_out_channels == [128, 256, 512, 512]
    assert arch.norm_num_groups == 32


def test_builtin_arch_defaults_are_the_tiny_layout_and_stay_strict():
    arch = BuiltinArch(unet_block_out_channels=[32, 64])
    assert arch.down_cross_attention == [False, True]
    assert (arch.unet_attention_head_dim, arch.norm_num_groups, arch.text_heads) == (8, 8, 2)
    with pytest.raises(ValueError):
        BuiltinArch(unet_block_out_channels=[32, 64], no_such_field=1)
    with pytest.raises(ValueError):
        BuiltinArch(unet_block_out_channels=[32, 64], unet_cross_attention_levels=[True])
    with pytest.raises(ValueError):
        BuiltinArch(unet_block_out_channels=[32, 64], unet_attention_head_dim=[8, 8, 8])
    with pytest.raises(ValueError):
        BuiltinArch(unet_block_out_channels=[32, 64], text_heads=3)
    with pytest.raises(ValueError):
        BuiltinArch(unet_block_out_channels=[32, 64], norm_num_groups=24)


def test_tiny_builtin_weights_are_unchanged(tmp_path):
    from wattserve.workers.pipelines import resolve_source

    variant = load_catalog().get("tiny-sd-turbo")
    assert variant is not None
    built = Path(resolve_source(variant, tmp_path))
    for relative, expected in TINY_TURBO_SHA256.items():
        digest = hashlib.sha256((built / relative).read_bytes()).hexdigest()
        assert digest == expected, relative
