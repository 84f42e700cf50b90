"""The result cache: content-addressed PNGs on disk, indexed in the database.

An entry maps an output key (``scheduler.identity.output_key``) and the variant that
made it to a PNG stored under ``<dir>/<sha256[:2]>/<sha256>.png``. A request may be
served by any entry whose variant's quality is at or above the request's floor (the best
one is used). Entries survive restarts (files + rows), expire after an optional TTL, and
the least recently used are evicted once the stored bytes pass the cap. A hit costs no
GPU time; its receipt points at the ledger row that paid for the image.

Thread-safe for one process; several replicas may share the directory and database
(writes are idempotent and files are written atomically).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Field, SQLModel

from wattserve.policies.reuse import CachedCopy, usable_copies
from wattserve.telemetry.database import write_transaction

DEFAULT_MAX_BYTES = 1 << 30


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
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, sha: str) -> Path:
        return self.directory / sha[:2] / f"{sha}.png"

    def get(
        self, output_key: str, min_quality: float, variant: str | None = None
    ) -> CacheHit | None:
        """The best fresh entry for ``output_key`` with quality >= ``min_quality``.

        ``variant`` restricts hits to one variant (a request that named its model).
        """
        now = self._clock()
        table = CacheRow.__table__
        query = sa.select(table).where(table.c.output_key == output_key)
        with self._lock, write_transaction(self.engine) as conn:
            rows = {row["variant"]: row for row in conn.execute(query).mappings()}
            copies = [CachedCopy(r["variant"], r["quality_score"], r["created_s"])
                      for r in rows.values()]  # fmt: skip
            for copy in usable_copies(copies, min_quality, variant, now, self.ttl_s):
                row = rows[copy.variant]
                try:
                    png = self._path(row["png_sha256"]).read_bytes()
                except FileNotFoundError:
                    conn.execute(sa.delete(table).where(
                        table.c.output_key == row["output_key"], table.c.variant == row["variant"]
                    ))  # fmt: skip
                    continue
                conn.execute(
                    sa.update(table)
                    .where(table.c.output_key == output_key, table.c.variant == row["variant"])
                    .values(last_used_s=now)
                )
                return CacheHit(
                    png, row["variant"], row["quality_score"], row["energy_source"],
                    row["source_request_id"], row["source_image_index"],
                )  # fmt: skip
        return None

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

    def _evict(self, conn: sa.Connection) -> None:
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
