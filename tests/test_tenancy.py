"""Pure control-plane decisions: callers, quotas, rate limits, node caps, reports."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from wattserve.policies.tenancy import (
    AuthError,
    RateLimiter,
    Tenant,
    check_quota,
    hash_key,
    identify,
    month_window,
    new_api_key,
)
from wattserve.telemetry.ledger import LedgerRow
from wattserve.telemetry.reporting import window_report

KEY = new_api_key()
ACME = Tenant("acme", hash_key(KEY), daily_kj=1.0, monthly_kj=10.0)
TENANTS = {ACME.key_hash: ACME}
ADMIN = "admin-secret"


def test_keys_are_random_and_only_their_hash_is_kept():
    assert KEY.startswith("ws_") and len(KEY) > 40 and new_api_key() != KEY
    assert hash_key(KEY) != KEY and len(hash_key(KEY)) == 64


@pytest.mark.parametrize(
    ("token", "tenants", "allow_anonymous", "expected"),
    [
        (KEY, TENANTS, False, "tenant"),
        (ADMIN, TENANTS, False, "admin"),
        (None, {}, False, "anonymous"),  # no tenants: the service is open
        ("anything", {}, False, "anonymous"),  # the OpenAI client always sends a key
        (None, TENANTS, True, "anonymous"),
        (None, TENANTS, False, AuthError),
        ("ws_wrong", TENANTS, True, AuthError),  # a wrong key is never anonymous
    ],
)
def test_identify(token, tenants, allow_anonymous, expected):
    if expected is AuthError:
        with pytest.raises(AuthError):
            identify(token, tenants, allow_anonymous, hash_key(ADMIN))
        return
    assert identify(token, tenants, allow_anonymous, hash_key(ADMIN)).kind == expected


def test_without_an_admin_token_configured_nobody_is_admin():
    with pytest.raises(AuthError):
        identify(ADMIN, TENANTS, False, None)


def test_quota_names_the_window_and_its_reset():
    now = datetime(2026, 11, 26, 17, 0, tzinfo=UTC)
    assert check_quota(ACME, 999.0, 999.0, now) is None
    daily = check_quota(ACME, 1000.0, 1000.0, now)
    assert daily is not None and "daily energy quota" in daily.message
    assert daily.resets_at == datetime(2026, 11, 27, tzinfo=UTC)
    assert daily.retry_after_s == 7 * 3600
    monthly = check_quota(ACME, 0.0, 10_000.0, now)
    assert monthly is not None and "monthly" in monthly.message
    assert monthly.resets_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert month_window(datetime(2026, 12, 31, 23, tzinfo=UTC))[1] == datetime(
        2027, 1, 1, tzinfo=UTC
    )


def test_rate_limiter_refills_with_the_clock():
    now = [0.0]
    limiter = RateLimiter(lambda: now[0])
    tenant = Tenant("t", "h", rate_limit_per_min=2)
    assert limiter.allow(tenant) is None and limiter.allow(tenant) is None
    wait_s = limiter.allow(tenant)
    assert wait_s == pytest.approx(30.0)
    now[0] = 30.0
    assert limiter.allow(tenant) is None
    assert limiter.allow(Tenant("free", "h2")) is None  # no limit set


def row(request_id: str, variant: str, joules: float, batch_size: int, tenant: str | None,
        cache: str = "miss", status: str = "ok") -> LedgerRow:  # fmt: skip
    return LedgerRow(
        request_id=request_id, image_index=0, tenant=tenant, variant=variant,
        quality="draft", route_reason="r", batch_id=f"b-{request_id}", batch_size=batch_size,
        joules=joules, energy_source="simulated", cache=cache, status=status, latency_ms=1.0,
        seed=1, width_px=64, height_px=64,
    )  # fmt: skip


def test_window_report_groups_by_variant_and_tenant_and_names_its_baseline():
    rows = [
        row("r1", "large", 400.0, 1, "acme"),
        row("r2", "turbo", 20.0, 1, "acme"),
        row("r3", "turbo", 0.0, 0, None, cache="hit"),
        row("r4", "turbo", 5.0, 1, "beta", status="failed"),
    ]
    report = window_report(rows, since=None, until=None, tenant=None, target=50.0,
                           reference="large", reference_prior_j=999.0)  # fmt: skip
    assert report.outputs == 3 and report.joules == 425.0
    assert {u.key: u.outputs for u in report.by_tenant} == {"(anonymous)": 1, "acme": 2, "beta": 0}
    assert {u.key: u.joules for u in report.by_variant} == {"large": 400.0, "turbo": 25.0}
    savings = report.savings
    assert "large at batch size 1" in savings.baseline and savings.baseline_joules == 1200.0
    assert savings.by_cause_joules["cache"] == 400.0
    assert savings.by_cause_joules["variant_choice"] == 380.0
    unpriced = window_report(rows[1:3], since=None, until=None, tenant=None, target=None,
                             reference="large", reference_prior_j=999.0)  # fmt: skip
    assert "estimated" in unpriced.savings.baseline
    assert "estimated" in unpriced.savings.energy_sources
