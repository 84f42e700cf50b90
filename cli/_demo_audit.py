"""The demo's shadow audit: a few outputs regenerated on the reference, their scores shown.

The demo raises the policy's audit rate for its own run (and puts it back after), lets
the audit's background work finish once the user workload is done, and reports the
scores per (variant, cause, tier). With the built-in tiny CLIP its text-image scores come
from random weights: they are printed, and labeled as meaning nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from wattserve._admin import AuditReport
from wattserve._admin_client import AdminClient
from wattserve.cli._render import audit as render_audit
from wattserve.cli._render import console

DEMO_AUDIT_RATE = 0.25  # a few audits in a 36-request demo (the default policy's is 0.02)
AUDIT_WAIT_S = 180.0


@contextmanager
def audited(url: str, token: str, rate: float = DEMO_AUDIT_RATE) -> Iterator[AdminClient]:
    """The demo's admin client with the audit rate raised for the run, restored after."""
    with AdminClient(url, token) as admin:
        before = admin.policy().audit_rate
        admin.set_policy(audit_rate=rate)
        try:
            yield admin
        finally:
            admin.set_policy(audit_rate=before)


def finished_audit(admin: AdminClient, deadline_s: float = AUDIT_WAIT_S) -> AuditReport:
    """The audit report once no audit is queued or running (or at the deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = admin.audit()
        if found.pending == 0 or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def audit_section(found: AuditReport, rate: float) -> dict:
    """The demo report's ``audit`` entry."""
    return {
        "rate": rate,
        "clip_model": found.clip_model,
        "random_weight_scores": any(g.random_weight_scores for g in found.groups),
        "note": "scores of served outputs against the reference variant's regeneration "
        "(same prompt, seed, size); the tiny variants and tiny CLIP have random weights, so "
        "the scores exercise the real code path and mean nothing about image quality",
        "joules": found.audit_joules,
        "still_pending": found.pending,
        "report": found.model_dump(mode="json"),  # GET /admin/audit: groups, scores, verdicts
    }


def print_audit(found: AuditReport) -> None:
    """The scores table, labeled, or why there is none."""
    if not found.groups:
        console.print("shadow audit: no output was sampled this run; `wattserve audit` "
                      "shows them on a live service")  # fmt: skip
        return
    render_audit(found)
    console.print("(random-weight scores: the tiny models' numbers exercise the audit's code "
                  "path and mean nothing about image quality)")  # fmt: skip
