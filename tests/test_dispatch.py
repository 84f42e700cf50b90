"""The dispatcher's state machine under a hand-driven clock: what the simulator relies on."""

from __future__ import annotations

from wattserve.policies.catalog import load_catalog
from wattserve.policies.dispatch import DispatchCore

CATALOG = load_catalog()  # large 450 W q0.9, medium 400 W q0.7, turbo 350 W q0.4


def test_a_partial_batch_waits_for_company_then_launches_and_holds_its_replica():
    core = DispatchCore(CATALOG, max_wait_s=0.02)
    tickets = [core.submit("tiny-sd-medium", 64, 64, now_s=0.0, deadline_s=None) for _ in range(3)]
    first = core.step(0.0, None, None)
    assert first.launches == () and first.wake_at_s == 0.02
    launched = core.step(0.02, None, None).launches
    assert [launch.tickets for launch in launched] == [tuple(tickets)]
    assert core.queued_for("tiny-sd-medium") == 8  # one busy replica: a full batch ahead
    core.submit("tiny-sd-medium", 64, 64, now_s=0.03, deadline_s=None)
    assert core.step(1.0, None, None).launches == ()  # its only replica is busy
    core.finished("tiny-sd-medium")
    assert len(core.step(1.0, None, None).launches) == 1 and not core.busy_with("tiny-sd-large")


def test_under_a_cap_work_is_held_then_moved_once_then_refused():
    core = DispatchCore(CATALOG, max_wait_s=0.0, max_hold_s=5.0)
    big = core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, floor=0.0)
    fussy = core.submit("tiny-sd-large", 64, 64, now_s=0.0, deadline_s=None, floor=0.9)
    held = core.step(0.0, cap_w=700, measured_w=280)  # 280 + 450 > 700: held
    assert held.launches == () and held.wake_at_s == 0.1
    moved = core.step(5.0, cap_w=700, measured_w=280)
    assert moved.moved == ((big, "tiny-sd-turbo"),)  # 350 W fits the floor of 0.0
    assert moved.rejected == (fussy,)  # nothing below 450 W is good enough for 0.9
    launched = core.step(5.1, cap_w=700, measured_w=280).launches
    assert [(x.variant, x.tickets, x.moved) for x in launched] == [
        ("tiny-sd-turbo", (big,), (True,))
    ]


def test_withdrawn_outputs_never_launch_and_no_reading_means_no_launch():
    core = DispatchCore(CATALOG, max_wait_s=0.0)
    gone = core.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    assert core.withdraw(gone) and not core.withdraw(gone)
    kept = core.submit("tiny-sd-turbo", 64, 64, now_s=0.0, deadline_s=None)
    assert core.step(0.0, cap_w=1000, measured_w=None).launches == ()
    assert core.step(0.0, cap_w=1000, measured_w=0.0).launches[0].tickets == (kept,)
