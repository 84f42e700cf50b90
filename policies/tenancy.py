"""Tenants: API keys, energy quotas and request rate limits, as pure decisions.

A tenant's API key is 32 random bytes, shown once at creation; only its SHA-256 is
stored. A fast hash is right here (unlike for passwords): the key has 256 bits of
entropy, so there is nothing to brute-force, and every request must look it up. Keys
are compared by looking up the hash, then confirmed with a constant-time comparison.

Quotas are energy, in kilojoules per UTC day and per UTC month, counted from the ledger
(every joule charged to the tenant's outputs, whatever its source). A tenant at or over
a quota is refused until the window resets; a request that starts under quota may end
a little over it (its energy is known only once it has run).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from wattserve import Quality

KEY_PREFIX = "ws_"


def new_api_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(api_key: str) -> str:
    """The stored form of an API key (hex SHA-256)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time equality of two secrets (or their hashes)."""
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class Tenant:
    """A tenant as decisions see it."""

    name: str
    key_hash: str
    daily_kj: float | None = None
    monthly_kj: float | None = None
    qualities: tuple[Quality, ...] = ("draft", "standard", "high")
    rate_limit_per_min: int | None = None
    revoked: bool = False
    approximate_reuse: bool = True  # may its requests resume from similar prompts' latents
    reuse_pool: str | None = None  # the named pool it shares latents in (None: its own)
    audit_rate: float | None = None  # its outputs' shadow-audit rate (None: the policy's)


def day_window(now: datetime) -> tuple[datetime, datetime]:
    """Start and end (the reset time) of the UTC day containing ``now``."""
    start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def month_window(now: datetime) -> tuple[datetime, datetime]:
    """Start and end (the reset time) of the UTC month containing ``now``."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


@dataclass(frozen=True)
class QuotaRefusal:
    """Why a tenant is over quota, and when it may try again."""

    message: str
    resets_at: datetime
    retry_after_s: float


def check_quota(
    tenant: Tenant, used_day_j: float, used_month_j: float, now: datetime
) -> QuotaRefusal | None:
    """None if ``tenant`` may spend more energy now, else which quota stops it."""
    checks = (
        ("daily", tenant.daily_kj, used_day_j, day_window(now)[1]),
        ("monthly", tenant.monthly_kj, used_month_j, month_window(now)[1]),
    )
    for label, quota_kj, used_j, resets_at in checks:
        if quota_kj is not None and used_j >= quota_kj * 1000:
            return QuotaRefusal(
                f"tenant {tenant.name!r} has used its {label} energy quota: "
                f"{used_j / 1000:,.3f} kJ of {quota_kj:,.3f} kJ; "
                f"it resets at {resets_at.isoformat(timespec='seconds')}",
                resets_at,
                max(1.0, (resets_at - now).total_seconds()),
            )
    return None


@dataclass
class RateLimiter:
    """Token buckets per tenant: ``rate_limit_per_min`` requests per minute, burst of one minute.

    Per scheduler replica: with R replicas behind a load balancer a tenant can get up to
    R times its limit; the energy quotas, which are counted in the shared ledger, are the
    hard limit.
    """

    clock: Callable[[], float]
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, at

    def allow(self, tenant: Tenant) -> float | None:
        """None if a request may pass now (and take a token), else seconds until one may."""
        limit = tenant.rate_limit_per_min
        if limit is None:
            return None
        now = self.clock()
        tokens, at = self._buckets.get(tenant.name, (float(limit), now))
        tokens = min(float(limit), tokens + (now - at) * limit / 60.0)
        if tokens >= 1.0:
            self._buckets[tenant.name] = (tokens - 1.0, now)
            return None
        self._buckets[tenant.name] = (tokens, now)
        return (1.0 - tokens) * 60.0 / limit


@dataclass(frozen=True)
class Caller:
    """Who is calling: the operator (admin token), a tenant, or nobody in particular."""

    kind: str  # "admin" | "tenant" | "anonymous"
    tenant: Tenant | None = None

    @property
    def name(self) -> str | None:
        """The tenant's name, if a tenant."""
        return self.tenant.name if self.tenant else None


class AuthError(Exception):
    """Credentials missing or wrong; the message says which (never the secret)."""


def identify(
    token: str | None,
    tenants: dict[str, Tenant],
    allow_anonymous: bool,
    admin_token_sha256: str | None,
) -> Caller:
    """The caller behind a bearer ``token`` (``tenants`` are keyed by key hash).

    While no tenant exists the service is open: any token (the OpenAI client always sends
    one) is served anonymously. Once one exists, an unknown or revoked key is refused, and
    so is no key at all unless the policy allows anonymous use.
    """
    if token:
        digest = hash_key(token)
        if admin_token_sha256 is not None and same_secret(digest, admin_token_sha256):
            return Caller("admin")
        tenant = tenants.get(digest)
        if tenant is not None and same_secret(digest, tenant.key_hash):
            return Caller("tenant", tenant)
        if tenants:
            raise AuthError("unknown or revoked API key")
        return Caller("anonymous")
    if tenants and not allow_anonymous:
        raise AuthError("an API key is required: send it as 'Authorization: Bearer <key>'")
    return Caller("anonymous")
