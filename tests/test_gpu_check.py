"""scripts/gpu_check.py without a GPU (--cpu-smoke), its catalog, and the built-in weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_cpu_smoke_measures_both_ways_and_writes_the_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("WATTSERVE_POWER_SOURCE", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--repeats", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert json.loads(proc.stdout) == report  # stdout is the same single JSON document
    assert report["mode"] == "cpu-smoke"
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


def test_gpu_check_never_changes_a_power_limit():
    source = SCRIPT.read_text(encoding="utf-8").lower()
    for forbidden in ("setpowermanagementlimit", "set_power", "nvidia-smi -pl", "nvmldeviceset"):
        assert forbidden not in source


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
