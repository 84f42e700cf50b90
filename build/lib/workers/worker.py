"""The variant worker: one Ray actor (a Serve replica) per loaded variant replica.

It loads its pipeline once and runs ``BatchPlan``s: one forward pass per batch, one
seeded ``torch.Generator`` per item so the same (prompt, seed, size) always gives the
same image bytes. It reports how long the device was busy; turning time into joules is
telemetry's job, not the worker's.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import structlog

from policies.catalog import VariantSpec
from policies.plans import BatchOutput, BatchPlan
from telemetry.logs import configure_logging
from workers.pipelines import load_pipeline

log = structlog.get_logger(__name__)


class VariantWorker:
    """Runs batches for one variant. Not thread-safe: deploy with one request at a time."""

    def __init__(self, variant: VariantSpec, models_dir: str) -> None:
        import torch

        configure_logging(json=True)
        if not torch.cuda.is_available():
            # Several workers share few cores; one thread each avoids oversubscription.
            torch.set_num_threads(max(1, int(variant.resources.num_cpus)))
        self.variant = variant
        started = time.monotonic()
        self._pipe = load_pipeline(variant, Path(models_dir))
        self._device = self._pipe.device
        log.info(
            "worker_ready",
            variant=variant.name,
            device=str(self._device),
            load_s=round(time.monotonic() - started, 3),
        )

    def run(self, plan: BatchPlan) -> BatchOutput:
        """Generate every item of ``plan`` in one pipeline call."""
        import torch

        if plan.variant != self.variant.name:
            raise ValueError(f"plan for {plan.variant!r} sent to worker {self.variant.name!r}")
        generators = [torch.Generator(device="cpu").manual_seed(it.seed) for it in plan.items]
        negative = [it.negative_prompt or "" for it in plan.items]
        started_at_s = time.time()
        started = time.monotonic()
        with torch.inference_mode():
            result = self._pipe(
                prompt=[it.prompt for it in plan.items],
                negative_prompt=negative if self.variant.guidance_scale > 1 else None,
                height=plan.height_px,
                width=plan.width_px,
                num_inference_steps=self.variant.steps,
                guidance_scale=self.variant.guidance_scale,
                generator=generators,
                output_type="pil",
            )
        if self._device.type == "cuda":
            torch.cuda.synchronize()
        busy_s = time.monotonic() - started
        pngs = []
        for image in result.images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        log.info(
            "batch_done",
            variant=self.variant.name,
            batch_id=plan.batch_id,
            batch_size=len(plan.items),
            busy_s=round(busy_s, 4),
        )
        return BatchOutput(plan.batch_id, tuple(pngs), started_at_s, busy_s)

    def check_health(self) -> None:
        """Serve's health probe: the pipeline is loaded."""
        if self._pipe is None:
            raise RuntimeError("pipeline not loaded")
