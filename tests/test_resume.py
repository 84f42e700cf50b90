"""Resuming from a kept latent: the strong check of the approximate-reuse path.

A latent kept after K steps of a generation, resumed with the same prompt and the tail
of the same schedule, must give the very bytes the full generation gave: anything else
(an off-by-one step, a re-initialised schedule, a rescaled latent) changes pixels.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from wattserve.policies.latent_reuse import capture_steps
from wattserve.policies.plans import BatchPlan, WorkItem
from wattserve.telemetry.agent import LocalMeter, TelemetryAgent
from wattserve.telemetry.devices import open_power_sources
from wattserve.workers.worker import VariantWorker

LARGE = "tiny-sd-large"  # 8 DDIM steps with guidance


@pytest.fixture(scope="module")
def worker(catalog, models_dir) -> VariantWorker:
    meter = LocalMeter(TelemetryAgent(open_power_sources("simulated")))
    return VariantWorker(catalog.get(LARGE), str(models_dir), meter)


def _npy(kept: bytes, step: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.load(io.BytesIO(kept))[f"s{step}"])
    return buffer.getvalue()


def _digest(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def test_a_resume_from_its_own_kept_latent_reproduces_the_full_generation(worker):
    keep = capture_steps(worker.variant.steps)
    assert keep == (1, 2, 3, 4)
    full = worker.run(BatchPlan("full", LARGE, 64, 64, (WorkItem("a red cube", None, 7),),
                                keep_steps=keep))  # fmt: skip
    (kept,) = full.latents
    assert sorted(np.load(io.BytesIO(kept)).files) == ["s1", "s2", "s3", "s4"]
    for step in (1, 4):
        item = WorkItem("a red cube", None, 999, latent=_npy(kept, step))  # seed unused
        resumed = worker.run(BatchPlan(f"r{step}", LARGE, 64, 64, (item,), start_step=step))
        assert _digest(resumed.png_images[0]) == _digest(full.png_images[0]), step


def test_a_resume_from_another_prompts_latent_makes_a_different_image(worker):
    keep = (1,)  # seven steps under the new prompt: late steps barely move a tiny model
    first = worker.run(BatchPlan("a", LARGE, 64, 64, (WorkItem("a red cube", None, 7),),
                                 keep_steps=keep))  # fmt: skip
    other = worker.run(BatchPlan("b", LARGE, 64, 64, (WorkItem("a blue ball", None, 7),)))
    item = WorkItem("a blue ball", None, 7, latent=_npy(first.latents[0], 1))
    resumed = worker.run(BatchPlan("c", LARGE, 64, 64, (item,), start_step=1))
    assert _digest(resumed.png_images[0]) not in {_digest(first.png_images[0]),
                                                  _digest(other.png_images[0])}  # fmt: skip


def test_a_resumed_batch_runs_fewer_steps_for_less_time_and_energy(worker):
    """Half the denoiser steps: the best of three resumed runs beats the best full one."""
    keep = (4,)
    full = [worker.run(BatchPlan(f"f{i}", LARGE, 64, 64, (WorkItem("x", None, i),),
                                 keep_steps=keep)) for i in range(3)]  # fmt: skip
    item = WorkItem("x", None, 0, latent=_npy(full[0].latents[0], 4))
    half = [worker.run(BatchPlan(f"h{i}", LARGE, 64, 64, (item,), start_step=4))
            for i in range(3)]  # fmt: skip
    assert min(o.busy_s for o in half) < min(o.busy_s for o in full)
    assert min(o.joules for o in half) < min(o.joules for o in full)
    assert {o.energy_source for o in half} == {"simulated"}


def test_a_plan_that_cannot_resume_is_refused_not_run_in_full(worker):
    with pytest.raises(ValueError, match="cannot resume"):
        worker.run(BatchPlan("n", LARGE, 64, 64, (WorkItem("x", None, 1),), start_step=2))


def test_only_history_free_first_order_schedulers_may_resume():
    """A multistep solver would resume with a cold history: it keeps nothing to resume."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from wattserve.workers.denoise import resumable_steps

    assert resumable_steps(DDIMScheduler(), 8) == 7
    assert resumable_steps(DPMSolverMultistepScheduler(), 8) == 0
    assert resumable_steps(EulerDiscreteScheduler(), 8) == 0  # rescales given latents
