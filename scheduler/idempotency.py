"""Idempotent requests: an ``Idempotency-Key`` makes a retry return the first answer.

The convention Stripe and others use. A caller sends a key of its choosing with a
request; the key (scoped to the caller: its tenant, or the anonymous scope) is stored
with a digest of the request body and the replica running it. Then a repeat of the key:

* whose request finished returns the stored response (same request id, images and
  receipts) without generating or charging again;
* while it runs joins it: it waits for the stored response;
* whose first holder stopped (its replica died: no heartbeat, see
  ``telemetry.ledger.LedgerStore.heartbeat``) takes the request over and runs it anew;
* with a different body is refused (409), since one key must mean one request.

Only answers that a retry could not change are stored: a success and the client errors
(4xx other than 429). A refusal a retry may overcome (429, 5xx) releases the key, so the
retry runs again. Keys expire after the policy's ``idempotency_ttl_s``.

Decisions (``claim``) are values; ``run_once`` is the asyncio around them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import Field, SQLModel

from wattserve import Conflict, InvalidRequest, WattserveError
from wattserve.telemetry.database import write_transaction
from wattserve.telemetry.ledger import LedgerHolder

log = structlog.get_logger(__name__)

MAX_KEY_CHARS = 255
JOIN_POLL_S = 0.1
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def _utcnow() -> datetime:
    return datetime.now(UTC)


class IdempotencyKey(SQLModel, table=True):
    """One caller's key: the request it names and, once finished, its stored answer."""

    __tablename__ = "idempotency_keys"

    scope: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=MAX_KEY_CHARS)
    body_sha256: str = Field(max_length=64)
    request_id: str | None = Field(default=None, max_length=64)
    holder: str = Field(max_length=64)
    status_code: int | None = None
    response_json: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = Field(default_factory=_utcnow)
    expires_at: datetime = Field(index=True)


@dataclass(frozen=True)
class Run:
    """Nobody holds the key (or its holder stopped): this caller runs the request."""


@dataclass(frozen=True)
class Replay:
    """The key's request finished: answer with what it answered."""

    status_code: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Wait:
    """A live replica is running the key's request: join it."""

    holder: str


@dataclass(frozen=True)
class Mismatch:
    """The key was used for a different request body."""


Claim = Run | Replay | Wait | Mismatch


def body_digest(body: dict[str, Any]) -> str:
    """A digest of the parsed request body (so whitespace or key order do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> str:
    """The key as stored; ``InvalidRequest`` for an empty or oversized one."""
    key = key.strip()
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable characters",
            param="Idempotency-Key",
        )
    return key


class IdempotencyStore:
    """Keys in the service's database, shared by every scheduler replica."""

    def __init__(self, engine: sa.Engine, holder: str, *, stale_after_s: float) -> None:
        self.engine = engine
        self.holder = holder
        self._stale_after_s = stale_after_s
        self._table = IdempotencyKey.__table__  # type: ignore[attr-defined]

    def claim(self, scope: str, key: str, digest: str, ttl_s: float) -> Claim:
        """Decide what a request with ``key`` does, taking the key when it is free."""
        t, now = self._table, _utcnow()
        mine = (t.c.scope == scope) & (t.c.key == key)
        with write_transaction(self.engine) as conn:
            conn.execute(t.delete().where(mine, t.c.expires_at < now))
            row = conn.execute(sa.select(t).where(mine)).first()
            if row is None:
                conn.execute(t.insert().values(
                    scope=scope, key=key, body_sha256=digest, holder=self.holder,
                    created_at=now, expires_at=now + timedelta(seconds=ttl_s),
                ))  # fmt: skip
                return Run()
            if row.body_sha256 != digest:
                return Mismatch()
            if row.status_code is not None:
                return Replay(row.status_code, json.loads(row.response_json or "{}"))
            if row.holder != self.holder and self._alive(conn, row.holder, now):
                return Wait(row.holder)
            conn.execute(t.update().where(mine).values(holder=self.holder))
            log.info("idempotency_key_taken_over", key=key, previous=row.holder)
            return Run()

    def _alive(self, conn: sa.Connection, holder: str, now: datetime) -> bool:
        beats = LedgerHolder.__table__  # type: ignore[attr-defined]
        seen = conn.execute(sa.select(beats.c.seen_at).where(beats.c.holder == holder)).first()
        if seen is None:
            return False
        seen_at = seen[0] if seen[0].tzinfo else seen[0].replace(tzinfo=UTC)  # SQLite: naive
        return now - seen_at <= timedelta(seconds=self._stale_after_s)

    def finish(self, scope: str, key: str, status_code: int, body: dict[str, Any]) -> None:
        """Store the answer of the key's request (only if this replica still holds it)."""
        t = self._table
        request_id = (body.get("wattserve") or {}).get("request_id")
        with write_transaction(self.engine) as conn:
            conn.execute(
                t.update()
                .where(t.c.scope == scope, t.c.key == key, t.c.holder == self.holder)
                .values(status_code=status_code, response_json=json.dumps(body),
                        request_id=request_id)
            )  # fmt: skip

    def release(self, scope: str, key: str) -> None:
        """Forget an unfinished key this replica holds: the next request with it runs."""
        t = self._table
        with write_transaction(self.engine) as conn:
            conn.execute(
                t.delete().where(t.c.scope == scope, t.c.key == key, t.c.holder == self.holder,
                                 t.c.status_code.is_(None))
            )  # fmt: skip

    def purge_expired(self) -> int:
        """Drop keys past their expiry; how many (the janitor calls it)."""
        t = self._table
        with write_transaction(self.engine) as conn:
            result = conn.execute(t.delete().where(t.c.expires_at < _utcnow()))
        return max(result.rowcount, 0)


async def run_once(
    store: IdempotencyStore,
    scope: str,
    key: str,
    body: dict[str, Any],
    ttl_s: float,
    produce: Callable[[], Awaitable[dict[str, Any]]],
    *,
    wait_s: float,
) -> tuple[int, dict[str, Any]]:
    """(status, body) of the one request ``key`` names: run it here, replay it or join it.

    ``produce`` returns a success body or raises a ``WattserveError``; a joined request
    that does not finish within ``wait_s`` is answered 409 (still running elsewhere).
    """
    digest = body_digest(body)
    waited_s = 0.0
    while True:
        claim = await asyncio.to_thread(store.claim, scope, key, digest, ttl_s)
        if isinstance(claim, Replay):
            return claim.status_code, claim.body
        if isinstance(claim, Mismatch):
            raise Conflict(
                "this Idempotency-Key was used with a different request body",
                param="Idempotency-Key",
            )
        if isinstance(claim, Run):
            return 200, await _produce_once(store, scope, key, produce)
        if waited_s >= wait_s:
            raise Conflict(
                f"the request of this Idempotency-Key is still running on replica "
                f"{claim.holder}; retry later", param="Idempotency-Key",
            )  # fmt: skip
        await asyncio.sleep(JOIN_POLL_S)
        waited_s += JOIN_POLL_S


async def _produce_once(
    store: IdempotencyStore, scope: str, key: str, produce: Callable[[], Awaitable[dict]]
) -> dict[str, Any]:
    """Run the request; store an answer a retry could not change, release the key else."""
    try:
        body = await produce()
    except WattserveError as exc:
        if exc.status_code in RETRYABLE_STATUS:
            await asyncio.shield(asyncio.to_thread(store.release, scope, key))
        else:
            await asyncio.to_thread(store.finish, scope, key, exc.status_code, exc.to_body())
        raise
    except BaseException:  # cancelled, or a bug: a retry must be able to run it
        await asyncio.shield(asyncio.to_thread(store.release, scope, key))
        raise
    await asyncio.to_thread(store.finish, scope, key, 200, body)
    return body
