"""Admin sub-commands: ``budget``, ``policy``, ``tenant`` and ``variants``.

Each command checks its input with the SDK's own body builders first (exit 2, nothing
sent), then opens an ``AdminClient`` (exit 1 saying where it looked if there is no admin
token), calls one method and renders the result. ``variants list`` also serves people
without a token: it falls back to the public ``/v1/models`` view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from wattserve import InvalidRequest
from wattserve._admin import PolicyUpdate, TenantUpdate, VariantRecord, VariantState
from wattserve._admin_client import (
    UNSET,
    AdminClient,
    budget_update,
    checked_name,
    partial_update,
    tenant_create,
    variant_add,
)
from wattserve._client import DEFAULT_BASE_URL
from wattserve.cli import _render as render
from wattserve.cli._common import (
    ApiKeyOption,
    HomeOption,
    JsonOption,
    TokenOption,
    UrlOption,
    admin_token_if_any,
    bad_input,
    errors,
    fail,
    open_admin,
    open_client,
    parse_qualities,
    pick,
)

budget_app = typer.Typer(help="Show or change the power cap and the J/output target.",
                         no_args_is_help=True)  # fmt: skip
policy_app = typer.Typer(help="Show or change the serving policy.", no_args_is_help=True)
tenant_app = typer.Typer(help="Create, list, change and revoke tenants (API keys, quotas).",
                         no_args_is_help=True)  # fmt: skip
variants_app = typer.Typer(help="List, add and retire model variants.", no_args_is_help=True)

WAIT_S = 120.0
NameArg = Annotated[str, typer.Argument(help="Tenant name (a-z 0-9 . _ -).", show_default=False)]
DailyKj = Annotated[float | None, typer.Option("--daily-kj", help="Energy quota per UTC day, kJ.")]
MonthlyKj = Annotated[
    float | None, typer.Option("--monthly-kj", help="Energy quota per UTC month, kJ.")
]
QualityList = Annotated[
    str | None,
    typer.Option("--quality", help="Tiers the tenant may use, comma-separated: draft,standard."),
]
RateLimit = Annotated[int | None, typer.Option("--rate-limit-per-min", help="Requests per minute.")]
ApproximateReuse = Annotated[
    bool | None,
    typer.Option("--approximate-reuse/--no-approximate-reuse",
                 help="Whether its requests may resume from similar prompts' latents."),
]  # fmt: skip
AuditRate = Annotated[
    float | None,
    typer.Option("--audit-rate", help="Share of its off-reference outputs audited, 0-1."),
]
ReusePool = Annotated[
    str | None, typer.Option(help="A named pool whose tenants share kept latents.")
]
WaitOption = Annotated[
    bool, typer.Option("--wait", help=f"Poll until the change settles ({WAIT_S:g} s at most).")
]


# --- budget ------------------------------------------------------------------------------


@budget_app.command("show")
def budget_show(
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """The cluster cap, node caps and J/output target in force, and when they changed."""
    with open_admin(url, token, home) as client, errors():
        found = client.budget()
    render.out(found, json_out, render.budget)


@budget_app.command("set")
def budget_set(
    watts: Annotated[
        float | None, typer.Option("--watts", help="Power cap in W (cluster, or --node's).")
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="Ray node id (or a prefix) to cap alone.")
    ] = None,
    joules_per_output: Annotated[
        float | None,
        typer.Option("--joules-per-output", help="Target J/output; above it batches fill more."),
    ] = None,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="Remove the cap.")] = False,
    no_target: Annotated[
        bool, typer.Option("--no-target", help="Remove the J/output target.")
    ] = False,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change the power cap (cluster-wide, or one node's with --node) or the J/output target."""
    cap = pick(watts, no_cap, "--watts", "--no-cap")
    target = pick(joules_per_output, no_target, "--joules-per-output", "--no-target")
    if not cap and not target:
        fail("nothing to change: give --watts, --joules-per-output, --no-cap or --no-target", 2)
    change: dict[str, Any] = {
        "watts": cap.get("watts", UNSET),
        "joules_per_output": target.get("joules_per_output", UNSET),
    }
    with bad_input():
        budget_update(node=node, **change)
    with open_admin(url, token, home) as client, errors():
        found = client.set_budget(node=node, **change)
    render.out(found, json_out, lambda b: render.budget(b, "budget now in force"))


# --- policy ------------------------------------------------------------------------------


@policy_app.command("show")
def policy_show(
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """The serving policy in force."""
    with open_admin(url, token, home) as client, errors():
        found = client.policy()
    render.out(found, json_out, render.policy)


@policy_app.command("set")
def policy_set(
    default_quality: Annotated[
        str | None, typer.Option(help="Tier of requests that name none: draft|standard|high.")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Cap on every batch.")] = None,
    no_max_batch_size: Annotated[
        bool, typer.Option("--no-max-batch-size", help="Use each variant's own limit.")
    ] = False,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="Longest wait for a batch to fill, ms.")
    ] = None,
    share_unseeded: Annotated[
        bool | None,
        typer.Option(
            "--share-unseeded/--no-share-unseeded",
            help="Cache and coalesce requests without a seed.",
        ),
    ] = None,  # fmt: skip
    cache_ttl_s: Annotated[float | None, typer.Option(help="Result cache lifetime, s.")] = None,
    no_cache_ttl: Annotated[
        bool, typer.Option("--no-cache-ttl", help="Keep cache entries until evicted.")
    ] = False,
    cache_max_bytes: Annotated[int | None, typer.Option(help="Result cache size cap.")] = None,
    default_deadline_s: Annotated[
        float | None, typer.Option(help="Deadline of requests that give none, s.")
    ] = None,
    no_default_deadline: Annotated[
        bool, typer.Option("--no-default-deadline", help="No deadline unless requested.")
    ] = False,
    allow_anonymous: Annotated[
        bool | None,
        typer.Option(
            "--allow-anonymous/--no-allow-anonymous",
            help="Serve requests without an API key once tenants exist.",
        ),
    ] = None,  # fmt: skip
    idempotency_ttl_s: Annotated[
        float | None, typer.Option(help="How long an Idempotency-Key replays its request, s.")
    ] = None,
    default_reuse: Annotated[
        str | None,
        typer.Option(help="Reuse of unseeded requests that name none: exact or approximate."),
    ] = None,
    pool_exact_reuse: Annotated[
        bool | None,
        typer.Option(
            "--pool-exact-reuse/--no-pool-exact-reuse",
            help="Keep exact reuse (cache hits, coalescing) inside reuse pools too.",
        ),
    ] = None,  # fmt: skip
    audit_rate: Annotated[
        float | None, typer.Option(help="Share of off-reference outputs audited, 0-1 (0: off).")
    ] = None,
    audit_clip_drop_max: Annotated[
        float | None, typer.Option(help="Audit tolerance: CLIP score drop a variant may cost.")
    ] = None,
    audit_ssim_min: Annotated[
        float | None, typer.Option(help="Audit tolerance: SSIM a same-model pair must keep.")
    ] = None,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change serving-policy fields; the ones not given stay as they are."""
    change: dict[str, Any] = {
        **pick(default_quality, False, "--default-quality", ""),
        **pick(max_batch_size, no_max_batch_size, "--max-batch-size", "--no-max-batch-size"),
        **pick(max_wait_ms, False, "--max-wait-ms", ""),
        **pick(share_unseeded, False, "--share-unseeded", ""),
        **pick(cache_ttl_s, no_cache_ttl, "--cache-ttl-s", "--no-cache-ttl"),
        **pick(cache_max_bytes, False, "--cache-max-bytes", ""),
        **pick(default_deadline_s, no_default_deadline, "--default-deadline-s",
               "--no-default-deadline"),
        **pick(allow_anonymous, False, "--allow-anonymous", ""),
        **pick(idempotency_ttl_s, False, "--idempotency-ttl-s", ""),
        **pick(default_reuse, False, "--default-reuse", ""),
        **pick(pool_exact_reuse, False, "--pool-exact-reuse", ""),
        **pick(audit_rate, False, "--audit-rate", ""),
        **pick(audit_clip_drop_max, False, "--audit-clip-drop-max", ""),
        **pick(audit_ssim_min, False, "--audit-ssim-min", ""),
    }  # fmt: skip
    if not change:
        fail("nothing to change: give at least one option (see --help)", code=2)
    with bad_input():
        partial_update(PolicyUpdate, change)
    with open_admin(url, token, home) as client, errors():
        found = client.set_policy(**change)
    render.out(found, json_out, render.policy)


# --- tenants -----------------------------------------------------------------------------


@tenant_app.command("create")
def tenant_create_cmd(
    name: NameArg,
    daily_kj: DailyKj = None,
    monthly_kj: MonthlyKj = None,
    quality: QualityList = None,
    rate_limit_per_min: RateLimit = None,
    approximate_reuse: ApproximateReuse = None,
    reuse_pool: ReusePool = None,
    audit_rate: AuditRate = None,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a tenant and print its API key, once: it is never shown again."""
    limits: dict[str, Any] = {"daily_kj": daily_kj, "monthly_kj": monthly_kj,
                              "qualities": parse_qualities(quality),
                              "rate_limit_per_min": rate_limit_per_min,
                              "approximate_reuse": approximate_reuse,
                              "reuse_pool": reuse_pool, "audit_rate": audit_rate}  # fmt: skip
    with bad_input():
        tenant_create(name, **limits)
    with open_admin(url, token, home) as client, errors():
        created = client.create_tenant(name, **limits)
    if json_out:
        render.print_json(created)
        return
    render.tenants([created.tenant])
    typer.echo(f"API key of {created.tenant.name} (shown once, store it now): {created.api_key}")


@tenant_app.command("list")
def tenant_list(
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Every tenant, revoked ones included (key prefixes only)."""
    with open_admin(url, token, home) as client, errors():
        found = client.tenants()
    render.out(found, json_out, render.tenants)


@tenant_app.command("show")
def tenant_show(
    name: NameArg,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """One tenant with its energy use against its quotas."""
    with bad_input():
        checked_name("tenant", name)
    with open_admin(url, token, home) as client, errors():
        found = client.tenant(name)
    render.out(found, json_out, render.tenant)


@tenant_app.command("set")
def tenant_set(
    name: NameArg,
    daily_kj: DailyKj = None,
    monthly_kj: MonthlyKj = None,
    quality: QualityList = None,
    rate_limit_per_min: RateLimit = None,
    no_daily_quota: Annotated[
        bool, typer.Option("--no-daily-quota", help="Remove the daily quota.")
    ] = False,
    no_monthly_quota: Annotated[
        bool, typer.Option("--no-monthly-quota", help="Remove the monthly quota.")
    ] = False,
    no_rate_limit: Annotated[
        bool, typer.Option("--no-rate-limit", help="Remove the rate limit.")
    ] = False,
    approximate_reuse: ApproximateReuse = None,
    reuse_pool: ReusePool = None,
    no_reuse_pool: Annotated[
        bool, typer.Option("--no-reuse-pool", help="Back to a reuse pool of its own.")
    ] = False,
    audit_rate: AuditRate = None,
    no_audit_rate: Annotated[
        bool, typer.Option("--no-audit-rate", help="Back to the policy's audit rate.")
    ] = False,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Change a tenant's quotas, tiers or rate limit; the ones not given stay."""
    with bad_input():
        checked_name("tenant", name)
    change: dict[str, Any] = {
        **pick(daily_kj, no_daily_quota, "--daily-kj", "--no-daily-quota"),
        **pick(monthly_kj, no_monthly_quota, "--monthly-kj", "--no-monthly-quota"),
        **pick(rate_limit_per_min, no_rate_limit, "--rate-limit-per-min", "--no-rate-limit"),
        **pick(approximate_reuse, False, "--approximate-reuse", ""),
        **pick(reuse_pool, no_reuse_pool, "--reuse-pool", "--no-reuse-pool"),
        **pick(audit_rate, no_audit_rate, "--audit-rate", "--no-audit-rate"),
    }
    tiers = parse_qualities(quality)
    if tiers is not None:
        change["qualities"] = tiers
    if not change:
        fail("nothing to change: give at least one option (see --help)", code=2)
    with bad_input():
        partial_update(TenantUpdate, change)
    with open_admin(url, token, home) as client, errors():
        found = client.update_tenant(name, **change)
    render.out(found, json_out, render.tenant)


@tenant_app.command("revoke")
def tenant_revoke(
    name: NameArg,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Revoke a tenant's API key at once; its ledger rows stay."""
    with bad_input():
        checked_name("tenant", name)
    with open_admin(url, token, home) as client, errors():
        found = client.revoke_tenant(name)
    render.out(found, json_out, render.tenant)


# --- variants ----------------------------------------------------------------------------


@variants_app.command("list")
def variants_list(
    url: UrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Variants: with an admin token, every one and its state; else what routing uses now.

    With --api-key, or without an admin token: the public view (/v1/models), with priors.
    """
    admin_token = admin_token_if_any(api_key, token, home)
    if admin_token is None:
        with open_client(url, api_key) as public, errors():
            found = public.variants()
        render.out(found, json_out, render.models)
        return
    with open_admin(url, admin_token, home) as client, errors():
        records = client.variants()
    render.out(records, json_out, render.variant_records)


def _read_variant_file(file: Path) -> str:
    """The TOML text of ``file``, checked to hold one ``[[variant]]``; exits 2 if not."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}", code=2)
    try:
        variant_add(text)
    except InvalidRequest as exc:
        fail(f"{file}: {exc.message}", code=2)
    return text


def _settle(client: AdminClient, name: str, states: tuple[VariantState, ...]) -> VariantRecord:
    """Poll ``name`` until it reaches ``states``; exit 1 if it failed or never settled."""
    typer.echo(f"waiting for {name} to become {' or '.join(states)} "
               f"(at most {WAIT_S:g} s)...", err=True)  # fmt: skip
    with errors():
        record = client.wait_variant(name, states, timeout_s=WAIT_S)
    if record.state == "failed":
        fail(f"variant {name} failed: {record.detail or 'no reason given'}")
    return record


@variants_app.command("add")
def variants_add(
    file: Annotated[
        Path,
        typer.Argument(help=escape("TOML file with one [[variant]] table."), show_default=False),
    ],  # fmt: skip
    wait: WaitOption = False,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add a variant from a catalog entry; the cluster deploys it, then routes to it."""
    text = _read_variant_file(file)
    with open_admin(url, token, home) as client:
        with errors():
            record = client.add_variant(text)
        if wait:
            record = _settle(client, record.name, ("active", "failed"))
    render.out(record, json_out, lambda r: render.variant_records([r]))


@variants_app.command("retire")
def variants_retire(
    name: Annotated[str, typer.Argument(help="Variant name.", show_default=False)],
    wait: WaitOption = False,
    url: UrlOption = DEFAULT_BASE_URL,
    token: TokenOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Stop routing to a variant; it is retired once its in-flight work has drained."""
    with bad_input():
        checked_name("variant", name)
    with open_admin(url, token, home) as client:
        with errors():
            record = client.retire_variant(name)
        if wait:
            record = _settle(client, name, ("retired",))
    render.out(record, json_out, lambda r: render.variant_records([r]))
