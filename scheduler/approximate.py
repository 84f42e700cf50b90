"""The request path's side of approximate reuse: find resumes, keep latents.

For a request served approximately (``policies.latent_reuse.reuse_mode``), each output
to generate looks for the most similar earlier prompt in its latent space — its reuse
pool, variant and size — and, where the similarity buys steps, resumes from that
generation's kept latent (``Resume``). The n outputs of one request take n different
sources, so they never come out as n copies of one image. Every generated output, exact
or approximate, leaves its kept latents for later requests.

Blocking (the text encoder, the database, files): callers run these in a thread.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from wattserve.policies.catalog import VariantSpec
from wattserve.policies.latent_reuse import steps_to_skip, variant_bands
from wattserve.scheduler.batcher import BatchedOutput
from wattserve.scheduler.latents import LatentStore, Space
from wattserve.scheduler.outcomes import RequestContext

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Resume:
    """Where one output starts: a kept latent after ``start_step`` steps."""

    start_step: int
    latent: bytes
    similarity: float
    entry_id: str
    owner: str | None  # the tenant that paid for the source generation


class ApproximateReuse:
    """Lookups before a generation, keeps after it."""

    def __init__(self, store: LatentStore, embed: Callable[[VariantSpec, str], Any]) -> None:
        self.store = store
        self._embed = embed

    def embedding(self, variant: VariantSpec, prompt: str) -> np.ndarray:
        """The prompt's embedding under ``variant``'s own text encoder."""
        return np.asarray(self._embed(variant, prompt), dtype=np.float32)

    def resumes(
        self, space: Space, embedding: np.ndarray, variant: VariantSpec, count: int
    ) -> list[Resume | None]:
        """For each of ``count`` outputs, a distinct resume or None (a full generation)."""
        bands = variant_bands(variant.reuse_bands)
        found: list[Resume | None] = []
        for match in self.store.nearest(space, embedding, k=count):
            step = steps_to_skip(match.similarity, variant.steps, bands, match.captured_steps)
            latent = self.store.load(match.entry_id, step) if step else None
            if latent is not None:
                found.append(Resume(step, latent, match.similarity, match.entry_id, match.owner))
        found.sort(key=lambda r: r.start_step if r else 0, reverse=True)
        return (found + [None] * count)[:count]

    def look(
        self, ctx: RequestContext, count: int
    ) -> tuple[np.ndarray | None, list[Resume | None]]:
        """An approximate request's embedding, and each of ``count`` outputs' resume.

        Reuse is an optimisation: when the encoder or the store fails, the outputs are
        generated in full (and the failure logged), never refused.
        """
        try:
            embedding = self.embedding(ctx.variant, ctx.request.prompt)
            return embedding, self.resumes(_space(ctx), embedding, ctx.variant, count)
        except Exception as exc:
            log.warning("latent_lookup_failed", request_id=ctx.request_id, error=repr(exc))
            return None, [None] * count

    def keep(
        self,
        ctx: RequestContext,
        embedding: np.ndarray | None,
        generated: Sequence[tuple[int, BatchedOutput]],
        resumed: Mapping[int, Resume],
    ) -> None:
        """Store the generated outputs' kept latents; count the resumes that served.

        An exact request's embedding is taken here, after its batch, not before it: it is
        needed only to keep its latents, and must not delay the output's queueing. A
        failure to keep loses only later reuse: it is logged, the outputs are served.
        """
        try:
            self._keep(ctx, embedding, generated, resumed)
        except Exception as exc:
            log.warning("latent_keep_failed", request_id=ctx.request_id, error=repr(exc))

    def _keep(
        self,
        ctx: RequestContext,
        embedding: np.ndarray | None,
        generated: Sequence[tuple[int, BatchedOutput]],
        resumed: Mapping[int, Resume],
    ) -> None:
        for index, output in generated:
            if output.latents is None or output.variant != ctx.variant.name:
                continue  # none kept, or moved to another variant's latent space
            if embedding is None:
                embedding = self.embedding(ctx.variant, ctx.request.prompt)
            with np.load(io.BytesIO(output.latents), allow_pickle=False) as arrays:
                steps = tuple(sorted(int(name[1:]) for name in arrays.files))
            if steps:
                self.store.put(_space(ctx), embedding, output.latents, steps,
                               (ctx.request_id, index), ctx.request.tenant)  # fmt: skip
        for resume in resumed.values():
            self.hit(resume)

    def hit(self, resume: Resume) -> None:
        """A resume from ``resume``'s source served an output: count it for eviction."""
        self.store.record_hit(resume.entry_id, resume.start_step)
        log.info("latent_reused", source=resume.entry_id, steps_skipped=resume.start_step,
                 similarity=round(resume.similarity, 4))  # fmt: skip


def _space(ctx: RequestContext) -> Space:
    """The latent space a request's outputs live in: pool, variant, size."""
    return (ctx.pool, ctx.variant.name, ctx.request.width_px, ctx.request.height_px)
