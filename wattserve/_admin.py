"""Wire schemas of the control plane: budgets, policies, tenants, variants, reports.

Updates are partial: a field left out of a ``*Update`` body is unchanged, a field sent
as ``null`` is cleared (where clearing means something, e.g. no power cap). Every body
forbids unknown fields, so a typo is a 400 rather than a silently ignored setting.
Limits are deliberately generous but finite: a budget of 10^12 W is a typo, not a plan.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from wattserve._schemas import DemotionInfo, DemotionKind, LedgerEntry, Quality, ReuseMode

ADMIN_TOKEN_FILE = "admin-token"  # in the state dir ($WATTSERVE_HOME), mode 0600
ADMIN_TOKEN_ENV = "WATTSERVE_ADMIN_TOKEN"
MAX_WATTS = 10_000_000.0  # 10 MW: a large datacenter hall; anything above is a typo
MAX_JOULES_PER_OUTPUT = 10_000_000.0
MAX_KJ = 1e12
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
TenantState = Literal["active", "revoked"]
VariantState = Literal["deploying", "active", "retiring", "retired", "failed"]

Watts = Annotated[float, Field(strict=True, gt=0, le=MAX_WATTS, allow_inf_nan=False)]
JoulesPerOutput = Annotated[
    float, Field(strict=True, gt=0, le=MAX_JOULES_PER_OUTPUT, allow_inf_nan=False)
]
KiloJoules = Annotated[float, Field(strict=True, gt=0, le=MAX_KJ, allow_inf_nan=False)]
AuditRate = Annotated[float, Field(strict=False, ge=0, le=1, allow_inf_nan=False)]
# a named pool of approximate reuse that tenants share kept latents in
ReusePool = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


def check_name(kind: str, name: str) -> str:
    """Raise ``ValueError`` unless ``name`` is a safe identifier (lowercase, no spaces)."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} name must be 1-64 of a-z 0-9 . _ - and start with a letter or digit, "
            f"got {name!r}"
        )
    return name


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- budgets -------------------------------------------------------------------------


class BudgetUpdate(_Body):
    """``PUT /admin/budgets``: change the cluster cap, a node's cap or the J/output target."""

    watts: Watts | None = None
    node: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    joules_per_output: JoulesPerOutput | None = None

    @field_validator("node")
    @classmethod
    def _node_hex(cls, node: str | None) -> str | None:
        if node is not None and not re.fullmatch(r"[0-9a-f]{1,64}", node):
            raise ValueError(f"node must be a Ray node id (hex) or its prefix, got {node!r}")
        return node


# --- policies ------------------------------------------------------------------------


class PolicyInfo(BaseModel):
    """The serving policy in force."""

    default_quality: Quality
    max_batch_size: int | None  # None: each variant's own limit
    max_wait_ms: float
    share_unseeded: bool
    cache_ttl_s: float | None
    cache_max_bytes: int
    default_deadline_s: float | None
    allow_anonymous: bool  # whether requests without an API key are served once tenants exist
    idempotency_ttl_s: float  # how long an Idempotency-Key replays its finished request
    default_reuse: ReuseMode = "exact"  # of an unseeded request that names none
    pool_exact_reuse: bool = False  # whether exact reuse (cache, coalescing) stays in pools
    audit_rate: float = 0.02  # share of off-reference outputs the shadow audit regenerates
    audit_clip_drop_max: float = 0.02  # CLIP score drop a cheaper variant may cost
    audit_ssim_min: float = 0.6  # SSIM to the reference a same-model pair must keep
    updated_at: datetime | None
    revision: int


class PolicyUpdate(_Body):
    """``PUT /admin/policies``: the fields to change."""

    default_quality: Quality | None = None
    max_batch_size: Annotated[StrictInt, Field(ge=1, le=256)] | None = None
    max_wait_ms: (
        Annotated[float, Field(strict=True, ge=0, le=60_000, allow_inf_nan=False)] | None
    ) = None
    share_unseeded: StrictBool | None = None
    cache_ttl_s: (
        Annotated[float, Field(strict=True, gt=0, le=10 * 365 * 86400, allow_inf_nan=False)] | None
    ) = None
    cache_max_bytes: Annotated[StrictInt, Field(ge=0, le=1 << 50)] | None = None
    default_deadline_s: (
        Annotated[float, Field(strict=True, gt=0, le=3600, allow_inf_nan=False)] | None
    ) = None
    allow_anonymous: StrictBool | None = None
    idempotency_ttl_s: (
        Annotated[float, Field(strict=True, gt=0, le=30 * 86400, allow_inf_nan=False)] | None
    ) = None
    default_reuse: ReuseMode | None = None
    pool_exact_reuse: StrictBool | None = None
    audit_rate: AuditRate | None = None
    audit_clip_drop_max: (  # a drop of cosine similarities: within [-2, 2]
        Annotated[float, Field(strict=False, ge=-2, le=2, allow_inf_nan=False)] | None
    ) = None
    audit_ssim_min: (
        Annotated[float, Field(strict=False, ge=-1, le=1, allow_inf_nan=False)] | None
    ) = None


# --- tenants -------------------------------------------------------------------------


class QuotaUsage(BaseModel):
    """Energy used in the current window against the quota (if any)."""

    window: Literal["day", "month"]
    used_kj: float
    quota_kj: float | None
    resets_at: datetime


class TenantInfo(BaseModel):
    """A tenant as the admin API shows it (never its key, only the key's prefix)."""

    name: str
    key_prefix: str
    daily_kj: float | None
    monthly_kj: float | None
    qualities: list[Quality]
    rate_limit_per_min: int | None
    approximate_reuse: bool = True
    reuse_pool: str | None = None
    audit_rate: float | None = None  # None: the policy's
    state: TenantState
    created_at: datetime
    revoked_at: datetime | None
    usage: list[QuotaUsage] = []


class TenantCreate(_Body):
    """``POST /admin/tenants``."""

    name: StrictStr
    daily_kj: KiloJoules | None = None
    monthly_kj: KiloJoules | None = None
    qualities: list[Quality] = Field(default=["draft", "standard", "high"], min_length=1)
    rate_limit_per_min: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    approximate_reuse: StrictBool = True
    reuse_pool: ReusePool | None = None
    audit_rate: AuditRate | None = None  # None: the policy's

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_name("tenant", name)


class TenantUpdate(_Body):
    """``PUT /admin/tenants/{name}``: the fields to change (``null`` removes a limit)."""

    daily_kj: KiloJoules | None = None
    monthly_kj: KiloJoules | None = None
    qualities: list[Quality] | None = Field(default=None, min_length=1)
    rate_limit_per_min: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    approximate_reuse: StrictBool | None = None
    reuse_pool: ReusePool | None = None  # null: back to a pool of its own
    audit_rate: AuditRate | None = None  # null: back to the policy's


class TenantCreated(BaseModel):
    """Response of ``POST /admin/tenants``: the API key, shown this once only."""

    tenant: TenantInfo
    api_key: str


class TenantList(BaseModel):
    """Response of ``GET /admin/tenants``."""

    data: list[TenantInfo]


# --- variants ------------------------------------------------------------------------


class VariantRecord(BaseModel):
    """A catalog variant with its lifecycle state."""

    name: str
    state: VariantState
    origin: str  # the catalog file that seeded it, or "admin"
    quality_score: float
    power_w: float
    steps: int
    source: str
    detail: str | None  # why it failed, when it did
    updated_at: datetime


class VariantAdd(_Body):
    """``POST /admin/variants``: one ``[[variant]]`` entry of a catalog file, as TOML text."""

    toml: Annotated[StrictStr, Field(min_length=1, max_length=32 * 1024)]


class VariantList(BaseModel):
    """Response of ``GET /admin/variants``."""

    data: list[VariantRecord]


# --- reports -------------------------------------------------------------------------


class UsageRow(BaseModel):
    """Ledger totals of one group (a variant or a tenant) in the report window."""

    key: str
    requests: int
    outputs: int
    failed_outputs: int  # failed or cancelled
    pending_outputs: int = 0  # accepted, not settled yet
    joules: float
    joules_per_output: float | None
    joules_by_source: dict[str, float]


class SavingsInfo(BaseModel):
    """Achieved joules against a named baseline, the saving split by cause."""

    baseline: str
    baseline_joules_per_output: float | None  # None: no batch-1 reference output to price it
    outputs: int
    baseline_joules: float | None
    achieved_joules: float
    by_cause_joules: dict[str, float]
    energy_sources: list[str]
    # What proving the savings cost: the shadow audit's reference runs in the window, by
    # source; net_saved_joules = baseline - achieved - audit (None: no baseline price).
    audit_joules: dict[str, float] = Field(default_factory=dict)
    net_saved_joules: float | None = None


class WindowReport(BaseModel):
    """Response of ``GET /admin/report`` (and ``/v1/usage`` for one tenant)."""

    since: datetime | None
    until: datetime | None
    tenant: str | None
    outputs: int
    joules: float
    joules_per_output: float | None
    joules_per_output_target: float | None
    by_variant: list[UsageRow]
    by_tenant: list[UsageRow]
    savings: SavingsInfo


class ProfilePoint(BaseModel):
    """What a scheduler replica has learned of one variant at one batch size."""

    variant: str
    batch_size: int
    joules_per_output: float  # EWMA of measured J/output (see the ledger for sources)
    batch_latency_s: float  # EWMA of launch to results back at the scheduler
    batches: int = 0  # batches measured at this size
    mean_joules_per_output: float | None = None  # over all of them
    median_batch_latency_s: float | None = None  # over the most recent of them
    recent_batch_latencies_s: list[float] = Field(default_factory=list)  # those round trips


class ProfileList(BaseModel):
    """Response of ``GET /admin/profiles``: one replica's learned energy profile."""

    replica: str
    energy_sources: list[str]  # the sources of the ledger's joules, for labelling
    data: list[ProfilePoint]
    # median time a served request spends in the scheduler outside any batch, by outcome
    # ("hit": served from the cache; "miss": generated or coalesced), s
    overhead_s: dict[str, float] = Field(default_factory=dict)


class AdminLedgerPage(BaseModel):
    """Response of ``GET /admin/ledger``: newest rows first, with the filters applied."""

    object: Literal["list"] = "list"
    data: list[LedgerEntry]


# --- shadow audit --------------------------------------------------------------------


class DemotionRestore(_Body):
    """``POST /admin/demotions/restore``: undo a demotion (the audit starts afresh)."""

    variant: StrictStr
    tier: Quality
    kind: DemotionKind = "variant"


class ScoreInterval(BaseModel):
    """One score over an audit group: sample size, mean and 95 % interval."""

    n: int
    mean: float
    ci95: list[float | None]  # None: too few to bound


class AuditGroup(BaseModel):
    """Audits of one (served variant, cause, tier) and their verdict."""

    variant: str
    cause: str  # variant_choice | approximate | cache
    tier: str
    reference_variants: list[str]
    audited: int
    dropped: int
    failed: int
    joules: float
    scores: dict[str, ScoreInterval]
    verdict: Literal["pass", "fail", "undecided"]
    measure: str | None  # the score the verdict rests on (None: no score compares them)
    tolerance: float | None
    why: str
    random_weight_scores: bool  # CLIP scores from random weights: the numbers mean nothing


class AuditReport(BaseModel):
    """Response of ``GET /admin/audit``."""

    audit_rate: float
    tolerances: dict[str, float]  # measure -> limit
    clip_model: str | None  # None: no CLIP configured, cross-model pairs get no verdict
    audit_joules: dict[str, float]  # by energy source: what proving the savings cost
    groups: list[AuditGroup]
    demotions: list[DemotionInfo]  # in force and restored, newest first
    pending: int = 0  # audits queued or running on the replica that answered
    overflowed: int = 0  # audits that replica could not queue (its queue was full)
