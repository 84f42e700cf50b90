"""The admin SDK: ``AdminClient`` for the control plane of a wattserve service.

Budgets, the serving policy, tenants, variants, the ledger across tenants and window
reports, all behind ``/admin/*`` with the admin token as ``Authorization: Bearer``.

Every body is validated by the same pydantic model the server parses it with, before
any I/O, so bad input raises ``InvalidRequest`` naming the field and nothing is sent.
The body builders are plain module functions (``budget_update`` and friends) so the CLI
can check input before it even resolves a token; ``AdminClient`` only adds the I/O.

Where the admin token is found (``default_admin_token`` and friends) is
``wattserve._admin_token``'s, re-exported here.
"""

from __future__ import annotations

import enum
import time
import tomllib
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ValidationError

from wattserve._admin import (
    ADMIN_TOKEN_ENV,
    ADMIN_TOKEN_FILE,
    AdminLedgerPage,
    AuditReport,
    BudgetUpdate,
    DemotionRestore,
    PolicyInfo,
    PolicyUpdate,
    ProfileList,
    TenantCreate,
    TenantCreated,
    TenantInfo,
    TenantList,
    TenantUpdate,
    VariantAdd,
    VariantList,
    VariantRecord,
    VariantState,
    WindowReport,
    check_name,
)
from wattserve._admin_token import (
    admin_token_path,
    default_admin_token,
    missing_token_message,
    state_home,
)
from wattserve._client import DEFAULT_BASE_URL, _SyncClient
from wattserve._exceptions import InvalidRequest, Unauthorized, WattserveError
from wattserve._schemas import (
    BudgetInfo,
    DemotionInfo,
    DemotionKind,
    LedgerEntry,
    LedgerStatus,
    Quality,
)

__all__ = [  # the names other modules (the CLI, the server) may rely on
    "ADMIN_TOKEN_ENV",
    "ADMIN_TOKEN_FILE",
    "LEDGER_STATUSES",
    "MAX_LEDGER_LIMIT",
    "UNSET",
    "AdminClient",
    "admin_token_path",
    "budget_update",
    "checked_name",
    "default_admin_token",
    "ledger_params",
    "missing_token_message",
    "partial_update",
    "report_params",
    "state_home",
    "tenant_create",
    "variant_add",
]

DEFAULT_ADMIN_TIMEOUT_S = 30.0  # admin calls read or write a few rows; none generates
MAX_LEDGER_LIMIT = 10_000
LEDGER_STATUSES: tuple[LedgerStatus, ...] = ("pending", "ok", "failed", "cancelled")


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""Default of an update argument: leave the setting as it is (``None`` clears it)."""
Unsettable = Literal[_Unset.UNSET]


# --- validation and bodies (pure: no I/O) ----------------------------------------------


def invalid_request(exc: ValidationError) -> InvalidRequest:
    """The first pydantic error as ``InvalidRequest("field: why", param=field)``.

    Same wording as the server's, so a message reads alike from either side.
    """
    err = exc.errors()[0]
    param = ".".join(str(part) for part in err["loc"]) or None
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        message = "unsupported field"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def validated(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked by ``model``, as the JSON body to send (only the keys given)."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc) from None
    return parsed.model_dump(mode="json", exclude_unset=True)


def checked_name(kind: str, name: str, param: str = "name") -> str:
    """``name`` if it is a safe tenant/variant name, else ``InvalidRequest`` on ``param``.

    Names go into URL paths and query strings; checking them here means nothing
    path-like or quote-laden is ever sent.
    """
    try:
        return check_name(kind, name)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param) from None


def budget_update(
    *,
    watts: float | None | Unsettable = UNSET,
    node: str | None = None,
    joules_per_output: float | None | Unsettable = UNSET,
) -> dict[str, Any]:
    """Body of ``PUT /admin/budgets``: only the settings given; ``None`` clears one."""
    data: dict[str, Any] = {}
    if watts is not UNSET:
        data["watts"] = watts
    if joules_per_output is not UNSET:
        data["joules_per_output"] = joules_per_output
    if not data:
        raise InvalidRequest("nothing to change: give watts and/or joules_per_output")
    if node is not None:
        if "joules_per_output" in data:
            raise InvalidRequest(
                "node: joules_per_output is cluster-wide; set it without node", param="node"
            )
        data["node"] = node
    return validated(BudgetUpdate, data)


def partial_update(model: type[BaseModel], fields: dict[str, Any]) -> dict[str, Any]:
    """Body of a partial ``PUT``: at least one field, each checked by ``model``."""
    if not fields:
        raise InvalidRequest("nothing to change: give at least one field")
    return validated(model, fields)


def tenant_create(
    name: str,
    *,
    daily_kj: float | None = None,
    monthly_kj: float | None = None,
    qualities: Collection[Quality] | None = None,
    rate_limit_per_min: int | None = None,
    approximate_reuse: bool | None = None,
    reuse_pool: str | None = None,
    audit_rate: float | None = None,
) -> dict[str, Any]:
    """Body of ``POST /admin/tenants`` (limits left None are not set)."""
    data: dict[str, Any] = {"name": name}
    optional = {"daily_kj": daily_kj, "monthly_kj": monthly_kj,
                "qualities": None if qualities is None else list(qualities),
                "rate_limit_per_min": rate_limit_per_min,
                "approximate_reuse": approximate_reuse, "reuse_pool": reuse_pool,
                "audit_rate": audit_rate}  # fmt: skip
    data.update({k: v for k, v in optional.items() if v is not None})
    return validated(TenantCreate, data)


def variant_add(toml_text: str) -> dict[str, Any]:
    """Body of ``POST /admin/variants``: TOML text holding exactly one ``[[variant]]``.

    Only the shape is checked here (valid TOML, one entry, a safe name); the server
    validates the entry's fields against its catalog schema.
    """
    body = validated(VariantAdd, {"toml": toml_text})
    try:
        raw = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"toml: not valid TOML: {exc}", param="toml") from None
    entries = raw.get("variant")
    if not isinstance(entries, list) or len(entries) != 1 or set(raw) != {"variant"}:
        found = len(entries) if isinstance(entries, list) else 0
        raise InvalidRequest(
            f"toml: give exactly one [[variant]] table and nothing else (found {found})",
            param="toml",
        )
    name = entries[0].get("name") if isinstance(entries[0], dict) else None
    if not isinstance(name, str):
        raise InvalidRequest("toml: the [[variant]] table needs a name", param="toml")
    checked_name("variant", name, "toml")
    return body


def _iso_utc(moment: datetime, param: str) -> str:
    """``moment`` as ISO 8601 in UTC; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC).isoformat()
    except (OverflowError, ValueError) as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param) from None


def ledger_params(
    *,
    tenant: str | None = None,
    variant: str | None = None,
    status: LedgerStatus | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> dict[str, str | int]:
    """Query of ``GET /admin/ledger``: the filters given, checked."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LEDGER_LIMIT:
        raise InvalidRequest(f"limit: must be 1..{MAX_LEDGER_LIMIT}, got {limit!r}", param="limit")
    params: dict[str, str | int] = {"limit": limit}
    if tenant is not None:
        params["tenant"] = checked_name("tenant", tenant, "tenant")
    if variant is not None:
        params["variant"] = checked_name("variant", variant, "variant")
    if status is not None:
        if status not in LEDGER_STATUSES:
            raise InvalidRequest(f"status: must be ok or failed, got {status!r}", param="status")
        params["status"] = status
    if since is not None:
        params["since"] = _iso_utc(since, "since")
    return params


def report_params(
    *, since: datetime | None = None, until: datetime | None = None, tenant: str | None = None
) -> dict[str, str]:
    """Query of ``GET /admin/report``: the window and tenant given, checked."""
    params: dict[str, str] = {}
    if since is not None:
        params["since"] = _iso_utc(since, "since")
    if until is not None:
        params["until"] = _iso_utc(until, "until")
    if since is not None and until is not None:
        if datetime.fromisoformat(params["since"]) >= datetime.fromisoformat(params["until"]):
            raise InvalidRequest("since: must be before until", param="since")
    if tenant is not None:
        params["tenant"] = checked_name("tenant", tenant, "tenant")
    return params


# --- the client ------------------------------------------------------------------------


class AdminClient(_SyncClient):
    """Synchronous client of the admin API. Use as a context manager or call ``close()``.

    ``token=None`` resolves the token with :func:`default_admin_token` (``home`` says
    which state dir's file to read); if there is none, construction raises
    ``Unauthorized`` saying where it looked, before anything is sent.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        home: Path | None = None,
    ) -> None:
        token = token if token is not None else default_admin_token(home)
        if not token:
            raise Unauthorized(missing_token_message(home))
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise Unauthorized("the admin token must be printable ASCII without spaces")
        super().__init__(base_url, token, timeout_s=timeout_s, transport=transport)

    # --- budgets ----------------------------------------------------------------------

    def budget(self) -> BudgetInfo:
        """The budget in force: cluster cap, node caps, J/output target."""
        return self._parse(BudgetInfo, self._request("GET", "/admin/budgets"))

    def set_budget(
        self,
        *,
        watts: float | None | Unsettable = UNSET,
        node: str | None = None,
        joules_per_output: float | None | Unsettable = UNSET,
    ) -> BudgetInfo:
        """Change the cluster cap (or ``node``'s cap) in W, or the J/output target.

        An argument left out is unchanged; ``None`` clears it (``watts=None``: uncapped).
        """
        body = budget_update(watts=watts, node=node, joules_per_output=joules_per_output)
        return self._parse(BudgetInfo, self._request("PUT", "/admin/budgets", json=body))

    # --- policy -----------------------------------------------------------------------

    def policy(self) -> PolicyInfo:
        """The serving policy in force."""
        return self._parse(PolicyInfo, self._request("GET", "/admin/policies"))

    def set_policy(self, **fields: Any) -> PolicyInfo:
        """Change the ``PolicyUpdate`` fields given; ``None`` clears one where it can."""
        body = partial_update(PolicyUpdate, fields)
        return self._parse(PolicyInfo, self._request("PUT", "/admin/policies", json=body))

    # --- tenants ----------------------------------------------------------------------

    def tenants(self) -> list[TenantInfo]:
        """Every tenant, revoked ones included."""
        return self._parse(TenantList, self._request("GET", "/admin/tenants")).data

    def create_tenant(
        self,
        name: str,
        *,
        daily_kj: float | None = None,
        monthly_kj: float | None = None,
        qualities: Collection[Quality] | None = None,
        rate_limit_per_min: int | None = None,
        approximate_reuse: bool | None = None,
        reuse_pool: str | None = None,
        audit_rate: float | None = None,
    ) -> TenantCreated:
        """Create a tenant; the result holds its API key, which is never shown again.

        ``approximate_reuse=False`` keeps its requests exact; ``reuse_pool`` names a pool
        whose tenants resume from each other's kept latents (default: its own pool);
        ``audit_rate`` is its outputs' shadow-audit rate (default: the policy's).
        """
        body = tenant_create(
            name,
            daily_kj=daily_kj,
            monthly_kj=monthly_kj,
            qualities=qualities,
            rate_limit_per_min=rate_limit_per_min,
            approximate_reuse=approximate_reuse,
            reuse_pool=reuse_pool,
            audit_rate=audit_rate,
        )
        return self._parse(TenantCreated, self._request("POST", "/admin/tenants", json=body))

    def tenant(self, name: str) -> TenantInfo:
        """One tenant with its energy use against its quotas."""
        path = f"/admin/tenants/{checked_name('tenant', name)}"
        return self._parse(TenantInfo, self._request("GET", path))

    def update_tenant(self, name: str, **fields: Any) -> TenantInfo:
        """Change the ``TenantUpdate`` fields given; ``None`` removes a quota or limit."""
        path = f"/admin/tenants/{checked_name('tenant', name)}"
        body = partial_update(TenantUpdate, fields)
        return self._parse(TenantInfo, self._request("PUT", path, json=body))

    def revoke_tenant(self, name: str) -> TenantInfo:
        """Revoke a tenant's API key; its ledger rows stay."""
        path = f"/admin/tenants/{checked_name('tenant', name)}"
        return self._parse(TenantInfo, self._request("DELETE", path))

    # --- variants ---------------------------------------------------------------------

    def variants(self) -> list[VariantRecord]:
        """Every variant with its lifecycle state."""
        return self._parse(VariantList, self._request("GET", "/admin/variants")).data

    def variant(self, name: str) -> VariantRecord:
        """One variant with its lifecycle state."""
        path = f"/admin/variants/{checked_name('variant', name)}"
        return self._parse(VariantRecord, self._request("GET", path))

    def add_variant(self, toml_text: str) -> VariantRecord:
        """Add a variant from one ``[[variant]]`` catalog entry; it starts ``deploying``."""
        body = variant_add(toml_text)
        return self._parse(VariantRecord, self._request("POST", "/admin/variants", json=body))

    def retire_variant(self, name: str) -> VariantRecord:
        """Stop routing to a variant; it is ``retired`` once its in-flight work drains."""
        path = f"/admin/variants/{checked_name('variant', name)}"
        return self._parse(VariantRecord, self._request("DELETE", path))

    def wait_variant(
        self,
        name: str,
        states: Collection[VariantState],
        *,
        timeout_s: float = 120.0,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> VariantRecord:
        """Poll ``name`` until its state is one of ``states``; ``WattserveError`` on timeout.

        Deploying loads a model and retiring drains in-flight work, both in the
        background; this is how a caller waits for either to settle.
        """
        deadline = clock() + timeout_s
        while True:
            record = self.variant(name)
            if record.state in states:
                return record
            if clock() >= deadline:
                raise WattserveError(
                    f"variant {name!r} is still {record.state} after {timeout_s:g} s"
                )
            sleep(poll_s)

    # --- ledger and reports -----------------------------------------------------------

    def ledger(
        self,
        *,
        tenant: str | None = None,
        variant: str | None = None,
        status: LedgerStatus | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[LedgerEntry]:
        """Ledger rows across tenants, newest first; ``since`` naive means UTC."""
        params = ledger_params(tenant=tenant, variant=variant, status=status, since=since,
                               limit=limit)  # fmt: skip
        body = self._request("GET", "/admin/ledger", params=params)
        return self._parse(AdminLedgerPage, body).data

    def report(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        tenant: str | None = None,
    ) -> WindowReport:
        """Outputs, joules and savings by cause, per variant and tenant, in a window."""
        params = report_params(since=since, until=until, tenant=tenant)
        return self._parse(WindowReport, self._request("GET", "/admin/report", params=params))

    def audit(self, *, since: datetime | None = None) -> AuditReport:
        """The shadow audit per (variant, cause, tier): scores, intervals, verdicts."""
        params = report_params(since=since, until=None, tenant=None)
        return self._parse(AuditReport, self._request("GET", "/admin/audit", params=params))

    def restore_demotion(
        self, variant: str, tier: Quality, kind: DemotionKind = "variant"
    ) -> DemotionInfo:
        """Undo a demotion in force: routing uses the pair again, audited afresh."""
        body = validated(DemotionRestore, {"variant": variant, "tier": tier, "kind": kind})
        found = self._request("POST", "/admin/demotions/restore", json=body)
        return self._parse(DemotionInfo, found)

    def profiles(self) -> ProfileList:
        """The energy profile one scheduler replica has learned (for ``wattserve simulate``)."""
        return self._parse(ProfileList, self._request("GET", "/admin/profiles"))
