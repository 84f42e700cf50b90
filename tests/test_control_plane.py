"""The control plane on the shared live service: auth, live budgets, tenants, variants.

Every test leaves the service as it found it (uncapped, default policy, no active
tenant), because the rest of the suite shares the same service.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray

LIVE_S = 2.0  # the bound: a change shows everywhere within 2 s


@pytest.fixture()
def admin(service) -> Iterator[httpx.Client]:
    token = service.admin_token
    with httpx.Client(
        base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as client:
        yield client
        client.put("/admin/budgets", json={"watts": None, "joules_per_output": None})
        for node in client.get("/admin/budgets").json()["node_caps_w"]:
            client.put("/admin/budgets", json={"watts": None, "node": node})
        client.put("/admin/policies", json={"default_quality": "standard",
                                            "allow_anonymous": False,
                                            "default_reuse": "exact"})  # fmt: skip
        for tenant in client.get("/admin/tenants").json()["data"]:
            if tenant["state"] == "active":
                client.delete(f"/admin/tenants/{tenant['name']}")


def eventually(check, timeout_s: float = LIVE_S) -> None:
    """Poll ``check`` until it holds: control changes reach every replica within 2 s."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        time.sleep(0.05)


def model_ids(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]


def as_key(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


ADMIN_ROUTES = [
    ("GET", "/admin/budgets", None),
    ("PUT", "/admin/budgets", {"watts": 1}),
    ("GET", "/admin/policies", None),
    ("PUT", "/admin/policies", {"max_wait_ms": 1}),
    ("GET", "/admin/tenants", None),
    ("POST", "/admin/tenants", {"name": "intruder"}),
    ("GET", "/admin/tenants/intruder", None),
    ("PUT", "/admin/tenants/intruder", {"daily_kj": 1}),
    ("DELETE", "/admin/tenants/intruder", None),
    ("GET", "/admin/variants", None),
    ("POST", "/admin/variants", {"toml": "name = 'x'"}),
    ("DELETE", "/admin/variants/tiny-sd-turbo", None),
    ("GET", "/admin/ledger", None),
    ("GET", "/admin/report", None),
]


@pytest.mark.parametrize("token", [None, "wrong-token", "ws_" + "x" * 43])
def test_admin_api_answers_401_without_the_token_and_changes_nothing(admin, url, token):
    before = admin.get("/admin/budgets").json(), admin.get("/admin/tenants").json()
    with as_key(url, token) as anyone:
        for method, path, body in ADMIN_ROUTES:
            response = anyone.request(method, path, json=body)
            assert response.status_code == 401, (method, path, response.text)
            assert "admin" in response.json()["error"]["message"]
    assert (admin.get("/admin/budgets").json(), admin.get("/admin/tenants").json()) == before
    assert token is None or token not in admin.get("/admin/ledger").text


def test_budget_set_is_in_status_within_two_seconds(admin, url):
    set_at = time.monotonic()
    assert admin.put("/admin/budgets", json={"watts": 300}).status_code == 200
    while True:
        budget = httpx.get(f"{url}/v1/status", timeout=10).json()["budget"]
        if budget["cluster_cap_w"] == 300:
            break
        assert time.monotonic() - set_at < LIVE_S, budget
        time.sleep(0.05)
    assert budget["updated_at"] is not None and budget["revision"] >= 1
    cleared = admin.put("/admin/budgets", json={"watts": None}).json()
    assert cleared["cluster_cap_w"] is None


def test_a_node_cap_holds_then_refuses_work_that_would_exceed_it(admin, url):
    node = httpx.get(f"{url}/v1/status").json()["nodes"][0]["node_id"]
    # 4 simulated GPUs idle at 70 W: a 450 W "high" batch never fits under 700 W on the node
    capped = admin.put("/admin/budgets", json={"watts": 700, "node": node[:12]})
    assert capped.json()["node_caps_w"] == {node[:12]: 700}
    refused = httpx.post(
        f"{url}/v1/images/generations",
        timeout=120,
        json={"prompt": "too hot for the node", "seed": 31, "quality": "high"},
    )
    assert refused.status_code == 429 and "power cap" in refused.json()["error"]["message"]
    served = httpx.post(
        f"{url}/v1/images/generations",
        timeout=120,
        json={"prompt": "cool enough", "seed": 32, "quality": "draft"},
    )
    assert served.status_code == 200  # the 350 W turbo batch fits
    cleared = admin.put("/admin/budgets", json={"watts": None, "node": node[:12]})
    assert cleared.json()["node_caps_w"] == {}


def test_policy_default_tier_applies_to_the_next_request(admin, url):
    body = {"prompt": "policy default", "seed": 11}  # names no quality tier
    assert admin.put("/admin/policies", json={"default_quality": "draft"}).status_code == 200
    draft = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()
    assert draft["wattserve"]["route"]["variant"] == "tiny-sd-turbo", draft["wattserve"]["route"]
    admin.put("/admin/policies", json={"default_quality": "high"})
    high = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()
    assert high["wattserve"]["route"]["variant"] == "tiny-sd-large"


def generate(client: httpx.Client, prompt: str, **extra: object) -> httpx.Response:
    return client.post("/v1/images/generations", json={"prompt": prompt, **extra})


def test_tenants_see_only_their_ledger_and_quotas_refuse_with_the_reason(admin, url, service):
    made = admin.post("/admin/tenants", json={"name": "tenant-a", "daily_kj": 0.001})
    assert made.status_code == 201
    key_a = made.json()["api_key"]
    key_b = admin.post("/admin/tenants", json={"name": "tenant-b", "qualities": ["draft"]}).json()[
        "api_key"
    ]
    assert key_a not in admin.get("/admin/tenants").text  # shown once, never again
    with as_key(url, None) as anonymous, as_key(url, key_a) as a, as_key(url, key_b) as b:
        refused = generate(anonymous, "who am i", seed=1)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        assert generate(a, "for a", seed=21, quality="draft").status_code == 200
        assert generate(b, "for b", seed=22, quality="draft").status_code == 200
        forbidden = generate(b, "too good for b", seed=23, quality="high")
        assert forbidden.status_code == 403 and "draft" in forbidden.json()["error"]["message"]
        rows_a = a.get("/v1/ledger").json()["data"]
        rows_b = b.get("/v1/ledger").json()["data"]
        assert rows_a and {r["tenant"] for r in rows_a} == {"tenant-a"}
        assert rows_b and {r["tenant"] for r in rows_b} == {"tenant-b"}
        over = generate(a, "one more for a", seed=24, quality="draft")
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
        message = over.json()["error"]["message"]
        assert "daily energy quota" in message and "resets at" in message
        usage = a.get("/v1/usage").json()
        assert usage["name"] == "tenant-a" and usage["usage"][0]["used_kj"] >= 0.001
        by_tenant = admin.get("/admin/report").json()["by_tenant"]
        assert {"tenant-a", "tenant-b"} <= {u["key"] for u in by_tenant}
        assert (
            admin.get("/admin/ledger", params={"tenant": "tenant-b"}).json()["data"][0]["tenant"]
            == "tenant-b"
        )
        assert b.get("/v1/report").status_code == 403  # the books span every tenant
        admin.delete("/admin/tenants/tenant-b")
        revoked = generate(b, "after revocation", seed=25, quality="draft")
        assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]
    secrets = [key_a, key_b, admin.headers["authorization"].removeprefix("Bearer ")]
    for path in Path(service.settings.ray_tmpdir).rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
            assert not any(s.encode() in text for s in secrets), f"a secret is in {path}"


def _reuse(client: httpx.Client, prompt: str, **extra: object) -> dict:
    answer = generate(client, prompt, quality="high", **extra)
    assert answer.status_code == 200, answer.text
    return answer.json()["wattserve"]["receipts"][0]


def test_latents_cross_tenants_only_inside_a_pool_the_admin_made(admin, url):
    keys = {name: admin.post("/admin/tenants", json={"name": name, **extra}).json()["api_key"]
            for name, extra in (("reuse-a", {}), ("reuse-b", {}),
                                ("reuse-c", {"approximate_reuse": False}))}  # fmt: skip
    with as_key(url, keys["reuse-a"]) as a, as_key(url, keys["reuse-b"]) as b, \
            as_key(url, keys["reuse-c"]) as c:  # fmt: skip
        first = _reuse(a, "a pooled harbour", reuse="approximate")
        assert _reuse(b, "a pooled harbour", reuse="approximate")["cache"] == "miss"
        refused = generate(c, "a pooled harbour", quality="high", reuse="approximate")
        assert refused.status_code == 403 and "reuse" in refused.json()["error"]["message"]
        for name in ("reuse-a", "reuse-b"):
            assert (
                admin.put(f"/admin/tenants/{name}", json={"reuse_pool": "team"}).status_code == 200
            )
        # latents kept while a was in a pool of its own stay there: a pool shares what
        # its members generate from the moment they join it
        made_by_b = _reuse(b, "a pooled harbour", reuse="approximate")
        assert made_by_b["cache"] == "miss"
        pooled = _reuse(a, "a pooled harbour", reuse="approximate")
        assert pooled["cache"] == "approximate" and pooled["steps_skipped"] > 0
        assert pooled["reuse_source"] is None  # b's output: a is not told which
        own = _reuse(b, "a pooled harbour", reuse="approximate")
        assert own["reuse_source"] == f"{made_by_b['request_id']}.0"
        assert first["cache"] == "miss"
        admin.put("/admin/policies", json={"default_reuse": "approximate"})
        assert _reuse(a, "a pooled harbour")["cache"] == "approximate"  # the policy's default
        assert _reuse(a, "a pooled harbour", seed=5)["cache"] == "miss"  # a seed keeps its bytes
        assert _reuse(c, "a pooled harbour")["cache"] == "miss"  # not allowed: served exactly


MINI = """
[[variant]]
name = "tiny-sd-mini"
source = "builtin:tiny-sd-mini"
steps = 24
guidance_scale = 1.0
max_size_px = 128
quality_score = 0.3
quality_provenance = "declared: test variant"
power_w = 300.0
resources = { num_cpus = 0.25 }
builtin = { unet_block_out_channels = [32, 64], unet_layers_per_block = 1, init_seed = 5 }

[variant.energy_prior]
joules_per_image = { 1 = 10.0 }
provenance = "declared for a test"
"""


def wait_state(admin: httpx.Client, name: str, state: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = admin.get(f"/admin/variants/{name}").json()
        if record["state"] == state:
            return record
        assert record["state"] != "failed", record
        time.sleep(0.25)
    raise AssertionError(f"{name} not {state} after {timeout_s}s: {record}")


def test_a_variant_is_added_routed_to_and_retired_live(admin, url):
    added = admin.post("/admin/variants", json={"toml": MINI})
    assert added.status_code == 202 and added.json()["state"] == "deploying"
    wait_state(admin, "tiny-sd-mini", "active")
    eventually(lambda: "tiny-sd-mini" in model_ids(url))
    body = {"prompt": "new variant", "seed": 3, "model": "tiny-sd-mini"}
    made = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
    assert made.status_code == 200, made.text
    assert made.json()["wattserve"]["receipts"][0]["variant"] == "tiny-sd-mini"
    # Retire while a slow request (24 steps x 4 images) is in flight: it must still finish.
    in_flight: dict[str, object] = {}

    def slow_request() -> None:
        slow = {"prompt": "drain me", "seed": 5, "model": "tiny-sd-mini", "n": 4,
                "size": "128x128"}  # fmt: skip
        in_flight["response"] = httpx.post(f"{url}/v1/images/generations", json=slow,
                                           timeout=120)  # fmt: skip
        in_flight["done_at"] = time.monotonic()

    worker = threading.Thread(target=slow_request)
    worker.start()
    time.sleep(0.5)
    assert admin.delete("/admin/variants/tiny-sd-mini").json()["state"] == "retiring"
    retire_returned_at = time.monotonic()
    assert "tiny-sd-mini" not in model_ids(url)  # the replica that retired it, at once
    wait_state(admin, "tiny-sd-mini", "retired")
    worker.join()
    drained = in_flight["response"]
    assert drained.status_code == 200, drained.text  # type: ignore[union-attr]
    assert in_flight["done_at"] > retire_returned_at  # it really was in flight: drained
    body["seed"] = 4
    gone = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
    assert gone.status_code == 404


SQLISH = "x'; DROP TABLE tenants;--"
BAD_ADMIN_INPUTS = [
    # (method, path, body, status, message contains)
    ("PUT", "/admin/budgets", {"watts": -5}, 400, "watts"),
    ("PUT", "/admin/budgets", {"watts": 1e12}, 400, "watts"),
    ("PUT", "/admin/budgets", {"watts": 0}, 400, "watts"),
    ("PUT", "/admin/budgets", {"watts": "300"}, 400, "watts"),
    ("PUT", "/admin/budgets", {"watts": 300, "volts": 5}, 400, "unsupported field"),
    ("PUT", "/admin/budgets", {}, 400, "nothing to change"),
    ("PUT", "/admin/budgets", {"watts": 300, "node": "zz-not-hex"}, 400, "node"),
    ("PUT", "/admin/budgets", {"watts": 300, "node": "ffffffff"}, 400, "no node"),
    ("PUT", "/admin/budgets", {"joules_per_output": -1}, 400, "joules_per_output"),
    ("PUT", "/admin/policies", {"default_quality": "ultra"}, 400, "default_quality"),
    ("PUT", "/admin/policies", {"max_batch_size": 0}, 400, "max_batch_size"),
    ("PUT", "/admin/policies", {"share_unseeded": None}, 400, "may not be null"),
    ("PUT", "/admin/policies", {"cache_ttl_s": -3}, 400, "cache_ttl_s"),
    ("POST", "/admin/tenants", {"name": SQLISH}, 400, "tenant name"),
    ("POST", "/admin/tenants", {"name": "Upper"}, 400, "tenant name"),
    ("POST", "/admin/tenants", {"name": "ok", "daily_kj": -1}, 400, "daily_kj"),
    ("POST", "/admin/tenants", {"name": "ok", "qualities": []}, 400, "qualities"),
    ("POST", "/admin/tenants", {"name": "ok", "qualities": ["ultra"]}, 400, "qualities"),
    ("POST", "/admin/tenants", {"name": "ok", "key_hash": "mine"}, 400, "unsupported field"),
    ("PUT", "/admin/tenants/nobody", {"daily_kj": 1}, 404, "no tenant"),
    ("DELETE", "/admin/tenants/nobody", None, 404, "no tenant"),
    ("GET", f"/admin/tenants/{SQLISH}", None, 400, "name"),
    ("POST", "/admin/variants", {"toml": "this is [not toml"}, 400, "TOML"),
    ("POST", "/admin/variants", {"toml": "name = 'x'"}, 400, "variant field"),
    ("POST", "/admin/variants", {"toml": MINI.replace("steps = 24", "steps = 0")}, 400, "steps"),
    ("POST", "/admin/variants", {"toml": MINI + MINI}, 400, "exactly one"),
    ("POST", "/admin/variants", {"toml": MINI.replace("tiny-sd-mini", "tiny-sd-turbo")}, 409,
     "already exists"),
    ("POST", "/admin/variants", {"toml": "x" * 70_000}, 400, "body larger than"),
    ("DELETE", "/admin/variants/nope", None, 404, "no variant"),
    ("GET", "/admin/ledger", {"limit": 0}, 400, "limit"),
    ("GET", "/admin/ledger", {"since": "yesterday"}, 400, "since"),
    ("GET", "/admin/ledger", {"tenant": SQLISH}, 400, "tenant"),
    ("GET", "/admin/report", {"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
     400, "before"),
]  # fmt: skip


def test_bad_admin_inputs_get_a_clear_4xx_and_change_nothing(admin):
    admin.post("/admin/tenants", json={"name": "existing"})
    before = [admin.get(p).json() for p in ("/admin/budgets", "/admin/policies",
                                            "/admin/tenants", "/admin/variants")]  # fmt: skip
    for method, path, body, status, needle in BAD_ADMIN_INPUTS:
        if method == "GET":
            response = admin.get(path, params=body)
        else:
            response = admin.request(method, path, json=body)
        assert response.status_code == status, (method, path, body, response.text)
        assert needle in response.json()["error"]["message"], (path, body, response.text)
    duplicate = admin.post("/admin/tenants", json={"name": "existing"})
    assert duplicate.status_code == 409
    after = [admin.get(p).json() for p in ("/admin/budgets", "/admin/policies",
                                           "/admin/tenants", "/admin/variants")]  # fmt: skip
    assert after == before
