r"""One prepared GPU check: NVML readings, SD 2.1-sized batches, two energy methods.

What it does, in one run (expected 4-6 minutes on an H100/H200 with the step sweep,
2-4 without it; none of it timed there yet; it must stay under 8):

1. lists the GPUs through wattserve's NVML source (``open_power_sources("nvml")``): id,
   name, power, energy counter, whether the counter works, the power limit. It only
   *reads*: this script never changes a power limit, clock or any other GPU setting;
2. builds a pipeline with the architecture of Stable Diffusion 2.1 and random weights
   (``scripts/gpu_catalog.toml``, variant ``sd21-arch-random``: 0.87 B UNet, 0.34 B
   text encoder, 84 M VAE parameters) into a temporary models directory, loads it in
   float16 through the real ``workers.worker.VariantWorker`` and runs batches of 1, 2
   and 4 images at 512x512, 25 steps, guidance 7.5 (one warm-up batch first, then each
   size ``--repeats`` times). The worker's meter is a ``telemetry.agent.LocalMeter`` over
   an in-process ``TelemetryAgent`` sampling NVML at 10 Hz, so each batch's joules are
   what wattserve itself would record (``nvml-counter`` on Volta and newer);
3. independently polls ``power_mw()`` of the same GPU at ~100 Hz in its own thread and
   integrates it (trapezoids) over exactly the meter's begin..end window of each batch;
4. prints per batch size: J/image from the agent (with its energy_source), J/image from
   integrated power, batch latency, and agent/integrated ratio;
5. the step sweep (``step_sweep`` in the report; ``--no-step-sweep`` skips it): J/image
   at batch 1 at 1, 2, 4, 8 and 25 denoising steps (``--sweep-steps``), one warm-up at
   the variant's own steps, then ``--sweep-repeats`` (3) interleaved rounds, for
   (a) the SD 2.1 worker above, 512x512, guidance 7.5, and (b) a random-weight SDXL
   base 1.0 architecture (``SDXL_LAYOUTS["sdxl"]``: 2.57 B UNet, 0.12 B + 0.69 B text
   encoders, 84 M VAE; ``StableDiffusionXLPipeline``, which ``workers.pipelines`` cannot
   build) created on the GPU, saved in float16, loaded by its own ``VariantWorker``,
   1024x1024, guidance 5.0, default 25 steps (as ``sdxl-h100`` in
   ``policies/real_catalog.toml``). Each figure is labelled: the agent's
   ``energy_source`` (``nvml-counter``) and the poller's ``nvml-power``. Fitted by least
   squares (``bench.step_energy.fit_step_energy``): ``J(steps) = fixed_j + per_step_j *
   steps``, with R² and ``fixed_fraction_at_default = fixed_j / J(default steps)``, the
   number ``bench.profiles`` assumes to be 0; latency gets the same line. The SDXL part
   starts only while ``SDXL_RESERVE_S`` (180 s) of ``--time-budget-s`` (480 s) remain,
   else it is listed under ``skipped``;
6. runs ``pytest -q -m gpu tests/test_gpu.py`` and records its exit code and summary.

Everything is printed as one JSON document on stdout (logs go to stderr) and, when
``OUT`` is set, also written to ``$OUT/gpu-check.json``: after every stage with
``"complete": false`` (a run cut short still leaves its numbers), and at the end with
``"complete": true``. The exit code is 0 only when every stage worked (the pytest exit
code included).

``--cpu-smoke`` runs the same code path without a GPU: simulated power source, the
tiny built-in variant ``tiny-sd-turbo``, 64x64, batch sizes 1 and 2, no pytest; its
step sweep runs 1, 2 and 4 steps on ``tiny-sd-turbo`` and on a toy SDXL layout
(``SDXL_LAYOUTS["tiny"]``), labelled ``simulated`` (power x busy time, not energy).
That is what ``tests/test_gpu_check.py`` runs.

Running it with the ``device`` tool (a lent H100/H200; nothing outside that machine can
be reached, so nothing can be pip-installed there from a registry)
-----------------------------------------------------------------------------------
The machine's image has its own ``python3`` (3.12, /opt/torch/.venv) with torch (CUDA),
transformers, accelerate, huggingface-hub, safetensors, tokenizers, numpy, pillow,
httpx, regex, requests, filelock, nvidia-ml-py (pynvml) and pytest, but, per
/work/.library/device/KINDS.md's package list, NOT diffusers, pydantic (with
pydantic-core, annotated-types, typing-inspection) or structlog, and pydantic 2.14
needs typing-extensions>=4.16 (the image's version is not listed). Our ``.venv`` cannot
travel (a CPU-only torch for Python 3.11, far over the 64 MiB ``carry`` limit), so
carry those few wheels, for the image's Python 3.12, and use the image's torch. Once,
here, in the repository root (these pins resolved on 2026-11-26: 8.9 MB together,
pydantic-core the only compiled one)::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 structlog==26.1.0

Then one ``run`` call with ``carry: [".whl"]`` and ``timeout_s`` about 540::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py

``$OUT/gpu-check.json`` comes back. Nothing installs wattserve there: the script adds
the checkout's root to ``wattserve.__path__`` (``_use_checkout_packages``) so that
``wattserve.policies``, ``wattserve.bench``, ... resolve to the folders as an editable
install maps them, and runs the pytest stage the same way.
With the sweep the run is expected to take 4-6 minutes; ``--no-step-sweep`` or
``--sweep-archs sd21`` shorten it. Limits to know: the session has 15 minutes of
device time in all (the machine's start counts), so run this once, prepared; the image's
transformers (5.17 when last listed) is older than ours (5.24) and diffusers' own
requirements (huggingface-hub>=1.32) are only listed as met there, not checked; ``ray``
is not on the image (carrying it and its dependencies was not tried), so the
``tests/test_gpu.py`` case that builds a ``VariantWorker`` without a meter (it then
looks up a Ray telemetry agent) is expected to fail there; this script gives its worker
a ``LocalMeter`` and never imports Ray (``cuda_device_uuid`` is recomputed below if
``workers.meter`` cannot be imported). ``make gpu-check`` runs this script with
``.venv/bin/python`` for a machine where the project's own venv has a CUDA torch.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing wattserve
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _use_checkout_packages() -> None:
    """Make ``wattserve.<folder>`` importable from a checkout that is not installed.

    The folders install as ``wattserve.policies``, ``wattserve.bench``, ... (pyproject's
    package-dir). An editable install maps them; the bare GPU image has none, so the
    repository root joins ``wattserve.__path__`` and ``wattserve.policies`` resolves to
    ``REPO/policies``. A no-op where the mapping already works.
    """
    import importlib.util

    import wattserve

    if importlib.util.find_spec("wattserve.policies") is None:
        wattserve.__path__.append(str(REPO))


GPU_CATALOG = REPO / "scripts" / "gpu_catalog.toml"
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red cube on a glass table, studio light",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, top view, photograph",
)


class PowerPoller:
    """Polls one device's ``power_mw()`` in a thread; integrates any window afterwards."""

    def __init__(self, device: Any, hz: float) -> None:
        self._device = device
        self._period_s = 1.0 / hz
        self._times: list[float] = []
        self._watts: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="power-poller", daemon=True)
        self.errors = 0

    def _loop(self) -> None:
        next_s = time.monotonic()
        while not self._stop.is_set():
            try:
                watts = self._device.power_mw() / 1000
            except Exception:  # a failed read leaves a gap; the trapezoids bridge it
                self.errors += 1
            else:
                with self._lock:
                    self._times.append(time.monotonic())
                    self._watts.append(watts)
            next_s += self._period_s
            self._stop.wait(max(0.0, next_s - time.monotonic()))

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (samples are kept)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _at(self, t: float) -> float:
        """Power at ``t``, linearly interpolated (nearest sample outside the range)."""
        i = bisect.bisect_left(self._times, t)
        if i == 0:
            return self._watts[0]
        if i == len(self._times):
            return self._watts[-1]
        t0, t1 = self._times[i - 1], self._times[i]
        w0, w1 = self._watts[i - 1], self._watts[i]
        return w0 + (w1 - w0) * (t - t0) / (t1 - t0) if t1 > t0 else w1

    def integrate(self, start_s: float, end_s: float) -> tuple[float, int]:
        """(joules over [start_s, end_s] by trapezoids, samples inside the window)."""
        with self._lock:
            if not self._times:
                raise RuntimeError("no power samples were taken")
            lo = bisect.bisect_right(self._times, start_s)
            hi = bisect.bisect_left(self._times, end_s)
            points = [(start_s, self._at(start_s))]
            points += list(zip(self._times[lo:hi], self._watts[lo:hi], strict=True))
            points.append((end_s, self._at(end_s)))
        joules = sum(
            (t1 - t0) * (w0 + w1) / 2
            for (t0, w0), (t1, w1) in zip(points, points[1:], strict=False)
        )
        return joules, hi - lo


class WindowMeter:
    """A ``BatchMeter`` that passes through to a ``LocalMeter`` and records its window."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.windows: dict[str, tuple[float, float]] = {}
        self._begun: dict[str, float] = {}

    def begin(self, batch_id: str, power_w: float) -> None:
        """Report a batch start, then note the time."""
        self._inner.begin(batch_id, power_w)
        self._begun[batch_id] = time.monotonic()

    def end(self, batch_id: str) -> Any:
        """Note the time, then report the batch end and return the agent's measurement."""
        ended = time.monotonic()
        self.windows[batch_id] = (self._begun.pop(batch_id), ended)
        return self._inner.end(batch_id)


def _device_info(device: Any) -> dict[str, Any]:
    """Everything the NVML (or simulated) source reports for one device, read-only."""
    from wattserve.telemetry.devices import TelemetryError

    def read(name: str) -> Any:
        try:
            return getattr(device, name)()
        except TelemetryError as exc:
            return f"unsupported: {exc}"

    return {
        "index": device.index,
        "id": device.uuid,
        "name": device.name,
        "kind": device.kind,
        "power_mw": read("power_mw"),
        "energy_mj": read("energy_mj"),
        "supports_energy_counter": device.supports_energy_counter(),
        "power_limit_mw": device.power_limit_mw(),
        "power_limit_constraints_mw": device.power_limit_constraints_mw(),
        "utilization_pct": device.utilization_pct(),
    }


def _device_uuid(torch_device: Any) -> str | None:
    """NVML UUID of the worker's device (``workers.meter.cuda_device_uuid`` without Ray)."""
    try:
        from wattserve.workers.meter import cuda_device_uuid
    except ImportError:  # workers.meter imports ray, which a bare GPU image may lack
        if getattr(torch_device, "type", "cpu") != "cuda":
            return None
        import torch

        return f"GPU-{torch.cuda.get_device_properties(torch_device).uuid}"
    return cuda_device_uuid(torch_device)


def _versions() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per batch size over the timed (non-warm-up) runs."""
    by_size: dict[str, Any] = {}
    for size in sorted({r["batch_size"] for r in runs}):
        rows = [r for r in runs if r["batch_size"] == size]
        agent = statistics.median(r["agent_joules"] / size for r in rows)
        integ = statistics.median(r["integrated_joules"] / size for r in rows)
        by_size[str(size)] = {
            "runs": len(rows),
            "agent_j_per_image": round(agent, 3),
            "energy_source": sorted({r["energy_source"] for r in rows}),
            "integrated_j_per_image": round(integ, 3),
            "batch_latency_s": round(statistics.median(r["busy_s"] for r in rows), 4),
            "mean_power_w": round(statistics.median(r["mean_power_w"] for r in rows), 1),
            "agent_over_integrated": round(agent / integ, 4) if integ > 0 else None,
        }
    return by_size


# ---------------------------------------------------------------------------------------
# Step sweep: J/image at several step counts, fitted to fixed_j + per_step_j * steps.

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


def _build_random_sdxl(layout: dict[str, Any], device: str = "cpu") -> Any:
    """A random-weight ``StableDiffusionXLPipeline`` of ``layout`` (see SDXL_LAYOUTS).

    The four models are created directly on ``device`` (random init of 3.5 B parameters
    is quick on a GPU, slow on a CPU); tokenizer and scheduler hold no weights.

    Built like ``workers.pipelines._build_random_pipeline`` (which only makes the
    one-text-encoder Stable Diffusion class): the same 514-token byte-level tokenizer for
    both text encoders (a larger vocabulary only enlarges the embedding tables).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from wattserve.workers.pipelines import _tiny_tokenizer

    torch.manual_seed(layout["seed"])
    tokenizer = _tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])

    def text_config(spec: dict[str, Any]) -> Any:
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

    text, text_2, unet_spec = layout["text"], layout["text_2"], layout["unet"]
    vae_spec = layout["vae"]
    levels = len(vae_spec["block_out_channels"])
    with torch.device(device):
        text_encoder = CLIPTextModel(text_config(text))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(text_2))
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


def _sdxl_variant(cpu_smoke: bool, models_dir: Path) -> Any:
    """Build (once) the random SDXL pipeline under ``models_dir``; its VariantSpec.

    On a GPU the modules are created on the device (fast) and saved in float16; the
    worker then loads the directory with ``from_pretrained`` like any checkpoint.
    """
    import torch

    from wattserve.policies.catalog import EnergyPrior, Resources, VariantSpec, load_catalog

    name = "tiny-sdxl-arch-random" if cpu_smoke else "sdxl-arch-random"
    target = models_dir / name
    if not (target / "model_index.json").exists():
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


def _measure(
    worker: Any, meter: WindowMeter, poller: PowerPoller, plan: Any, power_label: str
) -> dict[str, Any]:
    """Run one plan through the worker; the agent's joules and the poller's, labelled."""
    out = worker.run(plan)
    time.sleep(0.25)  # let the poller take samples past the window's end
    window_start, window_end = meter.windows[plan.batch_id]
    joules, samples = poller.integrate(window_start, window_end)
    window_s = window_end - window_start
    return {
        "batch_id": plan.batch_id,
        "batch_size": len(plan.items),
        "images": len(out.png_images),
        "busy_s": round(out.busy_s, 4),
        "window_s": round(window_s, 4),
        "agent_joules": round(out.joules, 3),
        "energy_source": out.energy_source,
        "integrated_joules": round(joules, 3),
        "integrated_source": power_label,
        "power_samples_in_window": samples,
        "mean_power_w": round(joules / window_s, 1) if window_s > 0 else None,
    }


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
    meter: WindowMeter,
    poller: PowerPoller,
    side_px: int,
    steps_list: tuple[int, ...],
    repeats: int,
    power_label: str,
    result: dict[str, Any],
) -> None:
    """Warm-up at the variant's steps, then ``repeats`` rounds over ``steps_list``.

    Rounds interleave the step counts (1, 2, 4, ..., then again) so slow drift in clocks
    or temperature spreads over all of them. The worker keeps its loaded pipeline; only
    its ``variant.steps`` changes between runs. Fills ``result`` as it goes (its points
    survive a failure part-way; ``fits`` is added once every run is done).
    """
    from wattserve.policies.plans import BatchPlan, WorkItem

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
            row = _measure(worker, meter, poller, plan, power_label)
            row.update(steps=steps, warmup=tag == "warmup")
            points.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        worker.variant = variant
    result["fits"] = _sweep_fits(points, variant.steps)


# ``python -m pytest`` with ``_use_checkout_packages`` first (conftest imports
# wattserve.policies, which an uninstalled checkout does not map by itself)
_PYTEST_BOOT = (
    "import sys; sys.path.insert(0, {repo!r}); import importlib.util, wattserve; "
    "importlib.util.find_spec('wattserve.policies') or wattserve.__path__.append({repo!r}); "
    "import pytest; sys.exit(pytest.main(['-q', '-m', 'gpu', 'tests/test_gpu.py']))"
)


def _run_pytest() -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PYTEST_BOOT.format(repo=str(REPO))],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return {"returncode": None, "summary": "timed out after 300 s", "tail": str(tail)}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else "",
        "tail": (proc.stdout + proc.stderr)[-3000:],
    }


def _sweep_options(cpu_smoke: bool, args: argparse.Namespace) -> dict[str, Any] | None:
    """The step sweep's settings from the command line (None: no sweep)."""
    if args.no_step_sweep:
        return None
    if args.sweep_steps:
        try:
            steps = tuple(sorted({int(s) for s in args.sweep_steps.split(",") if s.strip()}))
        except ValueError:
            raise SystemExit(f"--sweep-steps takes integers: {args.sweep_steps!r}") from None
    else:
        steps = CPU_SWEEP_STEPS if cpu_smoke else GPU_SWEEP_STEPS
    archs = tuple(a.strip() for a in args.sweep_archs.split(",") if a.strip())
    unknown = sorted(set(archs) - set(SWEEP_ARCHS))
    if unknown or not archs:
        raise SystemExit(f"--sweep-archs takes {','.join(SWEEP_ARCHS)}; got {args.sweep_archs!r}")
    if len(steps) < 2 or steps[0] < 1:
        raise SystemExit(f"--sweep-steps needs 2 or more step counts >= 1; got {steps}")
    return {"steps": steps, "archs": archs, "repeats": max(1, args.sweep_repeats)}


def run_check(
    cpu_smoke: bool,
    repeats: int,
    models_dir: Path,
    sweep: dict[str, Any] | None = None,
    time_budget_s: float = 480.0,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """Every stage of the check; failures are recorded in ``errors`` and later stages go on.

    ``checkpoint(report)``, when given, is called after each stage with the report so
    far (``main`` writes it to ``$OUT`` so a run cut short still returns its numbers).
    """
    _use_checkout_packages()
    import structlog

    from wattserve.policies.catalog import load_catalog
    from wattserve.policies.plans import BatchPlan, WorkItem
    from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
    from wattserve.telemetry.devices import TelemetryError, open_power_sources
    from wattserve.workers.pipelines import resolve_source
    from wattserve.workers.worker import VariantWorker

    # Logs to stderr so stdout is the one JSON document (configure_logging keeps this).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    check_started = time.monotonic()

    def save() -> None:
        if checkpoint is not None:
            checkpoint(report)

    if cpu_smoke:
        source_mode, variant = "simulated", load_catalog().get("tiny-sd-turbo")
        side_px, sizes, sdxl_px = 64, (1, 2), 64
    else:
        source_mode, variant = "nvml", load_catalog(GPU_CATALOG).get("sd21-arch-random")
        side_px, sizes, sdxl_px = 512, (1, 2, 4), 1024
    assert variant is not None
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if cpu_smoke else "gpu",
        "complete": False,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variant": {
            "name": variant.name,
            "steps": variant.steps,
            "guidance_scale": variant.guidance_scale,
            "dtype": variant.dtype,
            "size_px": side_px,
            "batch_sizes": list(sizes),
            "repeats": repeats,
        },
        "errors": [],
    }

    def fail(stage: str) -> None:
        report["errors"].append({"stage": stage, "error": traceback.format_exc(limit=8)})

    try:
        report["versions"] = _versions()
    except Exception:
        fail("versions")

    try:
        device_set = open_power_sources(source_mode)
        report["power_source"] = {"kind": device_set.kind, "reason": device_set.reason}
        report["devices"] = [_device_info(d) for d in device_set.devices]
    except Exception:
        fail("devices")
        return report
    # what the poller's integrated figures are: NVML power readings, or the simulation
    power_label = "nvml-power" if device_set.kind == "nvml" else "simulated"

    try:
        started = time.monotonic()
        resolve_source(variant, models_dir)
        report["build_s"] = round(time.monotonic() - started, 2)
    except Exception:
        fail("build")
        return report
    save()

    agent = TelemetryAgent(open_power_sources(source_mode), sample_hz=10)
    agent.start()
    poller: PowerPoller | None = None
    runs: list[dict[str, Any]] = []
    report["batches"] = runs
    try:
        # The agent samples its own devices; the poller reads the same device object
        # (one simulated device only exists once; NVML handles are thread-safe).
        inner = LocalMeter(agent, None)
        meter = WindowMeter(inner)
        started = time.monotonic()
        worker = VariantWorker(variant, str(models_dir), meter)
        report["load_s"] = round(time.monotonic() - started, 2)
        inner.device_uuid = _device_uuid(worker._device)
        try:
            index = agent.device_index(inner.device_uuid)
        except TelemetryError:  # torch's UUID not among NVML's: say so, measure device 0
            fail("device_uuid")
            inner.device_uuid, index = None, 0
        report["worker"] = {
            "torch_device": str(worker._device),
            "device_uuid": inner.device_uuid,
            "agent_device_index": index,
            "agent_device_id": agent.devices[index].uuid,
        }
        poller = PowerPoller(agent.devices[index], hz=100)
        poller.start()
        time.sleep(0.3)
        schedule = [(1, "warmup")] + [(s, f"r{r}") for r in range(repeats) for s in sizes]
        for number, (size, tag) in enumerate(schedule):
            items = tuple(
                WorkItem(PROMPTS[(number + i) % len(PROMPTS)], None, 1000 * number + i)
                for i in range(size)
            )
            batch_id = f"check-{number}-bs{size}-{tag}"
            plan = BatchPlan(batch_id, variant.name, side_px, side_px, items)
            row = _measure(worker, meter, poller, plan, power_label)
            row["warmup"] = tag == "warmup"
            runs.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        timed = [r for r in runs if not r["warmup"]]
        report["by_batch_size"] = _summary(timed) if timed else {}
        save()

        if sweep is not None:
            report["step_sweep"] = section = {
                "what": "J/image at batch 1 vs denoising steps, fitted by least squares to "
                "J(steps) = fixed_j + per_step_j * steps; fixed_fraction_at_default = "
                "fixed_j / J(default steps)",
                "power_source": device_set.kind,
                "note": (
                    "NVML energy of the GPU: agent = the telemetry agent's figure "
                    "(energy_source), integrated = this script's 100 Hz power polling"
                    if device_set.kind == "nvml"
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
            if "sd21" in sweep["archs"]:
                try:  # the batch stage's worker: SD 2.1 (GPU) or tiny-sd-turbo (CPU mode)
                    _sweep_one(
                        worker, variant, meter, poller, side_px, sweep["steps"],
                        sweep["repeats"], power_label, section["architectures"]["sd21"],
                    )  # fmt: skip
                except Exception:
                    fail("step_sweep:sd21")
                save()
            if "sdxl" in sweep["archs"]:
                left_s = time_budget_s - (time.monotonic() - check_started)
                if left_s < SDXL_RESERVE_S:
                    del section["architectures"]["sdxl"]
                    section["skipped"]["sdxl"] = (
                        f"{left_s:.0f} s of --time-budget-s left, under the {SDXL_RESERVE_S:.0f}"
                        " s the SDXL sweep is given"
                    )
                else:
                    _sweep_sdxl(
                        cpu_smoke, models_dir, meter, poller, sdxl_px, sweep, power_label,
                        section, fail,
                    )  # fmt: skip
                save()
    except Exception:
        fail("batches")
    finally:
        if poller is not None:
            poller.stop()
            report["poller"] = {"hz": 100, "read_errors": poller.errors}
        agent.stop()
        report["agent"] = {
            "sample_hz": agent.sample_hz,
            "sampling_cpu_pct": round(agent.sampling_cpu_pct, 3),
            "reconciliation": asdict(agent.reconciliation()),
        }
    if "by_batch_size" not in report:  # the batch stage failed part-way: what it measured
        timed = [r for r in runs if not r["warmup"]]
        report["by_batch_size"] = _summary(timed) if timed else {}
    try:
        report["devices_after"] = [_device_info(d) for d in agent.devices]
    except Exception:
        fail("devices_after")
    save()
    if not cpu_smoke:
        report["pytest"] = _run_pytest()
    report["elapsed_s"] = round(time.monotonic() - check_started, 1)
    report["complete"] = True
    return report


def _sweep_sdxl(
    cpu_smoke: bool,
    models_dir: Path,
    meter: WindowMeter,
    poller: PowerPoller,
    side_px: int,
    sweep: dict[str, Any],
    power_label: str,
    section: dict[str, Any],
    fail: Any,
) -> None:
    """Build the random SDXL pipeline, load it in its own worker, sweep it, free it."""
    import gc

    from wattserve.workers.worker import VariantWorker

    try:
        started = time.monotonic()
        sdxl = _sdxl_variant(cpu_smoke, models_dir)
        build_s = round(time.monotonic() - started, 2)
        started = time.monotonic()
        worker = VariantWorker(sdxl, str(models_dir), meter)
        load_s = round(time.monotonic() - started, 2)
    except Exception:
        fail("step_sweep:sdxl:build")
        return
    result = section["architectures"]["sdxl"]
    result.update(build_s=build_s, load_s=load_s)
    try:
        _sweep_one(
            worker, sdxl, meter, poller, side_px, sweep["steps"], sweep["repeats"], power_label,
            result,
        )  # fmt: skip
    except Exception:
        fail("step_sweep:sdxl")
    finally:
        del worker
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # freeing memory is a courtesy to the pytest stage
            pass


def _table(report: dict[str, Any]) -> str:
    lines = ["bs  agent J/img  source         integ J/img  latency s  ratio"]
    for size, row in report.get("by_batch_size", {}).items():
        lines.append(
            f"{size:>2}  {row['agent_j_per_image']:>11.2f}  {','.join(row['energy_source']):<13}"
            f"  {row['integrated_j_per_image']:>11.2f}  {row['batch_latency_s']:>9.3f}"
            f"  {row['agent_over_integrated']}"
        )
    archs = report.get("step_sweep", {}).get("architectures", {})
    if archs:
        lines.append("sweep  variant                 fit         source         fixed J"
                     "  J/step     R2      fixed_fraction@default")  # fmt: skip
    for arch, result in archs.items():
        for key in ("agent", "integrated") if "fits" in result else ():
            fit = result["fits"][key]
            source = ",".join(fit["energy_source"])
            if "error" in fit:
                lines.append(f"{arch:<5}  {result['variant']:<22}  {key:<10}  {source:<13}  "
                             f"{fit['error']}")  # fmt: skip
                continue
            r2 = "n/a" if fit["r_squared"] is None else f"{fit['r_squared']:.4f}"
            fraction = fit["fixed_fraction_at_default"]
            lines.append(
                f"{arch:<5}  {result['variant']:<22}  {key:<10}  {source:<13}  "
                f"{fit['fixed_j']:>7.2f}  {fit['per_step_j']:>7.3f}  {r2:>6}  "
                f"{'n/a' if fraction is None else f'{fraction:.4f}'} "
                f"(at {result['default_steps']} steps)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check, print and write the report; 0 when every stage worked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="simulated power, tiny model, no GPU needed"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size")
    parser.add_argument("--models-dir", type=Path, help="reuse built models (default: temp)")
    parser.add_argument(
        "--no-step-sweep", action="store_true", help="skip the fixed vs per-step sweep"
    )
    parser.add_argument(
        "--sweep-steps",
        help=f"comma-separated step counts (default {','.join(map(str, GPU_SWEEP_STEPS))}; "
        f"--cpu-smoke: {','.join(map(str, CPU_SWEEP_STEPS))})",
    )
    parser.add_argument(
        "--sweep-archs", default=",".join(SWEEP_ARCHS), help="which architectures to sweep"
    )
    parser.add_argument(
        "--sweep-repeats", type=int, default=3, help="timed runs per step count (after 1 warm-up)"
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=480.0,
        help=f"the SDXL sweep starts only with {SDXL_RESERVE_S:.0f} s of this left",
    )
    args = parser.parse_args(argv)
    sweep = _sweep_options(args.cpu_smoke, args)
    out_dir = os.environ.get("OUT")

    def checkpoint(report: dict[str, Any]) -> None:
        if out_dir:  # the report so far ("complete": false), replaced at the end
            text = json.dumps(report, indent=2) + "\n"
            Path(out_dir, "gpu-check.json").write_text(text, encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="wattserve-gpu-check-") as tmp:
        models_dir = args.models_dir or Path(tmp) / "models"
        report = run_check(
            args.cpu_smoke, max(1, args.repeats), models_dir, sweep, args.time_budget_s, checkpoint
        )

    document = json.dumps(report, indent=2)
    print(document, flush=True)
    print(_table(report), file=sys.stderr)
    if out_dir:
        Path(out_dir, "gpu-check.json").write_text(document + "\n", encoding="utf-8")
    pytest_rc = report.get("pytest", {}).get("returncode", 0)
    ok = not report["errors"] and pytest_rc == 0 and report.get("by_batch_size")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
