"""Rendering for the CLI: rich tables for people, stable JSON and CSV for scripts.

Renderers take SDK models and print; they never call the service. Nothing here prints
a secret: tenant records carry only the key's prefix, and the one API key a command
may show (``tenant create``) is printed by that command itself.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wattserve import LedgerEntry, VariantInfo
from wattserve._admin import (
    AuditGroup,
    AuditReport,
    PolicyInfo,
    TenantInfo,
    VariantRecord,
    WindowReport,
)
from wattserve._schemas import BudgetInfo, ClusterStatus, DemotionInfo, EnergyReport

T = TypeVar("T")

# Piped output is read by people too (logs, CI): give tables room instead of rich's 80.
console = Console(width=None if sys.stdout.isatty() else 132)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def print_json(data: Any) -> None:
    """Print ``data`` (models, lists of models, plain values) as indented JSON."""
    sys.stdout.write(json.dumps(_plain(data), indent=2, sort_keys=False) + "\n")


def out(data: T, json_out: bool, render: Callable[[T], None]) -> None:
    """Print ``data`` as JSON when asked, else with its table renderer."""
    if json_out:
        print_json(data)
    else:
        render(data)


def print_csv(rows: Sequence[BaseModel]) -> None:
    """Print models as CSV with a header of their fields (nested values as JSON)."""
    dumped = [row.model_dump(mode="json") for row in rows]
    if not dumped:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(dumped[0]), lineterminator="\n")
    writer.writeheader()
    for row in dumped:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v
                         for k, v in row.items()})  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, datetime):
        return when(value)
    return str(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a rich table; numbers are right-aligned, None is ``-``."""
    out = Table(title=Text(title, style="table.title"))
    rows = [list(r) for r in rows]
    for index, name in enumerate(columns):
        cells = [r[index] for r in rows if r[index] is not None]
        numeric = bool(cells) and all(_is_number(v) for v in cells)
        if numeric:  # numbers are never cut or wrapped; text wraps if space runs out
            out.add_column(name, justify="right", no_wrap=True, min_width=len(name))
        else:
            out.add_column(name, no_wrap=index == 0, overflow="fold")
    for row in rows:
        out.add_row(*(Text(_cell(v)) for v in row))  # Text: "[...]" in data is not markup
    console.print(out)


def fields(title: str, pairs: Sequence[tuple[str, Any]]) -> None:
    """Print one record as a two-column table of setting and value."""
    table(title, ["setting", "value"], [[name, _cell(value)] for name, value in pairs])


def when(moment: datetime | None) -> str:
    """A time in UTC to the second, or ``never``."""
    if moment is None:
        return "never"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --- control plane -----------------------------------------------------------------------


def budget(info: BudgetInfo, title: str = "budget in force") -> None:
    """The caps and the J/output target, with when they last changed."""
    nodes = ", ".join(f"{node}: {w:,.0f} W" for node, w in sorted(info.node_caps_w.items()))
    fields(title, [
        ("cluster cap W", "uncapped" if info.cluster_cap_w is None else info.cluster_cap_w),
        ("node caps", nodes or "none"),
        ("J/output target", "none" if info.joules_per_output_target is None
         else info.joules_per_output_target),
        ("last changed", f"{when(info.updated_at)} (revision {info.revision})"),
    ])  # fmt: skip


def policy(info: PolicyInfo) -> None:
    """The serving policy in force."""
    fields("serving policy", [
        ("default quality", info.default_quality),
        ("max batch size", info.max_batch_size or "each variant's own"),
        ("max wait ms", info.max_wait_ms),
        ("share unseeded", info.share_unseeded),
        ("cache TTL s", info.cache_ttl_s or "none"),
        ("cache max bytes", f"{info.cache_max_bytes:,}"),
        ("default deadline s", info.default_deadline_s or "none"),
        ("allow anonymous", info.allow_anonymous),
        ("idempotency key TTL s", info.idempotency_ttl_s),
        ("default reuse", info.default_reuse),
        ("exact reuse in pools only", info.pool_exact_reuse),
        ("audit rate", info.audit_rate),
        ("audit tolerances", f"CLIP drop <= {info.audit_clip_drop_max:g}, "
                             f"SSIM >= {info.audit_ssim_min:g}"),
        ("last changed", f"{when(info.updated_at)} (revision {info.revision})"),
    ])  # fmt: skip


def tenants(found: Sequence[TenantInfo]) -> None:
    """Tenants, one row each (key prefix only)."""
    table(
        "tenants",
        ["tenant", "state", "key prefix", "daily kJ", "monthly kJ", "qualities", "req/min",
         "reuse pool", "created"],
        [[t.name, t.state, t.key_prefix, t.daily_kj, t.monthly_kj, ",".join(t.qualities),
          t.rate_limit_per_min,
          (t.reuse_pool or "own") if t.approximate_reuse else "exact only",
          when(t.created_at)] for t in found],
    )  # fmt: skip


def tenant(info: TenantInfo) -> None:
    """One tenant and its energy use against its quotas."""
    tenants([info])
    if info.usage:
        table(
            f"energy used by {info.name}",
            ["window", "used kJ", "quota kJ", "resets"],
            [[u.window, u.used_kj, u.quota_kj, when(u.resets_at)] for u in info.usage],
        )


def variant_records(found: Sequence[VariantRecord]) -> None:
    """Variants with their lifecycle state (the admin view)."""
    table(
        "variants",
        ["variant", "state", "quality", "power W", "steps", "source", "origin", "updated",
         "detail"],
        [[v.name, v.state, v.quality_score, v.power_w, v.steps, v.source, v.origin,
          when(v.updated_at), v.detail] for v in found],
    )  # fmt: skip


def models(found: Sequence[VariantInfo]) -> None:
    """Routable variants with their quality and energy priors (the public view)."""
    table(
        "variants",
        ["variant", "steps", "guidance", "quality", "max px", "J/image prior", "power W"],
        [[v.id, v.steps, v.guidance_scale, v.quality_score, v.max_size_px,
          v.joules_per_image_prior, v.power_w] for v in found],
    )  # fmt: skip


# --- ledger, reports, status -------------------------------------------------------------


def ledger(rows: Sequence[LedgerEntry]) -> None:
    """Ledger rows, newest first."""
    table(
        "ledger (newest first)",
        ["time", "request", "#", "tenant", "variant", "status", "batch", "joules", "source",
         "cache", "latency ms"],
        [[when(r.created_at), r.request_id, r.image_index, getattr(r, "tenant", None),
          r.variant, r.status, r.batch_size, r.joules, r.energy_source, r.cache,
          r.latency_ms] for r in rows],
    )  # fmt: skip


def window_report(found: WindowReport) -> None:
    """A window report: per variant, per tenant, totals, target and savings by cause."""
    span = f"{when(found.since) if found.since else 'start'} .. " + (
        when(found.until) if found.until else "now"
    )
    scope = f"tenant {found.tenant}" if found.tenant else "all tenants"
    columns = ["requests", "outputs", "failed", "pending", "joules", "J/output", "joules by source"]
    for title, rows in (("variant", found.by_variant), ("tenant", found.by_tenant)):
        table(
            f"per {title} ({scope}, {span})",
            [title, *columns],
            [[r.key, r.requests, r.outputs, r.failed_outputs, r.pending_outputs, r.joules,
              r.joules_per_output,
              ", ".join(f"{s} {j:,.1f}" for s, j in sorted(r.joules_by_source.items()))]
             for r in rows],
        )  # fmt: skip
    target = found.joules_per_output_target
    actual = found.joules_per_output
    verdict = "-" if target is None or actual is None else (
        "over target" if actual > target else "within target")  # fmt: skip
    table(
        "totals",
        ["outputs", "joules", "J/output", "J/output target", ""],
        [[found.outputs, found.joules, actual, target, verdict]],
    )
    s = found.savings
    saved = None if s.baseline_joules is None else s.baseline_joules - s.achieved_joules
    table(
        f"savings against {s.baseline} (energy sources: {', '.join(s.energy_sources) or '-'})",
        ["outputs", "baseline J/output", "baseline J", "achieved J", "saved J",
         *(f"{cause} J" for cause in s.by_cause_joules), "audit J", "net saved J"],
        [[s.outputs, s.baseline_joules_per_output, s.baseline_joules, s.achieved_joules,
          saved, *s.by_cause_joules.values(), sum(s.audit_joules.values()),
          s.net_saved_joules]],
    )  # fmt: skip


def books(found: EnergyReport) -> None:
    """The energy books: reconciliation against the devices and per-variant totals."""
    rec = found.reconciliation
    table(
        "reconciliation (since the telemetry agents started)",
        ["device J", "attributed J", "idle J", "unattributed J", "pending J", "error %"],
        [[rec.device_j, rec.attributed_j, rec.idle_j, rec.unattributed_j, rec.pending_j,
          rec.error_pct]],
    )  # fmt: skip
    table(
        "per variant (ledger)",
        ["variant", "requests", "outputs", "failed", "pending", "joules", "J/output", "source"],
        [[v.variant, v.requests, v.outputs, v.failed_outputs, v.pending_outputs, v.joules,
          v.joules_per_output, v.energy_source] for v in found.variants],
    )  # fmt: skip


def status(found: ClusterStatus) -> None:
    """Live power per device, then the budget in force and when it last changed."""
    table(
        f"cluster power {found.cluster_power_w:,.1f} W"
        + (f" (cap {found.power_cap_w:,.0f} W)" if found.power_cap_w is not None else ""),
        ["node", "device", "name", "source", "power W", "avg W (window)", "energy J", "limit W"],
        [[d.node_id[:12], d.index, d.name, d.source, d.power_w, d.power_w_window, d.energy_j,
          d.power_limit_w] for d in found.devices],
    )  # fmt: skip
    budget(found.budget)
    if found.demotions:
        demotions(found.demotions, "demoted by the shadow audit (routing acts on these)")


def demotions(found: Sequence[DemotionInfo], title: str = "demotions") -> None:
    """The audit's demotions, with the verdict each rests on."""
    table(
        title,
        ["variant", "tier", "kind", "evidence", "demoted", "restored", "revision"],
        [[d.variant, d.tier, d.kind, d.evidence.get("why"), when(d.demoted_at),
          when(d.restored_at) if d.restored_at else "in force", d.revision]
         for d in found],
    )  # fmt: skip


def audit(found: AuditReport) -> None:
    """Audit groups with their scores and verdicts, then the demotions."""

    def score(group: AuditGroup, name: str) -> str:
        iv = group.scores.get(name)
        if iv is None:
            return ""
        low, high = iv.ci95
        bounds = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        return f"{iv.mean:.3f}{bounds}"

    clip = found.clip_model or "none (cross-model pairs get no verdict)"
    random = any(g.random_weight_scores for g in found.groups)
    table(
        f"shadow audit at rate {found.audit_rate:g}; CLIP: {clip}"
        + (" (random weights: CLIP scores mean nothing)" if random else ""),
        ["variant", "cause", "tier", "audited", "dropped", "SSIM", "PSNR dB", "CLIP drop",
         "verdict", "on", "J"],
        [[g.variant, g.cause, g.tier, g.audited, g.dropped, score(g, "ssim"),
          score(g, "psnr_db"), score(g, "clip_drop"), g.verdict, g.measure or "-", g.joules]
         for g in found.groups],
    )  # fmt: skip
    spent = ", ".join(f"{j:,.1f} J {src}" for src, j in found.audit_joules.items()) or "0 J"
    console.print(f"audit energy (a cost of proving the savings): {spent}")
    if found.demotions:
        demotions(found.demotions)
