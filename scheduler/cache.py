"""The result cache: content-addressed PNGs on disk, indexed in the database.

An entry maps an output key (``scheduler.identity.output_key``) and the variant that
made it to a PNG stored under ``<dir>/<sha256[:2]>/<sha256>.png``. A request may be
served by any entry whose variant's quality is at or above the request's floor (the best
one is used). Entries survive restarts (files + rows), expire after an optional TTL, and
the least recently used are evicted once the stored bytes pass the cap. A hit costs no
GPU time; its receipt points at the ledger row that paid for the image.

Hits are the common case at scale, so the hot ones cost no I/O: a bounded in-memory tier
(``memory_bytes``, least recently used out first) holds the copies this replica stored
or served lately, and ``recent`` answers from it on the event loop. A lookup writes
nothing: the last-used times it refreshes are kept and written in one transaction by
``flush_touches`` (the ingress calls it every half second), which is all the LRU
eviction needs. The tier may serve a copy that meets the floor while another replica has
stored a better one since; the database and the files stay the shared truth.

Thread-safe for one process; several replicas may share the directory and database
(writes are idempotent and files are written atomically).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Field, SQLModel

from wattserve.policies.reuse import CachedCopy, usable_copies
from wattserve.telemetry.database import write_transaction

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MEMORY_BYTES = 64 << 20  # 4,000+ 64x64 PNGs or 40 at 1024x1024


class CacheRow(SQLModel, table=True):
    """One cached output, made by one variant."""

    __tablename__ = "result_cache"

    output_key: str = Field(primary_key=True, max_length=64)
    variant: str = Field(primary_key=True, max_length=64)
    quality_score: float
    energy_source: str = Field(max_length=16)  # how the generation that made it was measured
    png_sha256: str = Field(index=True, max_length=64)
    size_bytes: int
    created_s: float  # wall clock (time.time) when stored
    last_used_s: float = Field(index=True)
    source_request_id: str = Field(max_length=64)
    source_image_index: int


@dataclass(frozen=True)
class CacheHit:
    """A cached output and where it came from."""

    png: bytes
    variant: str
    quality_score: float
    energy_source: str
    source_request_id: str
    source_image_index: int


class ResultCache:
    """Lookups and inserts of finished outputs."""

    def __init__(
        self,
        engine: sa.Engine,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.memory_bytes = memory_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # output key -> {variant: (copy, hit)}, least recently used first
        self._memory: OrderedDict[str, dict[str, tuple[CachedCopy, CacheHit]]] = OrderedDict()
        self._memory_used = 0
        self._memory_lock = threading.Lock()  # held for dict operations only: no I/O
        self._touched: dict[tuple[str, str], float] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, sha: str) -> Path:
        return self.directory / sha[:2] / f"{sha}.png"

    def recent(
        self, output_key: str, min_quality: float, variant: str | None = None
    ) -> CacheHit | None:
        """``get`` from the in-memory tier only (no I/O); None: ask ``get``."""
        now = self._clock()
        with self._memory_lock:
            held = self._memory.get(output_key)
            if held is None:
                return None
            usable = usable_copies((c for c, _ in held.values()), min_quality, variant, now,
                                   self.ttl_s)  # fmt: skip
            if not usable:
                return None
            self._memory.move_to_end(output_key)
            self._touched[(output_key, usable[0].variant)] = now
            return held[usable[0].variant][1]

    def get(
        self, output_key: str, min_quality: float, variant: str | None = None
    ) -> CacheHit | None:
        """The best fresh entry for ``output_key`` with quality >= ``min_quality``.

        ``variant`` restricts hits to one variant (a request that named its model).
        Blocking (a query and a file read): call it off the event loop.
        """
        now = self._clock()
        table = CacheRow.__table__
        query = sa.select(table).where(table.c.output_key == output_key)
        with self.engine.connect() as conn:
            rows = {row["variant"]: row for row in conn.execute(query).mappings()}
        copies = {r["variant"]: CachedCopy(r["variant"], r["quality_score"], r["created_s"])
                  for r in rows.values()}  # fmt: skip
        for copy in usable_copies(copies.values(), min_quality, variant, now, self.ttl_s):
            row = rows[copy.variant]
            try:
                png = self._path(row["png_sha256"]).read_bytes()
            except FileNotFoundError:  # evicted under us: the row goes too
                self._forget(output_key, copy.variant)
                with self._lock, write_transaction(self.engine) as conn:
                    conn.execute(sa.delete(table).where(
                        table.c.output_key == output_key, table.c.variant == copy.variant
                    ))  # fmt: skip
                continue
            hit = CacheHit(
                png, row["variant"], row["quality_score"], row["energy_source"],
                row["source_request_id"], row["source_image_index"],
            )  # fmt: skip
            self._hold(output_key, copy, hit)
            with self._memory_lock:
                self._touched[(output_key, copy.variant)] = now
            return hit
        return None

    def _hold(self, output_key: str, copy: CachedCopy, hit: CacheHit) -> None:
        """Keep a copy in the memory tier; drop the least recently used past its bound."""
        if len(hit.png) > self.memory_bytes:
            return
        with self._memory_lock:
            held = self._memory.setdefault(output_key, {})
            previous = held.get(copy.variant)
            self._memory_used += len(hit.png) - (len(previous[1].png) if previous else 0)
            held[copy.variant] = (copy, hit)
            self._memory.move_to_end(output_key)
            while self._memory_used > self.memory_bytes:
                _, dropped = self._memory.popitem(last=False)
                self._memory_used -= sum(len(h.png) for _, h in dropped.values())

    def _forget(self, output_key: str, variant: str) -> None:
        with self._memory_lock:
            held = self._memory.get(output_key, {})
            dropped = held.pop(variant, None)
            if dropped is not None:
                self._memory_used -= len(dropped[1].png)
            if not held:
                self._memory.pop(output_key, None)

    def flush_touches(self) -> int:
        """Write the last-used times lookups refreshed, in one transaction; how many."""
        with self._lock, write_transaction(self.engine) as conn:
            return self._write_touches(conn)

    def _write_touches(self, conn: sa.Connection) -> int:
        with self._memory_lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return 0
        table = CacheRow.__table__
        stmt = (
            table.update()
            .where(table.c.output_key == sa.bindparam("k_key"),
                   table.c.variant == sa.bindparam("k_variant"),
                   table.c.last_used_s < sa.bindparam("used_s"))
            .values(last_used_s=sa.bindparam("used_s"))
        )  # fmt: skip
        values = [{"k_key": key, "k_variant": variant, "used_s": used_s}
                  for (key, variant), used_s in touched.items()]  # fmt: skip
        conn.execute(stmt, values)
        return len(touched)

    def put(
        self,
        output_key: str,
        variant: str,
        quality_score: float,
        energy_source: str,
        png: bytes,
        source_request_id: str,
        source_image_index: int,
    ) -> None:
        """Store an output (idempotent per key and variant), then evict down to the cap."""
        sha = hashlib.sha256(png).hexdigest()
        path = self._path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(png)
            os.replace(staging, path)
        now = self._clock()
        row = CacheRow(
            output_key=output_key,
            variant=variant,
            quality_score=quality_score,
            energy_source=energy_source,
            png_sha256=sha,
            size_bytes=len(png),
            created_s=now,
            last_used_s=now,
            source_request_id=source_request_id,
            source_image_index=source_image_index,
        )
        with self._lock, write_transaction(self.engine) as conn:
            exists = conn.execute(
                sa.select(sa.func.count())
                .select_from(CacheRow.__table__)
                .where(
                    CacheRow.__table__.c.output_key == output_key,
                    CacheRow.__table__.c.variant == variant,
                )
            ).scalar_one()
            if not exists:
                insert = sa.insert(CacheRow.__table__)
                if conn.dialect.name == "postgresql":  # another replica may insert it first
                    insert = pg_insert(CacheRow.__table__).on_conflict_do_nothing()
                conn.execute(insert.values(**row.model_dump()))
            self._evict(conn)
        if not exists:  # else the stored copy is older: its created_s is the one that holds
            hit = CacheHit(png, variant, quality_score, energy_source, source_request_id,
                           source_image_index)  # fmt: skip
            self._hold(output_key, CachedCopy(variant, quality_score, now), hit)

    def _evict(self, conn: sa.Connection) -> None:
        self._write_touches(conn)  # least recently used as of now, not of the last flush
        table = CacheRow.__table__
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.size_bytes), 0)))
        excess = int(total.scalar_one()) - self.max_bytes
        if excess <= 0:
            return
        oldest = conn.execute(
            sa.select(
                table.c.output_key, table.c.variant, table.c.png_sha256, table.c.size_bytes
            ).order_by(table.c.last_used_s)
        ).all()
        for key, variant, sha, size in oldest:
            if excess <= 0:
                break
            conn.execute(
                sa.delete(table).where(table.c.output_key == key, table.c.variant == variant)
            )
            self._forget(key, variant)
            excess -= size
            still_used = conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.png_sha256 == sha)
            ).scalar_one()
            if not still_used:
                self._path(sha).unlink(missing_ok=True)

    def stats(self) -> dict[str, int]:
        """Entries and stored bytes."""
        table = CacheRow.__table__
        with self.engine.connect() as conn:
            entries, stored = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(table.c.size_bytes), 0))
            ).one()
        return {"entries": int(entries), "bytes": int(stored)}
