"""The request path's edge for routing: a ``RouteRefusal`` becomes a ``WattserveError``.

Routing returns refusals as plain data (``policies`` never imports ``scheduler`` nor
raises for an ordinary outcome); this is the one place a refusal turns into the
exception, and so the HTTP status and body, a client sees::

    size, quality   400 InvalidRequest      (param "size" / "quality")
    model_unknown   404 NotFound            (param "model")
    unavailable     503 ServiceUnavailable  (Retry-After: a replica's start)
    deadline        429 AdmissionRejected   (param "deadline_s", Retry-After)
"""

from __future__ import annotations

from typing import assert_never

from wattserve import (
    AdmissionRejected,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    WattserveError,
)
from wattserve.policies.routing import RouteRefusal
from wattserve.scheduler.batcher import NO_REPLICA_RETRY_AFTER_S

DEFAULT_RETRY_AFTER_S = 1.0  # a deadline refusal always carries one; this only guards


def refusal_error(refusal: RouteRefusal) -> WattserveError:
    """The exception to raise for ``refusal``, with its message and param unchanged."""
    match refusal.kind:
        case "size" | "quality":
            return InvalidRequest(refusal.message, param=refusal.param)
        case "model_unknown":
            return NotFound(refusal.message, param=refusal.param)
        case "unavailable":
            return ServiceUnavailable(refusal.message, retry_after_s=NO_REPLICA_RETRY_AFTER_S)
        case "deadline":
            retry_after_s = refusal.retry_after_s
            return AdmissionRejected(
                refusal.message,
                retry_after_s=DEFAULT_RETRY_AFTER_S if retry_after_s is None else retry_after_s,
                param=refusal.param,
            )
        case _:
            assert_never(refusal.kind)
