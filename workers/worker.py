"""The variant worker: one Ray actor (a Serve replica) per loaded variant replica.

It loads its pipeline once and runs ``BatchPlan``s: one forward pass per batch, one
seeded ``torch.Generator`` per item so the same (prompt, seed, size) always gives the
same image bytes. It tells its node's telemetry agent when each batch starts and ends
(through a ``BatchMeter``) and returns the joules the agent measured; it never reads
power itself.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from wattserve import WattserveError
from wattserve.policies.catalog import VariantSpec
from wattserve.policies.plans import BatchOutput, BatchPlan
from wattserve.telemetry.energy import BatchMeter, EnergyMeasurement, estimated_batch_energy
from wattserve.telemetry.logs import configure_logging
from wattserve.workers.denoise import Capture, resumable_steps, resumed, stack_latents
from wattserve.workers.faults import fault_point
from wattserve.workers.pipelines import load_pipeline

log = structlog.get_logger(__name__)


def _confirm_lease(lease_id: str) -> bool:
    from wattserve.workers.meter import confirm_lease  # imports ray: only in a deployment

    return confirm_lease(lease_id)


def _release_lease(lease_id: str) -> None:
    from wattserve.workers.meter import release_lease

    release_lease(lease_id)


class LeaseVoid(WattserveError):
    """The admission service no longer holds this batch's lease: it must not start."""


class VariantWorker:
    """Runs batches for one variant. Not thread-safe: deploy with one request at a time."""

    def __init__(
        self,
        variant: VariantSpec,
        models_dir: str,
        meter: BatchMeter | None = None,
        confirm_start: Callable[[str], bool] | None = None,
    ) -> None:
        import torch

        configure_logging(json=True)
        if not torch.cuda.is_available():
            # Several workers share few cores; one thread each avoids oversubscription.
            torch.set_num_threads(max(1, int(variant.resources.num_cpus)))
        self.variant = variant
        started = time.monotonic()
        self._pipe = load_pipeline(variant, Path(models_dir))
        self._device = self._pipe.device
        self._meter = meter if meter is not None else self._node_agent_meter()
        # In a Ray deployment every leased batch's start is confirmed with the admission
        # service; an injected meter (tests, the GPU check) means no service to ask.
        self._confirm_start = confirm_start or (None if meter is not None else _confirm_lease)
        self._release = None if self._confirm_start is None or meter is not None else _release_lease
        log.info(
            "worker_ready",
            variant=variant.name,
            device=str(self._device),
            load_s=round(time.monotonic() - started, 3),
        )

    def run(self, plan: BatchPlan) -> BatchOutput:
        """Generate every item of ``plan`` in one pipeline call.

        The batch's lease (if any) is confirmed before it starts and given back once its
        draw has ended, whatever happened.
        """
        if plan.variant != self.variant.name:
            raise ValueError(f"plan for {plan.variant!r} sent to worker {self.variant.name!r}")
        if plan.lease_id is not None and self._confirm_start is not None:
            if not self._confirm_start(plan.lease_id):
                raise LeaseVoid(f"lease {plan.lease_id} is void (expired or of an older epoch)")
        try:
            return self._run_metered(plan)
        finally:
            if plan.lease_id is not None and self._release is not None:
                self._release(plan.lease_id)

    def _run_metered(self, plan: BatchPlan) -> BatchOutput:
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(it.seed) for it in plan.items]
        negative = [it.negative_prompt or "" for it in plan.items]
        started_at_s = time.time()
        started = time.monotonic()
        self._meter.begin(plan.batch_id, self.variant.power_w)
        fault_point("worker_batch", self.variant.name, len(plan.items))
        capture = Capture(self._keepable(plan.keep_steps), plan.start_step)
        try:
            with torch.inference_mode(), resumed(self._pipe.scheduler, plan.start_step):
                result = self._pipe(
                    prompt=[it.prompt for it in plan.items],
                    negative_prompt=negative if self.variant.guidance_scale > 1 else None,
                    height=plan.height_px,
                    width=plan.width_px,
                    num_inference_steps=self.variant.steps,
                    guidance_scale=self.variant.guidance_scale,
                    generator=generators,
                    latents=self._start_latents(plan),
                    callback_on_step_end=capture if capture.steps else None,
                    output_type="pil",
                )
            if self._device.type == "cuda":
                torch.cuda.synchronize()
        except BaseException:  # its draw so far is a failed attempt's, not left open
            self._abandon(plan.batch_id)
            raise
        busy_s = time.monotonic() - started
        energy = self._batch_energy(plan.batch_id, busy_s)
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
            joules=round(energy.joules, 3),
            energy_source=energy.source,
        )
        latents = capture.per_item(len(plan.items)) if capture.kept else ()
        return BatchOutput(plan.batch_id, tuple(pngs), started_at_s, busy_s, energy.joules,
                           energy.source, latents)  # fmt: skip

    def _keepable(self, steps: tuple[int, ...]) -> tuple[int, ...]:
        """The asked-for steps this variant's scheduler could later resume from."""
        most = resumable_steps(self._pipe.scheduler, self.variant.steps)
        return tuple(s for s in steps if 0 < s <= most)

    def _start_latents(self, plan: BatchPlan) -> Any:
        """The resumed batch's latents, or None (a full generation from seeded noise)."""
        if plan.start_step <= 0:
            return None
        most = resumable_steps(self._pipe.scheduler, self.variant.steps)
        latents = [it.latent for it in plan.items]
        if plan.start_step > most or any(raw is None for raw in latents):
            raise ValueError(f"batch {plan.batch_id} cannot resume at step {plan.start_step}")
        return stack_latents(latents, self._device, self._pipe.unet.dtype)  # type: ignore[arg-type]

    def _abandon(self, batch_id: str) -> None:
        try:
            self._meter.abandon(batch_id)
        except Exception as exc:  # the agent's watcher closes it if this worker dies
            log.warning("meter_abandon_failed", batch_id=batch_id, error=repr(exc))

    def _batch_energy(self, batch_id: str, busy_s: float) -> EnergyMeasurement:
        """The agent's measurement; a declared-power estimate if the agent cannot answer."""
        try:
            return self._meter.end(batch_id)
        except Exception as exc:  # telemetry must never lose a finished batch
            log.warning("meter_failed", batch_id=batch_id, error=repr(exc))
            return estimated_batch_energy(self.variant.power_w, busy_s)

    def _node_agent_meter(self) -> BatchMeter:
        """The meter of the telemetry agent on this worker's node (Ray deployments)."""
        from wattserve.workers.meter import AgentMeter

        return AgentMeter.for_this_node(self._device)

    def node_id(self) -> str:
        """The Ray node this replica runs on (hex id), for placement checks and status."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def check_health(self) -> None:
        """Serve's health probe: the pipeline is loaded."""
        if self._pipe is None:
            raise RuntimeError("pipeline not loaded")
