import base64
import io
import json

import httpx
import pytest
from PIL import Image

import wattserve
from wattserve import (
    AdmissionRejected,
    AsyncClient,
    Client,
    InvalidRequest,
    NotFound,
    TransportError,
    WattserveError,
)


def png(color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def generation_body(n=1):
    receipts = [
        {"request_id": "req_1", "image_index": i, "variant": "v", "batch_id": "b",
         "batch_size": n, "joules": 1.5, "energy_source": "simulated", "cache": "miss",
         "latency_ms": 3.0, "seed": 7 + i, "route_reason": "cheapest_capable",
         "width_px": 8, "height_px": 8}
        for i in range(n)
    ]  # fmt: skip
    data = [{"b64_json": base64.b64encode(png()).decode()} for _ in range(n)]
    route = {"variant": "v", "reason": "cheapest_capable", "expected_joules_per_output": 1.5,
             "candidates": []}  # fmt: skip
    return {
        "created": 0,
        "data": data,
        "wattserve": {"request_id": "req_1", "route": route, "receipts": receipts},
    }


def test_public_surface_is_small_and_importable():
    assert set(wattserve.__all__) >= {"Client", "AsyncClient", "Receipt", "WattserveError"}
    for name in wattserve.__all__:
        assert hasattr(wattserve, name), name


def test_generate_sends_openai_body_and_decodes_receipts():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["body"] = json.loads(request.content)
        seen["auth"] = request.headers.get("authorization")
        return httpx.Response(200, json=generation_body(n=2))

    with Client("http://ws", api_key="k", transport=httpx.MockTransport(handler)) as client:
        result = client.generate("a red cube", n=2, seed=7, quality="high")
    assert seen["path"] == "/v1/images/generations"
    assert seen["body"] == {
        "prompt": "a red cube", "n": 2, "size": "64x64", "quality": "high", "model": "auto",
        "response_format": "b64_json", "seed": 7,
    }  # fmt: skip
    assert seen["auth"] == "Bearer k"
    assert [r.seed for r in result.receipts] == [7, 8]
    assert result.joules == 3.0
    assert result.images[0].image.size == (8, 8)


@pytest.mark.parametrize(
    ("status", "cls", "param"),
    [(400, InvalidRequest, "size"), (404, NotFound, "model"), (500, WattserveError, None)],
)
def test_http_errors_become_the_servers_exception(status, cls, param):
    body = {"error": {"message": "bad thing", "type": "x", "param": param}}
    transport = httpx.MockTransport(lambda _: httpx.Response(status, json=body))
    with Client("http://ws", transport=transport) as client, pytest.raises(cls) as info:
        client.generate("x")
    assert info.value.message == "bad thing"
    assert info.value.param == param


def test_rate_limit_carries_retry_after():
    transport = httpx.MockTransport(
        lambda _: httpx.Response(
            429, json={"error": {"message": "hot"}}, headers={"Retry-After": "3"}
        )
    )
    with Client("http://ws", transport=transport) as client, pytest.raises(AdmissionRejected) as i:
        client.variants()
    assert i.value.retry_after_s == 3.0


def test_non_json_error_still_has_a_reason():
    transport = httpx.MockTransport(lambda _: httpx.Response(502, text="upstream exploded"))
    with Client("http://ws", transport=transport) as client, pytest.raises(WattserveError) as i:
        client.health()
    assert "upstream exploded" in i.value.message


def test_unreachable_service_is_a_transport_error():
    with Client("http://127.0.0.1:9", timeout_s=2) as client, pytest.raises(TransportError):
        client.health()


async def test_async_client_shares_the_decoding():
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=generation_body()))
    async with AsyncClient("http://ws", transport=transport) as client:
        result = await client.generate("x", seed=7)
    assert result.request_id == "req_1" and result.receipts[0].energy_source == "simulated"
