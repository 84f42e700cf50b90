"""The step sweep of ``scripts/gpu_check.py``, and the random-weight SDXL it sweeps.

J/image at batch 1 at several step counts, fitted to ``fixed_j + per_step_j * steps``
(``bench.step_energy.fit_step_energy``), for the batch stage's worker and for a
random-weight SDXL base 1.0 architecture built here (``workers.pipelines`` only builds
the one-text-encoder Stable Diffusion class). Like ``_gpu_stages``, only the standard
library is imported at module level; ``wattserve``, torch and diffusers inside functions.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _gpu_stages import PROMPTS, Probe, Recorder

REPO = Path(__file__).resolve().parents[1]
GPU_SWEEP_STEPS = (1, 2, 4, 8, 25)
CPU_SWEEP_STEPS = (1, 2, 4)
SWEEP_ARCHS = ("sd21", "sdxl")
# The SDXL sweep (build, load, runs: about 1.5-2 min expected on an H200, not yet timed)
# starts only when this much of --time-budget-s is left.
SDXL_RESERVE_S = 180.0

# Stable Diffusion XL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0:
# unet/config.json, text_encoder/config.json (CLIP ViT-L/14), text_encoder_2/config.json
# (OpenCLIP ViT-bigG/14 with projection), vae/config.json): 2.57 B UNet, 0.12 B + 0.69 B
# text encoders, 84 M VAE parameters. "tiny" is the same pipeline class at toy sizes,
# for the CPU mode. Weights are random either way; nothing is downloaded.
SDXL_LAYOUTS: dict[str, dict[str, Any]] = {
    "sdxl": {
        "unet": {
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "addition_time_embed_dim": 256,
            "use_linear_projection": True,
            "norm_num_groups": 32,
            "sample_size": 128,
        },
        "text": {"hidden": 768, "intermediate": 3072, "layers": 12, "heads": 12,
                 "act": "quick_gelu", "projection": 768, "vocab": 49408},
        "text_2": {"hidden": 1280, "intermediate": 5120, "layers": 32, "heads": 20,
                   "act": "gelu", "projection": 1280, "vocab": 49408},
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025},
        "seed": 1024,
    },
    "tiny": {
        "unet": {
            "block_out_channels": (32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 1,
            "transformer_layers_per_block": (1, 1),
            "attention_head_dim": (2, 4),
            "addition_time_embed_dim": 8,
            "use_linear_projection": True,
            "norm_num_groups": 8,
            "sample_size": 32,
        },
        "text": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2,
                 "act": "quick_gelu", "projection": 32, "vocab": None},
        "text_2": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2,
                   "act": "gelu", "projection": 32, "vocab": None},
        "vae": {"block_out_channels": (32, 64), "layers_per_block": 1,
                "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.13025},
        "seed": 8,
    },
}  # fmt: skip


def _text_config(spec: dict[str, Any], tokenizer: Any) -> Any:
    """A ``CLIPTextConfig`` of one SDXL_LAYOUTS text encoder over ``tokenizer``."""
    from transformers import CLIPTextConfig

    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    return CLIPTextConfig(
        vocab_size=spec["vocab"] or len(tokenizer),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_attention_heads=spec["heads"],
        num_hidden_layers=spec["layers"],
        max_position_embeddings=77,
        hidden_act=spec["act"],
        bos_token_id=special[0],
        eos_token_id=special[1],
        pad_token_id=special[1],
        projection_dim=spec["projection"],
    )


def _sdxl_models(layout: dict[str, Any], tokenizer: Any) -> tuple[Any, Any, Any, Any]:
    """(text_encoder, text_encoder_2, unet, vae) of ``layout``, random, in this order.

    Created on torch's current default device (the caller's ``torch.device`` context).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text, text_2, unet_spec = layout["text"], layout["text_2"], layout["unet"]
    vae_spec = layout["vae"]
    levels = len(vae_spec["block_out_channels"])
    text_encoder = CLIPTextModel(_text_config(text, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(text_2, tokenizer))
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        # SDXL conditions on both encoders' penultimate states, concatenated (2048),
        # and on the pooled bigG embedding plus 6 size/crop numbers (2816)
        cross_attention_dim=text["hidden"] + text_2["hidden"],
        addition_embed_type="text_time",
        projection_class_embeddings_input_dim=(
            6 * unet_spec["addition_time_embed_dim"] + text_2["projection"]
        ),
        **unet_spec,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        force_upcast=True,  # SDXL's VAE decodes in float32, as the released config says
        **vae_spec,
    )
    return text_encoder, text_encoder_2, unet, vae


def _build_random_sdxl(layout: dict[str, Any], device: str = "cpu") -> Any:
    """A random-weight ``StableDiffusionXLPipeline`` of ``layout`` (see SDXL_LAYOUTS).

    The four models are created directly on ``device`` (random init of 3.5 B parameters
    is quick on a GPU, slow on a CPU); tokenizer and scheduler hold no weights.

    Built like ``workers.pipelines._build_random_pipeline`` (which only makes the
    one-text-encoder Stable Diffusion class): the same 514-token byte-level tokenizer for
    both text encoders (a larger vocabulary only enlarges the embedding tables).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from wattserve.workers.pipelines import _tiny_tokenizer

    torch.manual_seed(layout["seed"])
    tokenizer = _tiny_tokenizer()
    with torch.device(device):
        text_encoder, text_encoder_2, unet, vae = _sdxl_models(layout, tokenizer)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _save_random_sdxl(cpu_smoke: bool, models_dir: Path, name: str, target: Path) -> None:
    """Build the random SDXL pipeline and save it at ``target`` (via a staging folder).

    On a GPU the modules are created on the device (fast) and saved in float16.
    """
    import torch

    on_gpu = torch.cuda.is_available() and not cpu_smoke
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        pipe = _build_random_sdxl(
            SDXL_LAYOUTS["tiny" if cpu_smoke else "sdxl"], "cuda" if on_gpu else "cpu"
        )
        if on_gpu:
            pipe.to(torch.float16)
        pipe.save_pretrained(staging)
        del pipe
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if on_gpu:
            torch.cuda.empty_cache()


def _sdxl_variant(cpu_smoke: bool, models_dir: Path) -> Any:
    """Build (once) the random SDXL pipeline under ``models_dir``; its VariantSpec.

    The worker then loads the directory with ``from_pretrained`` like any checkpoint.
    """
    from wattserve.policies.catalog import EnergyPrior, Resources, VariantSpec, load_catalog

    name = "tiny-sdxl-arch-random" if cpu_smoke else "sdxl-arch-random"
    target = models_dir / name
    if not (target / "model_index.json").exists():
        _save_random_sdxl(cpu_smoke, models_dir, name, target)
    if cpu_smoke:
        return VariantSpec(
            name=name,
            source=str(target),
            steps=4,
            guidance_scale=5.0,
            max_size_px=256,
            quality_score=0.0,
            quality_provenance="random weights: toy SDXL layout for the CPU mode",
            power_w=350.0,
            energy_prior=EnergyPrior(
                joules_per_image={1: 18.0}, provenance="placeholder: CPU mode, not used"
            ),
        )
    # Steps, guidance and precision of the real SDXL variant (policies/real_catalog.toml)
    real = load_catalog(REPO / "policies" / "real_catalog.toml").get("sdxl-h100")
    assert real is not None
    fields = real.model_dump()
    fields.update(
        name=name,
        source=str(target),
        min_size_px=512,
        quality_score=0.0,
        quality_provenance="random weights: architecture and cost of SDXL base 1.0 only",
        resources=Resources(num_gpus=1).model_dump(),
    )
    return VariantSpec.model_validate(fields)


def _fit_or_error(points: list[tuple[int, float]], default_steps: int) -> dict[str, Any]:
    from wattserve.bench.step_energy import fit_step_energy

    try:
        return fit_step_energy(points, default_steps).as_dict()
    except ValueError as exc:
        return {"error": str(exc)}


def _sweep_fits(points: list[dict[str, Any]], default_steps: int) -> dict[str, Any]:
    """Fits of the timed points: agent joules, integrated joules, latency (batch 1)."""
    timed = [p for p in points if not p["warmup"]]
    fits: dict[str, Any] = {}
    for key, joules, label in (
        ("agent", "agent_joules", "energy_source"),
        ("integrated", "integrated_joules", "integrated_source"),
    ):
        fit = _fit_or_error(
            [(p["steps"], p[joules] / p["batch_size"]) for p in timed], default_steps
        )
        fit["energy_source"] = sorted({p[label] for p in timed})
        fits[key] = fit
    # the same line through batch latency, in seconds
    latency = _fit_or_error([(p["steps"], p["busy_s"]) for p in timed], default_steps)
    seconds = {"fixed_j": "fixed_s", "per_step_j": "per_step_s", "j_at_default": "s_at_default",
               "rms_residual_j": "rms_residual_s"}  # fmt: skip
    fits["latency"] = {seconds.get(key, key): value for key, value in latency.items()}
    return fits


def _sweep_one(
    worker: Any,
    variant: Any,
    probe: Probe,
    side_px: int,
    sweep: dict[str, Any],
    result: dict[str, Any],
) -> None:
    """Warm-up at the variant's steps, then ``sweep["repeats"]`` rounds over its steps.

    Rounds interleave the step counts (1, 2, 4, ..., then again) so slow drift in clocks
    or temperature spreads over all of them. The worker keeps its loaded pipeline; only
    its ``variant.steps`` changes between runs. Fills ``result`` as it goes (its points
    survive a failure part-way; ``fits`` is added once every run is done).
    """
    from wattserve.policies.plans import BatchPlan, WorkItem

    steps_list, repeats = sweep["steps"], sweep["repeats"]
    schedule = [(variant.steps, "warmup")]
    schedule += [(s, f"r{r}") for r in range(repeats) for s in steps_list]
    points: list[dict[str, Any]] = []
    result.update(
        variant=variant.name,
        default_steps=variant.steps,
        guidance_scale=variant.guidance_scale,
        dtype=variant.dtype,
        size_px=side_px,
        batch_size=1,
        steps=list(steps_list),
        repeats=repeats,
        points=points,
    )
    try:
        for number, (steps, tag) in enumerate(schedule):
            worker.variant = variant.model_copy(update={"steps": steps})
            item = WorkItem(PROMPTS[number % len(PROMPTS)], None, 5000 + number)
            batch_id = f"sweep-{variant.name}-{number}-s{steps}-{tag}"
            plan = BatchPlan(batch_id, variant.name, side_px, side_px, (item,))
            row = probe.measure(worker, plan)
            row.update(steps=steps, warmup=tag == "warmup")
            points.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        worker.variant = variant
    result["fits"] = _sweep_fits(points, variant.steps)


def _sweep_sdxl(
    rec: Recorder,
    cpu_smoke: bool,
    models_dir: Path,
    probe: Probe,
    side_px: int,
    sweep: dict[str, Any],
    result: dict[str, Any],
) -> None:
    """Build the random SDXL pipeline, load it in its own worker, sweep it, free it."""
    from wattserve.workers.worker import VariantWorker

    try:
        started = time.monotonic()
        sdxl = _sdxl_variant(cpu_smoke, models_dir)
        build_s = round(time.monotonic() - started, 2)
        started = time.monotonic()
        worker = VariantWorker(sdxl, str(models_dir), probe.meter)
        load_s = round(time.monotonic() - started, 2)
    except Exception:
        rec.fail("step_sweep:sdxl:build")
        return
    result.update(build_s=build_s, load_s=load_s)
    try:
        _sweep_one(worker, sdxl, probe, side_px, sweep, result)
    except Exception:
        rec.fail("step_sweep:sdxl")
    finally:
        del worker
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # freeing memory is a courtesy to the pytest stage
            pass


def _sweep_section(sweep: dict[str, Any], power_kind: str, time_budget_s: float) -> dict:
    """The report's ``step_sweep`` section before any run: what, how, which archs."""
    return {
        "what": "J/image at batch 1 vs denoising steps, fitted by least squares to "
        "J(steps) = fixed_j + per_step_j * steps; fixed_fraction_at_default = "
        "fixed_j / J(default steps)",
        "power_source": power_kind,
        "note": (
            "NVML energy of the GPU: agent = the telemetry agent's figure "
            "(energy_source), integrated = this script's 100 Hz power polling"
            if power_kind == "nvml"
            else "CPU mode: simulated power x busy time on toy architectures "
            "(tiny-sd-turbo, a toy SDXL layout); exercises the code, measures no GPU"
        ),
        "steps": list(sweep["steps"]),
        "repeats": sweep["repeats"],
        "warmup_runs": 1,
        "time_budget_s": time_budget_s,
        "architectures": {arch: {} for arch in sweep["archs"]},
        "skipped": {},
    }


def sweep_stage(
    rec: Recorder,
    sweep: dict[str, Any],
    *,
    cpu_smoke: bool,
    models_dir: Path,
    worker: Any,
    variant: Any,
    probe: Probe,
    sizes_px: tuple[int, int],
    power_kind: str,
    time_budget_s: float,
    check_started: float,
) -> None:
    """The step sweep into ``rec.report["step_sweep"]``, saving after each architecture.

    ``worker`` and ``variant`` are the batch stage's (SD 2.1 on a GPU, tiny-sd-turbo in
    the CPU mode); ``sizes_px`` is (their side, SDXL's side). The SDXL part starts only
    while ``SDXL_RESERVE_S`` of ``time_budget_s`` (counted from ``check_started``) remain.
    """
    rec.report["step_sweep"] = section = _sweep_section(sweep, power_kind, time_budget_s)
    archs = section["architectures"]
    if "sd21" in sweep["archs"]:
        try:
            _sweep_one(worker, variant, probe, sizes_px[0], sweep, archs["sd21"])
        except Exception:
            rec.fail("step_sweep:sd21")
        rec.save()
    if "sdxl" in sweep["archs"]:
        left_s = time_budget_s - (time.monotonic() - check_started)
        if left_s < SDXL_RESERVE_S:
            del archs["sdxl"]
            section["skipped"]["sdxl"] = (
                f"{left_s:.0f} s of --time-budget-s left, under the {SDXL_RESERVE_S:.0f}"
                " s the SDXL sweep is given"
            )
        else:
            _sweep_sdxl(rec, cpu_smoke, models_dir, probe, sizes_px[1], sweep, archs["sdxl"])
        rec.save()
