"""The contract between the scheduler and the workers, as plain data.

The scheduler decides a ``BatchPlan``; a worker carries it out and answers with a
``BatchOutput``. Both cross Ray's object store, so they are small frozen dataclasses
with no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

from wattserve._schemas import EnergySource


@dataclass(frozen=True)
class WorkItem:
    """One output to make: a prompt and the seed that fixes its pixels."""

    prompt: str
    negative_prompt: str | None
    seed: int
    # approximate reuse: the ``.npy`` latent to resume from at the plan's ``start_step``
    latent: bytes | None = None


@dataclass(frozen=True)
class BatchPlan:
    """Items one variant runs together; all share size (and so one forward pass)."""

    batch_id: str
    variant: str
    width_px: int
    height_px: int
    items: tuple[WorkItem, ...]
    # The lease that lets this batch draw power; the worker confirms its start with the
    # admission service (None: no admission service, e.g. one in-process scheduler).
    lease_id: str | None = None
    # Approximate reuse: every item resumes from its latent after this many steps of the
    # variant's schedule (0: a full generation), and the worker keeps each item's latent
    # after ``keep_steps`` (policies.latent_reuse.capture_steps) for later resumes.
    start_step: int = 0
    keep_steps: tuple[int, ...] = ()
    # The shadow audit's work, not a user's: its energy is booked to the audit.
    background: bool = False


@dataclass(frozen=True)
class BatchOutput:
    """PNG bytes per item, in order, the batch's timing, and its energy on the device."""

    batch_id: str
    png_images: tuple[bytes, ...]
    started_at_s: float  # wall clock (time.time()) when the device work began
    busy_s: float  # device work time, measured with a monotonic clock
    joules: float  # the whole batch's energy, from telemetry
    energy_source: EnergySource
    latents: tuple[bytes, ...] = ()  # per item, an ``.npz`` of its kept latents (or none)
