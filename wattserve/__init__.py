"""wattserve client SDK: the only package a client application imports.

>>> from wattserve import Client
>>> with Client("http://127.0.0.1:8000") as ws:
...     result = ws.generate("a red cube", seed=7)          # doctest: +SKIP
...     print(result.receipts[0].joules, result.receipts[0].energy_source)  # doctest: +SKIP
"""

from wattserve._admin_client import AdminClient
from wattserve._client import AsyncClient, Client, GeneratedImage, GenerationResult
from wattserve._exceptions import (
    AdmissionRejected,
    Conflict,
    Forbidden,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    TransportError,
    Unauthorized,
    WattserveError,
    WorkerFailed,
)
from wattserve._schemas import (
    GenerationRequest,
    ImageGenerationBody,
    ImageGenerationResponse,
    LedgerEntry,
    Quality,
    Receipt,
    ReuseMode,
    VariantInfo,
)

__version__ = "0.1.0"

__all__ = [
    "AdminClient",
    "AdmissionRejected",
    "AsyncClient",
    "Client",
    "Conflict",
    "Forbidden",
    "GeneratedImage",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "ImageGenerationBody",
    "ImageGenerationResponse",
    "InvalidRequest",
    "LedgerEntry",
    "NotFound",
    "Quality",
    "Receipt",
    "ReuseMode",
    "ServiceUnavailable",
    "TransportError",
    "WorkerFailed",
    "Unauthorized",
    "VariantInfo",
    "WattserveError",
    "__version__",
]
