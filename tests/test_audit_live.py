"""The shadow audit on the shared service: measured below tolerance, demoted, restored.

A tolerance no CLIP drop can meet (``audit_clip_drop_max=-2``) makes the audited drafts of
the cheap variant a confident failure once eight are scored: the demotion must then be a
control change visible in ``status``, routing must leave that variant out of ``draft``
(and say why), and ``wattserve audit restore`` must undo it.
"""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from wattserve import AdminClient, Client
from wattserve.cli.main import app

pytestmark = pytest.mark.ray

TIER, SIZE, PROMPT = "draft", "88x64", "a lighthouse at dusk"  # a size no other test asks for


def poll(ready, timeout_s: float = 240.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        found = ready()
        if found:
            return found
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every_s)


def in_force(client: Client) -> list:
    return [d for d in client.status().demotions if d.tier == TIER]


def rejection(route, variant: str) -> str | None:
    return next(c.rejected_because for c in route.candidates if c.variant == variant)


def test_a_measured_failure_demotes_the_variant_visibly_and_the_admin_restores_it(service, url):
    runner = CliRunner()
    with AdminClient(url, service.admin_token) as admin, Client(url) as client:
        admin.set_policy(audit_rate=1.0, audit_clip_drop_max=-2.0)
        try:
            seed = 900
            while not in_force(client):  # the cheap draft variant's audits pile up
                assert seed < 940, "no demotion after 40 audited drafts"
                made = client.generate(PROMPT, size=SIZE, seed=seed, quality=TIER)
                assert made.receipts[0].variant != "tiny-sd-large"  # off the reference
                seed += 1
                # one audit at a time, never beside a user batch: other tests' routing
                # rests on the profile these batches teach (a shared simulated device
                # splits its draw between overlapping batches)
                poll(lambda: admin.audit().pending == 0)
            (demotion,) = in_force(client)
            cheap = demotion.variant
            assert demotion.kind == "variant" and demotion.evidence["verdict"] == "fail"
            assert demotion.evidence["measure"] == "clip_drop"
            assert demotion.evidence["audited"] >= 8 and demotion.evidence["random_weight_scores"]
            report = admin.audit()
            group = next(g for g in report.groups if (g.variant, g.cause, g.tier)
                         == (cheap, "variant_choice", TIER))  # fmt: skip
            assert group.verdict == "fail" and group.scores["clip_drop"].n >= 8
            assert sum(report.audit_joules.values()) > 0
            assert any(d.id == demotion.id for d in report.demotions)
            rerouted = poll(lambda: (r := client.generate(PROMPT, size=SIZE, seed=990,
                                                           quality=TIER)).receipts[0].variant
                            != cheap and r)  # fmt: skip
            assert "audited below tolerance" in rejection(rerouted.route, cheap)
            listed = runner.invoke(app, ["audit", "--url", url, "--json"])
            assert listed.exit_code == 0, listed.output
            assert '"verdict": "fail"' in listed.stdout
            admin.set_policy(audit_rate=0.0)  # no new evidence while it is restored
            restored = runner.invoke(app, ["audit", "restore", cheap, TIER, "--url", url])
            assert restored.exit_code == 0, restored.output
            poll(lambda: not in_force(client))
            again = client.generate(PROMPT, size=SIZE, seed=991, quality=TIER)
            assert rejection(again.route, cheap) is None
            missing = runner.invoke(app, ["audit", "restore", cheap, TIER, "--url", url])
            assert missing.exit_code != 0 and "no variant demotion" in missing.output
        finally:
            admin.set_policy(audit_rate=0.0, audit_clip_drop_max=0.02)
            for d in in_force(client):
                admin.restore_demotion(d.variant, d.tier, d.kind)
