"""The latent store: kept intermediate latents, found again by prompt similarity.

A generation's latents after a few step counts (``policies.latent_reuse.capture_steps``)
are kept as one ``.npz`` under ``<dir>/<entry_id[:2]>/<entry_id>.npz``, indexed by a row
in ``latent_cache`` with the prompt's embedding, the latent space it belongs to (pool,
variant, size) and who paid for it. Entries survive restarts (files + rows) and are
evicted by ``policies.latent_reuse.evictions`` (steps saved × hits, decayed) once the
stored bytes pass the cap.

Nearest neighbour is FAISS (``faiss-cpu``): an exact inner-product index
(``IndexFlatIP`` over normalised embeddings = cosine) per latent space, in memory,
filled from the rows and topped up with rows other replicas added since. Why FAISS: it
is what the published systems use (MoDM), it ships wheels with no build step, and an
exact flat index over a few thousand entries per space answers in well under a
millisecond — an approximate graph index (hnswlib, usearch) would buy nothing at this
size and cost recall. Deleted (evicted) entries are dropped from a hit by re-reading
the row, so a stale index never serves a latent that is gone.

Thread-safe for one process; replicas may share the directory and database.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from wattserve.policies.latent_reuse import LatentEntry, after_hit, evictions
from wattserve.telemetry.database import write_transaction

DEFAULT_MAX_BYTES = 256 << 20


class LatentRow(SQLModel, table=True):
    """One generation's kept latents."""

    __tablename__ = "latent_cache"
    __table_args__ = (
        sa.Index("ix_latent_cache_space", "pool", "variant", "width_px", "height_px", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    entry_id: str = Field(max_length=80, unique=True)
    pool: str = Field(max_length=80)
    variant: str = Field(max_length=64)
    width_px: int
    height_px: int
    captured_steps: str = Field(max_length=64)  # comma-separated step counts
    embedding: bytes  # float32, normalised
    size_bytes: int
    saved_steps: float
    hits: int
    created_s: float
    updated_s: float
    source_request_id: str = Field(max_length=64)
    source_image_index: int
    owner: str | None = Field(default=None, max_length=64)  # the tenant that paid for it


Space = tuple[str, str, int, int]  # (pool, variant, width_px, height_px)


@dataclass(frozen=True)
class LatentMatch:
    """The nearest kept generation in one latent space and how similar its prompt is."""

    entry_id: str
    similarity: float
    captured_steps: tuple[int, ...]
    source_request_id: str
    source_image_index: int
    owner: str | None


@dataclass
class _Index:
    index: Any  # faiss.IndexIDMap2 over IndexFlatIP
    last_id: int = 0


def normalised(vector: Any) -> np.ndarray:
    """A float32 unit vector (what inner product turns into cosine similarity)."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


class LatentStore:
    """Puts, nearest-neighbour lookups and loads of kept latents."""

    def __init__(
        self,
        engine: sa.Engine,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._indexes: dict[Space, _Index] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, entry_id: str) -> Path:
        return self.directory / entry_id[:2] / f"{entry_id}.npz"

    def put(
        self, space: Space, embedding: Any, kept: bytes, steps: tuple[int, ...],
        source: tuple[str, int], owner: str | None,
    ) -> str:  # fmt: skip
        """Keep one generation's latents (``kept``: its ``.npz``); evict down to the cap."""
        request_id, index = source
        entry_id = f"{request_id}.{index}"
        path = self._path(entry_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(kept)
        os.replace(staging, path)
        now = self._clock()
        pool, variant, width_px, height_px = space
        row = LatentRow(
            entry_id=entry_id, pool=pool, variant=variant, width_px=width_px,
            height_px=height_px, captured_steps=",".join(map(str, steps)),
            embedding=normalised(embedding).tobytes(), size_bytes=len(kept),
            saved_steps=float(max(steps, default=0)), hits=0, created_s=now, updated_s=now,
            source_request_id=request_id, source_image_index=index, owner=owner,
        )  # fmt: skip
        with self._lock, write_transaction(self.engine) as conn:
            conn.execute(sa.insert(LatentRow.__table__).values(**row.model_dump(exclude={"id"})))
            self._evict(conn, now)
        return entry_id

    def nearest(self, space: Space, embedding: Any, k: int = 1) -> list[LatentMatch]:
        """Up to ``k`` kept generations of ``space``, most similar prompt first."""
        query = normalised(embedding).reshape(1, -1)
        table = LatentRow.__table__
        with self._lock:
            found = self._index(space, query.shape[1])
            if found.index.ntotal == 0:
                return []
            scores, ids = found.index.search(query, min(k * 4, found.index.ntotal))
            wanted = [int(i) for i in ids[0] if i >= 0]
            with self.engine.connect() as conn:
                rows = {r["id"]: r for r in conn.execute(
                    sa.select(table).where(table.c.id.in_(wanted))).mappings()}  # fmt: skip
            gone = [i for i in wanted if i not in rows]
            if gone:
                found.index.remove_ids(np.asarray(gone, dtype=np.int64))
        matches = [
            LatentMatch(
                rows[int(i)]["entry_id"],
                float(score),
                tuple(int(s) for s in rows[int(i)]["captured_steps"].split(",") if s),
                rows[int(i)]["source_request_id"],
                rows[int(i)]["source_image_index"],
                rows[int(i)]["owner"],
            )  # fmt: skip
            for score, i in zip(scores[0], ids[0], strict=True)
            if int(i) in rows
        ]
        return matches[:k]

    def _index(self, space: Space, dim: int) -> _Index:
        """The space's index, topped up with the rows added since it last looked."""
        import faiss

        found = self._indexes.get(space)
        if found is None:
            found = self._indexes[space] = _Index(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
        table = LatentRow.__table__
        pool, variant, width_px, height_px = space
        with self.engine.connect() as conn:
            new = conn.execute(
                sa.select(table.c.id, table.c.embedding).where(
                    table.c.pool == pool, table.c.variant == variant,
                    table.c.width_px == width_px, table.c.height_px == height_px,
                    table.c.id > found.last_id,
                ).order_by(table.c.id)
            ).all()  # fmt: skip
        vectors = [np.frombuffer(e, dtype=np.float32) for _, e in new]
        fit = [(i, v) for (i, _), v in zip(new, vectors, strict=True) if v.shape[0] == dim]
        if fit:
            found.index.add_with_ids(
                np.stack([v for _, v in fit]), np.asarray([i for i, _ in fit], dtype=np.int64)
            )
        if new:
            found.last_id = int(new[-1][0])
        return found

    def load(self, entry_id: str, step: int) -> bytes | None:
        """The ``.npy`` latent of ``entry_id`` after ``step`` steps (None: it is gone)."""
        try:
            with np.load(self._path(entry_id), allow_pickle=False) as kept:
                latent = kept[f"s{step}"]
        except (FileNotFoundError, KeyError):
            return None
        buffer = io.BytesIO()
        np.save(buffer, latent)
        return buffer.getvalue()

    def record_hit(self, entry_id: str, skipped: int) -> None:
        """A resume from ``entry_id`` skipped ``skipped`` steps: it is worth keeping more."""
        table = LatentRow.__table__
        now = self._clock()
        with self._lock, write_transaction(self.engine) as conn:
            row = conn.execute(sa.select(table).where(table.c.entry_id == entry_id)).mappings()
            found = row.first()
            if found is None:
                return
            entry = after_hit(_entry(found), skipped, now)
            conn.execute(sa.update(table).where(table.c.entry_id == entry_id).values(
                saved_steps=entry.saved_steps, updated_s=now, hits=found["hits"] + 1))  # fmt: skip

    def _evict(self, conn: sa.Connection, now: float) -> None:
        table = LatentRow.__table__
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.size_bytes), 0)))
        if int(total.scalar_one()) <= self.max_bytes:
            return
        columns = ("entry_id", "size_bytes", "captured_steps", "saved_steps", "updated_s")
        rows = conn.execute(sa.select(*(table.c[c] for c in columns))).mappings().all()
        dropped = evictions([_entry(r) for r in rows], self.max_bytes, now)
        for entry_id in dropped:
            conn.execute(sa.delete(table).where(table.c.entry_id == entry_id))
            self._path(entry_id).unlink(missing_ok=True)

    def stats(self) -> dict[str, int]:
        """Entries and stored bytes."""
        table = LatentRow.__table__
        with self.engine.connect() as conn:
            entries, stored = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(table.c.size_bytes), 0))
            ).one()
        return {"entries": int(entries), "bytes": int(stored)}


def _entry(row: Any) -> LatentEntry:
    steps = [int(s) for s in str(row["captured_steps"]).split(",") if s]
    return LatentEntry(row["entry_id"], int(row["size_bytes"]), max(steps, default=0),
                       float(row["saved_steps"]), float(row["updated_s"]))  # fmt: skip
