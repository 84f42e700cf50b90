"""The fleet simulator's latent store: approximate reuse on the live decision code.

A generation of a request whose reuse mode is ``approximate`` may resume from a cached
intermediate latent of a similar prompt and skip its first K denoising steps
(``policies.latent_reuse``). Every decision is the live service's: which steps a
generation keeps (``capture_steps``), how many a similarity buys (``steps_to_skip`` over
the bands), whose latents a request may use (``reuse_pool``), and which entries go when
the store is over its byte cap (``evictions``, NIRVANA's benefit order, hits counted by
``after_hit``), and every generation outside the baseline keeps its latents, a resumed
one those after its start step. What is simulated is the similarity — ``bench.similarity``'s labeled
``tfidf-proxy``, not a text encoder — and the size of a latent (below).

Bands are the variant's own where its catalog entry calibrates them (``reuse_bands``),
else the published ``DEFAULT_BANDS`` scaled to its steps.

The store is keyed by (pool, variant, width, height): a latent resumes only on the
variant (latent space, schedule) and size that made it. Nearest neighbour is brute
force: the request's proxy row gathered at the store's prompt ids, then an argmax —
one sparse product per request plus O(entries), fast enough for 50,000 requests.

Eviction is ``evictions`` itself, called as live whenever the store goes over its cap,
but over a short candidate list: the entries least beneficial *now* are the same at any
later instant (every benefit decays by the same factor), so a heap keyed by
log2(saved steps) + updated_s / half-life (stale keys skipped) yields them in order, and
``evictions`` picks among those, with the cap less the bytes of the rest. Sorting every
entry on each overflow took half of a 20,000-request run.

Latent size is an ASSUMPTION (``LATENT_CHANNELS`` etc.): a Stable Diffusion / SDXL VAE
latent, 4 channels at 1/8 of the image side, fp16, kept once per captured step. Other
models' latents differ (SD3 and FLUX 16 channels, SANA's DC-AE 32 channels at 1/32):
the figure only sets how many entries the byte cap holds.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from wattserve.bench.similarity import PromptSimilarity
from wattserve.policies.latent_reuse import (
    DEFAULT_BANDS,
    DEFAULT_HALF_LIFE_S,
    LatentEntry,
    ReuseBand,
    after_hit,
    capture_steps,
    evictions,
    steps_to_skip,
    variant_bands,
)

if TYPE_CHECKING:
    from wattserve.policies.catalog import VariantSpec

LATENT_CHANNELS = 4  # assumed: an SD/SDXL VAE latent (see the module docstring)
LATENT_DOWNSCALE = 8
LATENT_BYTES_PER_VALUE = 2  # fp16

StoreKey = tuple[str, str, int, int]  # pool, variant, width_px, height_px


def latent_bytes(width_px: int, height_px: int, kept_steps: int) -> int:
    """Bytes one generation's kept latents take (the assumed latent shape, fp16)."""
    side_w, side_h = -(-width_px // LATENT_DOWNSCALE), -(-height_px // LATENT_DOWNSCALE)
    return LATENT_CHANNELS * side_w * side_h * LATENT_BYTES_PER_VALUE * kept_steps


def bands_of(spec: VariantSpec) -> tuple[ReuseBand, ...]:
    """A variant's bands: its catalog entry's ``reuse_bands`` if any, else the defaults."""
    return variant_bands(spec.reuse_bands)


@dataclass(frozen=True, slots=True)
class Resume:
    """A resume found for one output: from which entry, at what similarity, how deep."""

    entry_id: str
    similarity: float
    skip: int  # steps skipped (the step the generation starts from)


@dataclass(slots=True)
class _Store:
    """The entries of one (pool, variant, size), as parallel lists (swap-remove)."""

    ids: list[str] = field(default_factory=list)
    prompts: list[int] = field(default_factory=list)
    captured: list[tuple[int, ...]] = field(default_factory=list)  # the steps each kept
    position: dict[str, int] = field(default_factory=dict)
    array: np.ndarray | None = None  # ``prompts`` as an index array, rebuilt on change

    def add(self, entry_id: str, prompt_id: int, captured: tuple[int, ...]) -> None:
        self.position[entry_id] = len(self.ids)
        self.ids.append(entry_id)
        self.prompts.append(prompt_id)
        self.captured.append(captured)
        self.array = None

    def remove(self, entry_id: str) -> None:
        at = self.position.pop(entry_id)
        last = self.ids.pop(), self.prompts.pop(), self.captured.pop()
        if at < len(self.ids):
            self.ids[at], self.prompts[at], self.captured[at] = last
            self.position[last[0]] = at
        self.array = None

    def prompt_array(self) -> np.ndarray:
        if self.array is None:
            self.array = np.fromiter(self.prompts, dtype=np.intp, count=len(self.prompts))
        return self.array


class LatentStore:
    """Latents kept by simulated generations, byte-capped over all pools and variants.

    Not thread-safe (the simulator is one thread). ``find`` counts a hit on the entry it
    returns at once (``after_hit``): the live path pins the latent when it decides.
    """

    def __init__(
        self,
        similarity: PromptSimilarity,
        max_bytes: int,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
    ) -> None:
        self.similarity = similarity
        self.max_bytes = max_bytes
        self.half_life_s = half_life_s
        self._stores: dict[StoreKey, _Store] = {}
        self._entries: dict[str, LatentEntry] = {}
        self._where: dict[str, StoreKey] = {}
        self._captured: dict[int, tuple[int, ...]] = {}
        self._row: tuple[int, np.ndarray] | None = None  # the last prompt's proxy row
        self._heap: list[tuple[float, float, str]] = []  # (rank key, updated_s, entry id)
        self._keys: dict[str, float] = {}  # each entry's current rank key
        self.bytes = 0
        self.stats = {"kept": 0, "evicted": 0, "hits": 0, "misses": 0}

    def captured(self, steps: int) -> tuple[int, ...]:
        """The steps a generation of ``steps`` keeps (``capture_steps``), memoised."""
        got = self._captured.get(steps)
        if got is None:
            got = self._captured[steps] = capture_steps(steps)
        return got

    def find(
        self,
        key: StoreKey,
        steps: int,
        prompt: str,
        now_s: float,
        bands: Sequence[ReuseBand] = DEFAULT_BANDS,
    ) -> Resume | None:
        """The deepest resume for ``prompt`` from its nearest stored prompt, or None."""
        store = self._stores.get(key)
        if not store or not store.ids:
            self.stats["misses"] += 1
            return None
        sims = self._proxy_row(self.similarity.id(prompt))[store.prompt_array()]
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        skip = steps_to_skip(similarity, steps, bands, store.captured[best])
        if skip <= 0:
            self.stats["misses"] += 1
            return None
        entry_id = store.ids[best]
        self._entries[entry_id] = after_hit(self._entries[entry_id], skip, now_s,
                                            self.half_life_s)  # fmt: skip
        self._rank(self._entries[entry_id])
        self.stats["hits"] += 1
        return Resume(entry_id, similarity, skip)

    def keep(
        self, key: StoreKey, steps: int, prompt: str, now_s: float, start_step: int = 0
    ) -> None:
        """Store a generation's kept latents; evict the least beneficial if over the cap.

        A generation resumed after ``start_step`` steps ran (and keeps) only the later
        ones, as the live worker's capture does.
        """
        captured = tuple(step for step in self.captured(steps) if step > start_step)
        if not captured:
            return  # nothing to resume from (a one-step schedule, or resumed past them)
        self.stats["kept"] += 1
        entry_id = f"lat_{self.stats['kept']}"
        deepest = max(captured)
        size = latent_bytes(key[2], key[3], len(captured))
        # its creation counts as one hit at its deepest step (``LatentEntry``)
        self._entries[entry_id] = LatentEntry(entry_id, size, deepest, float(deepest), now_s)
        self._rank(self._entries[entry_id])
        self._where[entry_id] = key
        self._stores.setdefault(key, _Store()).add(entry_id, self.similarity.id(prompt), captured)
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._evict(now_s)

    def _rank(self, entry: LatentEntry) -> None:
        """Queue ``entry`` by a key that orders benefits alike at every instant."""
        key = math.log2(entry.saved_steps) + entry.updated_s / self.half_life_s
        self._keys[entry.entry_id] = key
        heapq.heappush(self._heap, (key, entry.updated_s, entry.entry_id))

    def _evict(self, now_s: float) -> None:
        """``evictions`` over the least beneficial entries that cover the excess."""
        excess = self.bytes - self.max_bytes
        candidates: dict[str, LatentEntry] = {}
        covered = 0
        while self._heap and covered < excess:
            key, _, entry_id = heapq.heappop(self._heap)
            if self._keys.get(entry_id) != key or entry_id in candidates:
                continue  # evicted, or ranked again since (a hit)
            entry = self._entries[entry_id]
            candidates[entry_id] = entry
            covered += entry.size_bytes
        rest = self.bytes - covered
        dropped = set(evictions(candidates.values(), self.max_bytes - rest, now_s,
                                self.half_life_s))  # fmt: skip
        for entry_id, entry in candidates.items():
            if entry_id in dropped:
                self._drop(entry_id)
            else:
                self._rank(entry)

    def _drop(self, entry_id: str) -> None:
        entry = self._entries.pop(entry_id)
        del self._keys[entry_id]
        self._stores[self._where.pop(entry_id)].remove(entry_id)
        self.bytes -= entry.size_bytes
        self.stats["evicted"] += 1

    def _proxy_row(self, prompt_id: int) -> np.ndarray:
        """The proxy row of ``prompt_id``; the last one is reused (a request's n outputs)."""
        if self._row is None or self._row[0] != prompt_id:
            self._row = (prompt_id, self.similarity.row(prompt_id))
        return self._row[1]
