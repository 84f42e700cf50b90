"""HTTP edge of the scheduler: the FastAPI app, bodies, bearer tokens, error mapping."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import wattserve
from wattserve import InvalidRequest, NotFound, WattserveError

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
M = TypeVar("M", bound=BaseModel)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _param(err: dict[str, Any]) -> str | None:
    loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query")]
    return ".".join(loc) or None


def invalid_from_validation(errors: list[dict[str, Any]]) -> InvalidRequest:
    """Turn pydantic/FastAPI validation errors into one ``InvalidRequest`` naming the field."""
    err = errors[0]
    param = _param(err)
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        message = "unsupported field"
    return InvalidRequest(f"{param or 'body'}: {message}" if param else message, param=param)


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse a JSON object body into ``model`` or raise ``InvalidRequest``."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc.errors()) from exc  # type: ignore[arg-type]


def error_response(exc: WattserveError) -> JSONResponse:
    """The one place a ``WattserveError`` becomes an HTTP response."""
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)  # AdmissionRejected, ServiceUnavailable
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception the app can raise onto ``error_response``."""

    @app.exception_handler(WattserveError)
    async def _wattserve(_: Request, exc: WattserveError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request_failed", error=exc.message, status=exc.status_code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_from_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("no such route"))
        if exc.status_code == 405:
            return JSONResponse(InvalidRequest("method not allowed").to_body(), status_code=405)
        return error_response(InvalidRequest(str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", error=repr(exc))
        return error_response(WattserveError("internal error"))


api = FastAPI(title="wattserve", version=wattserve.__version__)
install_error_handlers(api)
