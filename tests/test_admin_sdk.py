"""The admin SDK through ``httpx.MockTransport``: exact requests out, typed models back."""

import json
from datetime import UTC, datetime

import httpx
import pytest

import wattserve
from wattserve import (
    AdminClient,
    AsyncClient,
    Client,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
    WattserveError,
)
from wattserve._admin_client import (
    ADMIN_TOKEN_ENV,
    ADMIN_TOKEN_FILE,
    admin_token_path,
    default_admin_token,
)

TOKEN = "adm_test-token"
NOW = "2026-05-01T12:00:00Z"
BUDGET = {"cluster_cap_w": 300.0, "joules_per_output_target": None, "node_caps_w": {},
          "updated_at": NOW, "revision": 3}  # fmt: skip
POLICY = {"default_quality": "standard", "max_batch_size": None, "max_wait_ms": 20.0,
          "share_unseeded": False, "cache_ttl_s": None, "cache_max_bytes": 1 << 30,
          "default_deadline_s": None, "allow_anonymous": True, "idempotency_ttl_s": 86400.0,
          "updated_at": None,
          "revision": 3}  # fmt: skip
TENANT = {"name": "acme", "key_prefix": "ws_abcd", "daily_kj": 5.0, "monthly_kj": None,
          "qualities": ["draft"], "rate_limit_per_min": None, "state": "active",
          "created_at": NOW, "revoked_at": None, "usage": []}  # fmt: skip
VARIANT = {"name": "tiny-x", "state": "deploying", "origin": "admin", "quality_score": 0.5,
           "power_w": 300.0, "steps": 2, "source": "builtin:tiny-x", "detail": None,
           "updated_at": NOW}  # fmt: skip
ROW = {"request_id": "req_1", "image_index": 0, "created_at": NOW, "user": None,
       "tenant": "acme", "variant": "tiny-x", "quality": "draft", "batch_id": "b1",
       "batch_size": 1, "joules": 2.5, "energy_source": "simulated", "cache": "miss",
       "status": "ok", "error": None, "latency_ms": 5.0, "seed": 1, "width_px": 64,
       "height_px": 64}  # fmt: skip
USAGE_ROW = {"key": "tiny-x", "requests": 1, "outputs": 1, "failed_outputs": 0, "joules": 2.5,
             "joules_per_output": 2.5, "joules_by_source": {"simulated": 2.5}}  # fmt: skip
REPORT = {"since": NOW, "until": None, "tenant": None, "outputs": 1, "joules": 2.5,
          "joules_per_output": 2.5, "joules_per_output_target": 3.0,
          "by_variant": [USAGE_ROW], "by_tenant": [{**USAGE_ROW, "key": "acme"}],
          "savings": {"baseline": "tiny-sd-large at batch 1, no cache",
                      "baseline_joules_per_output": 10.0, "outputs": 1,
                      "baseline_joules": 10.0, "achieved_joules": 2.5,
                      "by_cause_joules": {"variant_choice": 7.5},
                      "energy_sources": ["simulated"]}}  # fmt: skip
ONE_VARIANT = '[[variant]]\nname = "tiny-x"\nsource = "builtin:tiny-x"\nsteps = 2\n'


class Recorder:
    """A MockTransport handler that answers one canned response and keeps every request."""

    def __init__(self, status=200, body=None):
        self.status, self.body, self.requests = status, body, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body)

    @property
    def only(self) -> httpx.Request:
        assert len(self.requests) == 1
        return self.requests[0]


def admin(recorder) -> AdminClient:
    return AdminClient("http://ws", TOKEN, transport=httpx.MockTransport(recorder))


def sent_json(request: httpx.Request):
    return json.loads(request.content) if request.content else None


CALLS = [
    # (call, status, response, method, path, query, body)
    (lambda c: c.budget(), 200, BUDGET, "GET", "/admin/budgets", {}, None),
    (lambda c: c.set_budget(watts=300), 200, BUDGET, "PUT", "/admin/budgets", {},
     {"watts": 300.0}),
    (lambda c: c.set_budget(watts=None), 200, BUDGET, "PUT", "/admin/budgets", {},
     {"watts": None}),
    (lambda c: c.set_budget(watts=250, node="ab12"), 200, BUDGET, "PUT", "/admin/budgets", {},
     {"watts": 250.0, "node": "ab12"}),
    (lambda c: c.set_budget(joules_per_output=None), 200, BUDGET, "PUT", "/admin/budgets", {},
     {"joules_per_output": None}),
    (lambda c: c.policy(), 200, POLICY, "GET", "/admin/policies", {}, None),
    (lambda c: c.set_policy(max_batch_size=4, cache_ttl_s=None), 200, POLICY, "PUT",
     "/admin/policies", {}, {"max_batch_size": 4, "cache_ttl_s": None}),
    (lambda c: c.tenants(), 200, {"data": [TENANT]}, "GET", "/admin/tenants", {}, None),
    (lambda c: c.create_tenant("acme", daily_kj=5, qualities=["draft"]), 201,
     {"tenant": TENANT, "api_key": "ws_secret"}, "POST", "/admin/tenants", {},
     {"name": "acme", "daily_kj": 5.0, "qualities": ["draft"]}),
    (lambda c: c.tenant("acme"), 200, TENANT, "GET", "/admin/tenants/acme", {}, None),
    (lambda c: c.update_tenant("acme", monthly_kj=None, rate_limit_per_min=60), 200, TENANT,
     "PUT", "/admin/tenants/acme", {}, {"monthly_kj": None, "rate_limit_per_min": 60}),
    (lambda c: c.revoke_tenant("acme"), 200, {**TENANT, "state": "revoked"}, "DELETE",
     "/admin/tenants/acme", {}, None),
    (lambda c: c.variants(), 200, {"data": [VARIANT]}, "GET", "/admin/variants", {}, None),
    (lambda c: c.variant("tiny-x"), 200, VARIANT, "GET", "/admin/variants/tiny-x", {}, None),
    (lambda c: c.add_variant(ONE_VARIANT), 202, VARIANT, "POST", "/admin/variants", {},
     {"toml": ONE_VARIANT}),
    (lambda c: c.retire_variant("tiny-x"), 200, {**VARIANT, "state": "retiring"}, "DELETE",
     "/admin/variants/tiny-x", {}, None),
    (lambda c: c.ledger(), 200, {"object": "list", "data": [ROW]}, "GET", "/admin/ledger",
     {"limit": "100"}, None),
    (lambda c: c.ledger(tenant="acme", variant="tiny-x", status="failed",
                        since=datetime(2026, 5, 1, 12, tzinfo=UTC), limit=5),
     200, {"object": "list", "data": [ROW]}, "GET", "/admin/ledger",
     {"tenant": "acme", "variant": "tiny-x", "status": "failed",
      "since": "2026-05-01T12:00:00+00:00", "limit": "5"}, None),
    (lambda c: c.report(), 200, REPORT, "GET", "/admin/report", {}, None),
    (lambda c: c.report(since=datetime(2026, 5, 1), until=datetime(2026, 5, 2), tenant="acme"),
     200, REPORT, "GET", "/admin/report",
     {"since": "2026-05-01T00:00:00+00:00", "until": "2026-05-02T00:00:00+00:00",
      "tenant": "acme"}, None),
]  # fmt: skip


@pytest.mark.parametrize(("call", "status", "response", "method", "path", "query", "body"), CALLS)
def test_each_method_sends_exactly_one_request_and_decodes_it(
    call, status, response, method, path, query, body
):
    recorder = Recorder(status, response)
    with admin(recorder) as client:
        result = call(client)
    sent = recorder.only
    assert (sent.method, sent.url.path) == (method, path)
    assert dict(sent.url.params) == query
    assert sent_json(sent) == body
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert result is not None and not isinstance(result, dict)


def test_decoding_gives_typed_models():
    with admin(Recorder(201, {"tenant": TENANT, "api_key": "ws_secret"})) as client:
        created = client.create_tenant("acme")
    assert created.api_key == "ws_secret" and created.tenant.qualities == ["draft"]
    with admin(Recorder(200, {"object": "list", "data": [ROW]})) as client:
        (row,) = client.ledger()
    assert row.joules == 2.5 and row.created_at == datetime(2026, 5, 1, 12, tzinfo=UTC)
    with admin(Recorder(200, REPORT)) as client:
        report = client.report()
    assert report.savings.by_cause_joules == {"variant_choice": 7.5}
    assert report.by_tenant[0].key == "acme"


BAD_CALLS = [
    # (call, param the InvalidRequest names, substring of its message)
    (lambda c: c.set_budget(watts=-5), "watts", "greater than 0"),
    (lambda c: c.set_budget(watts=1e12), "watts", "less than or equal"),
    (lambda c: c.set_budget(watts=float("nan")), "watts", "finite"),
    (lambda c: c.set_budget(), None, "nothing to change"),
    (lambda c: c.set_budget(node="ab12"), None, "nothing to change"),
    (lambda c: c.set_budget(node="ab12", joules_per_output=3), "node", "cluster-wide"),
    (lambda c: c.set_budget(watts=5, node="node-1; rm -rf"), "node", "Ray node id"),
    (lambda c: c.set_policy(), None, "nothing to change"),
    (lambda c: c.set_policy(bogus=1), "bogus", "unsupported field"),
    (lambda c: c.set_policy(max_batch_size=0), "max_batch_size", "greater than or equal"),
    (lambda c: c.set_policy(default_quality="ultra"), "default_quality", "draft"),
    (lambda c: c.create_tenant("Acme Corp"), "name", "tenant name"),
    (lambda c: c.create_tenant("x'; DROP TABLE tenants;--"), "name", "tenant name"),
    (lambda c: c.create_tenant("acme", qualities=["ultra"]), "qualities.0", "draft"),
    (lambda c: c.create_tenant("acme", qualities=[]), "qualities", "at least 1"),
    (lambda c: c.create_tenant("acme", daily_kj=0), "daily_kj", "greater than 0"),
    (lambda c: c.create_tenant("acme", rate_limit_per_min=1.5), "rate_limit_per_min", "integer"),
    (lambda c: c.tenant("../admin/budgets"), "name", "tenant name"),
    (lambda c: c.update_tenant("acme"), None, "nothing to change"),
    (lambda c: c.update_tenant("acme", qualities=None, key="k"), "key", "unsupported"),
    (lambda c: c.revoke_tenant(""), "name", "tenant name"),
    (lambda c: c.variant("Tiny X"), "name", "variant name"),
    (lambda c: c.add_variant(""), "toml", "at least 1"),
    (lambda c: c.add_variant("[[variant]\nname="), "toml", "not valid TOML"),
    (lambda c: c.add_variant(ONE_VARIANT * 2), "toml", "exactly one"),
    (lambda c: c.add_variant('name = "x"\n'), "toml", "exactly one"),
    (lambda c: c.add_variant("[[variant]]\nsteps = 1\n"), "toml", "needs a name"),
    (lambda c: c.add_variant('[[variant]]\nname = "../x"\n'), "toml", "variant name"),
    (lambda c: c.ledger(limit=0), "limit", "1..10000"),
    (lambda c: c.ledger(limit=10_001), "limit", "1..10000"),
    (lambda c: c.ledger(status="meh"), "status", "ok or failed"),
    (lambda c: c.ledger(tenant="x'; DROP TABLE tenants;--"), "tenant", "tenant name"),
    (lambda c: c.report(since=datetime(2026, 5, 2), until=datetime(2026, 5, 1)), "since",
     "before until"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "param", "message"), BAD_CALLS)
def test_bad_input_fails_client_side_naming_the_field_and_sends_nothing(call, param, message):
    recorder = Recorder(200, {})
    with admin(recorder) as client, pytest.raises(InvalidRequest) as info:
        call(client)
    assert recorder.requests == []
    assert info.value.param == param
    assert message in info.value.message
    if param:
        assert info.value.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("status", "cls"), [(401, Unauthorized), (403, Forbidden), (404, NotFound), (409, Conflict)]
)
def test_server_errors_become_the_servers_exception(status, cls):
    body = {"error": {"message": "no", "type": "x", "param": None}}
    with admin(Recorder(status, body)) as client, pytest.raises(cls) as info:
        client.tenants()
    assert info.value.message == "no"


def test_a_response_of_another_shape_is_a_wattserve_error_not_a_pydantic_one():
    with admin(Recorder(200, {"cluster_cap_w": "lots"})) as client:
        with pytest.raises(WattserveError) as info:
            client.budget()
    assert type(info.value) is WattserveError and "BudgetInfo" in info.value.message


def test_wait_variant_polls_with_an_injected_clock_until_a_wanted_state():
    states = iter(["deploying", "deploying", "active"])
    sleeps = []

    def handler(request):
        return httpx.Response(200, json={**VARIANT, "state": next(states)})

    with AdminClient("http://ws", TOKEN, transport=httpx.MockTransport(handler)) as client:
        record = client.wait_variant(
            "tiny-x", ("active", "failed"), timeout_s=10, poll_s=2, clock=lambda: 0.0,
            sleep=sleeps.append,
        )  # fmt: skip
    assert record.state == "active" and sleeps == [2, 2]


def test_wait_variant_gives_up_at_the_timeout():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with admin(Recorder(200, VARIANT)) as client, pytest.raises(WattserveError) as info:
        client.wait_variant("tiny-x", ("active",), timeout_s=5, poll_s=1, clock=lambda: now[0],
                            sleep=sleep)  # fmt: skip
    assert "still deploying after 5 s" in info.value.message


# --- the admin token -------------------------------------------------------------------


def test_token_comes_from_the_environment_first_then_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    monkeypatch.setenv("WATTSERVE_HOME", str(tmp_path))
    assert default_admin_token() is None
    (tmp_path / ADMIN_TOKEN_FILE).write_text("from-file\n")
    assert admin_token_path() == tmp_path / "admin-token"
    assert default_admin_token() == "from-file"
    other = tmp_path / "other"
    other.mkdir()
    assert default_admin_token(other) is None  # an explicit home beats WATTSERVE_HOME
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    assert default_admin_token() == "from-env"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "")
    assert default_admin_token() == "from-file"


def test_an_unreadable_token_file_is_named_not_taken_for_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    (tmp_path / ADMIN_TOKEN_FILE).mkdir()  # a directory where the file should be
    with pytest.raises(WattserveError) as info:
        default_admin_token(tmp_path)
    assert str(tmp_path / ADMIN_TOKEN_FILE) in info.value.message


def test_admin_client_resolves_its_token_or_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    recorder = Recorder(200, BUDGET)
    transport = httpx.MockTransport(recorder)
    with pytest.raises(Unauthorized) as info:
        AdminClient("http://ws", home=tmp_path, transport=transport)
    assert str(tmp_path / "admin-token") in info.value.message
    assert "WATTSERVE_ADMIN_TOKEN" in info.value.message and "wattserve serve" in info.value.message
    assert recorder.requests == []
    (tmp_path / "admin-token").write_text("file-token")
    with AdminClient("http://ws", home=tmp_path, transport=transport) as client:
        client.budget()
    assert recorder.only.headers["authorization"] == "Bearer file-token"


def test_a_token_no_header_can_carry_is_refused_before_sending():
    with pytest.raises(Unauthorized):
        AdminClient("http://ws", "tok\nen")


# --- the tenant's own usage --------------------------------------------------------------


def test_usage_sends_the_api_key_and_decodes_the_tenant():
    recorder = Recorder(200, {**TENANT, "usage": [
        {"window": "day", "used_kj": 1.5, "quota_kj": 5.0, "resets_at": NOW}]})  # fmt: skip
    with Client("http://ws", api_key="ws_k", transport=httpx.MockTransport(recorder)) as c:
        info = c.usage()
    assert (recorder.only.method, recorder.only.url.path) == ("GET", "/v1/usage")
    assert recorder.only.headers["authorization"] == "Bearer ws_k"
    assert info.usage[0].used_kj == 1.5


async def test_async_usage_shares_the_decoding():
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=TENANT))
    async with AsyncClient("http://ws", api_key="ws_k", transport=transport) as client:
        info = await client.usage()
    assert info.name == "acme" and info.state == "active"


def test_admin_client_is_public():
    assert "AdminClient" in wattserve.__all__
