"""End to end over HTTP against the shared local Ray + Serve app."""

import base64
import hashlib
import io

import httpx
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image

from wattserve import Client, InvalidRequest, NotFound

pytestmark = pytest.mark.ray


def ledger_count(url):
    return len(httpx.get(f"{url}/v1/ledger", params={"limit": 1000}).json()["data"])


def test_health_and_models_list_the_catalog(url, catalog):
    with Client(url) as client:
        assert client.health().variants == sorted(catalog.names)
        listed = client.variants()
    assert [v.id for v in listed] == catalog.names
    assert all(v.quality_provenance and v.energy_prior_provenance for v in listed)


def test_sdk_generate_is_reproducible_and_every_output_is_in_the_ledger(url):
    with Client(url) as client:
        first = client.generate("reproducible cube", seed=7, n=2, quality="standard", user="al")
        again = client.generate("reproducible cube", seed=7, n=2, quality="standard", user="al")
        rows = client.ledger(limit=20)
    digests = [[hashlib.sha256(i.png_bytes).hexdigest() for i in r.images] for r in (first, again)]
    assert digests[0] == digests[1]
    assert digests[0][0] != digests[0][1]  # image 1 uses seed 8
    assert first.request_id != again.request_id
    for result in (first, again):
        mine = sorted(
            (r for r in rows if r.request_id == result.request_id), key=lambda r: r.image_index
        )
        assert [(r.joules, r.variant, r.status, r.user, r.cache) for r in mine] == [
            (x.joules, x.variant, "ok", "al", x.cache) for x in result.receipts
        ]
    assert all(r.energy_source == "simulated" and r.joules > 0 for r in first.receipts)
    assert {r.cache for r in first.receipts} == {"miss"}
    # the repeat is served from the result cache: no GPU work, 0 J, pointing at who paid
    assert [(r.cache, r.joules, r.batch_id) for r in again.receipts] == [
        ("hit", 0.0, f"hit:{first.request_id}.{i}") for i in range(2)
    ]


@pytest.mark.parametrize(
    ("quality", "variant"),
    [("draft", "tiny-sd-turbo"), ("standard", "tiny-sd-medium"), ("high", "tiny-sd-large")],
)
def test_routing_by_tier_over_the_wire(url, quality, variant):
    with Client(url) as client:
        result = client.generate(f"a tiny house for {quality}", seed=1, quality=quality)
    receipt = result.receipts[0]
    assert (receipt.variant, receipt.route_reason) == (variant, "cheapest_capable"), result.route
    assert result.route.variant == variant and len(result.route.candidates) == 3
    chosen = next(c for c in result.route.candidates if c.variant == variant)
    assert all(
        c.rejected_because or c.expected_joules_per_output >= chosen.expected_joules_per_output
        for c in result.route.candidates
    )


def test_official_openai_client_works_unchanged(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        prompt="a blue ball", n=1, size="96x64", response_format="b64_json",
        extra_body={"seed": 3, "quality": "draft"},
    )  # fmt: skip
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert (image.format, image.size) == ("PNG", (96, 64))
    assert result.model_extra["wattserve"]["receipts"][0]["energy_source"] == "simulated"
    with pytest.raises(BadRequestError) as info:
        client.images.generate(prompt="x", size="4096x4096", response_format="b64_json")
    assert "size" in str(info.value) and info.value.body["param"] == "size"
    assert [m.id for m in client.models.list()][0] == "tiny-sd-large"


BAD_BODIES = [
    (b"not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": "' + b"x" * 2001 + b'"}', "prompt"),
    (b'{"prompt": "x", "size": "64"}', "size"),
    (b'{"prompt": "x", "size": "2048x2048"}', "size"),
    (b'{"prompt": "x", "size": "60x64"}', "size"),
    (b'{"prompt": "x", "n": 0}', "n"),
    (b'{"prompt": "x", "n": 99}', "n"),
    (b'{"prompt": "x", "n": "2"}', "n"),
    (b'{"prompt": "x", "quality": "ultra"}', "quality"),
    (b'{"prompt": "x", "model": "dall-e-3"}', "model"),
    (b'{"prompt": "x", "seed": "seven"}', "seed"),
    (b'{"prompt": "x", "response_format": "url"}', "response_format"),
    (b'{"prompt": ["x"]}', "prompt"),
]


@pytest.mark.parametrize(("raw", "param"), BAD_BODIES)
def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(url, raw, param):
    before = ledger_count(url)
    response = httpx.post(
        f"{url}/v1/images/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert ledger_count(url) == before
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_unknown_route_and_bad_query_are_json_errors(url):
    missing = httpx.get(f"{url}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    bad_limit = httpx.get(f"{url}/v1/ledger", params={"limit": 0})
    assert bad_limit.status_code == 400 and bad_limit.json()["error"]["param"] == "limit"


def test_sdk_raises_typed_errors_from_the_server(url):
    with Client(url) as client:
        with pytest.raises(InvalidRequest) as info:
            client.generate("x", size="13x13")
        assert info.value.param == "size"
        with pytest.raises(NotFound):
            client.generate("x", model="nope")


def test_64_identical_concurrent_requests_make_one_generation(url):
    import asyncio

    from wattserve import AsyncClient

    async def burst():
        async with AsyncClient(url) as client:
            return await asyncio.gather(
                *(client.generate("one flight only", seed=64, quality="high") for _ in range(64))
            )

    results = asyncio.run(burst())
    assert len({r.images[0].png_bytes for r in results}) == 1
    caches = [r.receipts[0].cache for r in results]
    assert caches.count("miss") == 1
    assert set(caches) <= {"miss", "coalesced", "hit"}
    with Client(url) as client:
        ids = {r.request_id for r in results}
        rows = [r for r in client.ledger(limit=1000) if r.request_id in ids]
    assert len(rows) == 64
    assert len({r.batch_id for r in rows if r.cache != "hit"}) == 1
    generated = {r.batch_id for r in rows if r.cache == "miss"}
    assert len(generated) == 1


def test_32_distinct_concurrent_requests_are_batched(url):
    import asyncio

    from wattserve import AsyncClient

    async def burst():
        async with AsyncClient(url) as client:
            return await asyncio.gather(
                *(client.generate(f"distinct {i}", seed=1000 + i, quality="draft")
                  for i in range(32))
            )  # fmt: skip

    results = asyncio.run(burst())
    receipts = [r.receipts[0] for r in results]
    assert {r.cache for r in receipts} == {"miss"}
    # more than Serve's default 5 requests in the scheduler at once: batches can fill
    assert max(r.batch_size for r in receipts) > 5
    with Client(url) as client:
        rows = {(r.request_id, r.batch_id, r.batch_size) for r in client.ledger(limit=1000)}
    mine = [row for row in rows if row[0] in {r.request_id for r in results}]
    batches = {}
    for _, batch_id, size in mine:
        batches[batch_id] = size
    assert sum(batches.values()) == 32  # every output in exactly one batch, sizes add up


def test_an_approximate_repeat_resumes_from_the_first_ones_latent(url):
    """Issue 13's check: same prompt, unseeded, ``reuse: approximate``, twice."""
    with Client(url) as client:
        # a size no other test asks for: its latent space starts empty (every test here
        # shares the anonymous pool, and random encoders find any prompt "similar")
        ask = {"quality": "high", "reuse": "approximate", "size": "104x72"}
        first = client.generate("a lighthouse in approximate fog", **ask).receipts[0]
        second = client.generate("a lighthouse in approximate fog", **ask).receipts[0]
        rows = {r.request_id: r for r in client.ledger(limit=50)}
    assert (first.cache, first.steps_skipped) == ("miss", 0)
    assert second.cache == "approximate" and second.steps_skipped > 0
    assert second.similarity is not None and second.similarity > 0.99
    assert second.reuse_source == f"{first.request_id}.0"
    assert second.joules < first.joules and second.energy_source == "simulated"
    row = rows[second.request_id]
    assert (row.cache, row.steps_skipped, row.reuse_source) == (
        "approximate", second.steps_skipped, second.reuse_source,
    )  # fmt: skip
