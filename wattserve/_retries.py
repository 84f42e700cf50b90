"""The retry policy of the SDK's ``generate``: what is retried, and how long to wait.

Pure functions of an attempt's outcome, kept apart from the I/O so that ``Client`` and
``AsyncClient`` share one policy and tests can check it without a socket or a clock.

A retry is safe because every attempt of one call carries the same ``Idempotency-Key``:
the service answers a key whose request finished with that request's response (same
request id, images and receipts, charged once), joins a request still running under
it, and refuses the key with a different body (409).
"""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

import httpx

from wattserve._exceptions import is_wattserve_error_body

DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
BACKOFF_CAP_S = 8.0  # the jittered backoff never draws above this
RETRY_AFTER_CAP_S = 30.0  # a server's Retry-After is honoured up to this, no further
# After a proxy's 500 (the replica holding the request died) the wait is at least this,
# doubling per retry up to BACKOFF_CAP_S: Serve needs a few seconds to stop routing to a
# dead replica, and retries that come back at once would all find it again.
DEAD_REPLICA_FLOOR_S = 1.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
# A gateway, or a replica that is gone or busy: worth another try with the same key.
RETRY_STATUSES = frozenset({502, 503, 504})

# What one attempt came back with: a response (any status) or the transport's failure.
Outcome = httpx.Response | httpx.TransportError


def check_retry_settings(max_retries: int, backoff_s: float) -> None:
    """Refuse settings that would retry forever or sleep a negative or endless time."""
    if max_retries < 0:
        raise ValueError(f"max_retries: must be 0 or more, got {max_retries}")
    if not (backoff_s >= 0 and math.isfinite(backoff_s)):
        raise ValueError(f"backoff_s: must be a finite number >= 0, got {backoff_s}")


def idempotency_headers(idempotency_key: str | None) -> dict[str, str]:
    """The key header for one ``generate`` call: the caller's key, or a fresh one.

    The caller sends the same dict with every retry of the call, so the service sees
    one key per call and two calls never share one by accident.
    """
    if idempotency_key is None:
        idempotency_key = uuid.uuid4().hex
    elif not idempotency_key:
        raise ValueError("idempotency_key: must not be empty (None makes a fresh one)")
    return {IDEMPOTENCY_HEADER: idempotency_key}


def is_retryable(outcome: Outcome) -> bool:
    """Whether an attempt that ended this way is worth repeating with the same key.

    Retried: the service could not be reached or the connection broke (the request may
    or may not have run; the key makes that moot), 502/503/504, and a 500 that is not a
    wattserve JSON error, which is what Ray Serve's proxy answers (plain text) when the
    replica holding the request died. A wattserve 500 and every 4xx (a 409 key clash, a
    429 refusal) are deliberate answers that a repeat would only repeat.
    """
    if isinstance(outcome, httpx.TransportError):
        return not isinstance(outcome, httpx.UnsupportedProtocol)  # a bad URL stays bad
    if outcome.status_code in RETRY_STATUSES:
        return True
    return outcome.status_code == 500 and not is_wattserve_error_body(_json_or_text(outcome))


def retry_delay(retry: int, outcome: Outcome, *, backoff_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry`` (0 for the first).

    Bounded exponential backoff with full jitter, so clients that failed together do
    not come back together; a ``Retry-After`` from the server is a floor, honoured up
    to ``RETRY_AFTER_CAP_S`` so that a wild header cannot park a call for hours. After a
    dead replica's 500 the wait is at least ``DEAD_REPLICA_FLOOR_S`` doubled per retry.
    """
    ceiling = min(BACKOFF_CAP_S, backoff_s * 2.0 ** min(retry, 32))
    jittered = rng.uniform(0.0, ceiling)
    if not isinstance(outcome, httpx.Response):
        return jittered
    if outcome.status_code == 500:  # retried, so not wattserve's own: the replica died
        jittered = max(jittered, min(BACKOFF_CAP_S, DEAD_REPLICA_FLOOR_S * 2.0 ** min(retry, 32)))
    floor = retry_after_s(outcome)
    if floor is None:
        return jittered
    return min(RETRY_AFTER_CAP_S, max(jittered, floor))


def retry_after_s(response: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds; None when absent or not a number >= 0."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None  # an HTTP date: wattserve sends seconds, so this is someone else's
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
