"""Audit verdicts become demotions: control-plane rows with evidence, undone by the admin."""

from __future__ import annotations

import pytest

from wattserve import NotFound
from wattserve.policies.policy import Policy
from wattserve.scheduler.control_store import ControlStore
from wattserve.scheduler.demotions import Demotions
from wattserve.telemetry.audits import AuditRow, AuditStore


def scored(variant: str, cause: str, tier: str, **scores: float) -> AuditRow:
    return AuditRow(request_id="req", image_index=0, tier=tier, variant=variant, cause=cause,
                    reference_variant="tiny-sd-large", status="scored", joules=1.0,
                    energy_source="simulated",
                    measure="ssim" if "ssim" in scores else "clip_drop", **scores)  # fmt: skip


@pytest.fixture
def books(tmp_path):
    audits = AuditStore(f"sqlite:///{tmp_path}/w.db")
    return audits, Demotions(audits.engine, audits), ControlStore(audits.engine)


def test_a_confident_failure_demotes_its_pair_with_the_evidence_and_routing_sees_it(books):
    audits, demotions, control = books
    policy = Policy(audit_ssim_min=0.6)
    before = control.revision()
    for i in range(7):  # below MIN_SAMPLES: no verdict yet
        audits.record(scored("tiny-sd-large", "approximate", "high", ssim=0.2 + i * 0.01))
        assert demotions.judge(audits.rows()[-1], policy) is None
    audits.record(scored("tiny-sd-large", "approximate", "high", ssim=0.25))
    made = demotions.judge(audits.rows()[-1], policy)
    assert made is not None and made.kind == "approximate" and made.tier == "high"
    assert made.evidence["verdict"] == "fail" and made.evidence["measure"] == "ssim"
    assert made.evidence["audited"] == 8 and "wholly outside" in made.evidence["why"]
    snapshot = control.snapshot()
    assert snapshot.revision > before  # a control-plane change like any other
    assert snapshot.policy.approximate_demoted == {("tiny-sd-large", "high")}
    assert snapshot.policy.demoted == frozenset()
    assert demotions.judge(audits.rows()[-1], policy) is None  # in force: not twice


def test_a_restore_undoes_it_and_old_evidence_cannot_demote_again(books):
    audits, demotions, control = books
    for _ in range(8):
        audits.record(scored("tiny-sd-turbo", "variant_choice", "draft", clip_drop=0.5))
    assert demotions.judge(audits.rows()[-1], Policy()) is not None
    assert control.snapshot().policy.demoted == {("tiny-sd-turbo", "draft")}
    restored = demotions.restore("tiny-sd-turbo", "draft", "variant")
    assert restored.restored_at is not None
    assert control.snapshot().policy.demoted == frozenset()
    with pytest.raises(NotFound):
        demotions.restore("tiny-sd-turbo", "draft", "variant")
    assert demotions.judge(audits.rows()[-1], Policy()) is None  # only audits after it count
    assert [d.restored_at is not None for d in control.snapshot().demotions] == [True]


def test_passing_or_undecided_groups_demote_nothing(books):
    audits, demotions, control = books
    for i in range(12):
        audits.record(scored("tiny-sd-turbo", "variant_choice", "draft", clip_drop=-0.01))
        audits.record(scored("tiny-sd-medium", "variant_choice", "standard",
                             clip_drop=0.05 if i % 2 else -0.05))  # fmt: skip
    for row in audits.rows():
        assert demotions.judge(row, Policy()) is None
    assert control.snapshot().demotions == ()
