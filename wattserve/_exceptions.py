"""The one exception tree of wattserve, shared by the server and the SDK.

::

    WattserveError                 500  anything unexpected
    ├── InvalidRequest             400  a field is missing, malformed or out of range (``param``)
    ├── Unauthorized               401  missing or wrong credentials
    ├── Forbidden                  403  authenticated, but not allowed this (e.g. a tier)
    ├── NotFound                   404  unknown model/variant or route
    ├── Conflict                   409  the change clashes with current state (duplicate name)
    ├── AdmissionRejected          429  over a budget or quota; retry after ``retry_after_s``
    ├── GenerationFailed           502  a worker failed while generating
    ├── ServiceUnavailable         503  no capable variant is up right now
    └── TransportError             ---  SDK only: the service could not be reached

Each class carries its HTTP status and OpenAI-style error ``type``. The server maps an
exception to a response in exactly one handler (``scheduler/_http.py``); the SDK maps a
response back to the same class with :func:`error_from_response`, so a caller catches
``wattserve.InvalidRequest`` whether the error came from this process or over the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WattserveError(Exception):
    """Base of every error wattserve raises on purpose."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_body(self) -> dict[str, Any]:
        """The JSON error body, in the shape the OpenAI API uses."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.error_type,
            }
        }


class InvalidRequest(WattserveError):
    """The request is malformed; ``param`` names the offending field."""

    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(WattserveError):
    """Credentials are missing or wrong."""

    status_code = 401
    error_type = "authentication_error"


class Forbidden(WattserveError):
    """The caller is known but may not do this."""

    status_code = 403
    error_type = "permission_error"


class NotFound(WattserveError):
    """The named model, variant or route does not exist."""

    status_code = 404
    error_type = "not_found_error"


class Conflict(WattserveError):
    """The change clashes with the current state, e.g. a name that is already taken."""

    status_code = 409
    error_type = "conflict_error"


class AdmissionRejected(WattserveError):
    """Refused to protect a budget or quota; the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class GenerationFailed(WattserveError):
    """A worker accepted the work but failed to produce an output."""

    status_code = 502
    error_type = "generation_error"


class ServiceUnavailable(WattserveError):
    """No capable variant can take the request right now; ``retry_after_s`` when known."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class WorkerFailed(ServiceUnavailable):
    """The worker running the output died, and so did its retry: try again later."""

    error_type = "worker_failed"


class TransportError(WattserveError):
    """The SDK could not reach the service (connection refused, timeout)."""

    error_type = "transport_error"


_BY_STATUS: dict[int, type[WattserveError]] = {
    cls.status_code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        AdmissionRejected,
        GenerationFailed,
        ServiceUnavailable,
    )
}


def is_wattserve_error_body(body: Any) -> bool:
    """Whether ``body`` is the JSON error a wattserve handler wrote (see ``to_body``).

    It tells the service's own answer apart from a proxy's: Ray Serve's proxy answers
    plain-text ``Internal Server Error`` when the replica holding a request died, which
    is worth a retry, while a wattserve 500 is a deliberate answer that a retry repeats.
    """
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("type"), str)


def error_from_response(status_code: int, body: Any, headers: dict[str, str]) -> WattserveError:
    """Rebuild the server's exception from an HTTP error response."""
    message = f"HTTP {status_code}"
    param = error_type = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or message)
        param = body["error"].get("param")
        error_type = body["error"].get("type")
    elif isinstance(body, str) and body:
        message = f"HTTP {status_code}: {body[:200]}"
    cls = _BY_STATUS.get(status_code)
    if cls is None:
        cls = InvalidRequest if 400 <= status_code < 500 else WattserveError
    if cls is ServiceUnavailable and error_type == WorkerFailed.error_type:
        cls = WorkerFailed
    if cls is AdmissionRejected or (
        issubclass(cls, ServiceUnavailable) and "retry-after" in headers
    ):
        try:
            retry_after_s = float(headers.get("retry-after", "1"))
        except ValueError:
            retry_after_s = 1.0
        return cls(message, retry_after_s=retry_after_s, param=param)  # type: ignore[call-arg]
    return cls(message, param=param)
