"""The Python SDK: ``Client`` and ``AsyncClient`` for a wattserve service.

Shared logic (building requests, decoding responses, mapping errors) lives in
``_BaseClient``; the sync and async clients only add I/O. Both accept an httpx
``transport`` so tests and embedders can route calls without a socket.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import httpx
from PIL import Image
from pydantic import BaseModel, ValidationError

from wattserve._admin import TenantInfo
from wattserve._exceptions import TransportError, WattserveError, error_from_response
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
    RouteInfo,
    VariantInfo,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 300.0

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

    @property
    def receipts(self) -> list[Receipt]:
        """The receipt of every image, in order."""
        return [img.receipt for img in self.images]

    @property
    def joules(self) -> float:
        """Total joules charged to this request (sources: see each receipt)."""
        return sum(r.joules for r in self.receipts)


class _BaseClient:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s

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
    def _generation_result(body: Any) -> GenerationResult:
        parsed = _BaseClient._parse(ImageGenerationResponse, body)
        images = [
            GeneratedImage(png_bytes=base64.b64decode(datum.b64_json), receipt=receipt)
            for datum, receipt in zip(parsed.data, parsed.wattserve.receipts, strict=True)
        ]
        return GenerationResult(
            request_id=parsed.wattserve.request_id, images=images, route=parsed.wattserve.route
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
    ) -> None:
        super().__init__(base_url, credential, timeout_s)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )

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
    """Synchronous client. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s=timeout_s, transport=transport)

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
    ) -> GenerationResult:
        """Generate ``n`` images; each comes with its energy receipt.

        ``policy="baseline"`` asks for serving without wattserve's savings (highest-quality
        variant, batch of one, no cache, no coalescing), to measure what they save.
        """
        body = self._generation_body(
            prompt, n=n, size=size, seed=seed, quality=quality, negative_prompt=negative_prompt,
            deadline_s=deadline_s, model=model, user=user, policy=policy,
        )  # fmt: skip
        return self._generation_result(self._request("POST", "/v1/images/generations", json=body))

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
    """Asynchronous client, for many concurrent requests from one event loop."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )

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
    ) -> GenerationResult:
        """Generate ``n`` images; each comes with its energy receipt.

        ``policy="baseline"`` asks for serving without wattserve's savings (highest-quality
        variant, batch of one, no cache, no coalescing), to measure what they save.
        """
        body = self._generation_body(
            prompt, n=n, size=size, seed=seed, quality=quality, negative_prompt=negative_prompt,
            deadline_s=deadline_s, model=model, user=user, policy=policy,
        )  # fmt: skip
        body = await self._request("POST", "/v1/images/generations", json=body)
        return self._generation_result(body)

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
