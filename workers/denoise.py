"""Resuming a denoising schedule part-way, and keeping latents on the way.

Approximate reuse (``policies.latent_reuse``) starts a generation from another one's
latent after K steps and runs only the rest of *the same* schedule. Diffusers'
``StableDiffusionPipeline`` takes ``latents`` but no start step, so ``resumed`` lets
the scheduler compute the full schedule and then drops its first K timesteps — what
diffusers' own img2img does (``timesteps[t_start * order:]`` and ``set_begin_index``).
Only schedulers whose step depends on the current timestep alone resume exactly: DDIM
(and DDPM-style first-order ones) keep no history and have ``init_noise_sigma = 1``,
so the pipeline's scaling of given ``latents`` is a no-op. A multistep solver would
resume from a cold history and a sigma-scaled one would rescale the latent, so for them
``resumable_steps`` is 0 and no latent is kept: a band's K never exceeds what the
variant's scheduler can resume from.

``Capture`` is the pipeline callback that copies the latent after the kept steps.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

RESUMABLE_SCHEDULERS = frozenset({"DDIMScheduler", "DDPMScheduler"})


def resumable_steps(scheduler: Any, steps: int) -> int:
    """The most steps a resume may skip with this scheduler (0: it cannot resume)."""
    if type(scheduler).__name__ not in RESUMABLE_SCHEDULERS or scheduler.order != 1:
        return 0
    return max(0, steps - 1)


@contextmanager
def resumed(scheduler: Any, start_step: int) -> Iterator[None]:
    """While inside, ``set_timesteps`` yields the full schedule minus its first steps."""
    if start_step <= 0:
        yield
        return
    full = scheduler.set_timesteps

    def tail(*args: Any, **kwargs: Any) -> None:
        full(*args, **kwargs)
        begin = start_step * scheduler.order
        scheduler.timesteps = scheduler.timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)

    scheduler.set_timesteps = tail  # an instance attribute shadows the method
    try:
        yield
    finally:
        del scheduler.set_timesteps


class Capture:
    """``callback_on_step_end`` keeping each item's latent after the given step counts.

    ``start_step`` offsets the pipeline's step index on a resumed run, so the counts are
    always steps of the full schedule.
    """

    def __init__(self, steps: Sequence[int], start_step: int = 0) -> None:
        self.steps = frozenset(steps)
        self.start_step = start_step
        self.kept: dict[int, Any] = {}  # full-schedule step count -> latents (B, C, h, w)

    def __call__(self, _pipe: Any, index: int, _t: Any, tensors: dict[str, Any]) -> dict:
        """After step ``index`` of this run: keep the latents if it is a kept step."""
        done = self.start_step + index + 1
        if done in self.steps:
            self.kept[done] = tensors["latents"].detach().to("cpu", copy=True).float()
        return tensors

    def per_item(self, count: int) -> tuple[bytes, ...]:
        """One ``.npz`` per item: its latent at every kept step (``s<steps>`` arrays)."""
        import numpy as np

        items = []
        for i in range(count):
            buffer = io.BytesIO()
            np.savez(buffer, **{f"s{step}": t[i].numpy() for step, t in self.kept.items()})
            items.append(buffer.getvalue())
        return tuple(items)


def stack_latents(latents: Sequence[bytes], device: Any, dtype: Any) -> Any:
    """The batch's starting latents (B, C, h, w) from one ``.npy`` per item."""
    import numpy as np
    import torch

    arrays = [np.load(io.BytesIO(raw), allow_pickle=False) for raw in latents]
    return torch.from_numpy(np.stack(arrays)).to(device=device, dtype=dtype)
