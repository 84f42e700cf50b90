"""Wire schemas: what crosses HTTP between a client and a wattserve service.

The generation endpoint speaks the OpenAI Images API (``POST /v1/images/generations``)
so the official ``openai`` client works unchanged; wattserve's own fields (``seed``,
``quality``, ``deadline_s``, ``negative_prompt``) ride along as extra body fields, and
the per-image energy receipts come back under the ``wattserve`` key.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

Quality = Literal["draft", "standard", "high"]
# "approximate": generated, resumed from a similar prompt's cached latent (steps skipped)
CacheStatus = Literal["miss", "hit", "coalesced", "approximate"]
# exact: same prompt, seed and size give the same bytes; approximate: may resume from a
# similar prompt's intermediate latent (a different image, fewer steps, fewer joules)
ReuseMode = Literal["exact", "approximate"]
EnergySource = Literal["nvml-counter", "nvml-power", "simulated", "estimated"]
# "pending" from the moment a request is accepted until its output is settled, once
LedgerStatus = Literal["pending", "ok", "failed", "cancelled"]
RequestPolicy = Literal["default", "baseline", "competent"]

MAX_PROMPT_CHARS = 2000
MAX_IMAGES_PER_REQUEST = 8
MAX_SEED = 2**63 - 1
DEFAULT_SIZE = "64x64"
AUTO_MODEL = "auto"

# OpenAI's own quality values, accepted so OpenAI-shaped callers need no changes.
_QUALITY_ALIASES: dict[str, Quality] = {
    "draft": "draft",
    "low": "draft",
    "standard": "standard",
    "medium": "standard",
    "auto": "standard",
    "high": "high",
    "hd": "high",
}
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def parse_size(size: str) -> tuple[int, int]:
    """Parse ``"WxH"`` into ``(width_px, height_px)``; raise ``ValueError`` if malformed."""
    match = _SIZE_RE.match(size)
    if match is None:
        raise ValueError(f"size must look like '64x64' (WIDTHxHEIGHT), got {size!r}")
    width_px, height_px = int(match.group(1)), int(match.group(2))
    if width_px <= 0 or height_px <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return width_px, height_px


class ImageGenerationBody(BaseModel):
    """Body of ``POST /v1/images/generations`` (OpenAI shape + wattserve extras)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: StrictStr | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: StrictStr = DEFAULT_SIZE
    response_format: Literal["b64_json"] = "b64_json"
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    negative_prompt: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    quality: StrictStr | None = None  # None: the service policy's default tier
    deadline_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    policy: RequestPolicy = "default"
    reuse: ReuseMode | None = None  # None: exact when seeded, else the policy's default

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    @field_validator("size")
    @classmethod
    def _size_well_formed(cls, size: str) -> str:
        parse_size(size)
        return size

    @field_validator("quality")
    @classmethod
    def _quality_known(cls, quality: str | None) -> str | None:
        if quality is not None and quality not in _QUALITY_ALIASES:
            raise ValueError(
                f"quality must be one of draft, standard, high (or OpenAI's "
                f"low/medium/hd/auto), got {quality!r}"
            )
        return quality

    def to_request(
        self,
        *,
        default_quality: Quality = "standard",
        default_deadline_s: float | None = None,
        tenant: str | None = None,
    ) -> GenerationRequest:
        """Normalise the wire body into the scheduler's request, filling policy defaults."""
        width_px, height_px = parse_size(self.size)
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width_px=width_px,
            height_px=height_px,
            n=self.n,
            seed=self.seed,
            quality=default_quality if self.quality is None else _QUALITY_ALIASES[self.quality],
            deadline_s=self.deadline_s if self.deadline_s is not None else default_deadline_s,
            model=None if self.model in (None, "", AUTO_MODEL) else self.model,
            user=self.user,
            tenant=tenant,
            policy=self.policy,
            reuse=self.reuse,
        )


class GenerationRequest(BaseModel):
    """A validated generation request, as the scheduler sees it."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str | None = None
    width_px: int
    height_px: int
    n: int = 1
    seed: int | None = None
    quality: Quality = "standard"
    deadline_s: float | None = None
    model: str | None = None
    user: str | None = None
    tenant: str | None = None  # set by the service from the API key, never by the body
    # "baseline": what serving costs without wattserve — the highest-quality variant,
    # batch size 1, no cache, no coalescing. "competent": what an engineer would build by
    # hand — each tier on a fixed variant (the cheapest whose declared quality meets it),
    # dynamic batching, no cache, no coalescing, no power-awareness. Both for measuring
    # savings, not for production.
    policy: RequestPolicy = "default"
    reuse: ReuseMode | None = None


class Receipt(BaseModel):
    """What one output cost and how it was made: the unit of the energy ledger."""

    request_id: str
    image_index: int
    variant: str
    batch_id: str
    batch_size: int
    joules: float
    energy_source: EnergySource
    cache: CacheStatus
    latency_ms: float
    # arrival to the launch of the batch that made it (None: no batch of its own: a hit,
    # a coalesced output); the rest of latency_ms is the batch's run and the way back
    launch_ms: float | None = None
    seed: int
    route_reason: str
    width_px: int
    height_px: int
    # approximate reuse: steps of the variant's schedule, how many were skipped by
    # resuming from a cached latent, the prompts' similarity, and the output whose latent
    # it was (shown only to the tenant that owns that output)
    steps: int | None = None
    steps_skipped: int = 0
    similarity: float | None = None
    reuse_source: str | None = None


class ImageDatum(BaseModel):
    """One image in OpenAI's ``data`` list."""

    b64_json: str
    revised_prompt: str | None = None


class CandidateInfo(BaseModel):
    """One variant the router considered for a request."""

    variant: str
    quality_score: float
    expected_joules_per_output: float
    expected_latency_s: float | None
    rejected_because: str | None


class RouteInfo(BaseModel):
    """Why the request went where it went, with every alternative considered."""

    variant: str
    reason: str
    expected_joules_per_output: float
    candidates: list[CandidateInfo]


class WattserveExtension(BaseModel):
    """wattserve's part of a generation response."""

    request_id: str
    route: RouteInfo
    receipts: list[Receipt]


class ImageGenerationResponse(BaseModel):
    """Response of ``POST /v1/images/generations``."""

    created: int
    data: list[ImageDatum]
    wattserve: WattserveExtension


class VariantInfo(BaseModel):
    """A servable variant as listed by ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "wattserve"
    task: str
    steps: int
    guidance_scale: float
    max_size_px: int
    quality_score: float
    quality_provenance: str
    power_w: float
    joules_per_image_prior: float
    energy_prior_provenance: str


class ModelList(BaseModel):
    """Response of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[VariantInfo]


class LedgerEntry(BaseModel):
    """One ledger row on the wire: one output of one request."""

    request_id: str
    image_index: int
    created_at: datetime
    user: str | None
    tenant: str | None = None
    variant: str
    quality: Quality
    batch_id: str
    batch_size: int
    joules: float
    energy_source: EnergySource
    cache: CacheStatus
    status: LedgerStatus
    error: str | None
    latency_ms: float
    launch_ms: float | None = None
    seed: int
    width_px: int
    height_px: int
    steps: int | None = None
    steps_skipped: int = 0
    similarity: float | None = None
    reuse_source: str | None = None


class LedgerPage(BaseModel):
    """Response of ``GET /v1/ledger``: newest rows first."""

    object: Literal["list"] = "list"
    data: list[LedgerEntry]


class Health(BaseModel):
    """Response of ``GET /healthz``."""

    status: Literal["ok"] = "ok"
    variants: list[str]
    version: str
    replica: str | None = None  # which scheduler replica answered
    revision: int | None = None  # the control-plane revision that replica has applied


class DeviceInfo(BaseModel):
    """One device as ``GET /v1/status`` reports it."""

    node_id: str
    id: str
    index: int
    name: str
    source: EnergySource
    power_w: float | None
    power_w_window: float | None
    energy_j: float | None
    power_limit_w: float | None
    utilization_pct: int | None


class NodeInfo(BaseModel):
    """One node's telemetry agent."""

    node_id: str
    source_kind: Literal["nvml", "simulated"]
    power_w: float
    window_s: float
    sample_hz: float
    sampling_cpu_pct: float
    # The node's Ray accelerator type (label ray.io/accelerator-type), None if it has none;
    # optional so that clients older than it still parse.
    device_type: str | None = None


class BudgetInfo(BaseModel):
    """The energy budget in force and when it last changed."""

    cluster_cap_w: float | None  # None: uncapped
    joules_per_output_target: float | None
    node_caps_w: dict[str, float]  # per-node caps, keyed by Ray node id (or its prefix)
    updated_at: datetime | None  # None: never changed since the database was created
    revision: int  # control-plane revision that set it


class AdmissionInfo(BaseModel):
    """The cluster's admission service as one scheduler replica sees it."""

    epoch: int
    measured_w: float | None  # its latest power reading; None: none (nothing starts under a cap)
    pending_w: float  # declared draw of leases not yet visible in that reading
    headroom_w: float | None  # cap - measured - pending; None when uncapped
    leases: int  # live leases, all scheduler replicas together
    warming_up: bool  # a restarted service grants nothing until old work shows in a reading
    replica: str  # the scheduler replica that answered
    lease_round_trips: int  # lease requests this replica timed
    lease_round_trip_ms_p50: float | None
    lease_round_trip_ms_p99: float | None


DemotionKind = Literal["variant", "approximate"]


class DemotionInfo(BaseModel):
    """A (variant, tier) the audit measured below tolerance: a control-plane change."""

    id: int
    variant: str
    tier: Quality
    kind: DemotionKind  # variant: out of the tier; approximate: full generations only
    evidence: dict  # the audit group's verdict, scores and intervals when it was decided
    demoted_at: datetime
    restored_at: datetime | None = None  # set when the admin restored it
    revision: int


class ClusterStatus(BaseModel):
    """Response of ``GET /v1/status``: live power, from the per-node telemetry agents."""

    cluster_power_w: float
    power_cap_w: float | None  # the budget in force; None when uncapped
    budget: BudgetInfo
    nodes: list[NodeInfo]
    devices: list[DeviceInfo]
    admission: AdmissionInfo | None = None  # None: the admission service did not answer
    demotions: list[DemotionInfo] = []  # the audit's, in force: routing acts on them


class ReconciliationInfo(BaseModel):
    """Where the measured device energy went (since the telemetry agents started)."""

    device_j: float
    attributed_j: float
    idle_j: float
    unattributed_j: float
    pending_j: float
    gap_s: float
    failed_attempt_j: float = 0.0  # batch attempts that died or failed: charged to no output
    error_pct: float


class VariantUsage(BaseModel):
    """Ledger totals of one variant."""

    variant: str
    requests: int
    outputs: int
    failed_outputs: int  # failed or cancelled
    pending_outputs: int  # accepted, not settled yet: counted apart, never as served
    joules: float
    joules_per_output: float | None
    energy_source: str  # the one source of all its joules, or "mixed"
    joules_by_source: dict[str, float]


class TargetInfo(BaseModel):
    """The policy's joules-per-output target against the rolling measurement."""

    joules_per_output_target: float | None
    rolling_joules_per_output: float | None  # EWMA over generated outputs, this replica
    over_target: bool


class EnergyReport(BaseModel):
    """Response of ``GET /v1/report``."""

    reconciliation: ReconciliationInfo
    target: TargetInfo
    variants: list[VariantUsage]
