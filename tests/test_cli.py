"""The CLI through Typer's CliRunner: against the shared live service (``ray``), against
an ``httpx.MockTransport`` fake of the service, and with input that must fail before
anything is sent."""

import json
import os
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

import wattserve.cli._common as cli_common
from tests.test_admin_sdk import BUDGET, POLICY, REPORT, ROW, TENANT, VARIANT
from tests.test_sdk import generation_body
from wattserve.cli.main import app

runner = CliRunner()
DOWN = "http://127.0.0.1:9"  # nothing listens: a request that gets out fails with exit 1
NO_CREDENTIALS = {"WATTSERVE_ADMIN_TOKEN": None, "WATTSERVE_API_KEY": None}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A state dir with no admin token, and no credentials in the environment."""
    monkeypatch.setenv("WATTSERVE_HOME", str(tmp_path))
    for name in NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.ray
def test_generate_json_twice_gives_identical_bytes_and_receipts(url, tmp_path):
    args = ["generate", "a red cube", "--seed", "7", "--json", "--url", url, "--out", str(tmp_path)]
    first, again = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    one, two = json.loads(first.stdout), json.loads(again.stdout)
    assert one["images"][0]["sha256"] == two["images"][0]["sha256"]
    receipt = one["images"][0]["receipt"]
    assert receipt["energy_source"] == "simulated" and receipt["seed"] == 7
    assert set(receipt) >= {
        "request_id",
        "variant",
        "batch_id",
        "batch_size",
        "joules",
        "cache",
        "latency_ms",
    }
    saved = tmp_path / f"{one['request_id']}-0.png"
    assert saved.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_variants_and_ledger_print_tables_and_json(url, catalog, home):
    table = runner.invoke(app, ["variants", "list", "--url", url])
    assert table.exit_code == 0 and "tiny-sd-turbo" in table.stdout
    listed = json.loads(runner.invoke(app, ["variants", "list", "--url", url, "--json"]).stdout)
    assert [v["id"] for v in listed] == catalog.names
    runner.invoke(app, ["generate", "ledger check", "--seed", "1", "--url", url])
    rows = json.loads(runner.invoke(app, ["ledger", "--url", url, "--limit", "3", "--json"]).stdout)
    assert 1 <= len(rows) <= 3 and all(r["energy_source"] for r in rows)
    assert runner.invoke(app, ["ledger", "--url", url]).exit_code == 0


@pytest.mark.ray
def test_server_side_rejection_is_one_line_on_stderr(url):
    result = runner.invoke(app, ["generate", "x", "--size", "7x7", "--url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: size:") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_bad_flags_and_unreachable_service_exit_non_zero(home):
    bad_tier = runner.invoke(app, ["generate", "x", "--quality", "ultra"])
    assert bad_tier.exit_code == 2 and "draft, standard or high" in bad_tier.stderr
    down = runner.invoke(app, ["variants", "list", "--url", DOWN])
    assert down.exit_code == 1 and "cannot reach wattserve" in down.stderr
    bad_limit = runner.invoke(app, ["ledger", "--limit", "0"])
    assert bad_limit.exit_code == 2


def test_serve_with_invalid_catalog_fails_fast_naming_file_and_field(tmp_path):
    catalog = tmp_path / "bad.toml"
    catalog.write_text('[[variant]]\nname = "v"\nsource = "/x"\nsteps = 0\n')
    env = {**os.environ, "WATTSERVE_CATALOG": str(catalog), "WATTSERVE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert str(catalog) in done.stderr and "field 'steps'" in done.stderr
    assert "Traceback" not in done.stderr


# --- input that must be refused before anything is sent ---------------------------------

TWO_VARIANTS = '[[variant]]\nname = "a"\n\n[[variant]]\nname = "b"\n'
SQL_NAME = "x'; DROP TABLE tenants;--"

BAD_CLI_INPUTS = [
    # (args, substring of the one-line error, exit code)
    (["budget", "set", "--watts", "-5"], "error: --watts: Input should be greater than 0", 2),
    (["budget", "set", "--watts", "1e12"], "--watts: Input should be less than or equal", 2),
    (["budget", "set", "--watts", "nan"], "--watts: Input should be a finite number", 2),
    (["budget", "set", "--watts", "300", "--no-cap"], "contradict each other", 2),
    (["budget", "set", "--node", "ab12", "--joules-per-output", "3"], "cluster-wide", 2),
    (["budget", "set", "--watts", "300", "--node", "n1; rm -rf /"], "--node: node must be", 2),
    (["budget", "set"], "nothing to change", 2),
    (["policy", "set"], "nothing to change", 2),
    (["policy", "set", "--max-batch-size", "0"], "--max-batch-size: Input should be greater", 2),
    (["policy", "set", "--default-quality", "ultra"], "--default-quality: Input should be", 2),
    (["policy", "set", "--max-wait-ms", "-1"], "--max-wait-ms:", 2),
    (["policy", "set", "--cache-ttl-s", "5", "--no-cache-ttl"], "contradict each other", 2),
    (["tenant", "create", "acme", "--quality", "draft,,high"], "tiers separated by commas", 2),
    (["tenant", "create", "acme", "--quality", ""], "tiers separated by commas", 2),
    (["tenant", "create", "acme", "--quality", "draft;high"], "unknown tier 'draft;high'", 2),
    (["tenant", "create", "acme", "--quality", "ultra"], "unknown tier 'ultra'", 2),
    (["tenant", "create", "acme", "--quality", "draft,draft"], "listed twice", 2),
    (["tenant", "create", SQL_NAME], "NAME: tenant name must be 1-64 of a-z", 2),
    (["tenant", "create", "Acme Corp"], "NAME: tenant name must be", 2),
    (["tenant", "create", "acme", "--daily-kj", "1e13"], "--daily-kj: Input should be less", 2),
    (["tenant", "create", "acme", "--rate-limit-per-min", "0"], "--rate-limit-per-min:", 2),
    (["tenant", "show", SQL_NAME], "NAME: tenant name", 2),
    (["tenant", "revoke", "../../admin/budgets"], "NAME: tenant name", 2),
    (["tenant", "set", SQL_NAME, "--daily-kj", "5"], "NAME: tenant name", 2),
    (["tenant", "set", "acme"], "nothing to change", 2),
    (["tenant", "set", "acme", "--daily-kj", "-1"], "--daily-kj: Input should be greater", 2),
    (["tenant", "set", "acme", "--daily-kj", "5", "--no-daily-quota"], "contradict", 2),
    (["tenant", "set", "acme", "--quality", "high,ultra"], "unknown tier 'ultra'", 2),
    (["variants", "add", "{missing}"], "cannot read: No such file", 2),
    (["variants", "add", "{two}"], "exactly one [[variant]] table and nothing else (found 2)", 2),
    (["variants", "add", "{invalid}"], "toml: not valid TOML", 2),
    (["variants", "add", "{empty}"], "toml: String should have at least 1 character", 2),
    (["variants", "retire", SQL_NAME], "NAME: variant name must be", 2),
    (["ledger", "--since", "yesterday"], "--since: want an ISO 8601 time", 2),
    (["ledger", "--since", "24 hours"], "--since: want an ISO 8601 time", 2),
    (["ledger", "--since", "999999d"], "--since: '999999d' reaches back before year 1", 2),
    (["ledger", "--status", "meh"], "--status: want ok or failed", 2),
    (["ledger", "--tenant", SQL_NAME], "--tenant: tenant name must be", 2),
    (["ledger", "--variant", "a/b"], "--variant: variant name must be", 2),
    (["ledger", "--limit", "0"], "--limit: must be 1..10000", 2),
    (["ledger", "--limit", "10001"], "--limit: must be 1..10000", 2),
    (["ledger", "--format", "xml"], "--format: want table, json, csv", 2),
    (["ledger", "--json", "--format", "csv"], "contradict each other", 2),
    (["report", "--since", "1d", "--until", "2d"], "--since: must be before until", 2),
    (["report", "--until", "soon"], "--until: want an ISO 8601 time", 2),
    (["report", "--tenant", SQL_NAME], "--tenant: tenant name must be", 2),
    (["usage"], "give --api-key", 2),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected", "code"), BAD_CLI_INPUTS)
def test_bad_input_is_one_line_exit_2_before_any_request(args, expected, code, home, monkeypatch):
    # A token is available, so a request that got past validation would try DOWN: exit 1.
    monkeypatch.setenv("WATTSERVE_ADMIN_TOKEN", "adm_t")
    files = {"missing": home / "nope.toml", "two": home / "two.toml",
             "invalid": home / "bad.toml", "empty": home / "empty.toml"}  # fmt: skip
    files["two"].write_text(TWO_VARIANTS)
    files["invalid"].write_text("[[variant]\nname = ")
    files["empty"].write_text("")
    args = [str(files[a[1:-1]]) if a.startswith("{") else a for a in args]
    sent = []
    monkeypatch.setattr(cli_common, "transport", httpx.MockTransport(sent.append))
    result = runner.invoke(app, [*args, "--url", DOWN])
    assert (result.exit_code, sent) == (code, []), result.output
    assert expected in result.stderr and result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stdout == ""


def test_no_admin_token_says_where_it_looked(home):
    result = runner.invoke(app, ["budget", "show", "--url", DOWN])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "WATTSERVE_ADMIN_TOKEN" in result.stderr
    assert str(home / "admin-token") in result.stderr and "wattserve serve" in result.stderr
    other = runner.invoke(app, ["tenant", "list", "--url", DOWN, "--home", str(home / "x")])
    assert str(home / "x" / "admin-token") in other.stderr


# --- against a fake service ---------------------------------------------------------------

ADMIN_TOKEN = "adm_SECRET-admin-token-value"
API_KEY = "ws_SECRET-tenant-key-value"
NEW_KEY = "ws_NEW-key-shown-exactly-once"
STATUS = {"cluster_power_w": 280.0, "power_cap_w": 300.0, "budget": BUDGET, "nodes": [],
          "devices": []}  # fmt: skip
BOOKS = {"reconciliation": {"device_j": 10.0, "attributed_j": 9.0, "idle_j": 1.0,
                            "unattributed_j": 0.0, "pending_j": 0.0, "gap_s": 0.0,
                            "error_pct": 0.0},
         "target": {"joules_per_output_target": None, "rolling_joules_per_output": None,
                    "over_target": False},
         "variants": []}  # fmt: skip
MODEL = {"id": "tiny-x", "task": "text-to-image", "steps": 2, "guidance_scale": 1.0,
         "max_size_px": 256, "quality_score": 0.5, "quality_provenance": "declared",
         "power_w": 300.0, "joules_per_image_prior": 9.0,
         "energy_prior_provenance": "x"}  # fmt: skip
ROUTES = {
    ("GET", "/admin/budgets"): BUDGET,
    ("PUT", "/admin/budgets"): BUDGET,
    ("GET", "/admin/policies"): POLICY,
    ("PUT", "/admin/policies"): POLICY,
    ("GET", "/admin/tenants"): {"data": [TENANT]},
    ("POST", "/admin/tenants"): {"tenant": TENANT, "api_key": NEW_KEY},
    ("GET", "/admin/tenants/acme"): TENANT,
    ("PUT", "/admin/tenants/acme"): TENANT,
    ("DELETE", "/admin/tenants/acme"): {**TENANT, "state": "revoked"},
    ("GET", "/admin/variants"): {"data": [VARIANT]},
    ("POST", "/admin/variants"): VARIANT,
    ("GET", "/admin/variants/tiny-x"): {**VARIANT, "state": "active"},
    ("DELETE", "/admin/variants/tiny-x"): {**VARIANT, "state": "retiring"},
    ("GET", "/admin/ledger"): {"object": "list", "data": [ROW]},
    ("GET", "/admin/report"): REPORT,
    ("GET", "/v1/ledger"): {"object": "list", "data": [ROW]},
    ("GET", "/v1/usage"): TENANT,
    ("GET", "/v1/status"): STATUS,
    ("GET", "/v1/report"): BOOKS,
    ("GET", "/v1/models"): {"object": "list", "data": [MODEL]},
    ("POST", "/v1/images/generations"): generation_body(),
}


@pytest.fixture
def fake_service(home, monkeypatch):
    """A fake wattserve: canned answers per route; every request is kept in ``.sent``."""

    class Fake:
        def __init__(self):
            self.sent: list[httpx.Request] = []
            self.routes = dict(ROUTES)

        def __call__(self, request):
            self.sent.append(request)
            body = self.routes.get((request.method, request.url.path))
            if body is None:
                return httpx.Response(404, json={"error": {"message": "no such route"}})
            return httpx.Response(201 if request.method == "POST" else 200, json=body)

    fake = Fake()
    monkeypatch.setattr(cli_common, "transport", httpx.MockTransport(fake))
    return fake


@pytest.fixture
def variant_file(home):
    path = home / "v.toml"
    path.write_text('[[variant]]\nname = "tiny-x"\nsource = "builtin:tiny-x"\nsteps = 2\n')
    return path


def admin_commands(variant_file):
    return [
        ["budget", "show"], ["budget", "set", "--watts", "300"],
        ["budget", "set", "--no-cap", "--node", "ab12"], ["policy", "show"],
        ["policy", "set", "--max-batch-size", "4", "--no-share-unseeded"],
        ["tenant", "list"], ["tenant", "show", "acme"],
        ["tenant", "set", "acme", "--no-daily-quota", "--quality", "draft,standard"],
        ["tenant", "revoke", "acme"], ["variants", "list"],
        ["variants", "add", str(variant_file), "--wait"], ["variants", "retire", "tiny-x"],
        ["ledger"], ["ledger", "--format", "csv"], ["report"], ["report", "--books"],
    ]  # fmt: skip


def test_no_command_prints_a_secret_but_tenant_create_prints_the_new_key(
    fake_service, variant_file
):
    for args in admin_commands(variant_file):
        for extra in ([], ["--json"]) if "--format" not in args else ([],):
            result = runner.invoke(app, [*args, *extra, "--token", ADMIN_TOKEN])
            assert result.exit_code == 0, (args, result.output)
            assert ADMIN_TOKEN not in result.output and NEW_KEY not in result.output, args
    for args in (["usage"], ["ledger"], ["variants", "list"], ["generate", "x"]):
        result = runner.invoke(app, [*args, "--api-key", API_KEY])
        assert result.exit_code == 0 and API_KEY not in result.output, args
    created = runner.invoke(app, ["tenant", "create", "acme", "--token", ADMIN_TOKEN])
    assert created.exit_code == 0 and created.stdout.count(NEW_KEY) == 1
    assert "shown once" in created.stdout and ADMIN_TOKEN not in created.output
    as_json = runner.invoke(app, ["tenant", "create", "acme", "--json", "--token", ADMIN_TOKEN])
    assert json.loads(as_json.stdout)["api_key"] == NEW_KEY
    # The admin token goes to /admin only; /v1 gets the tenant's key or nothing.
    for request in fake_service.sent:
        sent = request.headers.get("authorization")
        if request.url.path.startswith("/admin/"):
            assert sent == f"Bearer {ADMIN_TOKEN}"
        else:
            assert sent in (None, f"Bearer {API_KEY}"), request.url


def test_a_rejected_token_is_not_echoed(home, monkeypatch):
    refused = httpx.Response(401, json={"error": {"message": "wrong admin token"}})
    monkeypatch.setattr(cli_common, "transport", httpx.MockTransport(lambda _: refused))
    result = runner.invoke(app, ["tenant", "list", "--token", ADMIN_TOKEN])
    assert result.exit_code == 1 and result.stderr == "error: wrong admin token\n"


def test_a_token_in_the_state_dir_is_used_never_shown(fake_service, home):
    (home / "admin-token").write_text(ADMIN_TOKEN + "\n")
    result = runner.invoke(app, ["budget", "show"])
    assert result.exit_code == 0 and ADMIN_TOKEN not in result.output
    assert fake_service.sent[-1].headers["authorization"] == f"Bearer {ADMIN_TOKEN}"
    assert "300" in result.stdout and "revision 3" in result.stdout


def test_budget_set_sends_only_what_was_asked(fake_service):
    runner.invoke(app, ["budget", "set", "--watts", "250", "--node", "ab12", "--token", "t"])
    runner.invoke(app, ["budget", "set", "--no-cap", "--no-target", "--token", "t"])
    first, second = (json.loads(r.content) for r in fake_service.sent)
    assert first == {"watts": 250.0, "node": "ab12"}
    assert second == {"watts": None, "joules_per_output": None}


def test_tenant_and_policy_updates_send_nulls_only_for_the_clearing_flags(fake_service):
    runner.invoke(app, ["tenant", "set", "acme", "--no-monthly-quota", "--rate-limit-per-min",
                        "60", "--token", "t"])  # fmt: skip
    runner.invoke(app, ["policy", "set", "--no-cache-ttl", "--allow-anonymous", "--token", "t"])
    runner.invoke(app, ["tenant", "create", "acme", "--quality", "draft, standard",
                        "--daily-kj", "5", "--token", "t"])  # fmt: skip
    bodies = [json.loads(r.content) for r in fake_service.sent]
    assert bodies == [
        {"monthly_kj": None, "rate_limit_per_min": 60},
        {"cache_ttl_s": None, "allow_anonymous": True},
        {"name": "acme", "daily_kj": 5.0, "qualities": ["draft", "standard"]},
    ]


def test_ledger_uses_the_admin_view_with_a_token_and_the_tenants_without(fake_service):
    args = ["ledger", "--token", "t", "--since", "2026-05-01T12:00", "--status", "ok",
            "--tenant", "acme", "--limit", "5", "--json"]  # fmt: skip
    admin = runner.invoke(app, args)
    assert admin.exit_code == 0 and json.loads(admin.stdout)[0]["request_id"] == "req_1"
    sent = fake_service.sent[-1]
    assert sent.url.path == "/admin/ledger"
    assert dict(sent.url.params) == {"limit": "5", "tenant": "acme", "status": "ok",
                                     "since": "2026-05-01T12:00:00+00:00"}  # fmt: skip
    tenant = runner.invoke(app, ["ledger", "--api-key", "ws_k", "--token", "t", "--limit", "3"])
    assert tenant.exit_code == 0 and "req_1" in tenant.stdout
    assert fake_service.sent[-1].url.path == "/v1/ledger"
    assert dict(fake_service.sent[-1].url.params) == {"limit": "3"}
    filtered = runner.invoke(app, ["ledger", "--api-key", "ws_k", "--variant", "tiny-x"])
    assert filtered.exit_code == 2 and "--variant: filters need the admin view" in filtered.stderr


def test_ledger_relative_since_and_csv(fake_service):
    result = runner.invoke(app, ["ledger", "--token", "t", "--since", "24h", "--format", "csv"])
    header, row = result.stdout.splitlines()
    assert header.startswith("request_id,image_index,created_at") and "tenant" in header
    assert row.startswith("req_1,0,")
    since = fake_service.sent[-1].url.params["since"]
    assert since.endswith("+00:00")


def test_report_renders_the_window_with_the_baseline_and_target(fake_service):
    result = runner.invoke(app, ["report", "--token", "t", "--since", "7d", "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "tiny-sd-large at batch 1, no cache" in text and "simulated" in text
    assert "within target" in text and "variant_choice" in text and "acme" in text
    assert set(fake_service.sent[-1].url.params) == {"since", "tenant"}
    books = runner.invoke(app, ["report", "--books", "--token", "t", "--json"])
    assert json.loads(books.stdout)["reconciliation"]["device_j"] == 10.0
    windowed_books = runner.invoke(app, ["report", "--books", "--since", "1d"])
    assert windowed_books.exit_code == 2 and "no window" in windowed_books.stderr


def test_status_shows_the_budget_in_force_and_when_it_changed(fake_service):
    result = runner.invoke(app, ["status"])
    assert ADMIN_TOKEN not in result.output
    assert result.exit_code == 0
    assert "budget in force" in result.stdout and "2026-05-01 12:00:00Z" in result.stdout
    assert json.loads(runner.invoke(app, ["status", "--json"]).stdout)["budget"]["revision"] == 3


def test_variants_list_is_the_admin_view_with_a_token_else_the_public_one(fake_service):
    admin = json.loads(runner.invoke(app, ["variants", "list", "--token", "t", "--json"]).stdout)
    assert admin[0]["state"] == "deploying"
    public = json.loads(runner.invoke(app, ["variants", "list", "--json"]).stdout)
    assert public[0]["id"] == "tiny-x" and fake_service.sent[-1].url.path == "/v1/models"


def test_variants_add_wait_reports_a_failed_deploy(fake_service, variant_file):
    fake_service.routes[("GET", "/admin/variants/tiny-x")] = {**VARIANT, "state": "failed",
                                                         "detail": "no GPU fits"}  # fmt: skip
    result = runner.invoke(app, ["variants", "add", str(variant_file), "--wait", "--token", "t"])
    assert result.exit_code == 1 and "variant tiny-x failed: no GPU fits" in result.stderr
    assert json.loads(fake_service.sent[0].content)["toml"] == variant_file.read_text()


def test_usage_shows_the_tenants_quota_use(fake_service):
    day = {"window": "day", "used_kj": 1.5, "quota_kj": 5.0, "resets_at": "2026-05-02T00:00:00Z"}
    fake_service.routes[("GET", "/v1/usage")] = {**TENANT, "usage": [day]}
    result = runner.invoke(app, ["usage", "--api-key", API_KEY])
    assert result.exit_code == 0 and "energy used by acme" in result.stdout
    assert fake_service.sent[-1].headers["authorization"] == f"Bearer {API_KEY}"


def test_serve_prints_where_the_admin_token_is_never_the_token(home, monkeypatch):
    import wattserve.cluster.runtime as cluster_runtime
    from wattserve.cluster.settings import Settings

    class FakeService:
        def __init__(self, settings, host, port, address):
            self.settings = settings

        def start(self):
            (self.settings.home / "admin-token").write_text(ADMIN_TOKEN + "\n")
            return "http://127.0.0.1:1"

        def stop(self):
            pass

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster_runtime, "LocalService", FakeService)
    monkeypatch.setattr("wattserve.cli.main.signal.pause", interrupt)
    monkeypatch.setattr("wattserve.cli.main.signal.signal", lambda *_: None)
    result = runner.invoke(app, ["serve", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert f"admin token: in {Settings.from_env(home).home / 'admin-token'}" in result.stdout
    assert ADMIN_TOKEN not in result.output
