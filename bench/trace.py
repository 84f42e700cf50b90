"""Workload traces: JSONL files of image requests that every benchmark replays.

A trace file is one header line, ``{"trace": {...}}``, naming exactly how the trace was
made (every ``TraceSpec`` field, the preset, the prompt file's name, sha256 prefix and
prompt count, the format version), then one ``TraceRequest`` per line in arrival order.
``make_trace`` is deterministic: the same spec and prompts give the same requests, byte
for byte once written, so a report can name its trace and anyone can regenerate it.

A spec sets the tier, size and tenant mixes, a repeat rate (a repeat is an exact copy
of an earlier *seeded* request of its tier and size: the same output, which cache or
coalescing can serve), which earlier request a repeat copies (Zipf over that class's
distinct requests ranked by first appearance, Pareto weights, or uniform), the share of
seeded requests, the order new requests take prompts in (``shuffled`` passes, or
``file``: the file's own order, for prompt logs whose order is the signal), and Poisson
or on/off bursty arrivals. ``bench._tracegen`` documents how each is drawn.

The ``diffusiondb`` preset replays ``diffusiondb_prompts_5k.txt`` from the shared data
directory (``$WATTSERVE_DATA_DIR``, else ``../shared/data``) in file order: the first
5,000 prompts DiffusionDB users wrote, where a prompt's edits and re-runs follow it
closely. That file is known by its hash (``SESSION_ORDERED``), so ``--prompts`` naming
it keeps its order by default too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wattserve._schemas import (
    MAX_IMAGES_PER_REQUEST,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    Quality,
    parse_size,
)
from wattserve.bench._tally import Tally
from wattserve.bench._tracegen import draw_requests
from wattserve.bench.profiles import DEFAULT_DATA_DIR

__all__ = [
    "PRESETS",
    "PRESET_PROMPTS",
    "SESSION_ORDERED",
    "PromptSet",
    "PromptSource",
    "Trace",
    "TraceHeader",
    "TraceRequest",
    "TraceSpec",
    "default_order",
    "iter_trace",
    "load_prompts",
    "make_trace",
    "make_trace_file",
    "preset_prompts",
    "preset_spec",
    "read_trace",
    "trace_stats",
    "write_trace",
]

TRACE_VERSION = 1
MAX_TRACE_REQUESTS = 10_000_000
QUALITIES: tuple[Quality, ...] = get_args(Quality)
SHA256_PREFIX_CHARS = 16
SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"

Popularity = Literal["zipf", "pareto", "uniform"]
Arrival = Literal["poisson", "bursty"]
PromptOrder = Literal["shuffled", "file"]
Weight = Annotated[float, Field(ge=0)]

# Presets set the mix; every other field takes TraceSpec's default. All are seeded (so
# repeats are possible, and a baseline replay renders the very same pixels) at 64x64,
# the size the CPU demo variants serve.
PRESETS: dict[str, dict[str, Any]] = {
    "mixed": {"repeat_rate": 0.3, "tiers": {"draft": 50, "standard": 30, "high": 20}},
    "draft-heavy": {"repeat_rate": 0.5, "tiers": {"draft": 80, "standard": 15, "high": 5}},
    # No repeats, all high quality: nothing to cache or coalesce, no cheap variant to
    # pick. The worst case for wattserve.
    "unique-high": {"repeat_rate": 0.0, "tiers": {"high": 1}},
    # Real users' prompts in the order they wrote them, the whole file once. Unseeded and
    # without exact repeats: a DiffusionDB re-run draws a new seed, so only approximate
    # reuse (a similar prompt's latent) can serve it. Tiers as ``mixed``.
    "diffusiondb": {
        "requests": 4999, "repeat_rate": 0.0, "seeded_fraction": 0.0, "prompt_order": "file",
        "tiers": {"draft": 50, "standard": 30, "high": 20},
    },
}  # fmt: skip
PRESET_DEFAULTS: dict[str, Any] = {"requests": 1000, "seed": 0}
# A preset's own prompt file, in the shared data directory (others: the caller's default)
PRESET_PROMPTS: dict[str, str] = {"diffusiondb": "diffusiondb_prompts_5k.txt"}
# Prompt files whose order is a real session's, by sha256 prefix: kept in order by default
SESSION_ORDERED: dict[str, str] = {"406fcf1483b491a1": "diffusiondb_prompts_5k.txt"}


def _canonical_size(size: str) -> str:
    width_px, height_px = parse_size(size)
    return f"{width_px}x{height_px}"


class TraceRequest(BaseModel):
    """One request of a trace: what to send, and when after the trace's start.

    Every check is a declarative constraint, so validation stays in pydantic's compiled
    core: a million requests are built (or read) per trace.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    arrival_s: float = Field(ge=0)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")  # not blank
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    size: str = Field(pattern=SIZE_PATTERN)  # canonical "WxH", as TraceSpec stores sizes
    quality: Quality
    tenant: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)


class TraceSpec(BaseModel):
    """How to make a trace: its length, mix, popularity and arrival process.

    Weights need not sum to 1; they are normalised when drawing. The mixes are stored in
    a canonical order (tiers draft, standard, high; sizes and tenants by name) so the
    same mix always makes the same trace. ``bench._tracegen`` documents the algorithm.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    requests: int = Field(ge=1, le=MAX_TRACE_REQUESTS)
    seed: int = Field(ge=0, le=MAX_SEED)
    repeat_rate: float = Field(ge=0, le=1)  # fraction of requests repeating an earlier one
    popularity: Popularity = "zipf"  # which earlier request a repeat copies
    skew: float = Field(default=1.1, gt=0, le=10)  # Zipf exponent s, or Pareto alpha
    tiers: dict[Quality, Weight]
    sizes: dict[str, Weight] = Field(default_factory=lambda: {"64x64": 1.0})
    seeded_fraction: float = Field(default=1.0, ge=0, le=1)  # of new requests
    prompt_order: PromptOrder = "shuffled"  # how new requests take prompts from the file
    arrival: Arrival = "poisson"
    rate_per_s: float = Field(default=1.0, gt=0, le=1e6)  # within ON windows when bursty
    on_s: float = Field(default=10.0, gt=0)  # bursty only
    off_s: float = Field(default=20.0, gt=0)  # bursty only
    tenants: dict[str, Weight] | None = None  # None: requests carry no tenant

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: dict[Quality, float]) -> dict[Quality, float]:
        _check_weights(tiers)
        return {tier: tiers[tier] for tier in QUALITIES if tier in tiers}

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: dict[str, float]) -> dict[str, float]:
        _check_weights(sizes)
        canonical = {_canonical_size(size): weight for size, weight in sizes.items()}
        if len(canonical) != len(sizes):
            raise ValueError(f"the same size is listed twice in {list(sizes)}")
        return dict(sorted(canonical.items()))

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, tenants: dict[str, float] | None) -> dict[str, float] | None:
        if tenants is None:
            return None
        _check_weights(tenants)
        if any(not name or len(name) > 256 for name in tenants):
            raise ValueError("tenant names must be 1 to 256 characters")
        return dict(sorted(tenants.items()))

    @model_validator(mode="after")
    def _consistent(self) -> TraceSpec:
        if self.repeat_rate > 0 and self.seeded_fraction == 0:
            raise ValueError(
                "repeat_rate > 0 needs seeded_fraction > 0: only seeded requests are "
                "repeated (the scheduler does not share unseeded outputs)"
            )
        if self.popularity == "pareto" and self.skew < 0.1:
            raise ValueError("skew: a Pareto alpha below 0.1 overflows the weights")
        return self


def _check_weights(weights: Mapping[str, float]) -> None:
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("want at least one positive weight")


class PromptSource(BaseModel):
    """The prompt file a trace drew from: its name (no directory), hash and size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    sha256: str  # the first 16 hex digits of the file's sha256
    count: int = Field(ge=1)


class TraceHeader(TraceSpec):
    """A trace file's first line: the spec, plus what it was made from and the format."""

    version: Literal[1] = TRACE_VERSION
    preset: str | None = None  # the preset the spec started from, before any overrides
    prompts: PromptSource


class _HeaderLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trace: TraceHeader


@dataclass(frozen=True)
class Trace:
    """A trace read from a file: how it was made, and its requests in arrival order."""

    header: TraceHeader
    requests: tuple[TraceRequest, ...]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one file, with the ``PromptSource`` a trace header names them by."""

    prompts: tuple[str, ...]
    source: PromptSource


def preset_spec(name: str, **overrides: Any) -> TraceSpec:
    """Preset ``name``'s spec with ``overrides`` applied (requests 1000, seed 0 by default).

    Raises:
        ValueError: ``name`` is not a preset.
        pydantic.ValidationError: an override is out of range.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return TraceSpec(**{**PRESET_DEFAULTS, **PRESETS[name], **overrides})


def preset_prompts(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The prompt file preset ``name`` is made from, or None where the caller chooses."""
    file = PRESET_PROMPTS.get(name)
    return Path(data_dir or DEFAULT_DATA_DIR) / file if file else None


def default_order(prompts: PromptSet) -> PromptOrder:
    """``file`` for a prompt file known to be a session log (``SESSION_ORDERED``)."""
    return "file" if prompts.source.sha256 in SESSION_ORDERED else "shuffled"


def load_prompts(path: str | os.PathLike[str]) -> PromptSet:
    """Read prompts from a ``.tsv`` with a ``Prompt`` column, or one per line otherwise.

    The ``.tsv`` form reads PartiPrompts as published. Blank prompts are skipped.

    Raises:
        OSError: the file cannot be read.
        ValueError: not UTF-8, no ``Prompt`` column, no prompts, or a prompt longer than
            the service accepts (named by line).
    """
    where = Path(path)
    data = where.read_bytes()
    text = data.decode("utf-8")
    if where.suffix.lower() == ".tsv":
        reader = csv.DictReader(io.StringIO(text), delimiter="\t")
        if "Prompt" not in (reader.fieldnames or []):
            raise ValueError(f"{where}: a .tsv prompt file needs a 'Prompt' column")
        numbered = [(reader.line_num, row["Prompt"] or "") for row in reader]
    else:
        numbered = list(enumerate(text.splitlines(), start=1))
    prompts = []
    for line, prompt in numbered:
        if len(prompt.strip()) > MAX_PROMPT_CHARS:
            raise ValueError(f"{where} line {line}: prompt over {MAX_PROMPT_CHARS} characters")
        if prompt.strip():
            prompts.append(prompt.strip())
    if not prompts:
        raise ValueError(f"{where}: no prompts")
    digest = hashlib.sha256(data).hexdigest()[:SHA256_PREFIX_CHARS]
    source = PromptSource(name=where.name, sha256=digest, count=len(prompts))
    return PromptSet(tuple(prompts), source)


# --- generation -----------------------------------------------------------------------


def make_trace(spec: TraceSpec, prompts: Sequence[str]) -> list[TraceRequest]:
    """The requests of ``spec`` drawn from ``prompts``, in arrival order; deterministic."""
    return list(iter_trace(spec, prompts))


def iter_trace(spec: TraceSpec, prompts: Sequence[str]) -> Iterator[TraceRequest]:
    """``make_trace`` one request at a time: memory grows with distinct outputs only.

    Raises:
        ValueError: no prompts, or a blank one or one longer than the service accepts.
    """
    if not prompts:
        raise ValueError("a trace needs at least one prompt")
    for prompt in prompts:
        if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts must be 1 to {MAX_PROMPT_CHARS} characters: {prompt!r}")
    for arrival_s, prompt, seed, size, quality, tenant in draw_requests(spec, prompts):
        yield TraceRequest(arrival_s=arrival_s, prompt=prompt, seed=seed, size=size,
                           quality=quality, tenant=tenant)  # fmt: skip


# --- files ----------------------------------------------------------------------------


def write_trace(
    path: str | os.PathLike[str], header: TraceHeader, requests: Iterable[TraceRequest]
) -> None:
    """Write ``header`` and ``requests`` (in arrival order) as a trace file.

    Writes a temporary file beside ``path`` and renames it, so a failure (including
    ``ValueError`` when the requests do not match the header) leaves no partial trace.
    """
    where = Path(path)
    partial = where.with_name(where.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="\n") as out:
            out.write(_HeaderLine(trace=header).model_dump_json() + "\n")
            count, previous_s = 0, 0.0
            for request in requests:
                if request.arrival_s < previous_s:
                    raise ValueError(f"request {count + 1} arrives before the one ahead of it")
                out.write(request.model_dump_json() + "\n")
                count, previous_s = count + 1, request.arrival_s
        if count != header.requests:
            raise ValueError(f"header says {header.requests} requests, got {count}")
        os.replace(partial, where)
    finally:
        partial.unlink(missing_ok=True)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace file.

    Raises:
        OSError: the file cannot be read.
        ValueError: ``"trace FILE line N: field: why"`` for the first bad line, or the
            request count disagreeing with the header.
    """
    where = Path(path)
    header: TraceHeader | None = None
    requests: list[TraceRequest] = []
    with where.open("rb") as lines:  # bytes: a line that is not UTF-8 is a bad line
        for number, line in enumerate(lines, start=1):
            try:
                if header is None:
                    header = _HeaderLine.model_validate_json(line).trace
                    continue
                request = TraceRequest.model_validate_json(line)
                if requests and request.arrival_s < requests[-1].arrival_s:
                    raise ValueError(
                        f"arrival_s: {request.arrival_s} is before the previous request's "
                        f"{requests[-1].arrival_s} (a trace is in arrival order)"
                    )
                requests.append(request)
            except ValidationError as exc:
                raise ValueError(f"trace {where} line {number}: {_why(exc)}") from None
            except ValueError as exc:
                raise ValueError(f"trace {where} line {number}: {exc}") from None
    if header is None:
        raise ValueError(f'trace {where}: empty, want a header line {{"trace": {{...}}}}')
    if len(requests) != header.requests:
        raise ValueError(
            f"trace {where}: the header says {header.requests} requests, the file has "
            f"{len(requests)}"
        )
    return Trace(header, tuple(requests))


def _why(exc: ValidationError) -> str:
    """``field: why`` for the first error (and how many more there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"]) or "line"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{field}: {first['msg']}{more}"


def make_trace_file(
    path: str | os.PathLike[str], spec: TraceSpec, prompts: PromptSet, preset: str | None = None
) -> tuple[TraceHeader, dict[str, Any]]:
    """Make ``spec``'s trace, write it to ``path``; return its header and ``trace_stats``.

    Streams, so a 10-million-request trace needs memory for its distinct outputs only.
    """
    header = TraceHeader(**spec.model_dump(), preset=preset, prompts=prompts.source)
    tally = Tally()
    write_trace(path, header, map(tally.add, iter_trace(spec, prompts.prompts)))
    return header, tally.summary()


# --- statistics -----------------------------------------------------------------------


def trace_stats(requests: Iterable[TraceRequest]) -> dict[str, Any]:
    """What a trace realised: repeats, distinct outputs, mixes, duration and mean rate.

    A request is a repeat when a seeded request with the same prompt, seed, size and
    quality came before it. Fractions are of requests, rounded to 4 places (stable JSON).
    """
    tally = Tally()
    for request in requests:
        tally.add(request)
    return tally.summary()
