"""The Python SDK: ``Client`` and ``AsyncClient`` for a wattserve service.

Shared logic (building requests, decoding responses, mapping errors) lives in
``_BaseClient``; the sync and async clients only add I/O. Both accept an httpx
``transport`` so tests and embedders can route calls without a socket.

Only ``generate`` retries (the policy is in ``_retries``): it sends an
``Idempotency-Key`` header, the same on every retry of one call, and the service answers
a repeated key with the first request's outcome instead of generating and charging
again, so a retry after a lost answer is safe. Every other call is one attempt.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import httpx
from PIL import Image
from pydantic import BaseModel, ValidationError

from wattserve._admin import TenantInfo
from wattserve._exceptions import TransportError, WattserveError, error_from_response
from wattserve._retries import (
    DEFAULT_BACKOFF_S,
    DEFAULT_MAX_RETRIES,
    Outcome,
    check_retry_settings,
    idempotency_headers,
    is_retryable,
    retry_delay,
)
from wattserve._schemas import (
    AUTO_MODEL,
    DEFAULT_SIZE,
    ClusterStatus,
    EnergyReport,
    Health,
    ImageGenerationResponse,
    LedgerEntry,
    LedgerPage,
    ModelList,
    Quality,
    Receipt,
    RequestPolicy,
    ReuseMode,
    RouteInfo,
    VariantInfo,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 300.0
GENERATIONS_PATH = "/v1/images/generations"

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image: its PNG bytes and its energy receipt."""

    png_bytes: bytes
    receipt: Receipt

    @property
    def image(self) -> Image.Image:
        """The image decoded with PIL."""
        return Image.open(io.BytesIO(self.png_bytes))


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one ``generate`` call."""

    request_id: str
    images: list[GeneratedImage]
    route: RouteInfo  # the variant chosen, why, and every alternative considered
    attempts: int = 1  # HTTP attempts the call took; above 1 when a retry was needed

    @property
    def receipts(self) -> list[Receipt]:
        """The receipt of every image, in order."""
        return [img.receipt for img in self.images]

    @property
    def joules(self) -> float:
        """Total joules charged to this request (sources: see each receipt)."""
        return sum(r.joules for r in self.receipts)


class _BaseClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        check_retry_settings(max_retries, backoff_s)
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._rng = random.Random()  # a seam: tests replace it to fix the jitter

    def _should_retry(self, outcome: Outcome, attempts: int) -> bool:
        """Whether ``generate`` tries again after its ``attempts``-th attempt."""
        return attempts <= self._max_retries and is_retryable(outcome)

    def _retry_delay(self, attempts: int, outcome: Outcome) -> float:
        """Seconds to wait after the ``attempts``-th attempt (jittered, see ``_retries``)."""
        return retry_delay(attempts - 1, outcome, backoff_s=self._backoff_s, rng=self._rng)

    def _generation_outcome(self, outcome: Outcome, attempts: int) -> GenerationResult:
        """The result of a call's last attempt, or the error it ended with, as today."""
        if isinstance(outcome, httpx.TransportError):
            raise self._transport_error(outcome) from outcome
        return self._generation_result(self._decode(outcome), attempts=attempts)

    @staticmethod
    def _generation_body(
        prompt: str,
        *,
        n: int,
        size: str,
        seed: int | None,
        quality: Quality | None,
        negative_prompt: str | None,
        deadline_s: float | None,
        model: str | None,
        user: str | None,
        policy: str = "default",
        reuse: ReuseMode | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "n": n,
            "size": size,
            "model": model or AUTO_MODEL,
            "response_format": "b64_json",
        }
        if policy != "default":
            body["policy"] = policy
        optional = {
            "quality": quality,  # None: the service policy's default tier
            "seed": seed,
            "negative_prompt": negative_prompt,
            "deadline_s": deadline_s,
            "user": user,
            "reuse": reuse,  # None: exact when seeded, else the service policy's default
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        if response.is_error:
            raise error_from_response(response.status_code, body, dict(response.headers))
        return body

    @staticmethod
    def _generation_result(body: Any, attempts: int = 1) -> GenerationResult:
        parsed = _BaseClient._parse(ImageGenerationResponse, body)
        images = [
            GeneratedImage(png_bytes=base64.b64decode(datum.b64_json), receipt=receipt)
            for datum, receipt in zip(parsed.data, parsed.wattserve.receipts, strict=True)
        ]
        return GenerationResult(
            request_id=parsed.wattserve.request_id,
            images=images,
            route=parsed.wattserve.route,
            attempts=attempts,
        )

    @staticmethod
    def _parse(model: type[M], body: Any) -> M:
        """Decode a success body; a shape this SDK does not know is a ``WattserveError``.

        A server of another version can answer in a shape this SDK cannot read; that is
        reported like any other service error, not as a pydantic traceback.
        """
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"]) or "body"
            raise WattserveError(
                f"unexpected {model.__name__} from the service ({where}: {err['msg']}); "
                "are the SDK and the service the same version?"
            ) from None

    def _transport_error(self, exc: httpx.TransportError) -> TransportError:
        return TransportError(f"cannot reach wattserve at {self.base_url}: {exc}")


class _SyncClient(_BaseClient):
    """The synchronous I/O that ``Client`` and ``AdminClient`` share."""

    def __init__(
        self,
        base_url: str,
        credential: str | None,
        *,
        timeout_s: float,
        transport: httpx.BaseTransport | None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        super().__init__(
            base_url, credential, timeout_s, max_retries=max_retries, backoff_s=backoff_s
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )
        self._sleep: Callable[[float], None] = time.sleep  # a seam: tests skip the wait

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        return self._decode(response)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client(_SyncClient):
    """Synchronous client. Use as a context manager or call ``close()``.

    ``generate`` retries up to ``max_retries`` times (0: never) after a broken
    connection or a 500/502/503/504 from a proxy or a replica that is gone, waiting a
    jittered backoff from ``backoff_s`` up; its idempotency key makes that safe.
    ``timeout_s`` bounds each attempt, not the whole call.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout_s=timeout_s, transport=transport,
            max_retries=max_retries, backoff_s=backoff_s,
        )  # fmt: skip

    def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: str = DEFAULT_SIZE,
        seed: int | None = None,
        quality: Quality | None = None,
        negative_prompt: str | None = None,
        deadline_s: float | None = None,
        model: str | None = None,
        user: str | None = None,
        policy: RequestPolicy = "default",
        idempotency_key: str | None = None,
        reuse: ReuseMode | None = None,
    ) -> GenerationResult:
        """Generate ``n`` images; each comes with its energy receipt.

        ``policy="baseline"`` asks for serving without wattserve's savings (highest-quality
        variant, batch of one, no cache, no coalescing), to measure what they save.
        ``idempotency_key`` (None: a fresh one per call) goes with every attempt; give
        your own to make a call you repeat yourself, e.g. after a crash, safe too.
        ``reuse="approximate"`` lets an output resume from a similar earlier prompt's
        latent (fewer steps, fewer joules, a different image; receipts say so).
        """
        body = self._generation_body(
            prompt, n=n, size=size, seed=seed, quality=quality, negative_prompt=negative_prompt,
            deadline_s=deadline_s, model=model, user=user, policy=policy, reuse=reuse,
        )  # fmt: skip
        headers = idempotency_headers(idempotency_key)
        attempts = 1
        while True:
            outcome = self._send_generation(body, headers)
            if not self._should_retry(outcome, attempts):
                return self._generation_outcome(outcome, attempts)
            self._sleep(self._retry_delay(attempts, outcome))
            attempts += 1

    def _send_generation(self, body: dict[str, Any], headers: dict[str, str]) -> Outcome:
        """One attempt; a transport failure is returned, not raised, for the retry loop."""
        try:
            return self._http.post(GENERATIONS_PATH, json=body, headers=headers)
        except httpx.TransportError as exc:
            return exc

    def variants(self) -> list[VariantInfo]:
        """The variants the service can route to."""
        return self._parse(ModelList, self._request("GET", "/v1/models")).data

    def ledger(self, limit: int = 50) -> list[LedgerEntry]:
        """The newest ``limit`` ledger rows, newest first."""
        body = self._request("GET", "/v1/ledger", params={"limit": limit})
        return self._parse(LedgerPage, body).data

    def health(self) -> Health:
        """Liveness and the variants that are up."""
        return self._parse(Health, self._request("GET", "/healthz"))

    def status(self) -> ClusterStatus:
        """Live power of every device and node, and the budget in force."""
        return self._parse(ClusterStatus, self._request("GET", "/v1/status"))

    def report(self) -> EnergyReport:
        """Energy reconciliation and per-variant ledger totals."""
        return self._parse(EnergyReport, self._request("GET", "/v1/report"))

    def usage(self) -> TenantInfo:
        """This API key's tenant: its limits and the energy used against its quotas."""
        return self._parse(TenantInfo, self._request("GET", "/v1/usage"))


class AsyncClient(_BaseClient):
    """Asynchronous client, for many concurrent requests from one event loop.

    Retries ``generate`` exactly as ``Client`` does (``max_retries``, ``backoff_s``).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, max_retries=max_retries, backoff_s=backoff_s)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # a seam for tests

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        return self._decode(response)

    async def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: str = DEFAULT_SIZE,
        seed: int | None = None,
        quality: Quality | None = None,
        negative_prompt: str | None = None,
        deadline_s: float | None = None,
        model: str | None = None,
        user: str | None = None,
        policy: RequestPolicy = "default",
        idempotency_key: str | None = None,
        reuse: ReuseMode | None = None,
    ) -> GenerationResult:
        """Generate ``n`` images; each comes with its energy receipt.

        ``policy="baseline"`` asks for serving without wattserve's savings (highest-quality
        variant, batch of one, no cache, no coalescing), to measure what they save.
        ``idempotency_key`` (None: a fresh one per call) goes with every attempt; give
        your own to make a call you repeat yourself, e.g. after a crash, safe too.
        ``reuse="approximate"`` lets an output resume from a similar earlier prompt's
        latent (fewer steps, fewer joules, a different image; receipts say so).
        """
        body = self._generation_body(
            prompt, n=n, size=size, seed=seed, quality=quality, negative_prompt=negative_prompt,
            deadline_s=deadline_s, model=model, user=user, policy=policy, reuse=reuse,
        )  # fmt: skip
        headers = idempotency_headers(idempotency_key)
        attempts = 1
        while True:
            outcome = await self._send_generation(body, headers)
            if not self._should_retry(outcome, attempts):
                return self._generation_outcome(outcome, attempts)
            await self._sleep(self._retry_delay(attempts, outcome))
            attempts += 1

    async def _send_generation(self, body: dict[str, Any], headers: dict[str, str]) -> Outcome:
        """One attempt; a transport failure is returned, not raised, for the retry loop."""
        try:
            return await self._http.post(GENERATIONS_PATH, json=body, headers=headers)
        except httpx.TransportError as exc:
            return exc

    async def variants(self) -> list[VariantInfo]:
        """The variants the service can route to."""
        return self._parse(ModelList, await self._request("GET", "/v1/models")).data

    async def ledger(self, limit: int = 50) -> list[LedgerEntry]:
        """The newest ``limit`` ledger rows, newest first."""
        body = await self._request("GET", "/v1/ledger", params={"limit": limit})
        return self._parse(LedgerPage, body).data

    async def health(self) -> Health:
        """Liveness and the variants that are up."""
        return self._parse(Health, await self._request("GET", "/healthz"))

    async def status(self) -> ClusterStatus:
        """Live power of every device and node, and the budget in force."""
        return self._parse(ClusterStatus, await self._request("GET", "/v1/status"))

    async def report(self) -> EnergyReport:
        """Energy reconciliation and per-variant ledger totals."""
        return self._parse(EnergyReport, await self._request("GET", "/v1/report"))

    async def usage(self) -> TenantInfo:
        """This API key's tenant: its limits and the energy used against its quotas."""
        return self._parse(TenantInfo, await self._request("GET", "/v1/usage"))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
